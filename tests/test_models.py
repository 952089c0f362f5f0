"""Model sources and precedence: the experiment's model wins over a hardware profile's default; chat templates are
checked before anything slow; generation stops on every end-of-turn token the template uses."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from adapterlab.config import open_run, resolve_config
from adapterlab.models import (ChatTemplateError, ModelNotFound, load_base_model, model_source, resolve_model,
                               stop_token_ids)


@pytest.fixture(scope="module")
def tokenizer_dir():
    return resolve_model("embedded:smollm2-135m-instruct").location


def tiny_llama(folder: Path, tokenizer_dir: str, keep_template: bool = True) -> Path:
    "A random 2-layer Llama with the embedded tokenizer (its ChatML template removed unless `keep_template`)."
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if not keep_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    return folder


def test_experiment_model_wins_over_profile_default(tmp_path, tokenizer_dir, capsys):
    folder = tiny_llama(tmp_path / "my-model", tokenizer_dir)
    exp = tmp_path / "mine.yaml"
    exp.write_text(yaml.safe_dump({
        "experiment": "mine", "model": {"base_model": str(folder)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"max_steps": 2}, "data": {"val_fraction": 0},
        "hw": {"batch_size": 2}, "output": {"root": str(tmp_path / "out")}}))
    cfg, run_dir = open_run(exp, "cpu")       # the CPU profile names embedded SmolLM2 as its default; no --set
    said = capsys.readouterr().err
    assert cfg.model.base_model == str(folder)
    line = next(l for l in said.splitlines() if l.startswith("model.base_model:"))
    assert f"{folder} from {exp}" in line and "over hw.base_model embedded:smollm2-135m-instruct" in line
    assert "a hardware profile only supplies a default" in line
    origin = yaml.safe_load((run_dir / "params_origin.yaml").read_text())
    assert "over hw.base_model" in origin["model.base_model"]
    from adapterlab.pipeline import report_markdown
    assert f"base model `{folder}` (from {exp}:" in report_markdown(run_dir)    # the report says why, too

    from adapterlab.train import run_training
    result = run_training(cfg, run_dir)
    trained = result.model.get_base_model()
    assert trained.config.model_type == "llama" and trained.config.hidden_size == 32   # not SmolLM2 (576)
    meta = json.loads((Path(result.summary["artifact"]) / "metadata.json").read_text())
    assert meta["base_model"]["spec"] == str(folder) and meta["base_model"]["location"] == str(folder)


def test_profile_default_and_overrides_say_why(capsys):
    cfg, origin = resolve_config("json_contacts", "8gb")     # names no model: the profile's default applies
    assert cfg.model.base_model == cfg.hw.base_model and "hardware profile's default applies" in origin["model.base_model"]
    cfg, _ = resolve_config("json_contacts", "cpu", ["model.base_model=some/model"])
    assert cfg.model.base_model == "some/model" and "explicit override" in capsys.readouterr().err
    cfg, origin = resolve_config("json_contacts", "cpu")     # profile and defaults agree: nothing to say
    assert "over" not in origin["model.base_model"] and capsys.readouterr().err == ""


def test_missing_chat_template_is_refused_before_conversion(tmp_path, monkeypatch):
    """A base GGUF without a chat template: refused, naming the setting, before the (slow) conversion starts; with
    `model.chat_template` set, resolution goes on to the conversion."""
    from gguf import GGUFWriter
    import adapterlab.models as models
    gguf = tmp_path / "base-model.gguf"
    w = GGUFWriter(str(gguf), "llama")
    w.add_name("base-model")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    converted = []
    monkeypatch.setattr(models, "convert_gguf", lambda g, out: converted.append(g) or Path(out))
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={gguf}"])
    with pytest.raises(ChatTemplateError, match=r"base-model.gguf: the model has no chat template; set model.chat_template"):
        model_source(cfg)
    assert converted == []
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={gguf}", "model.chat_template=chatml"])
    assert model_source(cfg).local and converted == [gguf]
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={gguf}", "model.chat_template=chatlm"])
    with pytest.raises(ChatTemplateError, match=r"model.chat_template: 'chatlm' is neither a named template \(chatml"):
        model_source(cfg)


def test_named_template_needs_its_markers_in_the_vocabulary(tmp_path, tokenizer_dir):
    folder = tiny_llama(tmp_path / "base", tokenizer_dir, keep_template=False)
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={folder}", "model.chat_template=gemma"])
    with pytest.raises(ChatTemplateError, match=r"model.chat_template: gemma: <end_of_turn> is not one token.*whose markers it has: chatml"):
        load_base_model(cfg)
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={folder}", "model.chat_template=chatml"])
    _, tok, _ = load_base_model(cfg)
    assert "<|im_end|>" in tok.chat_template and stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_uncached_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, _ = resolve_config("ci", "cpu", ["model.base_model=nobody/no-such-model"])
    with pytest.raises(ModelNotFound) as e:
        model_source(cfg)
    assert "\n" not in str(e.value) and "hub is offline here" in str(e.value) and "not in the local hub cache" in str(e.value)


def test_generation_stops_on_the_templates_end_of_turn_token(tmp_path, tokenizer_dir):
    """A template whose turns end with a token that is not the tokenizer's eos: eval's generation must stop there.
    The model is made to answer that token at once (final norm zeroed: all logits 0, greedy picks id 0)."""
    from adapterlab.formats import Example
    from adapterlab.eval import generate_predictions
    folder = tiny_llama(tmp_path / "base", tokenizer_dir, keep_template=False)
    template = tmp_path / "turns.jinja"
    template.write_text("{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{%- endfor -%}"
                        "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}")
    cfg, _ = resolve_config("ci", "cpu", [f"model.base_model={folder}", f"model.chat_template={template}",
                                          "eval.max_new_tokens=6", "eval.metrics=[exact_match]"])
    model, tok, _ = load_base_model(cfg)
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    assert end == 0 and end != tok.eos_token_id and stop_token_ids(tok) == [tok.eos_token_id, end]
    with torch.no_grad():
        model.model.norm.weight.zero_()
    ex = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], source="t:1")
    (rec,) = generate_predictions(model, tok, [ex], cfg)
    assert rec["finished"] and rec["new_tokens"] == 1
