"""Any causal LM a user has: tiny random models of five architectures, each saved as a plain transformers folder,
go through adapterlab's real path (data → train → artifact → reload → generate). Random weights prove the plumbing,
not learning; the embedded SmolLM2 (test_train.py) is the proof that training learns."""
import json
from pathlib import Path

import pytest
import torch

from adapterlab.artifact import verify_artifact
from adapterlab.artifact_load import load_verified_adapter
from adapterlab.config import open_run
from adapterlab.eval import generation_kwargs
from adapterlab.models import load_base_model, named_chat_templates, resolve_model, stop_token_ids
from adapterlab.train import run_training

pytestmark = pytest.mark.slow

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)


def tiny_config(arch: str, vocab: int):
    import transformers as t
    if arch == "llama":
        return t.LlamaConfig(vocab_size=vocab, **SIZE)
    if arch == "qwen2":
        return t.Qwen2Config(vocab_size=vocab, **SIZE)
    if arch == "gemma3":
        return t.Gemma3TextConfig(vocab_size=vocab, head_dim=8, sliding_window=64, **SIZE)
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512)
    if arch == "phi3":
        return t.Phi3Config(vocab_size=vocab, pad_token_id=0, **SIZE)
    raise ValueError(arch)


# How each folder's tokenizer is set up: the embedded model's own (ChatML template), or stripped of its template so
# that `model.chat_template` must supply one (the base-model case), with Gemma's turn markers added for `gemma`.
CASES = {"llama": None, "qwen2": "chatml", "gemma3": "gemma", "gpt2": None, "phi3": None}


@pytest.fixture(scope="module")
def embedded_tokenizer_dir():
    return resolve_model("embedded:smollm2-135m-instruct").location


def build_tiny_model(folder: Path, arch: str, template: str | None, tokenizer_dir: str) -> Path:
    "A random model of `arch` and a tokenizer, saved as a plain transformers folder (no adapterlab marker)."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template:
        tok.chat_template = None
        if template == "gemma":
            tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        if template and (folder / name).exists():
            (folder / name).unlink()
    return folder


@pytest.mark.parametrize("arch", list(CASES))
def test_tiny_architecture_trains_reloads_and_generates(arch, tmp_path, embedded_tokenizer_dir):
    template = CASES[arch]
    folder = build_tiny_model(tmp_path / f"tiny-{arch}", arch, template, embedded_tokenizer_dir)
    overrides = [f"model.base_model={folder}", "lora.target_modules=all-linear", "train.max_steps=2",
                 "hw.batch_size=2", "data.val_fraction=0", f"output.root={tmp_path / 'out'}"]
    if template:
        overrides.append(f"model.chat_template={template}")
    cfg, run_dir = open_run("ci", "cpu", overrides)
    assert cfg.model.base_model == str(folder)

    result = run_training(cfg, run_dir)
    steps = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]
    assert len(steps) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)
    art = Path(result.summary["artifact"])
    assert result.summary["verification"]["artifact_problems"] == []
    assert verify_artifact(art, str(folder)) == []
    assert result.model.get_base_model().config.model_type == tiny_config(arch, 8).model_type

    # The artifact carries the tokenizer with the template used, and names its base portably.
    assert json.loads((art / "adapter_config.json").read_text())["base_model_name_or_path"] == folder.name
    from transformers import AutoTokenizer
    carried = AutoTokenizer.from_pretrained(art)
    assert carried.chat_template == result.tokenizer.chat_template
    if template:
        assert carried.chat_template == named_chat_templates()[template].read_text()

    # Reload base + adapter from disk: same logits as the in-memory trained model.
    base, tok, _ = load_base_model(cfg)
    reloaded = load_verified_adapter(art, base).eval()
    messages = [{"role": "user", "content": "Ana Ruiz, 30, is a chef in Quito."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    result.model.eval()
    with torch.inference_mode():
        gap = (result.model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    assert gap < 1e-5, gap

    # Generate a few tokens the way eval and serve do, stopping on every end-of-turn token of the template.
    kw = generation_kwargs(cfg, tok)
    assert kw["eos_token_id"] == stop_token_ids(tok)
    if template == "gemma":
        assert tok.convert_tokens_to_ids("<end_of_turn>") in kw["eos_token_id"]
    with torch.inference_mode():
        out = reloaded.generate(**batch, **{**kw, "max_new_tokens": 4})
    new = out[0, batch["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and isinstance(tok.decode(new, skip_special_tokens=True), str)
