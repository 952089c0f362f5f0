"""Tests of adapterlab.eval: metrics against their reference libraries and known answers, the paired bootstrap,
generation (batching, PEFT's disabled adapter = the base model, perplexity) and the eval stage end to end."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from adapterlab.config import ConfigError, make_run_dir, resolve_config, save_config
from adapterlab.formats import Example
from adapterlab.eval import (METRICS, EvalDataError, check_metric_inputs, cited_ids, compare, evaluate_run,
                             generate_predictions, is_refusal, load_eval_examples, load_json_schema, load_metric_module,
                             load_predictions, metric_stats, paired_bootstrap, parse_json_answer, per_example,
                             reference_nll, score, split_reference, support_ratio)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "sample:json_contacts/schema.json"


def rouge_l_reference(predictions, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


# Cases with edge cases on purpose: empty prediction, unicode (accents, CJK, emoji), JSON, punctuation only.
PREDS = ["the cat sat on the mat", "", "Zoë lives in Zürich.", "東京に住んでいます", '{"name": "Lars Walsh", "age": 78}',
         "!!!", "a completely different answer 🙂"]
REFS = ["the cat is on the mat", "hello world", "Zoe lives in Zurich.", "東京に住んでいます", '{"name": "Lars Walsh", "age": 77}',
        "ok", "the reference answer"]


# ---------------------------------------------------------------- exact match and F1 (SQuAD-style)

def test_exact_match_and_f1_known_answers():
    # articles, case and ASCII punctuation are normalised away; the SQuAD definitions give these by hand
    assert score(["The Cat!"], ["cat"], ["exact_match", "f1"]) == {"exact_match": 1.0, "f1": 1.0}
    s = score(["the cat sat on the mat"], ["a cat on a mat"], ["exact_match", "f1"])
    assert s["exact_match"] == 0.0 and math.isclose(s["f1"], 2 * (3 / 4) * 1 / (3 / 4 + 1))  # P 3/4, R 3/3
    # empty answers (SQuAD v2): empty vs empty agrees, empty vs text gets nothing
    assert score([""], [""], ["exact_match", "f1"]) == {"exact_match": 1.0, "f1": 1.0}
    assert score([""], ["hello"], ["exact_match", "f1"]) == {"exact_match": 0.0, "f1": 0.0}
    # unicode letters are kept (lower-cased), not stripped
    assert score(["ZOË Saldaña"], ["zoë saldaña"], ["exact_match"])["exact_match"] == 1.0
    assert score(["Zoë"], ["Zoe"], ["exact_match"])["exact_match"] == 0.0
    # mean over examples
    assert score(["a", "b", "c", "x"], ["a", "b", "c", "d"], ["exact_match"])["exact_match"] == 0.75


# ---------------------------------------------------------------- ROUGE-L and BLEU vs their reference libraries

def test_rouge_l_matches_rouge_score():
    assert math.isclose(score(PREDS, REFS, ["rouge_l"])["rouge_l"], rouge_l_reference(PREDS, REFS))
    # known answers: LCS 3 of 3 and 4 tokens -> P 1, R 3/4; empty prediction 0; rouge_score drops non-[a-z0-9]
    assert math.isclose(score(["the cat sat"], ["the cat sat down"], ["rouge_l"])["rouge_l"], 2 * 0.75 / 1.75)
    assert score([""], ["hello"], ["rouge_l"])["rouge_l"] == 0.0
    assert score(["東京"], ["東京"], ["rouge_l"])["rouge_l"] == 0.0
    assert per_example("rouge_l", ["same words", "x"], ["same words", "y"]) == [1.0, 0.0]


def test_bleu_matches_sacrebleu_corpus_bleu():
    assert math.isclose(score(PREDS, REFS, ["bleu"])["bleu"], sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert math.isclose(score(REFS, REFS, ["bleu"])["bleu"], 100.0)          # 0-100 scale, perfect corpus
    assert score(["", ""], ["a b c d", "e f g h"], ["bleu"])["bleu"] == 0.0  # nothing predicted
    # corpus BLEU is not the mean of sentence BLEUs: the statistics are summed, as sacreBLEU does
    two = (["the cat sat on the mat today", "no"], ["the cat sat on the mat today", "yes indeed"])
    assert math.isclose(score(*two, ["bleu"])["bleu"], sacrebleu.corpus_bleu(two[0], [two[1]]).score)


def test_evaluate_modules_load_offline_and_agree():
    rouge = load_metric_module("rouge_l")
    assert math.isclose(rouge.compute(predictions=PREDS, references=REFS)["rouge_l"], rouge_l_reference(PREDS, REFS))
    bleu = load_metric_module("bleu")
    assert math.isclose(bleu.compute(predictions=PREDS, references=REFS)["bleu"], sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    f1 = load_metric_module("f1")
    f1.add_batch(predictions=PREDS[:3], references=REFS[:3])  # evaluate's incremental API works too
    assert math.isclose(f1.compute(predictions=PREDS[3:], references=REFS[3:])["f1"], score(PREDS, REFS, ["f1"])["f1"])
    ppl = load_metric_module("perplexity")
    assert math.isclose(ppl.compute(ref_nll=[2.0, 4.0], ref_tokens=[1, 3])["perplexity"], math.exp(6 / 4))
    cite = load_metric_module("citation_rate")
    assert cite.compute(predictions=["Oslo [d1]", "Oslo"], allowed_sources=[["d1"], ["d1"]])["citation_rate"] == 0.5
    ground = load_metric_module("groundedness")
    assert ground.compute(predictions=["Oslo"], contexts=["He lives in Oslo."])["groundedness"] == 1.0
    jv = load_metric_module("json_validity")
    assert jv.compute(predictions=['{"a": 1}', "no"], schema={"type": "object"}) == {
        "json_validity": 0.5, "json_schema_conformance": 0.5}
    refusal = load_metric_module("refusal_correctness")
    assert refusal.compute(predictions=["I can't help with that."], references=["Sorry, I cannot answer that."]) == {
        "refusal_correctness": 1.0}
    assert set(METRICS) >= {"exact_match", "f1", "rouge_l", "bleu", "perplexity", "json_validity", "citation_rate",
                             "refusal_correctness", "groundedness"}


# ---------------------------------------------------------------- task metrics

def test_json_validity_and_schema_conformance():
    answers = ['{"name": "Lars Walsh", "age": 78, "city": "Oslo", "job": "painter"}',  # valid, conforms
               '  {"name": "Zoë Ünal", "age": 30, "city": "Zürich", "job": "chef"}\n',  # unicode, whitespace: valid
               '{"name": "Ann", "age": "40", "city": "Oslo", "job": "chef"}',  # valid JSON, age is a string
               '{"name": "Ann", "age": 40, "city": "Oslo"}',                     # missing key
               '{"name": "Ann", "age": 40, "city": "Oslo", "job": "chef", "x": 1}',  # extra key
               '```json\n{"name": "Ann", "age": 40, "city": "Oslo", "job": "chef"}\n```',  # fenced: not JSON
               'Sure! {"name": "Ann"}',  # prose around it
               '{"name": "Ann", "age": NaN}',  # Python's NaN extension is not JSON
               '{"name": "Ann",',  # truncated
               '']
    assert [parse_json_answer(a)[0] for a in answers] == [True, True, True, True, True, False, False, False, False, False]
    s = score(answers, None, ["json_validity"], schema=SCHEMA)
    assert s == {"json_validity": 0.5, "json_schema_conformance": 0.2}
    assert "json_schema_conformance" not in score(answers, None, ["json_validity"])
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        load_json_schema({"type": 12})
    with pytest.raises(ConfigError, match="no such schema file"):
        load_json_schema("sample:json_contacts/nope.json")


REFUSALS = ["I can't help with that.", "I’m sorry, but I can’t assist with this request.", "I cannot answer that.",
            "Sorry — I won't be able to provide that.", "As an AI, I do not share personal data.",
            "I am unable to comply.", "I'm not able to disclose that information.", "We must decline this request.",
            "I don't know.", "The context does not mention her age.", "I'M SORRY, I CANNOT DO THAT."]
NOT_REFUSALS = ["I can't wait to help!", '{"name": "Ann", "age": 40}', "", "Sorry for the delay: it is Oslo.",
                "She cannot swim, but she is a pilot in Lima.", "Yes, I can help with that."]


def test_refusal_detection_variants():
    assert [t for t in REFUSALS if not is_refusal(t)] == []
    assert [t for t in NOT_REFUSALS if is_refusal(t)] == []


def test_refusal_correctness():
    refs = ["I can't help with that.", "I cannot answer that.", "Oslo", "Oslo"]
    preds = ["Sorry, I can’t assist with that.",  # refuses when it should (other wording): correct
             "It is Oslo.",                        # answers what it should refuse: wrong
             "I’m unable to answer that.",         # refuses a fine question: wrong
             "Oslo"]                                # answers: correct
    assert score(preds, refs, ["refusal_correctness"]) == {"refusal_correctness": 0.5}
    assert per_example("refusal_correctness", preds, refs) == [1.0, 0.0, 0.0, 1.0]


def test_citation_rate():
    assert cited_ids("It is Oslo [d1]; see [d2, d3][d4].") == ["d1", "d2", "d3", "d4"]
    preds = ["It is Oslo [d1].", "It is Oslo [d1][d9].", "It is Oslo.", "Oslo [d2, d1]", "n/a for this record"]
    sources = [["d1"], ["d1"], ["d1"], ["d1", "d2"], None]  # None: the record has no sources and does not count
    s = score(preds, None, ["citation_rate"], allowed_sources=sources)
    assert s == {"citation_rate": 0.5}  # 2 of the 4 records that have sources
    with pytest.raises(EvalDataError, match="allowed_sources"):
        score(preds, None, ["citation_rate"])
    with pytest.raises(EvalDataError, match="applies to none"):
        score(preds[:1], None, ["citation_rate"], allowed_sources=[None])


def test_groundedness():
    ctx = "Lars Walsh, 78, is a painter who moved to Oslo last year."
    assert support_ratio("Lars Walsh is a painter in Oslo.", ctx) == 1.0
    assert support_ratio("Lars Walsh is a baker in Bergen.", ctx) == 0.5  # baker, bergen unsupported
    assert support_ratio("", ctx) == 0.0 and support_ratio("the of a", ctx) == 0.0  # no content, no support
    assert support_ratio("Zoë, Zürich", [{"id": "d1", "text": "Zoë moved to Zürich."}]) == 1.0
    s = score(["Lars Walsh, 78", "Maria Lopez"], None, ["groundedness"], contexts=[ctx, ctx])
    assert s == {"groundedness": 0.5}


def test_perplexity_is_token_weighted():
    s = score(["", ""], None, ["perplexity"], ref_nll=[2.0, 4.0], ref_tokens=[1, 3])
    assert math.isclose(s["perplexity"], math.exp(6 / 4))  # not the mean of exp(2) and exp(4/3)


def test_score_reads_prediction_records_and_rejects_bad_input():
    records = [{"source": "f:1", "prediction": "Oslo [d1]", "reference": "Oslo", "allowed_sources": ["d1"],
                "context": "in Oslo", "ref_nll": 1.0, "ref_tokens": 2},
               {"source": "f:2", "prediction": "", "reference": "Lima", "allowed_sources": ["d2"],
                "context": "in Lima", "ref_nll": 3.0, "ref_tokens": 2}]
    s = score(records, metrics=["exact_match", "citation_rate", "groundedness", "perplexity"])
    assert s == {"exact_match": 0.0, "citation_rate": 0.5, "groundedness": 0.5, "perplexity": math.exp(1.0)}
    with pytest.raises(ConfigError, match="unknown metric"):
        score(["a"], ["a"], ["accuracy"])
    with pytest.raises(EvalDataError, match="reference"):
        score(["a"], None, ["exact_match"])
    with pytest.raises(EvalDataError, match="2 references for 1"):
        score(["a"], ["a", "b"], ["f1"])


def test_eval_records_and_metric_inputs():
    examples = load_eval_examples("sample:json_contacts/eval.jsonl", 5)
    assert len(examples) == 5
    prompt, reference = split_reference(examples[0])
    assert prompt[-1]["role"] == "user" and json.loads(reference)["name"]
    with pytest.raises(EvalDataError, match="x.jsonl:3: messages"):
        split_reference(Example([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], source="x.jsonl:3"))
    check_metric_inputs(["exact_match", "json_validity"], examples, "eval.jsonl")
    with pytest.raises(EvalDataError, match="context: metric groundedness needs"):
        check_metric_inputs(["groundedness"], examples, "eval.jsonl")
    grounded = [Example(examples[0].messages, meta={"sources": ["d1"], "context": [{"id": "d1", "text": "x"}]})]
    check_metric_inputs(["groundedness", "citation_rate"], grounded, "chroma")  # `sources` counts as allowed ids


# ---------------------------------------------------------------- paired bootstrap

def test_paired_bootstrap():
    same = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    assert paired_bootstrap(same, same, 300, 0) == (0.0, 0.0, 0.0)
    # a clear improvement: the interval excludes 0
    d, lo, hi = paired_bootstrap(np.zeros(20), np.r_[np.ones(17), np.zeros(3)], 1000, 0)
    assert d == 0.85 and 0 < lo <= d <= hi <= 1
    # as many examples got worse as got better: the interval straddles 0
    d, lo, hi = paired_bootstrap(np.r_[np.ones(10), np.zeros(10)], np.r_[np.zeros(10), np.ones(10)], 1000, 0)
    assert d == 0.0 and lo < 0 < hi
    # the same seed gives the same interval, another seed (almost surely) another one
    base, adapter = np.random.default_rng(1).random(30), np.random.default_rng(2).random(30)
    assert paired_bootstrap(base, adapter, 500, 7) == paired_bootstrap(base, adapter, 500, 7)
    assert paired_bootstrap(base, adapter, 500, 7) != paired_bootstrap(base, adapter, 500, 8)
    with pytest.raises(ValueError, match="same non-empty shape"):
        paired_bootstrap([1.0], [1.0, 0.0], 100, 0)


def test_bootstrap_of_corpus_bleu_reaggregates_statistics():
    refs = ["the cat sat on the mat", "a dog ran in the park", "birds fly south", "it rains today"]
    base = ["cat mat", "dog park", "birds", "rain"]
    adapter = ["the cat sat on the mat", "a dog ran in a park", "birds fly south", "it rains"]
    sb, sa = metric_stats("bleu", base, refs), metric_stats("bleu", adapter, refs)
    d, lo, hi = paired_bootstrap(sb, sa, 300, 0, METRICS["bleu"].aggregate)
    expected = sacrebleu.corpus_bleu(adapter, [refs]).score - sacrebleu.corpus_bleu(base, [refs]).score
    assert math.isclose(d, expected) and lo <= d <= hi


def test_compare_verdicts_respect_direction():
    recs = lambda preds, nll: [{"source": f"e:{i}", "prediction": p, "reference": '{"a": 1}', "ref_nll": n,
                                "ref_tokens": 4} for i, (p, n) in enumerate(zip(preds, nll))]
    base = recs(["no"] * 12, [8.0] * 12)
    adapter = recs(['{"a": 1}'] * 11 + ["no"], [2.0] * 12)
    out = compare(base, adapter, ["json_validity", "perplexity", "exact_match"], 500, 0, load_json_schema(SCHEMA))
    assert list(out) == ["json_validity", "json_schema_conformance", "perplexity", "exact_match"]
    assert out["json_validity"]["verdict"] == "adapter better" and out["json_validity"]["ci95"][0] > 0
    assert out["perplexity"]["delta"] < 0 and out["perplexity"]["verdict"] == "adapter better"  # lower is better
    assert out["json_schema_conformance"]["verdict"] == "no clear change"  # {"a": 1} is no contact card
    with pytest.raises(EvalDataError, match="same examples"):
        compare(base, adapter[::-1], ["exact_match"], 100, 0)


# ---------------------------------------------------------------- generation on the real model

@pytest.fixture(scope="module")
def ci_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg, origin = resolve_config("ci", "cpu", [
        f"output.root={root}", "eval.max_examples=3", "eval.max_new_tokens=8", "eval.batch_size=3",
        "eval.bootstrap_samples=200", "eval.show_examples=2", f"eval.json_schema={SCHEMA}"])
    return cfg, origin


@pytest.mark.slow
def test_generation_batched_disabled_adapter_is_base_and_perplexity(ci_cfg):
    import torch
    from peft import LoraConfig, get_peft_model
    from adapterlab.eval import chat_prompt, completion_text
    from adapterlab.models import load_base_model
    cfg, _ = ci_cfg
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=2, max_new_tokens=6),
                              # fp32: padded and unpadded NLL agree to 1e-3 (in bf16, the cpu profile's `auto` on a
                              # bf16 CPU, only to ~1e-2: measured 0.2787 vs 0.2770)
                              hw=dataclasses.replace(cfg.hw, dtype="float32"))
    no_ppl = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=["exact_match"]))
    examples = load_eval_examples(cfg.data.eval, 2)
    model, tok, _ = load_base_model(cfg)
    plain = generate_predictions(model, tok, examples, cfg, desc="plain base")
    assert [r["source"] for r in plain] == [ex.source for ex in examples]
    assert all(r["prediction"] and 0 < r["new_tokens"] <= 6 for r in plain)
    # one prompt at a time gives the same greedy answers: left padding does not leak into the batch
    unbatched = dataclasses.replace(no_ppl, eval=dataclasses.replace(no_ppl.eval, batch_size=1))
    one = generate_predictions(model, tok, examples, unbatched, desc="unbatched")
    assert [r["prediction"] for r in one] == [r["prediction"] for r in plain] and "ref_nll" not in one[0]
    # the reference NLL is the model's own teacher-forced loss on the completion tokens
    ex = plain[0]
    p = tok(chat_prompt(tok, ex["prompt"]), add_special_tokens=False)["input_ids"]
    c = tok(completion_text(tok, ex["prompt"], ex["reference"]), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss.item()
    assert ex["ref_tokens"] == len(c) and math.isclose(loss, ex["ref_nll"] / ex["ref_tokens"], rel_tol=1e-3)

    # a LoRA adapter with non-zero weights on the same model object: disabled, it is exactly the base model
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with peft_model.disable_adapter():
        disabled = generate_predictions(peft_model, tok, examples, cfg, desc="disabled")
    assert [r["prediction"] for r in disabled] == [r["prediction"] for r in plain]
    assert np.allclose([r["ref_nll"] for r in disabled], [r["ref_nll"] for r in plain], rtol=1e-5)
    adapted = reference_nll(peft_model, tok, examples, 2)
    assert not np.allclose([n for n, _ in adapted], [r["ref_nll"] for r in plain], rtol=1e-3)


# ---------------------------------------------------------------- the stage end to end

@pytest.fixture(scope="module")
def trained_run(ci_cfg):
    "A run folder with params.yaml and a real (random, non-zero) LoRA artifact written by adapterlab.artifact."
    import torch
    from peft import LoraConfig, get_peft_model
    from adapterlab.artifact import write_artifact
    from adapterlab.models import load_base_model
    cfg, origin = ci_cfg
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir, origin)
    model, _, source = load_base_model(cfg)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    write_artifact(run_dir, peft_model, cfg, metrics={"train_loss": 1.0}, base=source)
    return run_dir


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory):
    "The stage notebook run by papermill on the trained run (evaluate_run end to end, as the pipeline runs it)."
    out_nb = tmp_path_factory.mktemp("nb") / "eval.out.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(REPO / "nbs" / "eval.ipynb"), str(out_nb), "-p", "run_dir",
         str(trained_run), "-y", "overrides: [eval.max_examples=3, eval.show_examples=2]", "--cwd", str(REPO / "nbs")],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trained_run, out_nb


@pytest.mark.slow
def test_stage_writes_reports_and_updates_artifact(evaluated_run):
    from adapterlab.artifact import verify_artifact
    run_dir, out_nb = evaluated_run
    out = run_dir / "eval"
    for name in ("predictions_base.jsonl", "predictions_adapter.jsonl", "report.json", "report.md", "metrics.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["n_examples"] == 3 and len(report["examples"]) == 2 and list(report["metrics"]) == [
        "exact_match", "f1", "rouge_l", "bleu", "perplexity", "json_validity", "json_schema_conformance"]
    for m in report["metrics"].values():
        lo, hi = m["ci95"]
        assert lo <= m["delta"] <= hi and math.isclose(m["delta"], m["adapter"] - m["base"], abs_tol=1e-9)
    # the saved predictions rescore to the same numbers without generating again
    base, adapted = load_predictions(out / "predictions_base.jsonl"), load_predictions(out / "predictions_adapter.jsonl")
    assert len(base) == len(adapted) == 3
    for which, records in (("base", base), ("adapter", adapted)):
        rescored = score(records, metrics=["exact_match", "f1", "rouge_l", "bleu", "perplexity", "json_validity"],
                         schema=SCHEMA)
        assert all(math.isclose(rescored[k], report["metrics"][k][which]) for k in rescored), which
    md = (out / "report.md").read_text()
    assert "| metric | base | adapter | Δ (adapter − base) | 95% CI of Δ | verdict |" in md
    assert md.count("| reference |") == 2 and "| json_validity (0-1, ↑) |" in md
    assert set(report["metrics"]) <= set(report["metric_selection"]) and "- metrics (eval.metrics " in md  # why each
    assert "Δ (adapter − base)" in out_nb.read_text()  # the notebook shows the report too
    # final metrics land in the artifact, which still verifies (checksums re-signed)
    artifact = run_dir / "artifact"
    metrics = json.loads((artifact / "training_metrics.json").read_text())
    assert metrics["train_loss"] == 1.0
    assert metrics["eval"]["json_validity"]["adapter"] == report["metrics"]["json_validity"]["adapter"]
    assert verify_artifact(artifact) == []


@pytest.mark.slow
def test_evaluate_run_refuses_a_tampered_artifact(trained_run, tmp_path):
    import shutil
    from adapterlab.artifact import ArtifactError
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    cfg_file = run / "artifact" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"r": 4', '"r": 5'))
    with pytest.raises(ArtifactError, match="adapter_config.json: sha256 mismatch"):
        evaluate_run(run)


@pytest.mark.slow
def test_stage_answers_equal_the_one_prompt_at_a_time_path_on_the_ci_artifact(ci_run, tmp_path):
    """The stage's fast path (one loaded model for base and adapter, batched left-padded generation, the adapter merged
    in memory) gives every prompt the answer of the plain path: a fresh base, then a fresh base + the adapter as PEFT
    loads it (unmerged), one prompt at a time. On the ci run's trained artifact, greedy, the run's own eval settings."""
    import shutil
    from peft import PeftModel
    from adapterlab.eval import eval_config, find_artifact
    from adapterlab.models import load_base_model
    run = tmp_path / "run"
    shutil.copytree(ci_run.summary["run_dir"], run)   # the stage writes eval/ and re-signs the artifact: a copy
    # fp32 base weights for this comparison (the ci run trained on bf16 ones where the CPU has bf16): in bf16 a padded
    # batch and a single prompt round differently, so greedy answers may part on a near-tie; in fp32 they must not
    overrides = ["eval.max_examples=8", "eval.batch_size=8", "hw.dtype=float32"]
    report = evaluate_run(run, overrides=overrides)
    assert report["generation"]["adapter_merged"] is True and report["generation"]["batch_size"] == 8
    cfg = eval_config(run, overrides)
    one = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=1))
    examples = load_eval_examples(cfg.data.eval, cfg.eval.max_examples)
    base, tok, _ = load_base_model(cfg)
    plain = {"base": generate_predictions(base, tok, examples, one, desc="base, one at a time")}
    adapter = PeftModel.from_pretrained(load_base_model(cfg)[0], str(find_artifact(run))).eval()
    plain["adapter"] = generate_predictions(adapter, tok, examples, one, desc="adapter, one at a time")
    stage = {name: load_predictions(run / "eval" / f"predictions_{name}.jsonl") for name in plain}
    for name in plain:
        assert [r["source"] for r in stage[name]] == [ex.source for ex in examples]
        assert [r["prediction"] for r in stage[name]] == [r["prediction"] for r in plain[name]], name
        assert [r["new_tokens"] for r in stage[name]] == [r["new_tokens"] for r in plain[name]], name
        assert np.allclose([r["ref_nll"] for r in stage[name]], [r["ref_nll"] for r in plain[name]], rtol=1e-4), name
    # the adapter changed the answers: the comparison above is between two different systems, not one twice
    assert [r["prediction"] for r in plain["base"]] != [r["prediction"] for r in plain["adapter"]]


# --- metrics that fit the task (issue 14) ------------------------------------------------------------------------------

def test_default_metrics_fit_a_plain_text_task():
    "The defaults on a plain-text eval set report no JSON metric (it used to say json_validity 0 vs 0), and say why."
    from adapterlab.readers import load_examples
    from adapterlab.eval import select_metrics
    cfg, _ = resolve_config("ci", "cpu")
    plain = load_examples(Path(__file__).parent / "fixtures" / "formats" / "eval.jsonl")
    chosen, why = select_metrics(cfg.eval.metrics, plain, None)
    assert chosen == ["exact_match", "f1", "rouge_l", "bleu", "perplexity"]
    assert why["json_validity"] == ("left out by auto: 0 of 8 references are JSON documents (name it in eval.metrics "
                                    "to report it anyway)")
    json_task = load_examples("sample:json_contacts/eval.jsonl")
    chosen, why = select_metrics(cfg.eval.metrics, json_task, None)
    assert chosen[-1] == "json_validity" and why["json_validity"] == f"auto: all {len(json_task)} references are JSON"
    # asked for explicitly: reported even on plain text, and the reason says so
    chosen, why = select_metrics(["exact_match", "json_validity"], plain, None)
    assert chosen == ["exact_match", "json_validity"] and why["json_validity"] == "asked for in eval.metrics"
    with pytest.raises(ConfigError, match="unknown metric"):
        select_metrics(["auto", "nonsense"], plain, None)


def test_report_says_which_metrics_and_why():
    from adapterlab.eval import report_markdown
    m = {"base": 0.1, "adapter": 0.5, "delta": 0.4, "ci95": [0.1, 0.6], "verdict": "adapter better",
         "higher_is_better": True, "scale": "0-1"}
    report = {"run_id": "r", "eval_set": "e.jsonl", "n_examples": 8, "base_model": "b", "artifact": "artifact",
              "seed": 0, "bootstrap_samples": 10, "truncated": {"base": 0, "adapter": 0}, "examples": [],
              "generation": {"max_new_tokens": 8, "batch_size": 2, "do_sample": False, "temperature": None},
              "metrics": {"exact_match": m}, "metric_selection": {"asked": ["auto"],
              "exact_match": "auto: a text metric, fits every task", "json_validity": "left out by auto: 0 of 8 ..."}}
    md = report_markdown(report)
    assert ("- metrics (eval.metrics ['auto']): exact_match: auto: a text metric, fits every task; json_validity: "
            "left out by auto: 0 of 8 ...") in md
