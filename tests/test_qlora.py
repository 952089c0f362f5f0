"""QLoRA for real, on the CPU: a 4-bit NF4 base (double quantization) trains through `adapterlab run --hw cpu-qlora`,
every stage after it runs (DPO too), the artifact records the base it trained on and reloads onto that base to the
trained model's logits within the stated tolerance, a full-precision base is refused unless asked for (and then shown
to move the adapter's outputs), the eval stage answers on both bases, and merge says how far the merged model is
from each."""
import json
from pathlib import Path

import pytest
import torch

from adapterlab.artifact import ArtifactError
from adapterlab.artifact_load import load_verified_adapter, numerics_problems, verify_run
from adapterlab.config import resolve_config
from adapterlab.models import load_base_model, model_numerics
from adapterlab.pipeline import STAGES, read_status, run_pipeline
from adapterlab.train import RELOAD_TOLERANCE, reload_check, reload_logits_gap, reload_tolerance, run_training

pytestmark = pytest.mark.slow

SMALL = ["train.max_steps=3", "train.save_steps=3", "data.val_fraction=0", "eval.max_examples=4",
         "eval.max_new_tokens=24", "eval.bootstrap_samples=200", "preference.max_steps=2"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    "One `adapterlab run --hw cpu-qlora -f ci --also preference` at CI size."
    root = tmp_path_factory.mktemp("qlora-run")
    lines = []
    run_dir = run_pipeline("ci", "cpu-qlora", [f"output.root={root}", *SMALL], stages=STAGES + ("preference",),
                           echo=lines.append)
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A 4-bit run's `TrainResult` (the trained model still in memory), two steps."
    root = tmp_path_factory.mktemp("qlora-train")
    cfg, _ = resolve_config("ci", "cpu-qlora", [f"output.root={root}", "train.max_steps=2", "data.val_fraction=0"])
    return run_training(cfg, root)


def test_a_qlora_run_completes_every_stage_with_a_verified_artifact(qlora_run):
    status = read_status(qlora_run)
    assert status["status"] == "done", status
    assert [s for s, r in status["stages"].items() if r["status"] == "done"] == [*STAGES, "preference"]
    assert verify_run(qlora_run) == []
    numerics = json.loads((qlora_run / "artifact" / "metadata.json").read_text())["numerics"]
    assert numerics["quantization"]["quant_type"] == "nf4" and numerics["quantization"]["double_quant"] is True
    assert set(numerics["base_dtypes"]) == {"float32"}           # embeddings, norms, LM head as PEFT casts them
    assert numerics["adapter_dtype"] == numerics["quantization"]["compute_dtype"]
    losses = [json.loads(l)["loss"] for l in (qlora_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < losses[0], losses
    # the train stage's own reload check, as its notebook printed it
    train_nb = json.loads((qlora_run / "notebooks" / "03_train.ipynb").read_text())
    said = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in train_nb["cells"] for o in c.get("outputs", []))
    gap = float(said.split("max |logit difference| after reload: ")[1].split()[0])
    assert gap <= RELOAD_TOLERANCE[numerics["quantization"]["compute_dtype"]], said


def test_the_eval_stage_answers_on_both_bases_and_says_which_to_serve_on(qlora_run):
    report = json.loads((qlora_run / "eval" / "report.json").read_text())
    full = report["full_base"]
    assert full["trained_on"].startswith("nf4+double quant") and full["full_base"] == "float32"
    assert set(full["metrics"]) == set(report["metrics"])        # the same metrics, each with its interval
    assert all(len(m["ci95"]) == 2 for m in full["metrics"].values())
    assert full["max_logit_gap"] > 0 and full["serve_on"] in ("4-bit", "full") and full["why"]
    rows = (qlora_run / "eval" / "predictions_adapter_full_base.jsonl").read_text().splitlines()
    assert len(rows) == report["n_examples"]
    md = (qlora_run / "eval" / "report.md").read_text()
    assert "## The adapter on the full-precision base" in md and f"**Serve on the {full['serve_on']} base**" in md


def test_the_adapter_reloads_on_the_base_as_trained_within_the_stated_tolerance(trained):
    check = reload_check(trained)
    recorded = json.loads((Path(trained.summary["artifact"]) / "metadata.json").read_text())["numerics"]
    assert check["passed"] and check["gap"] <= check["tolerance"] == RELOAD_TOLERANCE[recorded["quantization"]["compute_dtype"]]
    assert model_numerics(trained.model)["quantization"] == recorded["quantization"]


def test_a_full_precision_base_is_refused_unless_asked_for_and_then_moves_the_outputs(trained):
    art = Path(trained.summary["artifact"])
    tcfg, _ = resolve_config("ci", "cpu", ["hw.dtype=float32"])
    full, _, _ = load_base_model(tcfg)
    assert numerics_problems(art, full) and "trained on a 4-bit nf4 base" in numerics_problems(art, full)[0]
    with pytest.raises(ArtifactError, match=r"numerics.quantization: the adapter trained on a 4-bit nf4 base .* full-precision"):
        load_verified_adapter(art, full)
    # asked for knowingly: it loads, and the outputs move by far more than a faithful reload may
    wrong = reload_logits_gap(trained, base=full, other_base=True)
    assert wrong > 10 * reload_tolerance(tcfg)[0], wrong


def test_merge_dequantizes_the_4bit_base_and_says_how_far_it_is_from_each_base(trained, tmp_path):
    from adapterlab.serve import merge_artifact, merge_check
    art = Path(trained.summary["artifact"])
    merged = merge_artifact(art, tmp_path / "merged")
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["merged_into"] == "the dequantized nf4 base"
    check = merge_check(art, merged)
    # merged into the 4-bit weights themselves: close to base-4bit + adapter, far from full base + adapter
    assert check["merged_vs_trained_base"] < check["merged_vs_full_base"], check
    assert check["merged_vs_trained_base"] < 0.05 * check["adapter_effect"], check


def test_a_4bit_base_with_biases_trains_with_bf16_compute_and_reloads_exactly(tmp_path):
    """Another architecture, the GPU profiles' compute dtype: a tiny random Qwen2 (attention biases on the 4-bit
    layers), NF4 with bf16 compute. bitsandbytes casts a 4-bit layer's bias to the compute dtype on the first forward;
    before `models.prepare_kbit_base` did it first, the freeze check saw 6 base tensors change during training."""
    from adapterlab.models import resolve_model
    from test_architectures import build_tiny_model
    folder = build_tiny_model(tmp_path / "qwen2", "qwen2", None, resolve_model("embedded:smollm2-135m-instruct").location)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg, _ = resolve_config("ci", "cpu-qlora", [f"output.root={tmp_path}", f"model.base_model={folder}", "train.max_steps=2",
                                                "data.val_fraction=0", "hw.compute_dtype=bfloat16"])
    result = run_training(cfg, run_dir)
    assert not result.summary["verification"]["base_tensors_changed"]
    check = reload_check(result)
    assert check["passed"] and check["tolerance"] == RELOAD_TOLERANCE["bfloat16"], check
