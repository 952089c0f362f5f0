"""The encoder + LoRA + custom-heads path (`adapterlab.heads`) on the real embedded MiniLM and the `heads` sample."""
import argparse
import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adapterlab import heads as H
from adapterlab import heads_train as HT
from adapterlab.config import ConfigError

SAMPLE = Path(H.__file__).parent / "sample_data" / "heads"


@pytest.fixture(scope="module")
def resolved():
    return H.resolve_heads_config("minilm_heads", "cpu")


@pytest.fixture(scope="module")
def minilm(resolved):
    cfg, _, _ = resolved
    encoder, tok, source = H.load_encoder(cfg)
    return encoder, tok, source


@pytest.fixture(scope="module")
def features(resolved):
    _, heads, _ = resolved
    return H.encode_records(H.read_records("sample:heads/train.jsonl"), heads)[0]


# --- parameters ---------------------------------------------------------------------------------------------------

def test_heads_section_is_validated_with_file_and_line():
    cfg, heads, origin = H.resolve_heads_config("minilm_heads", "cpu", ["heads.num_iterations=4"])
    assert heads.num_iterations == 4 and origin["heads.num_iterations"] == "override"
    assert re.fullmatch(r"params/experiments/minilm_heads\.yaml:\d+", origin["heads.target_alignment"])
    with pytest.raises(ConfigError) as e:
        H.resolve_heads_config("minilm_heads", "cpu", ["heads.pooling=max", "heads.target_alignment=stretch"])
    assert "heads.pooling: must be one of cls, mean; got 'max'" in str(e.value)
    assert "heads.target_alignment: must be one of exact, truncate, pad_mask; got 'stretch'" in str(e.value)


def test_encoder_is_the_experiments_not_the_profiles_causal_lm():
    cfg, _, origin = H.resolve_heads_config("minilm_heads", "cpu")
    assert cfg.model.base_model == "embedded:all-minilm-l6-v2" and cfg.hw.base_model is None
    assert "heads path" in origin["hw.base_model"]


def test_experiment_without_heads_section_and_quantized_profile_are_refused():
    with pytest.raises(H.HeadsConfigError, match="heads: missing"):
        H.resolve_heads_config("ci", "cpu")
    with pytest.raises(H.HeadsConfigError, match="hw.quantization=none"):
        H.resolve_heads_config("minilm_heads", "8gb", ["hw.device=cpu"])
    with pytest.raises(H.HeadsConfigError, match="two or more distinct class names"):
        H.resolve_heads_config("minilm_heads", "cpu", ["heads.class_names=[a, a]"])


def test_run_folder_snapshots_roundtrip(tmp_path):
    cfg, heads, run_dir = H.open_heads_run("minilm_heads", "cpu", [f"output.root={tmp_path}", "heads.pooling=cls"])
    assert (run_dir / "params.yaml").exists() and (run_dir / "heads.yaml").exists()
    cfg2, heads2, rd2 = H.open_heads_run(run_dir=run_dir)
    assert (cfg2, heads2, rd2) == (cfg, heads, run_dir) and heads2.pooling == "cls"


# --- guards, one by one -------------------------------------------------------------------------------------------

def test_every_guard_is_registered_with_its_fix():
    assert {g.fix for g in H.GUARDS.values()} == {"#16", "#17", "#18", "#19", "#20"}
    for name in H.GUARDS:
        assert callable(getattr(H, name))


def test_head_size_comes_from_the_model_and_a_disagreeing_yaml_names_both(minilm):
    encoder, _, _ = minilm
    assert H.head_input_size(encoder.config, None) == 384
    with pytest.raises(H.HeadsConfigError) as e:
        H.head_input_size(encoder.config, 512, "exp.yaml:7")
    assert str(e.value).startswith("exp.yaml:7: heads.hidden_size: 512 disagrees") and "config.hidden_size 384" in str(e.value)


@pytest.mark.parametrize("rule,values,expected", [
    ("truncate", [0.4, 0.2, 0.1, 0.05], ([0.4, 0.2, 0.1], [1.0, 1.0, 1.0])),
    ("pad_mask", [0.4, 0.2, 0.1, 0.05], ([0.4, 0.2, 0.1], [1.0, 1.0, 1.0])),
    ("pad_mask", [0.4], ([0.4, 0.0, 0.0], [1.0, 0.0, 0.0])),
    ("exact", [0.4, 0.2, 0.1], ([0.4, 0.2, 0.1], [1.0, 1.0, 1.0])),
])
def test_alignment_rules(rule, values, expected):
    assert H.align_targets(values, 3, rule) == expected


