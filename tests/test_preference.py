"""The preference (DPO) stage: pairs from files and from the feedback queue, DPO runs on the embedded SmolLM2 that
write verified artifacts, continuing an SFT artifact, and the eval comparison."""
import argparse
import contextlib
import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from adapterlab.artifact import ArtifactError, verify_artifact
from adapterlab.artifact_load import load_verified_adapter
from adapterlab.config import ConfigError, open_run, resolve_config
from adapterlab.formats import DataError
from adapterlab.data import write_jsonl
from adapterlab.models import load_base_model, load_tokenizer, resolve_model, sha256_file
from adapterlab.preference import (add_cli, compare_on_eval, pairs_from_queue, prepare_pairs, read_pairs,
                                   run_preference, with_artifact_lora)

SAMPLE = "sample:json_contacts/preference.jsonl"


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue()


def _answer_logp(model, tokenizer, prompt: list[dict], answer: str) -> float:
    "Summed log-probability of the answer's tokens after the chat-templated prompt."
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        logp = torch.log_softmax(model.eval()(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(p_ids) - 1, len(targets)), targets[len(p_ids) - 1:]].sum())


def test_sample_pairs_and_bad_lines(tmp_path):
    pairs = read_pairs(SAMPLE)
    assert len(pairs) == 60 and all(p.chosen != p.rejected for p in pairs)
    assert all(json.loads(p.chosen).keys() == {"name", "age", "city", "job"} for p in pairs)
    # the pairs come from the train split, never from the eval prompts
    from adapterlab.readers import load_examples
    eval_prompts = {e.messages[-2]["content"] for e in load_examples("sample:json_contacts/eval.jsonl")}
    assert not eval_prompts & {p.prompt[-1]["content"] for p in pairs}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n'
                   '{"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}\n'
                   '{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": "b"}\n'
                   'not json\n')
    with pytest.raises(DataError) as e:
        read_pairs(bad)
    msg = str(e.value)
    assert "3 bad preference pair(s)" in msg and "bad.jsonl:3: prompt: expected a string or a list" in msg
    assert "bad.jsonl:4: chosen: expected the answer as a string" in msg and "bad.jsonl:5: (json): not valid JSON" in msg


def test_dpo_ci_experiment_and_preference_keys():
    cfg, origin = resolve_config("dpo_ci", "cpu")
    assert cfg.preference.pairs == SAMPLE and origin["preference.beta"].startswith("params/experiments/dpo_ci.yaml:")
    with pytest.raises(ConfigError, match="preference.loss_type: must be one of"):
        resolve_config("dpo_ci", "cpu", ["preference.loss_type=nope"])


