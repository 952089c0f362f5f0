"""A portable artifact: a consumer with plain transformers + PEFT, on a copy of the artifact in another folder and the
base model loaded from a plain folder (no adapterlab, no adapterlab cache), gets adapterlab's logits."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterlab.artifact import verify_artifact

pytestmark = pytest.mark.slow


def test_copied_artifact_loads_with_plain_peft_and_reproduces_logits(ci_run, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    art = Path(ci_run.summary["artifact"])
    copy = shutil.copytree(art, tmp_path / "elsewhere" / "my-adapter")
    meta = json.loads((copy / "metadata.json").read_text())["base_model"]
    config = json.loads((copy / "adapter_config.json").read_text())

    # The adapter names its base portably; the machine-local path and the weights' hashes are in metadata.json.
    assert config["base_model_name_or_path"] == "embedded:smollm2-135m-instruct" == meta["name"]
    assert Path(meta["location"]).is_dir() and meta["weight_files"][0]["sha256"]
    assert verify_artifact(copy, meta["location"]) == []

    # The consumer: no adapterlab cache to look in, only the tokenizer the artifact carries and a plain base folder.
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "no-cache"))
    tok = AutoTokenizer.from_pretrained(copy)
    assert tok.chat_template == ci_run.tokenizer.chat_template
    import yaml   # the consumer loads the base in the dtype the artifact's training config records (cpu: auto, resolved)
    dtype = getattr(torch, yaml.safe_load((copy / "training_config.yaml").read_text())["hw"]["dtype"])
    base = AutoModelForCausalLM.from_pretrained(meta["location"], dtype=dtype)
    consumer = PeftModel.from_pretrained(base, copy).eval()

    messages = [{"role": "user", "content": "Return a JSON object for: Ana Ruiz, 30, a chef in Quito."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    assert batch["input_ids"].tolist() == ci_run.tokenizer([text], add_special_tokens=False)["input_ids"]
    ci_run.model.eval()
    with torch.inference_mode():
        ours = ci_run.model(**batch).logits
        theirs = consumer(**batch).logits
        with consumer.disable_adapter():
            plain = consumer(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-3      # the adapter does change the logits: the check has teeth