@pytest.mark.parametrize("rule,values,message", [
    ("truncate", [0.4, 0.2], "fewer than the head's 3 outputs"),
    ("exact", [0.4], "the rule is `exact`"),
    ("exact", [0.4, 0.2, 0.1, 0.05], "the rule is `exact`"),
    ("pad_mask", [], "needs at least one"),
])
def test_alignment_rules_refuse_what_they_cannot_fit(rule, values, message):
    with pytest.raises(H.TargetAlignmentError, match=re.escape(message)):
        H.align_targets(values, 3, rule, "t.jsonl:5: improvement")


def test_alignment_counts_are_reported(resolved):
    _, heads, _ = resolved
    rows = H.read_records("sample:heads/train.jsonl")
    _, stats = H.encode_records(rows, heads)
    lengths = [len(r["improvement"]) for _, r in rows]
    assert stats["truncated"] == sum(n > 3 for n in lengths) > 0 and stats["padded"] == sum(n < 3 for n in lengths) > 0


def test_bad_records_are_all_reported_with_file_and_line(resolved, tmp_path):
    _, heads, _ = resolved
    good = json.loads((SAMPLE / "train.jsonl").read_text().splitlines()[0])
    bad = [{**good, "decomposition": ["parallel"] * 5}, {**good, "depth": [1.0, 2.0]}, {**good, "decomposition": "huge"},
           {**good, "improvement": 0.3}, {**good, "improvement": []}, {k: v for k, v in good.items() if k != "depth"}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, *bad]) + "\n")
    with pytest.raises(H.LabelShapeError) as e:
        H.encode_records(H.read_records(path), heads)
    msg = str(e.value)
    assert msg.startswith("6 record(s) do not fit the heads")
    assert "bad.jsonl:2: decomposition: shape (5,), but the class head outputs one class name per example" in msg
    assert "bad.jsonl:3: depth: shape (2,), but the score head outputs one number per example" in msg
    assert "bad.jsonl:4: decomposition: 'huge' is not one of heads.class_names" in msg
    assert "bad.jsonl:5: improvement: shape scalar, but the sequence head outputs a list of numbers" in msg
    assert "bad.jsonl:6: improvement: no values; rule `pad_mask` needs at least one" in msg
    assert "bad.jsonl:7: depth: missing" in msg


def test_collator_returns_a_tensor_of_the_declared_dtype_for_every_field(minilm, features, resolved):
    _, tok, _ = minilm
    cfg, heads, _ = resolved
    batch = H.HeadsCollator(tok, cfg.hw.max_seq_length)(features[:5])
    assert set(batch) == set(H.BATCH_DTYPES)  # BERT's token_type_ids included
    for name, value in batch.items():
        assert isinstance(value, torch.Tensor) and value.dtype == H.BATCH_DTYPES[name], name
    assert batch["sequence_targets"].shape == batch["sequence_mask"].shape == (5, heads.num_iterations)
    with pytest.raises(TypeError, match="no dtype in BATCH_DTYPES"):
        H.tensorize({"depth": [1.0]})
    with pytest.raises(ValueError, match="rows of different lengths"):
        H.tensorize({"sequence_targets": [[0.1], [0.1, 0.2]]})


def test_pooling_is_explicit_and_masked():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert H.pool_hidden_states(hidden, mask, "cls").item() == 1.0
    assert H.pool_hidden_states(hidden, mask, "mean").item() == 2.0
    with pytest.raises(ValueError, match="pooling must be one of"):
        H.pool_hidden_states(hidden, mask, "max")


