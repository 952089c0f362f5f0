"""The compat layer: every setting placed where the installed TRL wants it, or a loud error; the all-releases matrix
agrees with what releases actually accept."""
import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from packaging.version import Version

from adapterlab.compat import (SFT_SETTINGS, TRAINERS, CompatError, build_dpo_trainer, build_sft_trainer,
                               check_lora_settings, load_matrix, locate, place_settings, place_sft_settings,
                               probe_surface, setting_history, snapshot_surface)
from adapterlab.compat_adr import add_cli, compat_stage, render_adr, translation_table
from adapterlab.compat_matrix import RegistryError, fetch_release, trl_releases
from adapterlab.compat_surface import SourceTree, read_surface

REQUIRED = ["max_length", "tokenizer", "text_field", "packing", "dataset_kwargs", "formatting_func",
            "completion_only_loss", "assistant_only_loss", "padding_free"]

# What the train stage asks for (the lead's list), with realistic values.
TRAIN_STAGE_SETTINGS = dict(
    max_length=128, completion_only_loss=True, per_device_train_batch_size=2, gradient_accumulation_steps=1,
    num_train_epochs=1, max_steps=3, learning_rate=2e-4, lr_scheduler_type="linear", warmup_ratio=0.1,
    weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_steps=10, save_total_limit=2, seed=42, data_seed=42,
    use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
    gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch", report_to=[],
    full_determinism=False, dataloader_num_workers=0)


def cpu_args(tmp_path) -> dict:
    return {"output_dir": str(tmp_path / "out"), "use_cpu": True, "bf16": False, "report_to": []}


@pytest.fixture(scope="module")
def sft_surface():
    return probe_surface("sft")