@pytest.mark.slow
def test_queue_corrections_become_pairs_with_the_models_answer(tmp_path):
    from adapterlab.queue import append_records, feedback_record, read_queue
    cfg, _ = resolve_config("ci", "cpu", [f"queue.path={tmp_path / 'q.jsonl'}", "eval.max_new_tokens=12",
                                          "data.system_prompt=You extract contact cards. Answer with JSON only."])
    query = 'Return a JSON object with the keys "name", "age", "city" and "job" for this text:\nBo Li, 41, nurse in Graz.'
    correction = '{"name": "Bo Li", "age": 41, "city": "Graz", "job": "nurse"}'
    append_records(tmp_path / "q.jsonl", [
        feedback_record(cfg, "critical", query, correction, "wrong keys"),
        feedback_record(cfg, "good", "Say hi", "Hi!"),
        {**feedback_record(cfg, "critical", "Card for Ana", '{"name": "Ana"}'), "rejected": "Ana is a person."}])
    model, tok, _ = load_base_model(cfg)
    pairs, skipped = pairs_from_queue(read_queue(tmp_path / "q.jsonl"), cfg, model=model, tokenizer=tok, source="q")
    assert skipped == [] and [p.source for p in pairs] == ["q:1", "q:3"]
    generated, stored = pairs
    assert generated.chosen == correction and generated.meta["rejected_from"] == "generated"
    assert generated.prompt == [{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": query}]
    # the rejected side is the model's own greedy answer to that conversation, generated independently here
    from adapterlab.serve import generate_reply
    assert generated.rejected == generate_reply(model, tok, generated.prompt, cfg)
    assert stored.rejected == "Ana is a person." and stored.meta["rejected_from"] == "record"


@pytest.fixture(scope="module")
def fresh_dpo(tmp_path_factory):
    """DPO from a fresh adapter through the CLI: 4 pairs, 2 steps of 2 pairs."""
    root = tmp_path_factory.mktemp("dpo")
    pairs = write_jsonl(root / "pairs.jsonl", (p.to_record() for p in read_pairs(SAMPLE)[:4]))
    run_dir = root / "run"
    rc, printed = _cli(["preference", "-f", "dpo_ci", "--hw", "cpu", "--run-dir", str(run_dir),
                        "--set", f"output.root={root}", "--set", f"preference.pairs={pairs}",
                        "--set", "preference.max_steps=2", "--set", "preference.batch_size=2",
                        "--set", "preference.learning_rate=0.002"])
    assert rc == 0, printed
    summary = json.loads((run_dir / "preference" / "summary.json").read_text())
    return {"run_dir": run_dir, "summary": summary, "artifact": Path(summary["artifact"]), "pairs": pairs}


@pytest.mark.slow
def test_dpo_run_writes_a_verified_artifact_that_prefers_chosen(fresh_dpo):
    art, summary = fresh_dpo["artifact"], fresh_dpo["summary"]
    v = summary["verification"]
    assert v["artifact_problems"] == [] and v["base_tensors_changed"] == [] and v["base_tensors_checked"] > 200
    base_location = resolve_model("embedded:smollm2-135m-instruct").location
    assert verify_artifact(art, base_location) == []
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["stage"] == "preference" and meta["method"] == "dpo" and meta["continued_from"] is None
    assert meta["datasets"] == [{"role": "preference_pairs", "file": "pairs.jsonl", "examples": 4,
                                 "sha256": sha256_file(fresh_dpo["run_dir"] / "preference" / "pairs.jsonl")}]
    m = summary["metrics"]
    assert m["train_steps"] == 2 and m["pairs"] == 4 and "reward_margin_final" in m
    # exactly one adapter was saved (TRL's frozen `ref` copy is not part of the artifact)
    assert json.loads((art / "adapter_config.json").read_text())["r"] == 8 and not list(art.glob("*/"))

    # what DPO is for, measured independently: against the base (the reference), the trained policy raised
    # log p(chosen) - log p(rejected) on the pairs it trained on
    model = load_verified_adapter(art)
    tok = load_tokenizer(resolve_model("embedded:smollm2-135m-instruct"), resolve_config("ci", "cpu")[0])
    margins = []
    for p in read_pairs(fresh_dpo["pairs"]):
        policy = _answer_logp(model, tok, p.prompt, p.chosen) - _answer_logp(model, tok, p.prompt, p.rejected)
        with model.disable_adapter():
            ref = _answer_logp(model, tok, p.prompt, p.chosen) - _answer_logp(model, tok, p.prompt, p.rejected)
        margins.append(policy - ref)
    assert sum(margins) / len(margins) > 0, margins


@pytest.mark.slow
def test_dpo_continues_an_sft_artifact_with_it_as_reference(ci_run, tmp_path):
    sft = Path(ci_run.summary["artifact"])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", (p.to_record() for p in read_pairs(SAMPLE)[4:5]))
    # the experiment asks for r=4; continuing the SFT adapter must keep its real shape (r=8)
    cfg, run_dir = open_run("dpo_ci", "cpu", [f"output.root={tmp_path}", f"preference.pairs={pairs}", "lora.r=4",
                                              "preference.max_steps=1", "preference.batch_size=1"], tmp_path / "run")
    result = run_preference(cfg, run_dir, sft_artifact=sft)
    art = Path(result.summary["artifact"])
    assert result.summary["verification"]["artifact_problems"] == []
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["continued_from"]["adapter_model_sha256"] == sha256_file(sft / "adapter_model.safetensors")
    assert json.loads((art / "adapter_config.json").read_text())["r"] == 8
    assert sha256_file(art / "adapter_model.safetensors") != sha256_file(sft / "adapter_model.safetensors")
    # the reference is the SFT model, not the base: at the first step the policy (SFT) equals the reference, so
    # both implicit rewards beta * (log pi - log pi_ref) are exactly 0 (against the base they would not be)
    first = json.loads((run_dir / "preference" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["step"] == 1
    other_base = resolve_config("dpo_ci", "cpu", ["model.base_model=embedded:all-minilm-l6-v2"])[0]
    with pytest.raises(ArtifactError, match="trained on base model"):
        with_artifact_lora(other_base, sft)


@pytest.mark.slow
def test_compare_on_eval_scores_each_model(ci_run, fresh_dpo, tmp_path):
    from adapterlab.eval import load_predictions, score
    cfg, _ = resolve_config("dpo_ci", "cpu", ["eval.max_examples=2", "eval.max_new_tokens=8",
                                              "eval.metrics=[exact_match, json_validity]", "eval.bootstrap_samples=100"])
    artifacts = {"sft": ci_run.summary["artifact"], "dpo": fresh_dpo["artifact"]}
    report = compare_on_eval(cfg, artifacts, tmp_path / "eval")
    assert report["models"] == ["base", "sft", "dpo"] and set(report["comparisons"]) == {"base->sft", "base->dpo", "sft->dpo"}
    where = {"base": ("base->sft", "base"), "sft": ("base->sft", "adapter"), "dpo": ("base->dpo", "adapter")}
    for name, (key, side) in where.items():   # every value in the report is the eval module's score of the saved answers
        preds = load_predictions(tmp_path / "eval" / f"predictions_{name}.jsonl")
        assert len(preds) == 2
        scored = score([p["prediction"] for p in preds], [p["reference"] for p in preds], ["exact_match", "json_validity"])
        for metric, value in scored.items():
            assert report["comparisons"][key][metric][side] == pytest.approx(value)
    c = report["comparisons"]
    assert c["sft->dpo"]["json_validity"]["base"] == c["base->sft"]["json_validity"]["adapter"]
    assert "| json_validity |" in (tmp_path / "eval" / "report.md").read_text()


def test_no_pairs_and_too_long_pairs_are_errors(tmp_path):
    cfg, _ = resolve_config("ci", "cpu", ["preference.pairs=null"])
    tok = load_tokenizer(resolve_model(cfg.model.base_model), cfg)
    with pytest.raises(DataError, match="no preference pairs"):
        prepare_pairs(cfg, tmp_path, tok)
    short, _ = resolve_config("ci", "cpu", ["hw.max_seq_length=100"])
    with pytest.raises(DataError, match="longer than hw.max_seq_length=100"):
        prepare_pairs(short, tmp_path, tok)
    dropping, _ = resolve_config("ci", "cpu", ["hw.max_seq_length=100", "data.too_long=drop"])
    kept = prepare_pairs(dropping, tmp_path, tok)
    assert 0 < kept.stats["pairs"] < 60 and kept.stats["max_tokens"] <= 100
