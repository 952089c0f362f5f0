"""bf16 where the CPU has it: detection, and the cpu profile's bf16 path (its `hw.dtype: auto`: bf16 base weights, fp32
LoRA weights and optimizer state) trains to the fp32 path's loss and leaves an artifact that reloads exactly; fp32 stays
available with `--set hw.dtype=float32`."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from adapterlab.config import resolve_config
from adapterlab.precision import (BF16_MATMUL_TOLERANCE, BF16_MIN_SPEEDUP, NATIVE_BF16_FLAGS, bf16_support, cpu_flags,
                                  resolve_dtype, with_resolved_dtypes)

BF16 = bf16_support("cpu")
needs_bf16 = pytest.mark.skipif(not BF16["supported"], reason=f"this CPU has no fast bf16: {BF16['reason']}")

# Loss equality, relative. Step 1 runs the same initial weights on the same batch, so only the forward's precision
# differs (bf16 keeps 8 mantissa bits: a fraction of a percent per matmul); after the last step the two runs have
# also taken different optimizer steps from slightly different gradients, so the tolerance is wider.
FIRST_STEP_RTOL = 0.02
FINAL_RTOL = 0.10


def test_detection_agrees_with_the_cpu_and_torch():
    flags = cpu_flags() & set(NATIVE_BF16_FLAGS)
    assert sorted(flags) == BF16["native_bf16_flags"]
    assert BF16["onednn_bf16"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not flags or not BF16["onednn_bf16"]:
        assert not BF16["supported"]
    else:   # the measured check decided: a correct bf16 matmul, not much slower than fp32
        assert BF16["supported"] == (BF16["matmul_rel_error"] <= BF16_MATMUL_TOLERANCE
                                     and BF16["gflops_bf16_256"] >= BF16_MIN_SPEEDUP * BF16["gflops_fp32_256"])
    cfg, _ = resolve_config("ci", "cpu")
    assert cfg.hw.dtype == "auto"      # the cpu profile as shipped: bf16 exactly where this check says so
    assert resolve_dtype(cfg) == ("bfloat16" if BF16["supported"] else "float32")
    assert resolve_dtype(cfg, half_ok=False) == "float32"     # the heads path's full precision
    fp32, _ = resolve_config("ci", "cpu", ["hw.dtype=float32"])
    assert with_resolved_dtypes(fp32).hw.dtype == "float32"   # fp32 stays available


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    "The ci run again with `--set hw.dtype=float32`: the reference for the cpu profile's `ci_run` (bf16 weights here)."
    from adapterlab.config import open_run
    from adapterlab.train import run_training
    root = tmp_path_factory.mktemp("ci-fp32")
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={root}", "hw.dtype=float32"])
    return run_training(cfg, run_dir)


@pytest.mark.slow
@needs_bf16
def test_auto_dtype_trains_bf16_weights_with_fp32_adapter(ci_run):
    bf16_run = ci_run
    model = bf16_run.model
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert base == {torch.bfloat16} and lora == {torch.float32}
    art = Path(bf16_run.summary["artifact"])
    import yaml
    assert yaml.safe_load((art / "training_config.yaml").read_text())["hw"]["dtype"] == "bfloat16"  # recorded, resolved
    # the saved adapter: fp32 tensors, bit-identical to the trained ones
    from safetensors.torch import load_file
    saved = load_file(art / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    from peft import get_peft_model_state_dict
    live = get_peft_model_state_dict(model)
    assert set(saved) == set(live) and all(torch.equal(saved[k], live[k]) for k in saved)


@pytest.mark.slow
@needs_bf16
def test_bf16_loss_equals_fp32_loss_and_reload_is_exact(ci_run, fp32_run):
    from adapterlab.train import reload_logits_gap
    bf16_run = ci_run
    bf, fp = bf16_run.summary["metrics"], fp32_run.summary["metrics"]
    assert {p.dtype for p in fp32_run.model.parameters()} == {torch.float32}
    assert abs(bf["first_loss"] - fp["first_loss"]) <= FIRST_STEP_RTOL * fp["first_loss"], (bf, fp)
    assert abs(bf["final_loss"] - fp["final_loss"]) <= FINAL_RTOL * fp["final_loss"], (bf, fp)
    assert abs(bf["val_loss_after"] - fp["val_loss_after"]) <= FINAL_RTOL * fp["val_loss_after"], (bf, fp)
    assert bf["final_loss"] < bf["first_loss"]          # and it did learn
    # base + adapter reloaded from the artifact (bf16 base, as recorded) computes the same logits, exactly
    assert reload_logits_gap(bf16_run) == 0.0
