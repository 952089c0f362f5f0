"""The memory planner: its arithmetic against what bitsandbytes, PEFT and autograd really allocate, the fitter, the
4-bit check and `adapterlab plan`."""
import argparse
import contextlib
import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from adapterlab.config import ConfigError, resolve_config
from adapterlab.arch import Arch, arch_from_config, model_config_for, preset_config
from adapterlab.plan import (GIB, PlanError, add_cli, fit_plan, gib, layer_activation_bytes, lora_params, lora_targets,
                             plan_memory, quantized_bytes_per_weight)
from adapterlab.precision import QuantizationUnavailable, check_4bit


def tiny_llama_config(layers: int = 3):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)


def test_preset_is_the_real_models_shape():
    real = arch_from_config(model_config_for("embedded:smollm2-135m-instruct"), name="x")
    assert real == arch_from_config(preset_config("smollm2-135m"), name="x")
    # and the parameter count is the model's own
    from transformers import AutoModelForCausalLM
    from adapterlab.models import resolve_model
    with torch.device("meta"):
        n = AutoModelForCausalLM.from_config(model_config_for("embedded:smollm2-135m-instruct")).num_parameters()
    assert real.total_params() == n


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_bytes_are_what_bitsandbytes_stores(double_quant):
    import bitsandbytes as bnb
    w = bnb.nn.Params4bit(torch.randn(192, 320, dtype=torch.bfloat16), requires_grad=False,
                          compress_statistics=double_quant, quant_type="nf4").to("cpu")
    qs = w.quant_state
    tensors = [w.data, qs.absmax] + ([qs.state2.absmax] if double_quant else [])
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert stored == pytest.approx(192 * 320 * quantized_bytes_per_weight(double_quant), abs=4)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj", "o_proj"]])
def test_lora_count_is_what_peft_trains(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    cfg = tiny_llama_config()
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = arch_from_config(cfg)
    assert lora_params(arch, 4, lora_targets(arch, targets)) == trainable


def test_unknown_lora_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="qkv_proj: not a linear layer"):
        lora_targets(arch_from_config(tiny_llama_config()), ["qkv_proj"])


def _qlora_model(cfg, dropout: float, targets, tmp_path):
    "The GPU recipe on bitsandbytes' CPU backend: NF4+DQ, prepare_model_for_kbit_training, cast back, bf16 LoRA."
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
                                             quantization_config=BitsAndBytesConfig(
                                                 load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    for p in m.parameters():
        if p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.bfloat16)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return m.train()


def _bytes_saved_by_one_layer(model, input_ids, layer_index: int, autocast) -> int:
    "Distinct activation storages autograd saves while decoder layer `layer_index` runs (weights excluded)."
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {p.untyped_storage().data_ptr() for p in base.parameters()}
    seen, marks = {}, {}
    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
        return t
    layer = base.model.layers[layer_index]
    h1 = layer.register_forward_pre_hook(lambda *a: marks.__setitem__("start", sum(seen.values())))
    h2 = layer.register_forward_hook(lambda *a: marks.__setitem__("end", sum(seen.values())))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            base.model(input_ids=input_ids, use_cache=False)
    finally:
        h1.remove(); h2.remove()
    return marks["end"] - marks["start"]


@pytest.mark.parametrize("dropout,targets", [(0.0, "all-linear"), (0.1, "all-linear"), (0.0, ["q_proj", "v_proj"])])
def test_activation_model_matches_what_autograd_keeps_qlora(dropout, targets, tmp_path):
    cfg = tiny_llama_config()
    model = _qlora_model(cfg, dropout, targets, tmp_path)
    tokens = 96
    measured = _bytes_saved_by_one_layer(model, torch.randint(0, cfg.vocab_size, (1, tokens)), 1, autocast=True)
    arch = arch_from_config(cfg)
    # the CPU's dropout mask has the input's dtype (CUDA's is bool): plan it as the CPU does here
    planned = tokens * layer_activation_bytes(arch, 2, lora_targets(arch, targets), 8, dropout, mask_bytes=2)
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)


def test_activation_model_matches_what_autograd_keeps_float32():
    "The CPU profile's path: a float32 model with LoRA, no autocast."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    cfg = tiny_llama_config()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, target_modules="all-linear",
                                                                             lora_dropout=0.0)).train()
    tokens = 96
    measured = _bytes_saved_by_one_layer(model, torch.randint(0, cfg.vocab_size, (1, tokens)), 1, autocast=False)
    arch = arch_from_config(cfg)
    planned = tokens * layer_activation_bytes(arch, 4, lora_targets(arch, "all-linear"), 8, 0.0)
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)


