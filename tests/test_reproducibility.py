"""Reproducible runs on the CPU: the same params give the same adapter bytes, and a pipeline run killed with SIGKILL
in the middle of training resumes from its last checkpoint to exactly the adapter an uninterrupted run produces."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterlab.artifact import verify_artifact
from adapterlab.config import project_root
from adapterlab.pipeline import read_status

# 4 steps, a checkpoint every 2: a kill after the first checkpoint leaves steps to redo and a checkpoint to redo them from.
# No validation split: the validation loss (two passes per run) proves nothing here and would cost every run its time.
STEPS = 4
RUN_SETTINGS = [f"train.max_steps={STEPS}", "train.save_steps=2", "train.save_total_limit=3", "data.val_fraction=0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "ADAPTERLAB_HOME": str(project_root())}


def adapterlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterlab.cli", *args]


def settings(root: Path) -> list[str]:
    return [a for s in RUN_SETTINGS + [f"output.root={root}"] for a in ("--set", s)]


def adapter_sha256(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "artifact" / "adapter_model.safetensors").read_bytes()).hexdigest()


def train_alone(root: Path, name: str) -> Path:
    "The train stage on its own, in a fresh process: what an uninterrupted run produces."
    run_dir = root / name
    proc = subprocess.run(adapterlab("train", "-f", "ci", "--hw", "cpu", "--run-dir", str(run_dir), *settings(root)),
                          cwd=project_root(), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return train_alone(tmp_path_factory.mktemp("reference"), "run")


@pytest.mark.slow
def test_same_params_give_the_same_adapter_bytes(uninterrupted, tmp_path):
    again = train_alone(tmp_path, "again")
    assert adapter_sha256(again) == adapter_sha256(uninterrupted)
    # the whole trajectory repeats, not only its end
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(again) == losses(uninterrupted) and len(losses(again)) == STEPS


def _complete_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"))


def _kill_after_first_checkpoint(cmd: list[str], run_root: Path, timeout: float = 600) -> Path:
    "Start `cmd` in its own process group; SIGKILL the whole group (papermill's kernel too) once a checkpoint exists."
    proc = subprocess.Popen(cmd, cwd=project_root(), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            runs = [d for d in run_root.glob("runs/*") if (d / "checkpoints").is_dir()]
            if runs and _complete_checkpoints(runs[0]):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return runs[0]
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_adapter(uninterrupted, tmp_path):
    run_dir = _kill_after_first_checkpoint(adapterlab("run", "-f", "ci", "--hw", "cpu", "--until", "train",
                                                      *settings(tmp_path)), tmp_path)
    status = read_status(run_dir)
    assert status["stages"]["train"]["status"] == "running"   # killed: nobody got to write "failed"
    assert not (run_dir / "artifact").exists()
    done_before = _complete_checkpoints(run_dir)
    resumed_step = int(done_before[-1].split("-")[-1])
    logged_before = [l for l in (run_dir / "metrics.jsonl").read_text().splitlines(True)
                     if l.endswith("\n") and json.loads(l)["step"] <= resumed_step]   # (the kill may cut a line short)
    logged_before = [l.rstrip("\n") for l in logged_before]
    assert len(logged_before) >= resumed_step
    by_notebook = run_dir.with_name(run_dir.name + "-notebook")   # the same killed run, continued by Run All below
    shutil.copytree(run_dir, by_notebook)

    proc = subprocess.run(adapterlab("run", "--resume", str(run_dir), "--until", "train"), cwd=project_root(), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data         already done" in proc.stdout and "compat       already done" in proc.stdout
    train_record = (run_dir / "notebooks" / "03_train.ipynb").read_text()
    assert f"resuming from {run_dir / 'checkpoints' / done_before[-1]}" in train_record

    assert adapter_sha256(run_dir) == adapter_sha256(uninterrupted)
    assert verify_artifact(run_dir / "artifact") == []
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))   # rewound to the checkpoint: no step logged twice
    # the steps up to the checkpoint were not trained again: their log lines (wall-clock times included) are the killed
    # process's own, kept as they were
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[:len(logged_before)] == logged_before
    assert read_status(run_dir)["status"] == "stopped after train"

    # the train stage notebook as it is (its `resume` default), run again on the killed run folder: it continues from
    # the last checkpoint too, to the same adapter bytes
    out = tmp_path / "train-again.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(project_root() / "nbs" / "train.ipynb"), str(out),
                           "-p", "run_dir", str(by_notebook), "--cwd", str(project_root() / "nbs")],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {by_notebook / 'checkpoints' / done_before[-1]}" in out.read_text()
    assert adapter_sha256(by_notebook) == adapter_sha256(uninterrupted)
