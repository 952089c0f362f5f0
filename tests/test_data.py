"""The data stage: validation with precise errors, normalisation, dedup/split, statistics, weighted sampling,
the Chroma source, `adapterlab data check`, and the stage notebook."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from adapterlab.config import project_root, resolve_config
from adapterlab.formats import DataError, Example, normalise_record, to_prompt_completion
from adapterlab.readers import count_tokens, load_examples, read_source
from adapterlab.data import add_cli, check_files, chi2_sf, load_prepared, prepare_data, sampler_check, weighted_sampler

FIXTURES = Path(__file__).parent / "fixtures" / "data"
JSON_LINE = re.compile(r"^(malformed\.jsonl:\d+: \(json\): not valid JSON: ).+ at column \d+$")


@pytest.fixture(scope="module")
def tok():
    from adapterlab.models import load_tokenizer, resolve_model
    cfg, _ = resolve_config("ci", "cpu")
    return load_tokenizer(resolve_model(cfg.model.base_model), cfg)


def cfg_for(tmp_path, *overrides):
    cfg, _ = resolve_config("ci", "cpu", [f"output.root={tmp_path}", *overrides])
    return cfg


def write(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(l) + "\n" for l in lines), encoding="utf-8")
    return path


def feedback_lines(n, weights=(10, 3, 1)):
    return [{"query": f"question {i}?", "response": f"answer {i}.", "weight": weights[i % len(weights)],
             "feedback": "fb"} for i in range(n)]


# --- the malformed corpus ------------------------------------------------------------------------------------------

def _comparable(line: str) -> str:
    "json's own wording differs between Python versions: compare `(json)` lines up to the column."
    m = JSON_LINE.match(line)
    return m.group(1) + "... at column N" if m else line


def test_malformed_corpus_one_precise_error_per_bad_line(tok, monkeypatch, capsys):
    monkeypatch.chdir(FIXTURES)
    expected = (FIXTURES / "expected_errors.txt").read_text(encoding="utf-8").splitlines()
    rc = check_files(["malformed.jsonl"], tokenizer=tok, max_length=256, too_long="error", max_weight=1000)
    out, err = capsys.readouterr()
    got = out.splitlines()
    assert rc == 1
    assert [_comparable(l) for l in got] == [_comparable(l) for l in expected]
    if sys.version_info[:2] == (3, 11):  # the version the fixture's json messages were written for
        assert got == expected
    lines = [int(l.split(":")[1]) for l in got]
    assert len(lines) == len(set(lines)), "more than one error for a line"
    assert f"89 records: 14 kept, {len(expected)} bad" in err


def test_malformed_corpus_keeps_every_good_line(tok):
    r = read_source(FIXTURES / "malformed.jsonl", tokenizer=tok, max_length=256, max_weight=1000)
    good_ids = (FIXTURES / "expected_good_ids.txt").read_text().split()
    assert [e.meta["id"] for e in r.examples] == good_ids
    assert r.lines == 91 and r.blank_lines == 2 and len(r.rejects) == 75
    bad_lines = {int(x.line) for x in r.rejects}
    kept_lines = {int(e.source.rsplit(":", 1)[1]) for e in r.examples}
    assert not bad_lines & kept_lines and len(bad_lines | kept_lines) == 89
    by_id = {e.meta["id"]: e for e in r.examples}
    assert by_id["good-1"].messages[0]["role"] == "system"  # the BOM did not break line 1
    assert "日本" in by_id["good-8"].messages[0]["content"] and "\u2028" in by_id["good-9"].messages[0]["content"]
    assert by_id["good-2"].meta == {"id": "good-2", "context": "ctx", "sources": ["doc-1"]} and by_id["good-2"].weight == 2.5
    assert by_id["good-14"].messages[-1]["content"] == "still read"  # last line has no newline


def test_fixture_is_what_its_generator_writes(tmp_path):
    import shutil
    shutil.copy(FIXTURES / "make_malformed.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "make_malformed.py")], check=True, capture_output=True)
    for name in ("malformed.jsonl", "expected_errors.txt", "expected_good_ids.txt"):
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name



def test_sample_task_is_what_its_generator_writes(tmp_path):
    """sample_data/README.md keeps the json_contacts generator verbatim: it must still write the shipped files."""
    import re
    import adapterlab
    sample = Path(adapterlab.__file__).parent / "sample_data"
    code = re.search(r"```python\n(.*?)```", (sample / "README.md").read_text(), re.S).group(1)
    (tmp_path / "gen.py").write_text(code.replace('Path("lib/adapterlab/sample_data/json_contacts")', f'Path(r"{tmp_path}")'))
    subprocess.run([sys.executable, str(tmp_path / "gen.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (sample / "json_contacts" / name).read_bytes(), name

# --- formats and weights -----------------------------------------------------------------------------------------

def test_three_formats_normalise_to_one_record():
    fb, f1 = normalise_record({"query": "q", "response": "r", "weight": 3, "feedback": "style"})
    ins, f2 = normalise_record({"instruction": "Do", "input": "x", "response": "done", "sources": ["d1"]})
    msg, f3 = normalise_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
                                "context": "c"})
    assert (f1, f2, f3) == ("feedback", "instruction", "messages")
    assert fb.messages == msg.messages and fb.weight == 3.0 and msg.weight == 1.0
    assert fb.meta == {"feedback": "style"} and ins.meta == {"sources": ["d1"]} and msg.meta == {"context": "c"}
    assert ins.messages[0]["content"] == "Do\n\nx"
    pc = to_prompt_completion(fb)
    assert pc == {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "r"}],
                  "weight": 3.0}


@pytest.mark.parametrize("weight, ok", [(10, True), (0.5, True), (1e-6, True), (0, False), (-1, False),
                                        (float("nan"), False), (float("inf"), False), ("3", False), (True, False)])
def test_weight_rules(weight, ok):
    rec = {"query": "q", "response": "r", "weight": weight}
    if ok:
        assert normalise_record(rec)[0].weight == float(weight)
    else:
        with pytest.raises(ValueError, match=r"^weight: "):
            normalise_record(rec)


def test_forced_format_and_system_prompt():
    with pytest.raises(ValueError, match="^query: missing$"):
        normalise_record({"instruction": "i", "response": "r"}, "feedback")
    ex, _ = normalise_record({"query": "q", "response": "r", "weight": 1}, "feedback", system_prompt="Be brief.")
    assert ex.messages[0] == {"role": "system", "content": "Be brief."}


def test_load_examples_strict_and_lenient(tmp_path):
    p = write(tmp_path / "d.jsonl", [{"query": "q", "response": "r", "weight": 1}, {"query": "q"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: response: missing"):
        load_examples(p)
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert len(load_examples(p, strict=False)) == 1
    eval_recs = load_examples("sample:json_contacts/eval.jsonl")
    assert len(eval_recs) == 48 and eval_recs[0].source == "sample:json_contacts/eval.jsonl:1"


# --- lengths --------------------------------------------------------------------------------------------------------

def test_token_count_is_the_chat_template_length(tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert count_tokens(conv, tok) == len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("policy", ["error", "drop", "truncate"])
def test_too_long_policies(tmp_path, tok, policy):
    long = {"query": "Summarise.", "response": "lorem ipsum " * 80, "weight": 1}
    p = write(tmp_path / "d.jsonl", [{"query": "short", "response": "ok", "weight": 1}, long])
    r = read_source(p, tokenizer=tok, max_length=96, too_long=policy)
    full = count_tokens([{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": long["response"]}], tok)
    if policy == "truncate":
        assert len(r.examples) == 2 and not r.rejects
        cut = r.examples[1]
        assert count_tokens(cut.messages, tok) <= 96 and cut.meta["truncated_from_tokens"] == full
        assert long["response"].startswith(cut.messages[-1]["content"].rstrip())
        assert r.truncated == [{"source": cut.source, "tokens": full, "kept_tokens": count_tokens(cut.messages, tok)}]
    else:
        assert len(r.examples) == 1 and len(r.rejects) == 1
        x = r.rejects[0]
        assert str(x).startswith(f"{p}:2: (tokens): {full} tokens after the chat template > max length 96")
        assert x.kind == ("too_long" if policy == "error" else "dropped") and x.bad == (policy == "error")


# --- the stage ------------------------------------------------------------------------------------------------------

def test_prepare_data_writes_everything_and_is_deterministic(tmp_path, tok):
    lines = feedback_lines(40)
    lines += [lines[0], {"query": "bad", "weight": 1}]          # an exact duplicate and one bad record
    src = write(tmp_path / "fb.jsonl", lines)
    cfg = cfg_for(tmp_path, f"data.train={src}", "data.eval=sample:json_contacts/eval.jsonl", "data.val_fraction=0.25")
    a = prepare_data(cfg, tmp_path / "a", tok)
    b = prepare_data(cfg, tmp_path / "b", tok)
    for name in ("train.jsonl", "val.jsonl", "eval.jsonl", "rejects.jsonl"):
        assert (tmp_path / "a/data" / name).read_bytes() == (tmp_path / "b/data" / name).read_bytes(), name
    assert len(a.train) == 30 and len(a.val) == 10 and a.train.column_names == ["prompt", "completion", "weight"]
    rejects = [json.loads(l) for l in open(tmp_path / "a/data/rejects.jsonl")]
    assert [(r["kind"], r["line"]) for r in rejects] == [("invalid", 42), ("duplicate", "41")]
    assert rejects[0]["error"] == f"{src}:42: response: missing" and rejects[0]["raw"] == '{"query": "bad", "weight": 1}'
    assert rejects[1]["problem"] == f"exact duplicate of {src}:1"
    st = a.stats
    assert st["inputs"]["train"]["records"] == 42 and st["inputs"]["train"]["rejected"] == 1
    assert st["duplicates_removed"] == 1 and st["split"] == {"seed": cfg.seed, "val_fraction": 0.25, "train": 30, "val": 10,
                                                             "train_turns": 30}
    assert st["tokens"]["train"]["count"] == 30 and st["tokens"]["train"]["max"] <= cfg.hw.max_seq_length
    assert st["inputs"]["eval"]["valid"] == 48 and st["eval_overlap_with_train"] == 0
    assert (tmp_path / "a/data/lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_prepared(tmp_path / "a").stats == st and set(a.files) == {"train", "val", "eval"}
    # another seed, another split
    cfg2 = cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.val_fraction=0.25", "seed=1")
    c = prepare_data(cfg2, tmp_path / "c", tok)
    assert c.val["prompt"] != a.val["prompt"]


def test_weighting_is_visible_in_the_stats(tmp_path, tok):
    src = write(tmp_path / "fb.jsonl", feedback_lines(30))          # 10 critical, 10 improvement, 10 good
    cfg = cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.val_fraction=0")
    st = prepare_data(cfg, tmp_path / "run", tok).stats
    classes = {c["label"]: c for c in st["weights"]["classes"]}
    assert set(classes) == {"critical", "improvement", "good"}
    assert classes["critical"]["share_of_records"] == pytest.approx(1 / 3)
    assert classes["critical"]["expected_share_of_draws"] == pytest.approx(10 / 14)
    assert classes["critical"]["observed_share_of_draws"] == pytest.approx(10 / 14, abs=0.01)
    assert st["sampler_check"]["by_class"]["df"] == 2 and st["sampler_check"]["by_class"]["p_value"] > 1e-3
    cfg_off = cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.val_fraction=0", "data.weighted_sampling=false")
    st_off = prepare_data(cfg_off, tmp_path / "off", tok).stats
    assert st_off["weights"]["classes"][0]["expected_share_of_draws"] == pytest.approx(1 / 3)


def test_reject_threshold_stops_the_run_after_writing_the_rejects(tmp_path, tok):
    lines = feedback_lines(18) + [{"query": "q", "response": "r", "weight": -1}, {"nope": 1}]
    src = write(tmp_path / "fb.jsonl", lines)
    cfg = cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.max_reject_fraction=0.05")
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tmp_path / "run", tok)
    assert "2 of 20 records rejected (10.0%) > data.max_reject_fraction 5.0%" in str(e.value)
    assert f"{src}:19: weight: must be > 0, got -1" in str(e.value)
    assert len((tmp_path / "run/data/rejects.jsonl").read_text().splitlines()) == 2
    cfg_ok = cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.max_reject_fraction=0.1")
    assert len(prepare_data(cfg_ok, tmp_path / "ok", tok).train) == 16


def test_too_long_error_counts_against_the_threshold(tmp_path, tok):
    lines = feedback_lines(9) + [{"query": "q", "response": "word " * 400, "weight": 1}]
    src = write(tmp_path / "fb.jsonl", lines)
    with pytest.raises(DataError, match=r"1 of 10 records rejected"):
        prepare_data(cfg_for(tmp_path, f"data.train={src}", "data.eval=null"), tmp_path / "e", tok)
    prep = prepare_data(cfg_for(tmp_path, f"data.train={src}", "data.eval=null", "data.too_long=drop"), tmp_path / "d", tok)
    assert prep.stats["inputs"]["train"]["dropped_too_long"] == 1 and prep.stats["inputs"]["train"]["rejected"] == 0
    kinds = [json.loads(l)["kind"] for l in open(tmp_path / "d/data/rejects.jsonl")]
    assert kinds == ["dropped"]


# --- weighted sampling, tested statistically ----------------------------------------------------------------------

def test_chi2_survival_function_matches_tables():
    # 95% critical values of the chi-square distribution (any statistics table)
    for x, df in [(3.841, 1), (5.991, 2), (7.815, 3), (9.488, 4), (11.070, 5), (18.307, 10), (31.410, 20)]:
        assert chi2_sf(x, df) == pytest.approx(0.05, abs=2e-4), df
    assert chi2_sf(6.635, 1) == pytest.approx(0.01, abs=1e-4) and chi2_sf(0, 3) == 1.0


def test_weighted_sampler_draws_in_proportion_to_weight():
    weights = [10.0] * 5 + [3.0] * 10 + [1.0] * 25
    draws = 80_000
    chk = sampler_check(weights, draws, seed=123)
    assert chk["by_class"]["p_value"] > 1e-3 and chk["by_example"]["p_value"] > 1e-3
    total = sum(weights)
    for w, n in ((10.0, 5), (3.0, 10), (1.0, 25)):
        assert chk["by_class"]["observed_share"][str(w)] == pytest.approx(w * n / total, abs=0.01)
    # the test has power: the same draws from an unweighted sampler are rejected
    import torch
    uniform = torch.utils.data.RandomSampler(range(len(weights)), replacement=True, num_samples=draws,
                                             generator=torch.Generator().manual_seed(123))
    assert sampler_check(weights, draws, 123, sampler=uniform)["by_class"]["p_value"] < 1e-6
    # reproducible: same seed, same draws
    assert list(weighted_sampler(weights, 100, 7)) == list(weighted_sampler(weights, 100, 7))
    assert list(weighted_sampler(weights, 100, 7)) != list(weighted_sampler(weights, 100, 8))


# --- Chroma ----------------------------------------------------------------------------------------------------------

def make_collection(path: Path):
    "A real embedded, persistent collection with explicit embeddings (no embedding model is ever loaded)."
    chromadb = pytest.importorskip("chromadb")  # the `chroma` extra
    from chromadb.config import Settings
    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    col = client.create_collection("pdf_docs")
    col.add(ids=["doc-1", "doc-2", "doc-3", "doc-4", "doc-5"],
            documents=["The Rhône meets the Saône in Lyon. Lyon is France's third city.",
                       "Oslo is the capital of Norway. It lies at the head of a fjord.",
                       "Kyoto was the capital of Japan for over a thousand years.",
                       "A page without a title.",
                       "Bergen is Norway's second city. It is rainy."],
            metadatas=[{"title": "Lyon"}, {"question": "What is the capital of Norway?", "answer": "Oslo"},
                       {"title": "Kyoto", "page": 4}, {"page": 9}, {"title": "Bergen"}],
            embeddings=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1], [0.0, 0.0, 1.0], [0.1, 0.95, 0.0]])


def test_chroma_collection_becomes_grounded_citing_examples(tmp_path):
    make_collection(tmp_path / "db")
    r = read_source(f"chroma:{tmp_path / 'db'}?collection=pdf_docs&distractors=1")
    assert [e.meta["id"] for e in r.examples] == ["doc-1", "doc-2", "doc-3", "doc-5"]
    ex = {e.meta["id"]: e for e in r.examples}
    # answer = metadata answer, else the first sentence; always cites its own id
    assert ex["doc-2"].messages[-1]["content"] == "Oslo [doc-2]"
    assert ex["doc-1"].messages[-1]["content"] == "The Rhône meets the Saône in Lyon. [doc-1]"
    assert "Question: What does the source say about Lyon?" in ex["doc-1"].messages[0]["content"]
    # context = own passage + the nearest neighbour in embedding space, both with their ids
    assert {p["id"] for p in ex["doc-1"].meta["context"]} == {"doc-1", "doc-3"}
    assert {p["id"] for p in ex["doc-2"].meta["context"]} == {"doc-2", "doc-5"}
    assert "[doc-5] Bergen is Norway's second city." in ex["doc-2"].messages[0]["content"]
    assert ex["doc-3"].meta["sources"] == ["doc-3"] and ex["doc-3"].meta["metadata"] == {"title": "Kyoto", "page": 4}
    assert [str(x).split(":", 2)[-1] for x in r.rejects] == ["doc-4: metadata.question: missing, and no metadata.title to ask about"]


def test_chroma_source_through_the_stage_and_errors(tmp_path, tok):
    make_collection(tmp_path / "db")
    spec = f"chroma:{tmp_path / 'db'}?collection=pdf_docs"
    cfg = cfg_for(tmp_path, f"data.train={spec}", "data.eval=null", "data.val_fraction=0.25",
                  "data.max_reject_fraction=0.5")
    prep = prepare_data(cfg, tmp_path / "run", tok)
    assert len(prep.train) == 3 and len(prep.val) == 1 and prep.stats["inputs"]["train"]["formats"] == {"chroma": 4}
    rows = [json.loads(l) for l in open(tmp_path / "run/data/train.jsonl")]
    assert all(r["messages"][-1]["content"].endswith(f"[{r['meta']['id']}]") for r in rows)
    with pytest.raises(DataError, match="no collection 'nope'"):
        read_source(f"chroma:{tmp_path / 'db'}?collection=nope")
    with pytest.raises(DataError, match="expected chroma:PATH"):
        read_source(f"chroma:{tmp_path / 'db'}")
    with pytest.raises(DataError, match="no Chroma database folder"):
        read_source(f"chroma:{tmp_path / 'missing'}?collection=pdf_docs")


# --- the CLI --------------------------------------------------------------------------------------------------------

def run_cli(*argv) -> int:
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    args = ap.parse_args(list(argv))
    return args.func(args)


def test_data_check_cli(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", feedback_lines(3))
    bad = write(tmp_path / "bad.jsonl", [{"query": "q", "response": "r", "weight": "heavy"}])
    assert run_cli("data", "check", "--no-length", str(good)) == 0
    assert run_cli("data", "check", "--no-length", str(good), str(bad)) == 1
    out, err = capsys.readouterr()
    assert out == f'{bad}:1: weight: expected a number, got a string "heavy"\n'
    assert "checked 4 records in 2 source(s): 1 bad" in err
    assert run_cli("data", "check", "--no-length", str(tmp_path / "missing.jsonl")) == 2   # unreadable: exit 2
    assert "no such data file" in capsys.readouterr().out


def test_data_export_cli(tmp_path):
    make_collection(tmp_path / "db")
    out = tmp_path / "qa.jsonl"
    spec = f"chroma:{tmp_path / 'db'}?collection=pdf_docs"
    with pytest.raises(DataError):
        run_cli("data", "export", spec, str(out))                   # doc-4 is bad: refused by default
    with pytest.warns(UserWarning, match="skipped 1 bad record.*doc-4: metadata.question: missing"):
        assert run_cli("data", "export", "--skip-bad", spec, str(out)) == 0
    reread = load_examples(out)                                      # the export is valid messages JSONL
    assert len(reread) == 4 and reread[0].meta["sources"] == ["doc-1"] and reread[0].meta["id"] == "doc-1"


# --- the stage notebook ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stage_notebook_writes_the_run_data(tmp_path):
    import papermill as pm
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(project_root() / "nbs" / "data.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"run_dir": str(run_dir), "experiment": "ci", "hw": "cpu",
                                    "overrides": [f"output.root={tmp_path}"]},
                        kernel_name="python3", cwd=str(project_root() / "nbs"), progress_bar=False)
    for name in ("train.jsonl", "val.jsonl", "rejects.jsonl", "stats.json", "lengths.png"):
        assert (run_dir / "data" / name).exists(), name
    prep = load_prepared(run_dir)
    assert len(prep.train) == 216 and len(prep.val) == 24 and (run_dir / "params.yaml").exists()


# --- the format fixtures (issue 14); each format trains: tests/test_formats_run.py ------------------------------------

FORMATS_DIR = Path(__file__).parent / "fixtures" / "formats"


def test_format_fixtures_are_what_their_generator_writes(tmp_path):
    shutil.copy(FORMATS_DIR / "make_formats.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "make_formats.py")], check=True, capture_output=True)
    for name in ("text.jsonl", "messages.jsonl", "sharegpt.json", "prompt_completion_conversational.jsonl",
                 "preference.jsonl", "preference_implicit.jsonl", "feedback.jsonl", "eval.jsonl", "alpaca.csv"):
        assert (tmp_path / name).read_bytes() == (FORMATS_DIR / name).read_bytes(), name
    from datasets import Dataset, load_from_disk
    assert Dataset.from_parquet(str(tmp_path / "prompt_completion.parquet")).to_list() == \
        Dataset.from_parquet(str(FORMATS_DIR / "prompt_completion.parquet")).to_list()
    assert load_from_disk(str(tmp_path / "messages_saved")).to_list() == load_from_disk(str(FORMATS_DIR / "messages_saved")).to_list()

def test_convert_writes_normalised_records_that_read_back(tmp_path):
    out = tmp_path / "sharegpt.jsonl"
    assert run_cli("data", "convert", str(FORMATS_DIR / "sharegpt.json"), str(out)) == 0
    original, converted = load_examples(FORMATS_DIR / "sharegpt.json"), load_examples(out)
    assert [e.messages for e in converted] == [e.messages for e in original] and len(converted) == 32
    assert json.loads(out.read_text().splitlines()[0])["messages"][1] == {"role": "user", "content": "Opposite of hot?"}
    with pytest.raises(DataError, match="looks like a Parquet file"):   # a wrong type is refused here too
        shutil.copy(FORMATS_DIR / "prompt_completion.parquet", tmp_path / "p.jsonl")
        run_cli("data", "convert", str(tmp_path / "p.jsonl"), str(tmp_path / "o.jsonl"))


def test_implicit_and_explicit_preference_give_the_same_pairs():
    "The preference stage reads an implicit-prompt file (two transcripts) as the explicit one."
    from adapterlab.preference import read_pairs
    implicit, explicit = read_pairs(FORMATS_DIR / "preference_implicit.jsonl"), read_pairs(FORMATS_DIR / "preference.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in implicit] == [(p.prompt, p.chosen, p.rejected) for p in explicit]
    assert len(implicit) == 32 and implicit[0].chosen == "cold"


@pytest.mark.parametrize("kind", ["parquet", "json", "csv", "save_to_disk"])
def test_preference_pairs_from_any_table_the_data_stage_reads(tmp_path, kind):
    "A pairs file exported as Parquet, a JSON array, CSV or a saved dataset gives the JSONL file's pairs."
    from datasets import Dataset
    from adapterlab.formats import DataError
    from adapterlab.preference import read_pairs
    rows = [json.loads(l) for l in (FORMATS_DIR / "preference_implicit.jsonl").read_text().splitlines() if l.strip()]
    if kind == "csv":   # a CSV holds strings: the explicit form (prompt text, two answers)
        rows = [{"prompt": p.prompt[-1]["content"], "chosen": p.chosen, "rejected": p.rejected}
                for p in read_pairs(FORMATS_DIR / "preference.jsonl") if len(p.prompt) == 1]
    ds, path = Dataset.from_list(rows), tmp_path / f"pairs.{kind}"
    {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False), "save_to_disk": ds.save_to_disk,
     "json": lambda p: p.write_text(json.dumps(rows))}[kind](path)
    got = read_pairs(path)
    want = [p for p in read_pairs(FORMATS_DIR / "preference.jsonl")
            if kind != "csv" or len(p.prompt) == 1]
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(p.prompt, p.chosen, p.rejected) for p in want]
    assert got[-1].source == f"{path}: row {len(got)}"
    bad = Dataset.from_list([*rows[:2], {**rows[2], "rejected": rows[2]["chosen"]}])
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 3: rejected: is the same answer as chosen"):
        read_pairs(tmp_path / "bad.parquet")