@pytest.mark.parametrize("pooling", H.POOLINGS)
def test_model_outputs_one_value_per_example_and_a_loss(minilm, features, resolved, pooling):
    import dataclasses
    encoder, tok, _ = minilm
    cfg, heads, _ = resolved
    heads = dataclasses.replace(heads, pooling=pooling)
    model = H.build_heads_model(copy.deepcopy(encoder), heads, cfg.seed).eval()
    batch = H.HeadsCollator(tok, cfg.hw.max_seq_length)(features[:4])
    shapes = H.preflight(model, batch)
    assert shapes == {"class_logits": (4, 3), "score": (4,), "sequence": (4, heads.num_iterations)}
    out = model(**batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and set(out.losses) == {"class", "score", "sequence"}


def test_masked_positions_do_not_count_in_the_loss(minilm, features, resolved):
    encoder, tok, _ = minilm
    cfg, heads, _ = resolved
    model = H.build_heads_model(copy.deepcopy(encoder), heads, cfg.seed).eval()
    batch = H.HeadsCollator(tok, cfg.hw.max_seq_length)(features[:4])
    batch["sequence_mask"][:, 1:] = 0
    with torch.no_grad():
        a = model(**batch).losses["sequence"]
        batch["sequence_targets"][:, 1:] = 1e6  # garbage under the mask
        b = model(**batch).losses["sequence"]
    assert torch.equal(a, b)


def test_preflight_stops_misaligned_targets_before_training(minilm, features, resolved):
    encoder, tok, _ = minilm
    cfg, heads, _ = resolved
    model = H.build_heads_model(copy.deepcopy(encoder), heads, cfg.seed)
    batch = H.HeadsCollator(tok, cfg.hw.max_seq_length)(features[:4])
    with pytest.raises(H.LabelShapeError, match=r"sequence_targets \(4, 7\) for outputs \(4, 3\)"):
        H.preflight(model, {**batch, "sequence_targets": torch.zeros(4, 7)})
    with pytest.raises(H.LabelShapeError, match=r"class label 5 ≥ the head's 3 classes"):
        H.preflight(model, {**batch, "class_labels": torch.tensor([0, 1, 2, 5])})


def test_lora_has_no_task_wrapper_and_saves_the_heads(minilm, resolved):
    from peft import LoraConfig
    encoder, _, _ = minilm
    cfg, heads, _ = resolved
    model = H.build_heads_model(copy.deepcopy(encoder), heads, cfg.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = H.attach_heads_lora(model, LoraConfig(task_type="TOKEN_CLS", target_modules=["query"]))
    assert type(pm).__name__ == "PeftModel" and pm.peft_config["default"].task_type is None
    assert any("Fix #16" in str(w.message) for w in caught), "a dropped setting must not be silent"
    assert set(H.HEAD_MODULES) <= set(pm.peft_config["default"].modules_to_save)
    plain = H.heads_lora_config(cfg)
    assert plain.task_type is None and plain.target_modules == set(cfg.lora.target_modules)


# --- the sample data ----------------------------------------------------------------------------------------------

def test_sample_data_is_what_its_generator_writes(tmp_path):
    readme = (SAMPLE / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "gen.py").write_text(code.replace('Path("lib/adapterlab/sample_data/heads")', f'Path(r"{tmp_path}")'))
    subprocess.run([sys.executable, str(tmp_path / "gen.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


# --- a real training run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    from adapterlab.train import read_metrics
    root = tmp_path_factory.mktemp("heads-run")
    cfg, heads, run_dir = H.open_heads_run("minilm_heads", "cpu", [f"output.root={root}", "train.max_steps=12"])
    result = HT.train_heads(cfg, heads, run_dir)
    return cfg, heads, run_dir, result, read_metrics(run_dir)


@pytest.mark.slow
def test_training_loss_falls(heads_run):
    *_, history = heads_run
    fell, first, last = HT.loss_fell(history, 3)
    assert len([r for r in history if "loss" in r]) == 12
    assert fell, f"mean loss of the first 3 steps {first:.3f}, of the last 3 {last:.3f}"


@pytest.mark.slow
def test_training_only_touches_lora_and_heads_and_leaves_a_verified_artifact(heads_run):
    from adapterlab.artifact import verify_artifact
    cfg, heads, run_dir, result, _ = heads_run
    v = result.summary["verification"]
    assert v["base_tensors_changed"] == [] and v["artifact_problems"] == []
    art = Path(result.summary["artifact"])
    assert verify_artifact(art, H.load_encoder(cfg)[2].location) == []
    adapter_cfg = json.loads((art / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] is None and set(H.HEAD_MODULES) <= set(adapter_cfg["modules_to_save"])
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["heads"]["num_iterations"] == heads.num_iterations and meta["task"] == "encoder_heads"
    assert {d["role"] for d in meta["datasets"]} == {"train", "val", "eval"}
    assert meta["data_stats"]["alignment"]["truncated"] > 0
    metrics = json.loads((art / "training_metrics.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"]


@pytest.mark.slow
def test_saved_adapter_reloads_with_identical_outputs(heads_run):
    cfg, heads, _, result, _ = heads_run
    assert HT.reload_outputs_gap(result) < 1e-5


@pytest.mark.slow
def test_tampered_heads_artifact_is_refused(heads_run, tmp_path):
    import shutil
    from adapterlab.artifact import ArtifactError
    cfg, heads, _, result, _ = heads_run
    copy_dir = tmp_path / "artifact"
    shutil.copytree(result.summary["artifact"], copy_dir)
    data = bytearray((copy_dir / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy_dir / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="adapter_model.safetensors: sha256 mismatch"):
        HT.load_heads_artifact(copy_dir)


def test_cli_registers_heads_train():
    parser = argparse.ArgumentParser()
    HT.add_cli(parser.add_subparsers())
    args = parser.parse_args(["heads-train", "--override", "train.max_steps=2", "--hw", "cpu"])
    assert args.func is HT._cmd_heads_train and args.experiment == "minilm_heads" and args.set == ["train.max_steps=2"]
