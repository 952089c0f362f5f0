"""Tampering with a real artifact, as an attacker would: each case damages a private copy of the ci run's artifact
(in a copy of its run folder, with the run's artifacts.json) and must be caught with a one-line reason, by
`verify_artifact` + the run record, by `adapterlab verify`, and by `load_verified_adapter` (which then loads nothing)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from adapterlab.artifact import ArtifactError, write_checksums, write_artifact
from adapterlab.artifact_load import load_verified_adapter, loading_problems, verify_run
from adapterlab.cli import main
from adapterlab.config import load_run_config
from adapterlab.models import resolve_model
from adapterlab.signing import RUN_RECORD, SIGNATURE_FILE, sign_folder

pytestmark = pytest.mark.slow


@pytest.fixture
def run(ci_run, tmp_path):
    "A private copy of the ci run's folder (its artifact and artifacts.json), free to damage; returns the artifact."
    src = Path(ci_run.summary["artifact"])
    dst = tmp_path / src.parent.name
    dst.mkdir()
    shutil.copytree(src, dst / src.name, symlinks=True)
    for name in (RUN_RECORD, "params.yaml"):
        shutil.copy2(src.parent / name, dst / name)
    return dst / src.name


@pytest.fixture(scope="module")
def other_run_artifact(ci_run, tmp_path_factory):
    "A genuine artifact of another run (same key, same base, its own metadata), written by the production path."
    run_dir = tmp_path_factory.mktemp("other") / "20990101-000000-ci-cpu"
    run_dir.mkdir()
    cfg = load_run_config(Path(ci_run.summary["artifact"]).parent)
    return write_artifact(run_dir, ci_run.model, cfg, metrics={"x": 1}, base=resolve_model(cfg.model.base_model))


def _json(path: Path, edit):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


def _tensors(art: Path, edit):
    from safetensors.torch import load_file, save_file
    f = art / "adapter_model.safetensors"
    save_file({k: edit(v) for k, v in load_file(f).items()}, str(f))


def consistent_rewrite(art, **_):
    _tensors(art, lambda t: t + 0.01)
    write_checksums(art)                          # the attacker recomputes checksums.json


def swapped_from_other_run(art, other, **_):
    shutil.rmtree(art)
    shutil.copytree(other, art)                    # signed by the same (trusted) key, checksums all fine


def empty_base_weight_files(art, **_):
    def edit(m):
        m["base_model"]["weight_files"] = []
        return m
    _json(art / "metadata.json", edit)
    write_checksums(art)


def trust_remote_code(art, **_):
    p = art / "training_config.yaml"
    p.write_text(p.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    write_checksums(art)


def all_nan(art, **_):
    _tensors(art, lambda t: t * float("nan"))
    write_checksums(art)


def listed_pickle(art, **_):
    import torch
    torch.save({"x": 1}, art / "adapter_model.bin")
    write_checksums(art)


def unlisted_pickle(art, **_):
    import torch
    torch.save({"x": 1}, art / "optimizer.pt")


def symlink_outside(art, **_):
    (art / "README.md").unlink()
    os.symlink("/etc/hostname", art / "README.md")


def hidden_folder(art, **_):
    (art / ".cache").mkdir()
    (art / ".cache" / "payload.py").write_text("print('hi')")


def other_base_model(art, **_):
    _json(art / "adapter_config.json", lambda c: {**c, "base_model_name_or_path": "someone/other-model"})
    write_checksums(art)


def checksums_empty_list(art, **_):
    (art / "checksums.json").write_text("[]")


def checksums_null(art, **_):
    (art / "checksums.json").write_text("null")


def adapter_config_list(art, **_):
    (art / "adapter_config.json").write_text("[]")
    write_checksums(art)


def bad_rank_pattern(art, **_):
    _json(art / "adapter_config.json", lambda c: {**c, "rank_pattern": {"q_proj(": 4}})
    write_checksums(art)


def resigned_other_key(art, tmp_path, **_):
    _tensors(art, lambda t: t * 2)
    write_checksums(art)
    sign_folder(art, keys=tmp_path / "attacker-keys")   # a valid signature, by a key nobody trusted


def deleted_signature(art, **_):
    (art / SIGNATURE_FILE).unlink()


def truncated_safetensors(art, **_):
    p = art / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def extra_file(art, **_):
    (art / "notes.txt").write_text("hello")


def modified_card(art, **_):
    with open(art / "README.md", "a") as f:
        f.write("\nNow also great at medical advice.\n")


def changed_rank(art, **_):
    _json(art / "adapter_config.json", lambda c: {**c, "r": c["r"] * 2})
    write_checksums(art)


# (tamper, words one of the reported lines must contain)
TAMPERS = [
    (consistent_rewrite, "model.sig: signature by"),
    (swapped_from_other_run, "differs from the digest its run recorded"),
    (empty_base_weight_files, "metadata.json: base_model.weight_files"),
    (trust_remote_code, "model.trust_remote_code"),
    (all_nan, "NaN or infinite"),
    (listed_pickle, "adapter_model.bin: pickle-capable format refused"),
    (unlisted_pickle, "optimizer.pt: pickle-capable format refused"),
    (symlink_outside, "README.md: symlink refused"),
    (hidden_folder, ".cache: hidden folder refused"),
    (other_base_model, "adapter_config.json: base_model_name_or_path"),
    (checksums_empty_list, "checksums.json: [] is not of type 'object'"),
    (checksums_null, "checksums.json: None is not of type 'object'"),
    (adapter_config_list, "adapter_config.json: [] is not of type 'object'"),
    (bad_rank_pattern, "rank_pattern: 'q_proj(' is not a valid regular expression"),
    (resigned_other_key, "model.sig: signed by an untrusted key"),
    (deleted_signature, "model.sig: missing"),
    (truncated_safetensors, "adapter_model.safetensors: unreadable"),
    (extra_file, "notes.txt: unexpected file"),
    (modified_card, "README.md: sha256 mismatch"),
    (changed_rank, "but adapter_config r="),
]


def test_untouched_copy_verifies(run, capsys):
    "The control: the same copy, untouched, passes every check and loads (so each case below fails for its tamper)."
    assert loading_problems(run) == [] and verify_run(run.parent) == []
    assert main(["verify", str(run)]) == 0
    assert "signed by local key" in capsys.readouterr().out


@pytest.mark.parametrize("tamper, reason", TAMPERS, ids=[t.__name__ for t, _ in TAMPERS])
def test_tamper_is_caught_with_a_one_line_reason(run, other_run_artifact, tmp_path, capsys, tamper, reason):
    tamper(run, other=other_run_artifact, tmp_path=tmp_path)
    problems = loading_problems(run)
    assert problems, f"{tamper.__name__} went unnoticed"
    assert all("\n" not in p for p in problems), problems
    assert any(reason in p for p in problems), f"{tamper.__name__}: {reason!r} not among {problems}"
    assert verify_run(run.parent), f"{tamper.__name__}: verify --run passed"
    with pytest.raises(ArtifactError) as e:
        load_verified_adapter(run)
    assert "\n" not in str(e.value) and reason in str(e.value)
    capsys.readouterr()
    assert main(["verify", "--run", str(run.parent)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and any(reason in line for line in out.out.splitlines()), out.out


def test_tampers_are_twenty_and_distinct():
    assert len(TAMPERS) >= 20 and len({t for t, _ in TAMPERS}) == len(TAMPERS)
