"""The pipeline runner: a failing stage stops the run in one line (file:line, log file); a run is `interrupted` when its
process died (SIGKILL) or was stopped (Ctrl-C), and `--resume` continues it; one process per run folder; runs made
without the pipeline get a real status; the stages of a run share one kernel, and each finds it as a new kernel."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterlab.config import HardwareError, open_run, project_root
from adapterlab.pipeline import (HOLD_ENV, StageFailed, StageKernel, list_runs, read_status, run_pipeline,
                                 run_state)
from adapterlab.tracking import RunBusy, lock_run, owner_record

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "ADAPTERLAB_HOME": str(project_root())}


def adapterlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterlab.cli", *args]


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_in_one_line_with_file_line_and_a_log(tmp_path):
    good = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    bad = tmp_path / "mostly_bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + "{not json\n" + '{"messages": []}\n', encoding="utf-8")
    lines = []
    with pytest.raises(StageFailed) as failure:
        run_pipeline("ci", "cpu", [f"output.root={tmp_path / 'out'}", f"data.train={bad}"], echo=lines.append)
    message = str(failure.value)
    run_dir = next((tmp_path / "out" / "runs").iterdir())
    log = run_dir / "logs" / "01_data.log"
    assert "\n" not in message and message.startswith("stage 'data' failed at lib/adapterlab/"), message
    assert "reject" in message.lower() and f"(full traceback: {log})" in message
    assert "Traceback" in log.read_text() or "----" in log.read_text()   # the whole traceback is in the log file
    assert any("data" in l and "FAILED" in l for l in lines), lines
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["stages"]["data"]["status"] == "failed"
    assert "compat" not in status["stages"]                       # nothing ran after the failing stage
    rejects = [json.loads(l) for l in (run_dir / "data" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]                  # what was done is kept: every reject, with its line
    report = (run_dir / "report.md").read_text()
    assert "**failed**" in report and "No verdict yet" in report.split("\n## ")[0]
    assert (run_dir / "params.yaml").exists() and (run_dir / "notebooks" / "01_data.ipynb").exists()


def test_a_gpu_profile_without_a_gpu_stops_before_any_stage(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(HardwareError, match=r"params/hw/8gb.yaml:\d+: hw profile '8gb' needs a CUDA GPU.*hw.device=cpu"):
        run_pipeline("ci", "8gb", [f"output.root={tmp_path}"], echo=lambda _: None)
    assert not (tmp_path / "runs").exists()               # refused at once: no run folder, no stage started
    proc = subprocess.run(adapterlab("run", "--hw", "8gb", "--set", f"output.root={tmp_path}"), cwd=project_root(),
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("runs/*"))


def test_a_second_process_cannot_run_the_same_run_folder(tmp_path):
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}"])
    me = owner_record()
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "stages": {}, "owner": me}))
    held = lock_run(run_dir)
    try:
        with pytest.raises(RunBusy, match=re.escape(f"already being run by pid {os.getpid()} on {me['host']} since {me['since']}")):
            run_pipeline(resume=run_dir, echo=lambda _: None)
        assert run_state(run_dir) == "running"            # the holder is alive
    finally:
        held.release()


def test_runs_made_without_the_pipeline_get_a_real_status(tmp_path):
    _, stage_run = open_run("ci", "cpu", [f"output.root={tmp_path}"])
    assert run_state(stage_run) == "new"
    (stage_run / "train_summary.json").write_text("{}")
    assert run_state(stage_run) == "stage-only: trained"
    _, queue_run = open_run("ci", "cpu", [f"output.root={tmp_path}"], run_dir=tmp_path / "runs" / "q")
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    (queue_run / "queue_train.json").write_text(json.dumps({"state": "running", "pid": dead.pid}))
    assert run_state(queue_run) == "queue interrupted"
    (queue_run / "queue_train.json").write_text(json.dumps({"state": "succeeded", "pid": dead.pid}))
    assert run_state(queue_run) == "queue succeeded"
    _, died = open_run("ci", "cpu", [f"output.root={tmp_path}"], run_dir=tmp_path / "runs" / "died")
    (died / "status.json").write_text(json.dumps({"status": "running", "stages": {},
                                                  "owner": {**owner_record(), "pid": dead.pid}}))
    assert run_state(died) == "interrupted"
    assert {r["id"]: r["status"] for r in list_runs(tmp_path / "runs")}["died"] == "interrupted"


def _start_and_wait_for_a_stage(root: Path, stage: str, timeout: float = 600,
                                sigint=signal.SIG_DFL) -> tuple[subprocess.Popen, Path]:
    """Start `adapterlab run -f ci --until compat` in its own session; return once `stage` is running, held at the
    pipeline's barrier (`hold_point`) inside the stage's kernel: the signal then lands during that stage on any machine,
    however fast the stages before it run. The child's SIGINT disposition is `sigint`: default, as for a job in a
    terminal's foreground, whatever this test process inherited (pytest started in the background by a script has
    SIGINT ignored, and children inherit that)."""
    held = root / f"held-{stage}"
    proc = subprocess.Popen(adapterlab("run", "-f", "ci", "--hw", "cpu", "--until", "compat", "--set",
                                       f"output.root={root}"), cwd=project_root(),
                            env={**ENV, HOLD_ENV: f"{stage}:{held}"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if held.exists():
            (run_dir,) = [s.parent for s in root.glob("runs/*/status.json")]
            assert read_status(run_dir)["stages"][stage]["status"] == "running"
            return proc, run_dir
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"stage {stage} never reached its barrier")


def _resume_finishes(run_dir: Path) -> None:
    proc = subprocess.run(adapterlab("run", "--resume", str(run_dir), "--until", "compat"), cwd=project_root(), env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_status(run_dir)["status"] == "stopped after compat" and run_state(run_dir) == "stopped after compat"


@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_listed_interrupted_and_resumes(tmp_path):
    proc, run_dir = _start_and_wait_for_a_stage(tmp_path, "compat")
    os.killpg(proc.pid, signal.SIGKILL)   # the pipeline and its kernel, as a closed terminal or the OOM killer would
    proc.wait()
    assert read_status(run_dir)["status"] == "running"     # nobody got to write anything else ...
    assert {r["id"]: r["status"] for r in list_runs(tmp_path / "runs")}[run_dir.name] == "interrupted"   # ... yet
    _resume_finishes(run_dir)


@pytest.mark.slow
def test_ctrl_c_stops_a_run_in_one_line_as_interrupted_and_it_resumes(tmp_path):
    proc, run_dir = _start_and_wait_for_a_stage(tmp_path, "compat")
    os.killpg(proc.pid, signal.SIGINT)    # Ctrl-C in a terminal: the whole foreground process group gets SIGINT
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == [f"adapterlab run: interrupted during stage 'compat' after "
                                        f"{err.split(' after ')[1].split('s;')[0]}s; continue with: "
                                        f"adapterlab run --resume {run_dir.name}"], err
    status = read_status(run_dir)
    assert status["status"] == "interrupted" and status["stages"]["compat"]["status"] == "interrupted"
    assert {r["id"]: r["status"] for r in list_runs(tmp_path / "runs")}[run_dir.name] == "interrupted"
    _resume_finishes(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "background-job"])
def test_sigterm_to_the_pipeline_alone_stops_it_as_interrupted(tmp_path, sigint):
    # background-job: `adapterlab run ... &` from a script starts with SIGINT ignored; `kill PID` must still stop it
    proc, run_dir = _start_and_wait_for_a_stage(tmp_path, "data", sigint=sigint)
    proc.send_signal(signal.SIGTERM)      # `kill PID`: the pipeline only, not its kernel
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, (out, err)
    assert "interrupted during stage 'data'" in err and read_status(run_dir)["status"] == "interrupted"


def _notebook(path: Path, source: str) -> str:
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)
    return str(path)


def test_the_next_stage_in_the_shared_kernel_finds_the_last_ones_model_freed(tmp_path):
    import papermill
    build = _notebook(tmp_path / "build.ipynb", "import torch\nmodel = torch.nn.Linear(512, 512)\nmodel   # shown: Out[1] holds it too")
    count = _notebook(tmp_path / "count.ipynb", "import gc, os, torch\n"
                      "print(os.getpid(), sum(isinstance(o, torch.nn.Linear) for o in gc.get_objects()), 'model' in globals())")
    run = lambda nb, i, **engine: papermill.execute_notebook(nb, str(tmp_path / f"out{i}.ipynb"), progress_bar=False,
                                                             **engine).cells[0]
    with StageKernel(tmp_path / "kernel.log") as kernel:
        run(build, 0, **kernel.engine_kwargs())
        unreset = run(count, 1, km=kernel.km).outputs[0].text.split()   # the same kernel, not reset: the probe sees it
        after = run(count, 2, **kernel.engine_kwargs())
        pid = kernel.km.provisioner.pid
    assert unreset[1:] == ["1", "True"]
    assert after.outputs[0].text.split() == [unreset[0], "0", "False"] and after.execution_count == 1
    assert str(pid) == unreset[0]                                      # one kernel process all along ...
    assert not kernel.km.has_kernel                                    # ... shut down when the run ends