def test_8gb_profile_fits_llama_3_1_8b_at_1024_tokens():
    cfg, _ = resolve_config("json_contacts", "8gb")
    plan = plan_memory(preset_config("llama-3.1-8b"), cfg)
    assert plan.seq_len >= 1024 and plan.device == "cuda"
    assert plan.fits and plan.total <= 7.5 * GIB, plan.table()
    # the big items are where the arithmetic says: ~3.35 GiB of NF4 weights, ~1.96 GiB of bf16 embeddings + head
    assert gib(plan.components["quantized_weights"]) == pytest.approx(6.98e9 * 0.51587 / GIB, rel=0.01)
    assert gib(plan.components["unquantized_weights"]) == pytest.approx(2 * 128256 * 4096 * 2 / GIB, rel=0.01)
    assert plan.total == plan.allocated + plan.components["allocator_slack"] + plan.components["cuda_context"]


def test_float32_embeddings_and_full_logits_do_not_fit_8gb():
    "What the plan exists to catch: prepare_model_for_kbit_training's float32 upcast, and unfused 128k logits."
    cfg, _ = resolve_config("json_contacts", "8gb")
    arch = preset_config("llama-3.1-8b")
    assert not plan_memory(arch, cfg, upcast_unquantized=True).fits
    naive = plan_memory(arch, cfg, fused_loss_head=False)
    assert gib(naive.components["loss_head"]) > 1.5 and not naive.fits


def test_activations_scale_with_tokens_and_checkpointing_saves_most_of_them():
    cfg, _ = resolve_config("json_contacts", "24gb")
    arch = preset_config("llama-3.1-8b")
    a = plan_memory(arch, cfg, seq_len=1024, gradient_checkpointing=False)
    b = plan_memory(arch, cfg, seq_len=2048, gradient_checkpointing=False)
    assert b.components["activations"] == pytest.approx(2 * a.components["activations"], rel=0.01)
    c = plan_memory(arch, cfg, seq_len=1024, gradient_checkpointing=True)
    assert c.components["activations"] < a.components["activations"] / 10
    assert c.detail["recompute"] > 0 and a.detail["recompute"] == 0


def test_fit_plan_trades_micro_batch_for_accumulation_and_refuses_when_hopeless():
    arch = preset_config("llama-3.1-8b")
    cfg, _ = resolve_config("json_contacts", "8gb", ["hw.batch_size=16", "hw.grad_accum=1",
                                                     "hw.gradient_checkpointing=false"])
    fitted, plan = fit_plan(arch, cfg)
    assert plan.fits and fitted.hw.batch_size * fitted.hw.grad_accum == 16
    assert fitted.hw.gradient_checkpointing and fitted.hw.batch_size < 16
    assert cfg.hw.batch_size == 16                        # the caller's config is not modified
    # the largest micro-batch that fits: one step up does not
    bigger = [d for d in range(fitted.hw.batch_size + 1, 17) if 16 % d == 0]
    if bigger:
        assert not plan_memory(arch, fitted, micro_batch=bigger[0]).fits
    hopeless, _ = resolve_config("json_contacts", "8gb", ["hw.memory_budget_gb=3"])
    with pytest.raises(PlanError) as e:
        fit_plan(arch, hopeless)
    assert "hw.memory_budget_gb" in str(e.value) and "4-bit" in str(e.value) and "max_seq_length" in str(e.value)


def test_fit_plan_leaves_cpu_profiles_alone():
    cfg, _ = resolve_config("json_contacts", "cpu")
    fitted, plan = fit_plan(preset_config("smollm2-135m"), cfg)
    assert fitted == cfg and plan.budget_bytes is None and plan.fits


def test_check_4bit_runs_here_on_cpu_and_explains_failures(monkeypatch):
    assert check_4bit("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationUnavailable, match="sees no CUDA GPU"):
            check_4bit("cuda")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)       # as if it were not installed
    with pytest.raises(QuantizationUnavailable, match="pip install"):
        check_4bit("cpu")


def _run_cli(*argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="adapterlab")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue()


def test_cli_plans_the_8gb_profile_offline():
    rc, out = _run_cli("--hw", "8gb", "--arch", "llama-3.1-8b")
    assert rc == 0 and "llama-3.1-8b" in out and "fits" in out and "4-bit" in out
    rc, out = _run_cli("--hw", "8gb")                            # the profile's own hub id maps to the preset
    assert rc == 0 and "llama-3.1-8b" in out
    rc, out = _run_cli("--hw", "8gb", "--json", "--seq-len", "2048")
    d = json.loads(out)
    assert d["seq_len"] == 2048 and d["total"] == sum(d["components"][k] for k in d["components"]
                                                        if k not in ("loss_head", "layer_backward")) + \
        max(d["components"]["loss_head"], d["components"]["layer_backward"])


def test_cli_refuses_with_the_breakdown_and_reads_local_folders():
    rc, out = _run_cli("--hw", "8gb", "--arch", "llama-3.1-8b", "--fit", "-o", "hw.memory_budget_gb=3")
    assert rc == 2 and "too small" in out and "LoRA adapter weights" in out
    from adapterlab.models import resolve_model
    folder = resolve_model("embedded:smollm2-135m-instruct").location
    rc, out = _run_cli("--hw", "8gb", "--arch", folder)
    assert rc == 0 and "fits" in out


def test_hub_ids_without_a_preset_are_refused_offline():
    with pytest.raises(ConfigError, match="works offline"):
        model_config_for("nobody/no-such-model")