@pytest.fixture(scope="module")
def tiny_lm():
    """A factory of (model, tokenizer): SmolLM2's real tokenizer with a fresh 1-layer, 16-wide Llama — the real
    trainer code paths at toy cost."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from adapterlab.models import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct").location)

    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    return make, tok


# --- the seed's story: legacy spellings on the installed release ------------------------------------------------

def test_seed_spellings_that_raised_typeerror_are_placed_on_the_installed_release(tmp_path, sft_surface):
    from trl import SFTConfig, SFTTrainer
    trainer_sig = inspect.signature(SFTTrainer.__init__)
    config_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    # Passed verbatim, the seed's spellings fail on this installation (where they still work, nothing to prove).
    if "max_seq_length" not in config_fields:
        with pytest.raises(TypeError):
            SFTConfig(max_seq_length=64, **cpu_args(tmp_path))
    if "tokenizer" not in trainer_sig.parameters:
        with pytest.raises(TypeError):
            trainer_sig.bind_partial(None, tokenizer=object())

    tok = object()
    given = {"max_seq_length": 64, "tokenizer": tok, "dataset_text_field": "body", "packing": True,
             "dataset_kwargs": {"skip_prepare_dataset": False}, **cpu_args(tmp_path)}
    p = place_settings(given, "sft")
    placed = {s.given: s for s in p.steps}
    assert set(placed) == set(given)                          # nothing dropped
    cfg = SFTConfig(**p.config)                                # the config accepts every keyword placed on it
    for given_name in ("max_seq_length", "dataset_text_field", "packing", "dataset_kwargs"):
        step = placed[given_name]
        assert step.where == "SFTConfig" and step.name in config_fields
        assert getattr(cfg, step.name) == given[given_name]
    assert placed["max_seq_length"].setting == "max_length"
    assert placed["tokenizer"].where == "SFTTrainer" and p.trainer[placed["tokenizer"].name] is tok
    trainer_sig.bind_partial(None, **p.trainer)                # and the trainer accepts what was placed on it


def test_every_train_stage_setting_lands_on_the_installed_config(tmp_path):
    from trl import SFTConfig
    from adapterlab.config import resolve_config
    from adapterlab.compat import sft_settings
    cfg_ci, _ = resolve_config("ci", "cpu")
    for settings in ({**TRAIN_STAGE_SETTINGS, "output_dir": str(tmp_path / "a")}, sft_settings(cfg_ci, tmp_path)):
        p = place_settings(settings, "sft")
        assert [s.given for s in p.steps] == list(settings) and not p.trainer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = SFTConfig(**p.config)
        # only the current API is called: no deprecation warning about a keyword we passed
        deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
        assert not [m for m in deprecations if any(f"`{k}`" in m for k in p.config)], deprecations
        for step in p.steps:
            if step.given == "report_to":            # transformers normalises the list; checked below
                continue
            assert getattr(args, step.name) == settings[step.given], step
        # what tracking asked for (TensorBoard by default when installed), or nothing
        assert args.report_to == (settings["report_to"] or ["none"]) or args.report_to in ([], "none", ["none"])
    # warmup_ratio: kept when transformers still has it, otherwise a fraction of warmup_steps
    placed = {s.given: s for s in place_settings({"warmup_ratio": 0.1}, "sft").steps}
    assert placed["warmup_ratio"].name in ("warmup_ratio", "warmup_steps")


def test_warmup_ratio_that_cannot_be_expressed_fails(sft_surface):
    if "warmup_ratio" in sft_surface.inherited_fields:
        pytest.skip("the installed transformers still has warmup_ratio")
    assert place_settings({"warmup_ratio": 0.25}, "sft").config == {"warmup_steps": 0.25}
    with pytest.raises(CompatError, match=r"warmup_ratio=1.0.*cannot be expressed"):
        place_settings({"warmup_ratio": 1.0}, "sft")


def test_place_sft_settings_returns_config_keywords_and_refuses_trainer_ones():
    assert place_sft_settings({"max_seq_length": 64, "learning_rate": 1e-3}) == {"max_length": 64, "learning_rate": 1e-3}
    with pytest.raises(CompatError, match="formatting_func.*constructor arguments"):
        place_sft_settings({"formatting_func": str})


# --- errors ---------------------------------------------------------------------------------------------------------

def test_unknown_setting_fails_with_the_list_of_valid_names(sft_surface):
    with pytest.raises(CompatError) as e:
        place_settings({"learnin_rate": 1e-3}, "sft")
    msg = str(e.value)
    assert "learnin_rate: unknown setting" in msg and f"trl {sft_surface.trl_version}" in msg
    assert "Did you mean: learning_rate" in msg
    assert all(k in msg for k in SFT_SETTINGS)                      # every canonical name is listed
    assert "per_device_train_batch_size" in msg and "max_seq_length" in msg  # config fields and old spellings too


def test_settings_the_installed_release_cannot_honour_fail_loudly(sft_surface):
    missing = {kind: [r["setting"] for r in translation_table(kind) if r["where"] is None] for kind in TRAINERS}
    assert any(missing.values()), "nothing to check: every known setting exists on this release"
    for kind, names in missing.items():
        matrix = load_matrix(kind)
        for name in names:
            with pytest.raises(CompatError) as e:
                place_settings({name: 1, "learning_rate": 1e-3}, kind)
            msg = str(e.value)
            assert msg.startswith(f"{name}: not available in trl {probe_surface(kind).trl_version}")
            assert TRAINERS[kind].settings[name].alternatives in msg
            lived = [r for r in setting_history(matrix, name) if r["where"]]
            if lived:
                assert f"it was {lived[-1]['where']}({lived[-1]['name']}=…)" in msg
                assert f"Up to trl {lived[-1]['last']}" in msg


def test_all_problems_are_reported_at_once_and_conflicts_are_refused():
    with pytest.raises(CompatError) as e:
        place_settings({"chars_per_token": 3.0, "learning_rate": 1e-3, "learnin_rate": 1}, "sft")
    assert str(e.value).startswith("2 settings cannot be placed") and "chars_per_token" in str(e.value)
    with pytest.raises(CompatError, match="max_length: conflicts with max_seq_length"):
        place_settings({"max_seq_length": 64, "max_length": 128}, "sft")
    assert place_settings({"max_seq_length": 64, "max_length": 64}, "sft").config == {"max_length": 64}
    with pytest.raises(CompatError, match="pass it as an argument of build_sft_trainer"):
        place_settings({"train_dataset": []}, "sft")


def test_older_releases_from_the_snapshot_place_and_refuse_as_they_did():
    matrix = load_matrix("sft")
    # 0.8.6: everything was a trainer argument; 0.11.4: SFTConfig(max_seq_length); both had `tokenizer`.
    old = place_settings({"max_length": 512, "tokenizer": "T", "text_field": "text"}, "sft", snapshot_surface("0.8.6"))
    assert old.trainer == {"max_seq_length": 512, "tokenizer": "T", "dataset_text_field": "text"} and not old.config
    mid = place_settings({"max_length": 512, "tokenizer": "T"}, "sft", snapshot_surface("0.11.4"))
    assert mid.config == {"max_seq_length": 512} and mid.trainer == {"tokenizer": "T"}
    with pytest.raises(CompatError) as e:
        place_settings({"completion_only_loss": True}, "sft", snapshot_surface("0.11.4"))
    first = next(v for v, row in matrix["trl"].items() if row["completion_only_loss"]["where"])
    msg = str(e.value)
    assert "completion_only_loss: not available in trl 0.11.4" in msg
    assert f"Since trl {first} set SFTConfig(completion_only_loss=…)" in msg
    assert "DataCollatorForCompletionOnlyLM" in msg


def test_lora_settings_are_checked_against_the_installed_peft():
    assert check_lora_settings({"r": 8, "lora_alpha": 16}) == {"r": 8, "lora_alpha": 16}
    with pytest.raises(CompatError, match="lora_apha: not a field.*did you mean lora_alpha"):
        check_lora_settings({"lora_apha": 16})


# --- the matrix and the probe agree ---------------------------------------------------------------------------

def test_snapshot_shape_and_coverage():
    for kind in TRAINERS:
        m = load_matrix(kind)
        versions = list(m["trl"])
        assert versions == sorted(versions, key=Version) and len(versions) > 50
        assert all(Version(v) < Version(versions[0]) for v in m["releases_without_trainer"])
        spellings = {n for s in m["settings"].values() for n in s["names"]}
        seen = {e["name"] for row in m["trl"].values() for e in row.values() if e["name"]}
        seen |= {a["name"] for row in m["trl"].values() for e in row.values() for a in e.get("also", [])}
        assert spellings <= seen, f"spellings no release ever used: {spellings - seen}"
        for row in m["trl"].values():
            for e in row.values():
                assert e["where"] in (m["trainer"], m["config"], None) and (e["name"] is None) == (e["where"] is None)
    sft = load_matrix("sft")
    assert all(set(REQUIRED) <= set(row) for row in sft["trl"].values())


def test_installed_source_read_with_ast_agrees_with_inspect_and_the_snapshot():
    import trl
    for kind, spec in TRAINERS.items():
        live = probe_surface(kind)
        read = read_surface(SourceTree.open(Path(trl.__file__).parent), spec, trl.__version__)
        assert read.trainer_params == live.trainer_params
        assert read.config_fields == live.config_fields          # same fields, same declaring TRL class
        assert read.config_base == live.config_base == "TrainingArguments"
        matrix = load_matrix(kind)
        if trl.__version__ not in matrix["trl"]:
            pytest.skip(f"trl {trl.__version__} is newer than the snapshot")
        snap = snapshot_surface(trl.__version__, kind)
        assert snap.trainer_params == live.trainer_params and snap.config_fields == live.config_fields
        for key, setting in spec.settings.items():
            row, now = matrix["trl"][trl.__version__][key], locate(setting, live)
            assert (row["where"], row["name"]) == (now["where"], now["name"]), key


def test_archives_are_read_like_the_installed_folder(tmp_path):
    import trl
    folder = Path(trl.__file__).parent
    whl, sdist = tmp_path / f"trl-{trl.__version__}-py3-none-any.whl", tmp_path / f"trl-{trl.__version__}.tar.gz"
    with zipfile.ZipFile(whl, "w") as z, tarfile.open(sdist, "w:gz") as t:
        for p in folder.rglob("*.py"):
            rel = p.relative_to(folder.parent).as_posix()
            z.write(p, rel)
            t.add(p, f"trl-{trl.__version__}/{rel}")
    spec = TRAINERS["sft"]
    expected = read_surface(SourceTree.open(folder), spec, trl.__version__)
    assert read_surface(SourceTree.open(whl), spec, trl.__version__) == expected
    assert read_surface(SourceTree.open(sdist), spec, trl.__version__) == expected


def run_cli(*argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="adapterlab")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def test_cli_matrix_offline_and_probe(tmp_path):
    code, out = run_cli("compat", "matrix", "--out", str(tmp_path))
    assert code == 0
    assert json.loads((tmp_path / "matrix.json").read_text()) == load_matrix("sft")
    md = (tmp_path / "matrix.md").read_text()
    assert all(f"| `{k}` |" in md for k in REQUIRED) and "## Moves" in md
    assert (tmp_path / "dpo_matrix.md").exists()
    code, out = run_cli("compat", "probe", "--json")
    probe = json.loads(out)
    assert code == 0 and probe["versions"]["trl"] == probe_surface("sft").trl_version
    assert {r["setting"] for r in probe["tables"]["sft"]} == set(SFT_SETTINGS)
    with pytest.raises(CompatError, match="needs --refresh"):
        run_cli("compat", "matrix", "--update-snapshot", "--out", str(tmp_path))


# --- building real trainers -----------------------------------------------------------------------------------

def test_build_sft_trainer_applies_old_spellings(tmp_path, tiny_lm):
    from datasets import Dataset
    from trl import SFTTrainer
    make, tok = tiny_lm
    model = make()
    text = "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up. " * 3
    data = Dataset.from_dict({"body": [text, text[::-1]]})

    class Marked(SFTTrainer):
        pass

    trainer = build_sft_trainer(model, tok, data, {"max_seq_length": 16, "dataset_text_field": "body",
                                                   "packing": False, "max_steps": 1, **cpu_args(tmp_path)},
                                trainer_cls=Marked)
    assert isinstance(trainer, Marked) and trainer.processing_class is tok
    assert trainer.args.max_length == 16 and trainer.args.dataset_text_field == "body"
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert max(lengths) == 16 < len(tok(text)["input_ids"])     # the length setting took effect, not dropped
    with pytest.raises(CompatError, match="given both as an argument and in the settings"):
        build_sft_trainer(model, tok, data, {"tokenizer": object(), **cpu_args(tmp_path)})


def test_build_dpo_trainer_through_the_same_layer(tmp_path, tiny_lm):
    from datasets import Dataset
    make, tok = tiny_lm
    model, ref = make(), make()
    pairs = Dataset.from_dict({"prompt": ["Say hi.", "Say bye."], "chosen": [" hi", " bye"],
                               "rejected": [" no", " never"]})
    trainer = build_dpo_trainer(model, tok, pairs, {"beta": 0.25, "max_length": 32, "max_steps": 1,
                                                    **cpu_args(tmp_path)}, ref_model=ref)
    assert trainer.args.beta == 0.25 and trainer.args.max_length == 32 and trainer.processing_class is tok
    unavailable = [r["setting"] for r in translation_table("dpo") if r["where"] is None]
    for name in unavailable:
        with pytest.raises(CompatError, match=f"^{name}: not available"):
            build_dpo_trainer(model, tok, pairs, {name: 8, **cpu_args(tmp_path)}, ref_model=ref)


# --- the stage ------------------------------------------------------------------------------------------------

def test_compat_stage_writes_the_adr_and_json(tmp_path):
    from adapterlab.config import resolve_config
    from adapterlab.compat import sft_settings
    cfg, _ = resolve_config("ci", "cpu", [f"output.root={tmp_path}"])
    report = compat_stage(cfg, tmp_path / "run")
    adr = (tmp_path / "run" / "compat" / "ADR.md").read_text()
    for section in ("Context", "Decision", "Consequences", "Alternatives considered", "Evidence"):
        assert f"\n## {section}\n" in adr
    for given in sft_settings(cfg, tmp_path / "run"):
        assert f"| `{given}` |" in adr
    assert f"trl {report['versions']['trl']}" in adr and "max_seq_length" in adr
    saved = json.loads((tmp_path / "run" / "compat" / "compat.json").read_text())
    assert saved["run"]["ok"] and len(saved["run"]["steps"]) == len(sft_settings(cfg, tmp_path / "run"))
    assert render_adr(saved) == render_adr(report)        # the JSON holds everything the ADR says



def test_adr_lists_the_releases_the_pipeline_ran_on(tmp_path):
    "The records `make pipeline-oldest` and `make compat-newest` leave: each finished one is listed, oldest TRL first."
    from adapterlab.compat_adr import compat_report, releases_run
    folder = tmp_path / "outputs" / "compat" / "runs"
    folder.mkdir(parents=True)
    def record(label, trl, status):
        pk = {"trl": trl, "transformers": f"tf-{label}", "peft": f"peft-{label}", "torch": "2.13.0+cpu"}
        (folder / f"{label}.json").write_text(json.dumps({"label": label, "status": status, "packages": pk,
                                                          "run_id": f"run-{label}", "seconds": 1.0}))
    record("newest", "1.16.0", "done")
    record("oldest", "0.20.0", "done")
    record("broken", "0.9.0", "failed")
    runs = releases_run(tmp_path)
    assert [r["label"] for r in runs] == ["oldest", "newest"]   # by TRL version, not by file name; failed left out
    report = compat_report()
    report["releases_run"] = runs
    section = render_adr(report).split("### Releases the pipeline has run on")[1]
    for label, trl in (("oldest", "0.20.0"), ("newest", "1.16.0")):
        assert f"| {label} | {trl} | tf-{label} | peft-{label} |" in section and f"`run-{label}`" in section
    assert "broken" not in section
    report["releases_run"] = releases_run(tmp_path / "nowhere")
    assert "none recorded in this checkout yet" in render_adr(report)

@pytest.mark.slow
def test_stage_notebook_runs_under_papermill(tmp_path):
    import papermill
    from adapterlab.config import open_run
    _, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}"], tmp_path / "run")   # as the pipeline does
    nb = Path(__file__).resolve().parents[1] / "nbs" / "compat.ipynb"
    papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                               parameters={"run_dir": str(run_dir)})
    adr = (run_dir / "compat" / "ADR.md").read_text()
    assert "## Decision" in adr and "### This run's settings" in adr
    assert json.loads((run_dir / "compat" / "compat.json").read_text())["run"]["ok"]


# --- the registry: slow, and skipped cleanly when it cannot be reached ----------------------------------------

def _registry_or_skip(fn, *args):
    try:
        return fn(*args)
    except (RegistryError, subprocess.TimeoutExpired, OSError) as e:
        pytest.skip(f"package registry unreachable: {str(e)[:200]}")


@pytest.mark.slow
def test_matrix_covers_every_registry_release_up_to_its_newest():
    releases = _registry_or_skip(trl_releases)
    for kind in TRAINERS:
        m = load_matrix(kind)
        newest = Version(next(reversed(m["trl"])))
        covered = set(m["trl"]) | set(m["releases_without_trainer"])
        missing = [v for v in releases if Version(v) <= newest and v not in covered]
        assert not missing, f"{kind}: releases on the registry missing from the snapshot: {missing}"
        newer = [v for v in releases if Version(v) > newest]
        if newer:
            print(f"{kind}: snapshot predates {newer}; refresh: adapterlab compat matrix --refresh --update-snapshot")


@pytest.mark.slow
def test_a_downloaded_release_reads_as_in_the_snapshot(tmp_path):
    version = "0.9.6"   # SFTConfig's first releases: settings in the config *and* deprecated on the trainer
    archive = _registry_or_skip(fetch_release, version, tmp_path)
    for kind, spec in TRAINERS.items():
        surface = read_surface(SourceTree.open(archive), spec, version)
        assert surface == snapshot_surface(version, kind)


# Two old releases installed for real (no dependencies; a transformers of their era beside them, everything else
# from this venv) in throw-away folders put first on PYTHONPATH. Inside, the translation layer's own live probe runs
# against the real classes — inspect and dataclass fields, imported — and must agree with the matrix read from source.
OLD_RELEASES = ("0.8.6", "0.11.4")
OLD_STACK = ("transformers==4.45.2", "tokenizers==0.20.3", "huggingface_hub==0.25.2", "datasets==2.21.0")
PROBE_SCRIPT = r"""
import dataclasses, json, sys, tempfile, warnings
warnings.simplefilter("ignore")
import trl, transformers
from adapterlab.compat import TRAINERS, locate, place_settings, probe_surface
out = {"trl": trl.__version__, "trl_file": trl.__file__, "transformers": transformers.__version__}
s = probe_surface("sft")
out["surface"] = {"trainer_params": s.trainer_params, "config": s.config, "config_fields": s.config_fields}
out["located"] = {k: locate(v, s) for k, v in TRAINERS["sft"].settings.items()}
p = place_settings({"max_seq_length": 64, "tokenizer": "T", "dataset_text_field": "body", "packing": True,
                    "learning_rate": 1e-3, "output_dir": tempfile.mkdtemp(), "use_cpu": True}, "sft")
