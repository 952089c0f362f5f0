"""The docs site (adapterlab.docs): README in sync with index.ipynb, a build with a page per module and stage,
and loud failures for a broken notebook or a broken link."""
import base64
import json
import shutil
from pathlib import Path

import pytest

from adapterlab.config import project_root
from adapterlab.docs import build_docs, check_readme, readme_text
from adapterlab.docs_process import DocsBuildError, module_notebooks, page_name, stage_notebooks, tiny_notebook
from adapterlab.pipeline import STAGES

REPO = project_root()
NBS = REPO / "nbs"
# a 1x1 PNG: what a plot output looks like in an executed notebook
PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6360f80f000001010001ff2f36f20000000049454e44ae426082")).decode()


def _fake_run(root: Path) -> Path:
    "A finished run folder whose executed notebooks are the stage sources, train's with a plot output."
    run = root / "20250101-000000-ci-cpu"
    (run / "notebooks").mkdir(parents=True)
    (run / "params.yaml").write_text("{}")
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    for i, stage in enumerate(STAGES):
        nb = json.loads((NBS / f"{stage}.ipynb").read_text())
        if stage == "train":
            nb["cells"].append({"cell_type": "code", "metadata": {}, "source": "plot_loss(run_dir);", "execution_count": 1,
                                "outputs": [{"output_type": "display_data", "metadata": {}, "data": {"image/png": PNG}}]})
        (run / "notebooks" / f"{i:02d}_{stage}.ipynb").write_text(json.dumps(nb))
    return run


def test_readme_in_sync_with_index():
    assert check_readme(), "README.md differs from nbs/index.ipynb: run `adapterlab docs readme`"
    text = readme_text()
    assert "make run" in text and "make test" in text and "](nbs/00_config.ipynb)" in text


def test_readme_check_detects_a_hand_edit(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(NBS, tmp_path / "nbs", ignore=lambda d, names: [n for n in names if n != "index.ipynb"])
    (tmp_path / "README.md").write_text(readme_text())
    assert check_readme(tmp_path)
    (tmp_path / "README.md").write_text(readme_text() + "edited by hand\n")
    assert not check_readme(tmp_path)


@pytest.mark.slow
def test_build_has_a_page_per_module_and_stage(tmp_path):
    run = _fake_run(tmp_path / "runs")
    site = build_docs(run=run, out=tmp_path / "site", work=tmp_path / "work")
    assert (site / "index.html").exists() and "make test" in (site / "index.html").read_text()
    for nb in module_notebooks(NBS):
        page = site / "api" / f"{page_name(nb)}.html"
        assert page.exists(), page
        assert '"c1">#|' not in page.read_text(), f"raw directive comment in a code cell of {page}"
    for nb in stage_notebooks(NBS):
        assert (site / "stages" / f"{page_name(nb)}.html").exists(), nb
    train = (site / "stages" / "train.html").read_text()
    assert "Outputs of run" in train and "data:image/png" in train
    if (NBS / "preference.ipynb").exists():  # a stage the CI run does not execute: its source, marked as such
        assert "Not executed" in (site / "stages" / "preference.html").read_text()
    assert 'show_doc</span><span class="p">(' not in (site / "api" / "docs.html").read_text()  # rendered, not its code
    assert "build_docs" in (site / "api" / "docs.html").read_text()
    # API pages carry the outputs of their examples: the train page's quick real run ends in its verification table
    assert "base weights unchanged by training" in (site / "api" / "train.html").read_text()
    params = (site / "parameters.html").read_text()
    assert "lora.r" in params and "LoRA rank" in params           # the schema as a table
    assert (site / "records" / "0001-no-settings-ini.html").exists()


def test_broken_notebook_fails_the_build(tmp_path):
    nbs = tmp_path / "nbs"
    tiny_notebook(nbs / "00_ok.ipynb", [("markdown", "# Ok"), ("code", "#| export\ndef f(): pass")])
    tiny_notebook(nbs / "01_bad.ipynb", [("markdown", "# Bad"), ("code", "#| export\nraise ValueError('broken on purpose')")])
    (tmp_path / "run" / "notebooks").mkdir(parents=True)
    with pytest.raises(DocsBuildError, match="(?s)01_bad.ipynb.*broken on purpose"):
        build_docs(run=tmp_path / "run", out=tmp_path / "site", nbs=nbs, work=tmp_path / "work")


def test_broken_link_fails_the_build(tmp_path):
    nbs = tmp_path / "nbs"
    tiny_notebook(nbs / "index.ipynb", [("markdown", "# Home\n\nSee [a module that is not there](99_missing.ipynb).")])
    tiny_notebook(nbs / "00_ok.ipynb", [("markdown", "# Ok"), ("code", "#| export\ndef f(): pass")])
    (tmp_path / "run" / "notebooks").mkdir(parents=True)
    with pytest.raises(DocsBuildError, match="mkdocs build --strict failed"):
        build_docs(run=tmp_path / "run", out=tmp_path / "site", nbs=nbs, work=tmp_path / "work")


def test_example_without_output_fails_the_build(tmp_path):
    nbs = tmp_path / "nbs"
    tiny_notebook(nbs / "00_mute.ipynb", [("markdown", "# Mute"), ("code", "#| export\ndef f(): return None"), ("code", "f()"),
                                ("code", "assert f() is None")])
    (tmp_path / "run" / "notebooks").mkdir(parents=True)
    with pytest.raises(DocsBuildError, match="00_mute.ipynb: cell 2: 'f\\(\\)' shows no output"):
        build_docs(run=tmp_path / "run", out=tmp_path / "site", nbs=nbs, work=tmp_path / "work")
    assert not list((REPO / "_proc" / "executed").glob("00_mute*"))   # another project's notebooks: not in ours


def test_every_export_cell_has_an_example_and_a_check_after_it(tmp_path):
    "The fastcore style, counted: `literate_gaps` finds none in the project, and does find a bare export cell."
    import json
    from adapterlab.docs_process import literate_gaps, module_notebooks
    assert [g for p in module_notebooks(project_root() / "nbs") for g in literate_gaps(p)] == []
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": src}
             for src in ("#| export\ndef shown(): return 1", "shown()", "assert shown() == 1",
                         "#| export\ndef bare(): return 2", "assert bare() == 2")]
    nb = tmp_path / "01_x.ipynb"
    nb.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert literate_gaps(nb) == ["01_x.ipynb: cell 3: bare"]
