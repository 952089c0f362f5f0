"""The stage notebooks as they are (no parameters: JupyterLab's Run All), one after the other, make one complete run
folder, as `adapterlab run` does: status `done`, a verified artifact, report.md and report.html (issue 19)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from adapterlab.config import project_root
from adapterlab.pipeline import STAGES, ipc_kernel_manager, list_runs, read_status, run_state

REPO = project_root()

# The default experiment of every stage notebook, at the smallest size that still trains, verifies and evaluates
SMALL_DEFAULT = """experiment: json_contacts
seed: 0
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
data: {train: data/train.jsonl, eval: sample:json_contacts/eval.jsonl, val_fraction: 0.1, sampler_check_draws: 1000}
train: {epochs: 1, max_steps: 2, learning_rate: 0.002, save_steps: 2}
eval: {json_schema: sample:json_contacts/schema.json, max_new_tokens: 16, max_examples: 4, bootstrap_samples: 100,
       metrics: [exact_match, json_validity]}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A project of its own (ADAPTERLAB_HOME): the repository's params/, its default experiment made small."
    from adapterlab.readers import resolve_data_path
    home = tmp_path / "project"
    shutil.copytree(REPO / "params", home / "params")
    (home / "data").mkdir()
    sample = resolve_data_path("sample:json_contacts/train.jsonl").read_text().splitlines(keepends=True)
    (home / "data" / "train.jsonl").write_text("".join(sample[:40]))   # 36 to train on, 4 to validate
    (home / "params" / "experiments" / "json_contacts.yaml").write_text(SMALL_DEFAULT)
    monkeypatch.setenv("ADAPTERLAB_HOME", str(home))   # the kernels inherit it
    return home


def _run_all(stage: str, out: Path) -> None:
    "Run All on the notebook, unmodified, in a fresh kernel whose working folder is nbs/ (as JupyterLab does)."
    nb = nbformat.read(REPO / "nbs" / f"{stage}.ipynb", as_version=4)
    try:
        with tempfile.TemporaryDirectory(prefix="adapterlab-kernel-") as sockets:   # (short: a socket path has a limit)
            NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "nbs")}},
                           kernel_manager_class=ipc_kernel_manager(Path(sockets))).execute()
    finally:
        nbformat.write(nb, out / f"{stage}.ipynb")   # what ran, for a failure's reader


@pytest.mark.slow
def test_stage_notebooks_run_as_they_are_make_one_complete_run(project, tmp_path):
    started = time.time()
    for stage in STAGES:
        _run_all(stage, tmp_path)
        runs = sorted((project / "outputs" / "runs").iterdir())
        assert len(runs) == 1, f"after {stage}: {[r.name for r in runs]}"   # every stage continued the same run
        status = read_status(runs[0])
        assert status["stages"][stage]["status"] == "done", status
        if stage != STAGES[-1]:
            assert status["status"] == "incomplete" and run_state(runs[0]) == "incomplete"   # never "done" half-way
    run = runs[0]
    print(f"five stage notebooks: {time.time() - started:.0f}s")
    status = read_status(run)
    assert status["status"] == "done" and status["driver"] == "notebooks" and status["finished_utc"]
    assert [s for s in STAGES if status["stages"][s]["status"] == "done"] == list(STAGES)
    assert run_state(run) == "done" and [r["status"] for r in list_runs(run.parent)] == ["done"]
    report = (run / "report.md").read_text()
    assert "**Verdict:" in report and "Status: **done**" in report and (run / "report.html").exists()
    assert json.loads((run / "provenance.json").read_text())["run_id"] == run.name
    env = {**os.environ, "ADAPTERLAB_HOME": str(project)}
    verify = subprocess.run([sys.executable, "-m", "adapterlab.cli", "verify", "--run", run.name], env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verified 1 artifact(s)" in verify.stdout


def test_a_run_whose_next_stage_another_kernel_holds_is_not_taken_again(tmp_path):
    from adapterlab.pipeline import finish_stage, stage_run_dir
    from adapterlab.tracking import lock_run
    out = [f"output.root={tmp_path}"]
    first = stage_run_dir("data", "ci", "cpu", out)
    assert finish_stage(first) == "incomplete"
    held = lock_run(first)                        # as the kernel of a compat notebook running on it holds it
    try:
        second = stage_run_dir("compat", "ci", "cpu", out)
        assert second != first and read_status(second)["stages"]["compat"]["status"] == "running"
        assert "compat" not in read_status(first)["stages"]
    finally:
        held.release()
    assert finish_stage(second) == "incomplete"
    assert stage_run_dir("compat", "ci", "cpu", out) == first   # free again, and still the newest with data done
    assert finish_stage(first) == "incomplete"


@pytest.mark.slow
def test_a_cell_that_raises_ends_the_stage_failed_and_frees_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from adapterlab.pipeline import stage_run_dir\n"
        f"run_dir = stage_run_dir('data', 'ci', 'cpu', ['output.root={tmp_path}'])"),
        nbformat.v4.new_code_cell("raise ValueError('bad record\\nmore')")])
    with pytest.raises(Exception, match="bad record"):
        with tempfile.TemporaryDirectory(prefix="adapterlab-kernel-") as sockets:
            NotebookClient(nb, timeout=300, kernel_name="python3", kernel_manager_class=ipc_kernel_manager(Path(sockets))).execute()
    (run,) = (tmp_path / "runs").iterdir()
    status = read_status(run)
    assert status["status"] == "failed" and run_state(run) == "failed"
    assert status["stages"]["data"] == {**status["stages"]["data"], "status": "failed", "error": "ValueError: bad record"}
    from adapterlab.pipeline import finish_stage, stage_run_dir
    assert stage_run_dir("data", "ci", "cpu", [f"output.root={tmp_path}"]) == run   # the failed stage is taken again
    assert finish_stage(run) == "incomplete"


def test_no_stage_notebook_checks_with_a_bare_assert():
    """A failed check in a stage names the check, what it measured, what it expected and what to try
    (`adapterlab.config.check`); a bare `assert` says `AssertionError:` and nothing else (issue 26)."""
    import ast
    found = []
    for name in (*STAGES, "preference"):
        nb = nbformat.read(REPO / "nbs" / f"{name}.ipynb", as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
            found += [f"nbs/{name}.ipynb cell {i} line {n.lineno}" for n in ast.walk(ast.parse(source))
                      if isinstance(n, ast.Assert)]
    assert found == [], found


def test_a_failed_stage_check_says_what_it_measured_and_expected():
    from adapterlab.config import CheckFailed, check
    with pytest.raises(CheckFailed) as e:
        check(1.01 < 1e-4, "the artifact reloads to the model that trained", "max |logit difference| 1.01e+00",
              "<= 1e-04 for a float32 base", "load the base as it trained")
    assert str(e.value) == ("check failed: the artifact reloads to the model that trained: measured max |logit "
                            "difference| 1.01e+00, expected <= 1e-04 for a float32 base; load the base as it trained")
