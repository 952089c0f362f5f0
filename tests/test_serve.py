"""Merge/export, generation and multi-adapter serving (adapterlab.serve) on real artifacts of the embedded SmolLM2."""
import argparse
import contextlib
import io
import dataclasses
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adapterlab.artifact import ArtifactError, verify_artifact, write_artifact
from adapterlab.artifact_load import load_verified_adapter
from adapterlab.config import resolve_config
from adapterlab.models import load_base_model, resolve_model, sha256_file
from adapterlab.serve import AdapterSet, add_cli, artifact_config, serving_config, vllm_lora_problems

TEXTS = ["Return a JSON object with the keys \"name\", \"age\", \"city\" and \"job\" for this text:\n"
         "Ana Ruiz, 30, is a chef in Quito.", "A second, longer sentence so that the batch needs padding here."]


def _cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue()


def _logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model.eval()(**batch).logits[batch["attention_mask"].bool()]


def _second_domain_artifact(run_dir: Path, seed: int = 3) -> Path:
    """A second adapter on the same base, cheaply: LoRA as `ci` configures it, B filled with seeded noise, written by
    the production `write_artifact`. It stands in for another domain's adapter."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, _ = resolve_config("ci", "cpu", [f"output.root={run_dir}", f"seed={seed}"])
    from adapterlab.train import attach_lora
    base, _, source = load_base_model(cfg)
    model = attach_lora(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return write_artifact(run_dir, model, cfg, metrics={}, base=source)


@pytest.mark.slow
def test_merged_model_computes_base_plus_adapter(ci_run, tmp_path):
    artifact = Path(ci_run.summary["artifact"])
    out = tmp_path / "merged"
    rc, printed = _cli(["merge", str(artifact), "--out", str(out), "--check"])
    assert rc == 0 and "ok" in printed, printed
    # a standard transformers model folder: safetensors weights, config, tokenizer with the chat template, a card
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert (out / "config.json").exists() and (out / "README.md").read_text().startswith("---\nbase_model:")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["adapter"]["adapter_model_sha256"] == sha256_file(artifact / "adapter_model.safetensors")
    sums = json.loads((out / "checksums.json").read_text())
    assert sums == {p.name: sha256_file(p) for p in out.iterdir() if p.is_file() and p.name != "checksums.json"}

    # the equality itself, computed here rather than by merge_check: merged logits == base + adapter logits
    cfg = artifact_config(artifact)   # merged in float32 (merge's default): the reference is base + adapter in float32
    cfg = dataclasses.replace(cfg, hw=dataclasses.replace(cfg.hw, dtype="float32"))
    base, tok, _ = load_base_model(cfg)
    adapted = load_verified_adapter(artifact, base)
    with_adapter = _logits(adapted, tok)
    with adapted.disable_adapter():
        base_only = _logits(adapted, tok)
    gap = (_logits(merged, tok) - with_adapter).abs().max().item()
    effect = (with_adapter - base_only).abs().max().item()
    assert gap < 1e-3, gap
    assert effect > 100 * gap, (effect, gap)   # the adapter really changes the logits, so equality is not trivial

    rc, _ = _cli(["merge", str(artifact), "--out", str(out)])   # an existing folder is not replaced silently
    assert rc == 2 and (out / "merge_info.json").read_text() == json.dumps(info, indent=2) + "\n"


def test_merge_over_existing_folder_and_tampered_artifact_refused(tmp_path):
    art = _second_domain_artifact(tmp_path / "run")
    from adapterlab.serve import merge_artifact
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        merge_artifact(art, tmp_path / "taken")
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 99}))
    with pytest.raises(ArtifactError, match="adapter_config.json: sha256 mismatch"):
        merge_artifact(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_adapters_switch_by_name(ci_run, tmp_path):
    contacts = Path(ci_run.summary["artifact"])
    other = _second_domain_artifact(tmp_path / "other")
    adapters = AdapterSet.open([f"contacts={contacts}", f"other={other}"])
    assert adapters.names == ["contacts", "other"] and adapters.active == "contacts"
    tok = adapters.tokenizer
    a1 = _logits(adapters.model, tok)
    b = _logits(adapters.use("other").model, tok)
    a2 = _logits(adapters.use("contacts").model, tok)
    with adapters.base():
        base = _logits(adapters.model, tok)
    assert adapters.active == "contacts"
    assert torch.equal(a1, a2)                    # switching back gives exactly the same model
    assert (a1 - b).abs().max() > 1e-2 and (a1 - base).abs().max() > 1e-2 and (b - base).abs().max() > 1e-2

    # each adapter, switched to, computes what it computes when loaded alone on a fresh base, placed as serving places
    # it (on a CPU: fp32, whatever dtype the adapter trained with: the cpu profile's bf16 here)
    cfg = serving_config(contacts)
    for art, seen in ((contacts, a1), (other, b)):
        fresh, _, _ = load_base_model(cfg)
        alone = _logits(load_verified_adapter(art, fresh), tok)
        assert (alone - seen).abs().max() < 1e-5
    plain, _, _ = load_base_model(cfg)
    assert (_logits(plain, tok) - base).abs().max() < 1e-5

    # generation goes through the chat template with the adapter asked for; the CLI prints the same answer
    answer = adapters.generate(TEXTS[0], adapter="other", max_new_tokens=12)
    assert isinstance(answer, str) and answer and adapters.active == "other"
    rc, printed = _cli(["generate", f"contacts={contacts}", f"other={other}", "--adapter", "other",
                        "--prompt", TEXTS[0], "--max-new-tokens", "12"])
    assert rc == 0 and printed.strip() == answer
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        adapters.use("nope")
    with pytest.raises(ValueError, match="already taken"):
        adapters.add("other", other)

    # an adapter trained on another base is refused before anything is loaded. Its metadata is only believed once
    # the artifact verifies, so a copy whose recorded base was edited is refused as tampered; the same copy with
    # checksums and signature re-written (a properly signed adapter of another base) is refused for its base
    foreign = tmp_path / "foreign"
    shutil.copytree(other, foreign)
    meta = json.loads((foreign / "metadata.json").read_text())
    meta["base_model"]["weight_files"][0]["sha256"] = "0" * 64
    (foreign / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"refusing to load an artifact that fails verification: .*"
                                            r"metadata\.json: sha256 mismatch"):
        adapters.add("foreign", foreign)
    from adapterlab.artifact import write_checksums
    from adapterlab.signing import sign_folder
    write_checksums(foreign)
    sign_folder(foreign)
    with pytest.raises(ArtifactError) as refused:
        adapters.add("foreign", foreign)
    message = str(refused.value)
    assert "fails verification: base model " in message and "sha256 mismatch" not in message, message
    assert message.endswith(f"{meta['base_model']['weight_files'][0]['name']} differs from the one this adapter "
                            "was trained on"), message
    assert adapters.names == ["contacts", "other"] and adapters.active == "other"


@pytest.mark.slow
def test_artifact_loads_in_plain_peft(ci_run):
    """The documented no-adapterlab path: transformers + PeftModel.from_pretrained on the artifact folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    artifact = Path(ci_run.summary["artifact"])
    meta = json.loads((artifact / "metadata.json").read_text())
    location = meta["base_model"]["location"]
    assert location == resolve_model(meta["base_model"]["spec"]).location
    tok = AutoTokenizer.from_pretrained(location)
    dtype = getattr(torch, artifact_config(artifact).hw.dtype)   # the base dtype the artifact recorded (cpu: auto)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(location, dtype=dtype), artifact)
    ours = load_verified_adapter(artifact)
    assert (_logits(plain, tok) - _logits(ours, tok)).abs().max() < 1e-5


