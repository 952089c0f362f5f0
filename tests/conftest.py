"""Shared fixtures. Tests run offline (no model hub) and write only to temporary folders."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# artifacts are signed with the local key: tests use a throw-away key folder, never the user's own key
from adapterlab.config import scratch_dir  # removed when the test session ends

if "ADAPTERLAB_KEYS" not in os.environ: os.environ["ADAPTERLAB_KEYS"] = str(scratch_dir("adapterlab-test-keys-"))

import pytest


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    """One real training run of the `ci` experiment (embedded SmolLM2, a few steps), shared by the tests that
    inspect what training leaves behind. Returns the `TrainResult`."""
    from adapterlab.config import open_run
    from adapterlab.train import run_training
    root = tmp_path_factory.mktemp("ci-run")
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={root}"])
    return run_training(cfg, run_dir)
