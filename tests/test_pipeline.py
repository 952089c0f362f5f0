"""The pipeline runner on its failure path: a stage that fails stops the run, says where, and keeps what was done."""
import json
from pathlib import Path

import pytest

from adapterlab.config import HardwareError
from adapterlab.pipeline import StageFailed, read_status, run_pipeline

pytestmark = pytest.mark.slow


def test_a_failing_stage_stops_the_run_naming_stage_cell_and_error(tmp_path):
    good = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    bad = tmp_path / "mostly_bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + "{not json\n" + '{"messages": []}\n', encoding="utf-8")
    lines = []
    with pytest.raises(StageFailed) as failure:
        run_pipeline("ci", "cpu", [f"output.root={tmp_path / 'out'}", f"data.train={bad}"], echo=lines.append)
    message = str(failure.value)
    assert "stage 'data' failed in cell [" in message and "reject" in message.lower(), message
    run_dir = next((tmp_path / "out" / "runs").iterdir())
    assert f"executed notebook (with the full traceback): {run_dir / 'notebooks' / '01_data.ipynb'}" in message
    assert any("data" in l and "FAILED" in l for l in lines), lines
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["stages"]["data"]["status"] == "failed"
    assert "compat" not in status["stages"]                       # nothing ran after the failing stage
    rejects = [json.loads(l) for l in (run_dir / "data" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3]                  # what was done is kept: every reject, with its line
    assert "**failed**" in (run_dir / "report.md").read_text()
    assert (run_dir / "params.yaml").exists() and (run_dir / "notebooks" / "01_data.ipynb").exists()


def test_a_gpu_profile_without_a_gpu_stops_before_any_stage(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(HardwareError, match=r"params/hw/8gb.yaml:\d+: hw profile '8gb' needs a CUDA GPU.*hw.device=cpu"):
        run_pipeline("ci", "8gb", [f"output.root={tmp_path}"], echo=lambda _: None)
    assert not (tmp_path / "runs").exists()               # refused at once: no run folder, no stage started