out["placed"] = {"config": {k: v for k, v in p.config.items() if k != "output_dir"}, "trainer": p.trainer}
cfg = (trl.SFTConfig if s.config else transformers.TrainingArguments)(**p.config)   # the real class takes them
out["config_values"] = {k: getattr(cfg, k) for k in p.config if k != "output_dir"}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_matrix_agrees_with_old_releases_actually_installed(tmp_path):
    import adapterlab
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target"]
    stack = tmp_path / "stack"
    jobs = [subprocess.Popen(pip + [str(stack), *OLD_STACK], stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    jobs += [subprocess.Popen(pip + [str(tmp_path / v), f"trl=={v}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for v in OLD_RELEASES]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        if job.returncode:
            pytest.skip(f"could not install from the registry: {err.decode()[-300:]}")
    lib = str(Path(adapterlab.__file__).resolve().parents[1])
    probes = {v: subprocess.Popen([sys.executable, "-c", PROBE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / v), str(stack), lib])})
              for v in OLD_RELEASES}
    matrix = load_matrix("sft")
    for version, proc in probes.items():
        out, err = proc.communicate(timeout=600)
        line = next((l for l in out.decode().splitlines() if l.startswith("RESULT ")), None)
        assert line, f"trl {version} probe failed:\n{err.decode()[-3000:]}"
        got = json.loads(line[len("RESULT "):])
        assert got["trl"] == version and got["trl_file"].startswith(str(tmp_path / version))
        snap = snapshot_surface(version, "sft")
        assert got["surface"]["trainer_params"] == snap.trainer_params                 # inspect == ast
        assert got["surface"]["config"] == snap.config
        assert got["surface"]["config_fields"] == snap.config_fields
        for key, entry in matrix["trl"][version].items():
            live = got["located"][key]
            assert (live["where"], live["name"]) == (entry["where"], entry["name"]), (version, key)
        assert got["config_values"] == got["placed"]["config"]   # the real old class kept every value placed on it
        if snap.config:   # SFTConfig era: the data settings in the config, the tokenizer still `tokenizer`
            assert got["placed"]["config"] == {"max_seq_length": 64, "dataset_text_field": "body", "packing": True,
                                               "learning_rate": 1e-3, "use_cpu": True}
            assert got["placed"]["trainer"] == {"tokenizer": "T"}
        else:             # before SFTConfig every SFT setting was an SFTTrainer argument, the rest TrainingArguments
            assert got["placed"]["trainer"] == {"max_seq_length": 64, "tokenizer": "T", "dataset_text_field": "body",
                                                "packing": True}
            assert got["placed"]["config"] == {"learning_rate": 1e-3, "use_cpu": True}
