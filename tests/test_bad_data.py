"""Data that can't hurt (issue 17): every bad input below gets one line from the real `adapterlab data check`, the
exit status it promises (2: the source cannot be read at all; 1: some records are bad), never a traceback; and the
data stage of a run agrees with `data check` on what is a reject, duplicates included."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapterlab.config import resolve_config
from adapterlab.formats import DataError
from adapterlab.readers import read_source
from adapterlab.data import check_files, prepare_data, sampler_check

FORMATS = Path(__file__).parent / "fixtures" / "formats"
SECRET = "root:x:0:0:this line must never be copied anywhere"


def data_check(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "adapterlab.cli", "data", "check", "--no-length", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _parquet(tmp):
    shutil.copy(FORMATS / "prompt_completion.parquet", tmp / "train.jsonl")
    return tmp / "train.jsonl"


def _outside_link(tmp):
    outside = tmp / "system"; outside.mkdir()
    (outside / "passwd").write_text(SECRET + "\n")
    data = tmp / "data"; data.mkdir()
    os.symlink(outside / "passwd", data / "train.jsonl")
    return data / "train.jsonl"


# (case, how to make the file, the one line data check prints (a substring), exit status)
FATAL = [
    ("empty file", lambda t: _write(t / "e.jsonl", b""), "no records (the file is empty)"),
    ("blank lines only", lambda t: _write(t / "b.jsonl", b"\n  \n"), "no records (the source is empty; 2 blank line(s))"),
    ("empty csv", lambda t: _write(t / "e.csv", b""), "no records (the file is empty)"),
    ("csv header only", lambda t: _write(t / "h.csv", b"prompt,completion\n"), "no records (a header, no rows)"),
    ("symlink out of the data folder", _outside_link, "a symbolic link to"),
    ("parquet named .jsonl", _parquet, "looks like a Parquet file, not JSON Lines; rename it to train.parquet"),
    ("csv fed as json", lambda t: _write(t / "x.json", (FORMATS / "alpaca.csv").read_bytes()),
     "looks like CSV/TSV text, not JSON; rename it to x.csv"),
    ("json array in .jsonl", lambda t: _write(t / "a.jsonl", (FORMATS / "sharegpt.json").read_bytes()),
     "looks like a JSON array, not JSON Lines; rename it to a.json"),
    ("binary file", lambda t: _write(t / "b.jsonl", bytes(range(256)) * 4), "looks like a binary file, not JSON Lines"),
    ("gzip file", lambda t: _write(t / "g.jsonl", b"\x1f\x8b\x08\x00" + bytes(60)), "looks like a gzip-compressed file"),
    ("missing file", lambda t: t / "nope.jsonl", "no such data file"),
    ("folder not saved by datasets", lambda t: (t / "dir").mkdir() or t / "dir", "not one written by Dataset.save_to_disk"),
    ("unknown file type", lambda t: _write(t / "notes.txt", b"hello"), "unknown file type '.txt'"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, make, line", FATAL, ids=[c[0] for c in FATAL])
def test_unreadable_source_is_one_line_and_exit_2(tmp_path, case, make, line, capsys):
    path = make(tmp_path)
    assert check_files([str(path)]) == 2        # the function behind `data check`, one case at a time
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(str(path)) and line in out[0], out
    assert SECRET not in "\n".join(out)


def test_unreadable_sources_through_the_real_cli(tmp_path):
    "All the cases above in one real `adapterlab data check` process: exit 2, one line each, no traceback."
    paths = []
    for i, (_, make, _) in enumerate(FATAL):
        (tmp_path / str(i)).mkdir()
        paths.append(make(tmp_path / str(i)))
    r = data_check(*paths)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == len(FATAL) and all(o.startswith(str(p)) and line in o
                                          for o, p, (_, _, line) in zip(out, paths, FATAL)), out
    assert SECRET not in r.stdout + r.stderr
    assert f"{len(FATAL)} unreadable" in r.stderr


def test_hub_id_offline_is_one_line_and_exit_2(tmp_path):
    r = data_check("hf:someone/some-dataset", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stdout.strip() == ("hf:someone/some-dataset: no such local file, and the hub dataset 'someone/some-dataset' "
                                "cannot be fetched: offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); download it "
                                "and give the folder or file")


BAD_RECORDS = [  # (record, the problem data check and the stage both report for it)
    ({"query": "q", "response": "r", "weight": 1e308},
     "weight: must be ≤ data.max_weight = 1000, got 1e+308 (one record would take most of the sampler's draws)"),
    ({"query": "null \u0000 byte", "response": "r", "weight": 1},
     "query: contains the control character U+0000 at position 5; remove it (only tab, newline and carriage return are allowed in text)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bell \u0007"}]},
     "messages[1].content: contains the control character U+0007 at position 5; remove it (only tab, newline and carriage return are allowed in text)"),
    ({"text": "escape \u001b[2J"}, "text: contains the control character U+001B at position 7; remove it (only tab, newline and carriage return are allowed in text)"),
]


def _mixed_file(tmp_path) -> Path:
    good = [{"query": f"question {i}?", "response": f"answer {i}.", "weight": [10, 3, 1][i % 3]} for i in range(60)]
    lines = good + [rec for rec, _ in BAD_RECORDS] + [good[4], good[7]]   # two exact duplicates
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))     # json.dumps writes NUL as the escape \u0000
    return path


def test_bad_records_and_duplicates_data_check_and_stage_agree(tmp_path):
    path = _mixed_file(tmp_path)
    assert b"\\u0000" in path.read_bytes() and b"\x00" not in path.read_bytes()   # escaped, as the issue found it
    r = data_check(path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    expected = [f"{path}:{61 + i}: {problem}" for i, (_, problem) in enumerate(BAD_RECORDS)]
    expected += [f"{path}:65: (record): exact duplicate of {path}:5", f"{path}:66: (record): exact duplicate of {path}:8"]
    assert r.stdout.splitlines() == expected
    assert f"{path}: 66 records: 60 kept, 4 bad (2 duplicate(s) left out (data.dedup))" in r.stderr

    cfg, _ = resolve_config("ci", "cpu", [f"output.root={tmp_path}", f"data.train={path}", "data.eval=null",
                                          "data.max_reject_fraction=0.1", "data.val_fraction=0"])
    from adapterlab.models import load_tokenizer, resolve_model
    prep = prepare_data(cfg, tmp_path / "run", load_tokenizer(resolve_model(cfg.model.base_model), cfg))
    rejects = [json.loads(l) for l in open(tmp_path / "run/data/rejects.jsonl")]
    assert [x["error"] for x in rejects] == expected                  # the same rejects, the same words
    assert [x["kind"] for x in rejects] == ["invalid"] * 4 + ["duplicate"] * 2
    assert len(prep.train) == 60 and max(prep.train["weight"]) == 10.0
    train_text = (tmp_path / "run/data/train.jsonl").read_text()
    assert "\\u0000" not in train_text and "\\u001b" not in train_text


def test_weight_bound_keeps_the_sampler_honest():
    # what a 1e308 weight would do if it were let through: one record takes every draw
    check = sampler_check([1e308] + [1.0] * 9, 10_000, seed=0)
    assert check["by_class"]["observed_share"]["1e+308"] == 1.0
    cfg, _ = resolve_config("ci", "cpu")
    assert cfg.data.max_weight == 1000   # the documented default (params/defaults.yaml)


def test_symlink_content_never_reaches_the_run(tmp_path):
    link = _outside_link(tmp_path)
    cfg, _ = resolve_config("ci", "cpu", [f"output.root={tmp_path}", f"data.train={link}", "data.eval=null"])
    with pytest.raises(DataError, match="a symbolic link to .*passwd, outside the data folder"):
        prepare_data(cfg, tmp_path / "run", tokenizer=object())
    for f in (tmp_path / "run").rglob("*"):
        assert not f.is_file() or SECRET not in f.read_text(errors="replace"), f


def test_link_inside_the_data_folder_is_followed(tmp_path):
    shutil.copy(FORMATS / "feedback.jsonl", tmp_path / "real.jsonl")
    os.symlink(tmp_path / "real.jsonl", tmp_path / "train.jsonl")
    assert len(read_source(tmp_path / "train.jsonl").examples) == 32


def test_rows_of_other_files_are_named_by_row(tmp_path):
    (tmp_path / "t.csv").write_text('prompt,completion\nOpposite of hot?,cold\nOpposite of up?,"do\x01wn"\n,x\n')
    r = data_check(tmp_path / "t.csv")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stdout.splitlines() == [
        f"{tmp_path / 't.csv'}: row 2: completion: contains the control character U+0001 at position 2; remove it "
        "(only tab, newline and carriage return are allowed in text)",
        f"{tmp_path / 't.csv'}: row 3: prompt: missing"]
