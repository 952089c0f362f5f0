"""Artifact integrity: every file is covered, tampering is caught, loading refuses a bad artifact."""
import json
import shutil
from pathlib import Path

import pytest

from adapterlab.artifact import REQUIRED_FILES, ArtifactError, verify_artifact, write_artifact
from adapterlab.artifact_load import load_verified_adapter, update_artifact_metrics
from adapterlab.config import load_run_config
from adapterlab.models import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture
def artifact(ci_run, tmp_path):
    """A private copy of the run's artifact, free to damage."""
    dst = tmp_path / "artifact"
    shutil.copytree(ci_run.summary["artifact"], dst)
    return dst


def test_fresh_artifact_is_complete_and_verified(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert set(REQUIRED_FILES) <= names   # and the tokenizer with the chat template used, nothing else:
    assert names - set(REQUIRED_FILES) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert verify_artifact(artifact) == []
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["base_model"]["weight_files"][0]["sha256"] and meta["datasets"][0]["examples"] > 0
    assert set(meta["packages"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"}
    assert meta["git"].keys() == {"commit", "dirty"} and meta["hw_profile"] == "cpu"
    card = (artifact / "README.md").read_text()
    assert "base_model: embedded:smollm2-135m-instruct" in card and "How to load" in card


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_one_flipped_byte_in_any_file_is_caught(artifact, name):
    path = artifact / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_artifact(artifact)
    assert problems, f"flipping a byte of {name} went unnoticed"
    # a flipped byte inside checksums.json may land in a recorded hash: then it reads as that file's mismatch
    assert any(p.startswith(name) or "checksums.json" in p or (name == "checksums.json" and "sha256 mismatch" in p)
               for p in problems), problems


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_deleted_file_is_caught(artifact, name):
    (artifact / name).unlink()
    assert any(p.startswith(f"{name}: missing") or p.startswith("checksums.json") for p in verify_artifact(artifact))


def test_added_file_is_caught(artifact):
    (artifact / "extra.bin").write_bytes(b"\0")
    problems = verify_artifact(artifact)
    assert "extra.bin: pickle-capable format refused; adapterlab artifacts hold safetensors only" in problems
    assert any(p.startswith("model.sig: signature by") and "extra.bin" in p for p in problems), problems


def test_consistent_checksums_do_not_hide_a_config_that_lies(artifact):
    """Someone edits r and re-writes checksums: the tensors no longer match the config."""
    cfg_path = artifact / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = cfg["r"] * 2
    cfg_path.write_text(json.dumps(cfg))
    from adapterlab.artifact import write_checksums
    write_checksums(artifact)
    problems = verify_artifact(artifact)
    assert any("rank" in p and p.startswith("adapter_model.safetensors") for p in problems), problems
    assert any(p.startswith("model.sig: signature by") for p in problems), problems


def test_base_model_hash_is_checked(artifact, tmp_path):
    base = Path(resolve_model("embedded:smollm2-135m-instruct").location)
    assert verify_artifact(artifact, base) == []
    fake = tmp_path / "fake-base"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"not the same weights")
    assert verify_artifact(artifact, fake) == [
        f"base model {fake}: model.safetensors differs from the one this adapter was trained on"]


def test_tampered_artifact_is_never_loaded(artifact):
    (artifact / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="refusing to load"):
        load_verified_adapter(artifact)


def test_existing_artifact_is_never_overwritten_silently(ci_run, tmp_path):
    cfg = load_run_config(ci_run.summary["run_dir"])
    base = resolve_model(cfg.model.base_model)
    first = write_artifact(tmp_path, ci_run.model, cfg, metrics={"x": 1}, base=base)
    second = write_artifact(tmp_path, ci_run.model, cfg, metrics={"x": 2}, base=base)
    assert (first.name, second.name) == ("artifact", "artifact-v2")
    assert json.loads((first / "training_metrics.json").read_text()) == {"x": 1}
    replaced = write_artifact(tmp_path, ci_run.model, cfg, metrics={"x": 3}, base=base, overwrite=True)
    assert replaced == first and json.loads((first / "training_metrics.json").read_text()) == {"x": 3}
    assert verify_artifact(first) == [] and not list(tmp_path.glob(".artifact*"))


def test_no_secret_reaches_the_artifact(ci_run, tmp_path, monkeypatch):
    token = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2"
    monkeypatch.setenv("HF_TOKEN", token)
    cfg = load_run_config(ci_run.summary["run_dir"])
    cfg.data.system_prompt = f"use key sk-{'Z' * 24} please"
    art = write_artifact(tmp_path, ci_run.model, cfg, metrics={"note": token}, base=resolve_model(cfg.model.base_model))
    for f in art.iterdir():
        if f.suffix in (".json", ".yaml", ".md"):
            text = f.read_text()
            assert token not in text and "sk-ZZZZ" not in text, f.name


def test_metrics_update_keeps_artifact_verified_but_refuses_tampered(artifact):
    update_artifact_metrics(artifact, {"eval_exact_match": 0.5})
    assert verify_artifact(artifact) == []
    assert json.loads((artifact / "training_metrics.json").read_text())["eval_exact_match"] == 0.5
    (artifact / "README.md").write_text("edited")
    with pytest.raises(ArtifactError):
        update_artifact_metrics(artifact, {"x": 1})


def test_verify_cli_exit_codes(artifact, capsys):
    from adapterlab.cli import main
    assert main(["verify", str(artifact)]) == 0
    (artifact / "metadata.json").write_text("{}")
    assert main(["verify", str(artifact)]) == 1
    assert "metadata.json: sha256 mismatch" in capsys.readouterr().out


def test_replacement_swaps_atomically_and_stale_temp_folders_are_cleaned(tmp_path):
    """Under overwrite the old artifact stays at its name until the new one is there: the two folders are exchanged in
    one rename (renameat2), not removed then renamed. Temp folders of a killed write are removed, a live one's kept."""
    import os
    from adapterlab.artifact import _replace_dir, clean_stale_temp
    final, new = tmp_path / "artifact", tmp_path / ".artifact.tmp-1-x"
    for d, text in ((final, "old"), (new, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    _replace_dir(new, final)
    assert (final / "f").read_text() == "new" and (new / "f").read_text() == "old"   # exchanged, not deleted first
    dead = tmp_path / ".artifact.tmp-999999999-abc"
    old_style = tmp_path / ".artifact-v2.tmp-k3j2x"
    live = tmp_path / f".artifact.tmp-{os.getpid()}-abc"
    other = tmp_path / ".artifact-merged.tmp-abc"
    for d in (dead, old_style, live, other):
        d.mkdir()
    removed = clean_stale_temp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, old_style.name])   # pid 1 (of `new`) is alive
    assert live.exists() and other.exists() and new.exists()