def test_vllm_lora_loader_checks(tmp_path):
    art = _second_domain_artifact(tmp_path / "run")
    assert vllm_lora_problems(art) == []
    cfg = json.loads((art / "adapter_config.json").read_text())
    variants = {"r": ({**cfg, "r": 64}, "above vLLM's --max-lora-rank 16"),
                "dora": ({**cfg, "use_dora": True}, "does not support DoRA"),
                "save": ({**cfg, "modules_to_save": ["lm_head"]}, "modules_to_save"),
                "bias": ({**cfg, "bias": "all"}, "--enable-lora-bias")}
    for name, (changed, expected) in variants.items():
        d = tmp_path / name
        shutil.copytree(art, d)
        (d / "adapter_config.json").write_text(json.dumps(changed))
        problems = vllm_lora_problems(d)
        assert len(problems) == 1 and expected in problems[0], (name, problems)
    assert vllm_lora_problems(tmp_path / "r", max_lora_rank=64) == []
    # a tensor name outside base_model.model.<module>.lora_A|B.weight is what vLLM cannot parse
    from safetensors.torch import load_file, save_file
    d = tmp_path / "names"
    shutil.copytree(art, d)
    tensors = load_file(d / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key.replace("base_model.model.", "")] = tensors.pop(key)
    save_file(tensors, d / "adapter_model.safetensors")
    problems = vllm_lora_problems(d)
    assert len(problems) == 1 and "not a tensor name vLLM's LoRA loader parses" in problems[0]
    assert verify_artifact(art) == []


