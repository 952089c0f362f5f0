"""Training on several processes: the accelerate launch configs under params/accelerate/, how hardware profiles name
them, and a real 2-process (gloo) training run on the CPU that produces one verified artifact."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from adapterlab.artifact import verify_artifact
from adapterlab.artifact_load import verify_run
from adapterlab.config import ConfigError, open_run, params_dir, project_root, resolve_config
from adapterlab.models import resolve_model

ENGINES = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}


def accelerate_config(name: str) -> Path:
    return params_dir() / "accelerate" / f"{name}.yaml"


def test_accelerate_configs_load_and_use_only_real_launch_options():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    launch_options = {a.dest for a in launch_command_parser()._actions}
    assert sorted(p.stem for p in (params_dir() / "accelerate").glob("*.yaml")) == sorted(ENGINES)
    for name, engine in ENGINES.items():
        cfg = load_config_from_file(str(accelerate_config(name)))   # accelerate's own reader rejects unknown keys
        assert cfg.distributed_type.value == engine
        assert cfg.num_processes == -1   # the process count is always given on the command line
        raw = yaml.safe_load(accelerate_config(name).read_text())
        # precision, batch, accumulation and clipping come from the hw profile via TrainingArguments, never from here
        assert "mixed_precision" not in raw
        nested = {**(cfg.deepspeed_config or {}), **(cfg.fsdp_config or {})}
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(nested)
        unknown = [k for k in nested if k not in launch_options]   # accelerate silently ignores these: refuse them here
        assert not unknown, (name, unknown)
    assert load_config_from_file(str(accelerate_config("zero3"))).deepspeed_config["zero_stage"] == 3


def test_every_hw_profile_names_an_existing_launch_config():
    for profile in sorted((params_dir() / "hw").glob("*.yaml")):
        cfg, origin = resolve_config("json_contacts", profile.stem)
        assert origin["hw.distributed"] == f"params/hw/{profile.name}:{_line_of(profile, 'distributed')}"
        assert cfg.hw.distributed == "none" or accelerate_config(cfg.hw.distributed).exists(), profile
    with pytest.raises(ConfigError, match="hw.distributed: must be one of none, ddp, zero2, zero3, fsdp"):
        resolve_config("ci", "cpu", ["hw.distributed=horovod"])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _line_of(path: Path, key: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


@pytest.mark.slow
def test_two_process_cpu_training_writes_one_verified_artifact(tmp_path):
    """`accelerate launch` with the cpu profile's config, 2 processes, gloo: the unchanged `adapterlab train`.

    Only the config snapshot is made before launching: the main process prepares the data while the other waits, and
    the training skeleton lets only the main process write; the other rank waits at a barrier, then verifies."""
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}", "train.max_steps=2", "hw.batch_size=2",
                                          "data.val_fraction=0"], tmp_path / "run")
    assert cfg.hw.distributed == "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(cfg.hw.distributed)),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "adapterlab.cli", "train",
           "-f", "ci", "--hw", "cpu", "--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ADAPTERLAB_HOME": str(project_root())}
    proc = subprocess.run(cmd, cwd=project_root(), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    n_train = sum(1 for line in (run_dir / "data" / "train.jsonl").read_text().splitlines() if line.strip())

    # the rank log: rank 0 alone wrote the artifact and the summary; rank 1 waited for it and verified it
    log = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert [l.split(":")[0] for l in log if ": wrote " in l] == ["rank 0/2"], log
    verified = [l for l in log if ": verified " in l]
    assert [l.split(":")[0] for l in verified] == ["rank 1/2"] and verified[0].endswith("no problems"), log

    # two processes really trained: each step consumed 2 (processes) x 2 (per-device batch) examples
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    assert round(state["epoch"] * n_train / (2 * 2)) == 2, state["epoch"]
    # one artifact, no half-written or swapped-out copies beside it, and it verifies against the base weights
    artifacts = sorted(p.name for p in run_dir.iterdir() if "artifact" in p.name and p.name != "artifacts.json")
    assert artifacts == ["artifact"], artifacts
    assert not verify_run(run_dir)   # its digest, recorded once outside it (artifacts.json), matches
    assert verify_artifact(run_dir / "artifact", resolve_model(cfg.model.base_model).location) == []
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["verification"]["base_tensors_changed"] == [] and summary["metrics"]["train_steps"] == 2