def test_feedback_classes_and_records():
    """The seed's /critical /medium /good as queue records: /medium is the queue's `improvement`; a correction is the
    answer to learn and the model's answer is kept as `rejected`, which is what the preference stage reads."""
    from adapterlab.feedback import FeedbackError, answer_feedback, feedback_class
    cfg, _ = resolve_config("ci", "cpu")
    assert [feedback_class(k) for k in ("/critical", "medium", "improvement", "GOOD")] == \
        ["critical", "improvement", "improvement", "good"]
    with pytest.raises(FeedbackError, match="unknown feedback class 'bad'"):
        feedback_class("bad")
    crit = answer_feedback(cfg, "critical", "Q?", "wrong", " right ")
    assert crit == {"query": "Q?", "response": "right", "weight": 10.0, "feedback": "critical", "rejected": "wrong"}
    assert answer_feedback(cfg, "medium", "Q?", "ok", "better") == {
        "query": "Q?", "response": "better", "weight": 3.0, "feedback": "improvement", "rejected": "ok"}
    assert answer_feedback(cfg, "medium", "Q?", "ok") == {"query": "Q?", "response": "ok", "weight": 3.0,
                                                          "feedback": "improvement"}
    assert answer_feedback(cfg, "good", "Q?", "fine", "clear") == {"query": "Q?", "response": "fine", "weight": 1.0,
                                                                   "feedback": "clear"}
    with pytest.raises(FeedbackError, match="needs the answer that should have been given"):
        answer_feedback(cfg, "critical", "Q?", "wrong", "  ")
    from adapterlab.preference import pairs_from_queue
    pairs, _ = pairs_from_queue([crit], cfg)
    assert [(p.chosen, p.rejected) for p in pairs] == [("right", "wrong")]


def test_streamed_reply_is_the_reply_and_stops_when_closed(tmp_path):
    """Streaming decodes the same tokens as one call; closing a stream stops the generation at the next token."""
    adapters = AdapterSet.open([_second_domain_artifact(tmp_path / "run")])
    text = adapters.prompt_text(TEXTS[0])
    whole = adapters.complete(text, max_new_tokens=10)
    assert 0 < whole.completion_tokens <= 10 and whole.prompt_tokens > 20
    stream = adapters.complete(text, max_new_tokens=10, stream=True)
    assert "".join(stream).strip() == whole.text and stream.reply == whole
    long = adapters.complete(adapters.prompt_text("Tell me a long story about a lighthouse keeper."),
                             max_new_tokens=400, stream=True)
    next(iter(long))
    long.close()  # the client went away after the first words
    assert long.reply.completion_tokens < 40 and long.reply.finish_reason == "length", long.reply
    # seeded sampling repeats itself; greedy is what `generate` prints
    a, b = (adapters.complete(text, max_new_tokens=8, temperature=1.5, seed=7).text for _ in range(2))
    assert a == b
    assert adapters.generate(TEXTS[0], max_new_tokens=10) == whole.text
