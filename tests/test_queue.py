"""The feedback queue: validated appends that survive concurrent writers, status, archiving of exactly what was trained
on, and the background training path (real SmolLM2, a couple of steps)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from adapterlab.config import resolve_config
from adapterlab.formats import DataError
from adapterlab.readers import load_examples
from adapterlab.queue import (QueueError, add_cli, append_records, archive_consumed, archive_dir, feedback_record,
                              marker_path, queue_path, queue_status, read_queue, running_training, start_training,
                              training_status, wait_for_training)


def sets(tmp_path, *extra):
    return [f"queue.path={tmp_path / 'queue' / 'feedback.jsonl'}", f"output.root={tmp_path / 'out'}", *extra]


def cfg_for(tmp_path, *extra):
    return resolve_config("ci", "cpu", sets(tmp_path, *extra))[0]


def run_cli(*argv) -> int:
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    args = ap.parse_args(list(argv))
    return args.func(args)


def cli_sets(tmp_path, *extra):
    out = ["--experiment", "ci", "--hw", "cpu"]
    for s in sets(tmp_path, *extra):
        out += ["--set", s]
    return out


def test_add_validates_weights_by_class_and_status(tmp_path, capsys):
    cfg = cfg_for(tmp_path)
    for kind in ("critical", "improvement", "good"):
        assert run_cli("queue", "add", f"--{kind}", "--query", f"{kind} q", "--response", "r", *cli_sets(tmp_path)) == 0
    assert [r["weight"] for r in read_queue(queue_path(cfg))] == [10.0, 3.0, 1.0]
    assert run_cli("queue", "add", "--good", "--query", "q", "--response", "  ", *cli_sets(tmp_path)) == 2
    assert "response: is empty" in capsys.readouterr().err
    assert len(read_queue(queue_path(cfg))) == 3
    st = queue_status(cfg)
    assert st["by_class"] == {"critical": 1, "improvement": 1, "good": 1} and st["records"] == 3 and not st["ready"]
    # the queue is valid input for the data stage, weights and feedback intact
    exs = load_examples(queue_path(cfg), format="feedback")
    assert [e.weight for e in exs] == [10.0, 3.0, 1.0] and exs[0].meta == {"feedback": "critical"}
    assert run_cli("queue", "status", *cli_sets(tmp_path)) == 0
    assert "3 queued (critical 1, improvement 1, good 1); threshold 10" in capsys.readouterr().out
    weights = resolve_config("ci", "cpu", sets(tmp_path, "queue.weight_critical=20"))[0]
    assert feedback_record(weights, "critical", "q", "r")["weight"] == 20.0


WRITER = textwrap.dedent("""
    import argparse, sys
    from adapterlab.queue import add_cli
    writer, n, sets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    ap = argparse.ArgumentParser(); add_cli(ap.add_subparsers())
    for i in range(n):
        args = ap.parse_args(["queue", "add", "--good", "--query", f"{writer}-{i}", "--response", "r" * (i * 37 % 900 + 1),
                              "--experiment", "ci", *sum((["--set", s] for s in sets), [])])
        assert args.func(args) == 0
""")


@pytest.mark.slow
def test_concurrent_adds_and_archiving_lose_nothing(tmp_path):
    """Several processes `queue add` at once while the archiver repeatedly takes and archives the queue's head:
    every record ends up exactly once, either archived or still queued, each line whole."""
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    writers, per_writer = 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{k}", str(per_writer), *sets(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(writers)]
    archives = 0
    while any(p.poll() is None for p in procs) or archives == 0:
        time.sleep(0.05)
        if q.exists() and q.stat().st_size:
            snap = tmp_path / f"snap-{archives}.jsonl"
            snap.write_bytes(q.read_bytes())  # racing with the writers on purpose: archive_consumed re-checks under the lock
            try:
                archive_consumed(q, snap)
                archives += 1
            except QueueError:
                pass  # only possible if the snapshot caught a half-written line; nothing is changed then
    assert all(p.wait() == 0 for p in procs), [p.stderr.read() for p in procs]
    lines = []
    for f in sorted(archive_dir(q).glob("*.jsonl")) + [q]:
        lines += [l for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
    queries = [json.loads(l)["query"] for l in lines]  # every line is whole JSON
    assert sorted(queries) == sorted(f"w{k}-{i}" for k in range(writers) for i in range(per_writer))
    assert archives >= 1
    for k in range(writers):  # each writer's records in the order it wrote them
        mine = [x for x in queries if x.startswith(f"w{k}-")]
        assert mine == [f"w{k}-{i}" for i in range(per_writer)]


def test_a_snapshot_cut_inside_a_record_is_never_archived(tmp_path):
    """A reader without the lock can see an append half done (Linux publishes a write a page at a time): the
    concurrent test above once archived such a snapshot, which left a record's front half in the archive and its back
    half in the queue. Every cut of a queue: inside a record it is refused and nothing changes; at a line end it
    archives exactly the records before the cut (a cut just before a newline too: that record is whole, and so is
    the queue's next line, which is how a crashed writer's half line looks once the next append has closed it)."""
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    append_records(q, [feedback_record(cfg, "good", f"q{i}", "r" * (20 * i + 1)) for i in range(3)])
    full, snap = q.read_bytes(), tmp_path / "snap.jsonl"
    line_ends = {i + 1 for i, b in enumerate(full) if b == ord("\n")}
    whole = line_ends | {e - 1 for e in line_ends}
    archived = 0
    for cut in range(1, len(full) + 1):
        snap.write_bytes(full[:cut])
        if cut not in whole:
            with pytest.raises(QueueError, match="ends inside a record"):
                archive_consumed(q, snap)
            assert q.read_bytes() == full and not archive_dir(q).exists()
            continue
        target = archive_consumed(q, snap)
        archived += 1
        assert target.read_bytes() + q.read_bytes() == full
        lines = [l for f in (target, q) for l in f.read_text().splitlines() if l.strip()]
        assert [json.loads(l)["query"] for l in lines] == ["q0", "q1", "q2"]
        shutil.rmtree(archive_dir(q))
        q.write_bytes(full)
    assert archived == 6


def test_archive_after_a_crashed_half_line_keeps_every_record_whole(tmp_path):
    """A half line a crashed writer left is closed by the next append's newline: a snapshot that ends on it (taken
    under the lock, before that append) still archives, and the records after it stay whole."""
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    q.parent.mkdir(parents=True)
    q.write_bytes(b'{"query": "crashed mid-wri')
    snap = tmp_path / "snap.jsonl"
    snap.write_bytes(q.read_bytes())
    append_records(q, [feedback_record(cfg, "good", "after", "r")])
    target = archive_consumed(q, snap)
    assert target.read_bytes() == b'{"query": "crashed mid-wri' and [r["query"] for r in read_queue(q)] == ["after"]


def test_archive_refuses_a_queue_edited_meanwhile(tmp_path):
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    append_records(q, [feedback_record(cfg, "good", f"q{i}", "r") for i in range(3)])
    snap = tmp_path / "snap.jsonl"
    snap.write_bytes(q.read_bytes())
    q.write_text(q.read_text().replace("q1", "edited"))
    before = q.read_bytes()
    with pytest.raises(QueueError, match="edited meanwhile"):
        archive_consumed(q, snap)
    assert q.read_bytes() == before and not archive_dir(q).exists()


def test_append_after_a_crashed_half_line_starts_a_new_line(tmp_path):
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    q.parent.mkdir(parents=True)
    q.write_bytes(b'{"query": "crashed mid-wri')
    assert append_records(q, [feedback_record(cfg, "good", "after", "r")]) == 2
    assert q.read_bytes().endswith(b'\n{"query": "after", "response": "r", "weight": 1.0, "feedback": "good"}\n')


def test_train_below_threshold_is_refused(tmp_path, capsys):
    cfg = cfg_for(tmp_path)
    append_records(queue_path(cfg), [feedback_record(cfg, "good", "q", "r")])
    assert run_cli("queue", "train", *cli_sets(tmp_path)) == 2
    assert "1 record(s) queued, threshold 10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_failed_training_leaves_the_queue_intact(tmp_path, capsys):
    cfg = cfg_for(tmp_path)
    q = queue_path(cfg)
    append_records(q, [feedback_record(cfg, "critical", f"q{i}", "r") for i in range(3)])
    before = q.read_bytes()
    rc = run_cli("queue", "train", "--force", "--wait", *cli_sets(tmp_path, "model.base_model=/no/such/model"))
    out = capsys.readouterr().out
    # the worker runs the pipeline's stages: the error names the stage that failed, then the cause
    assert rc == 1 and "training failed: StageFailed: stage '" in out and "ModelNotFound" in out, out
    run_dir = Path(out.split("run folder: ")[1].split()[0])
    assert training_status(run_dir)["state"] == "failed"
    assert "Traceback" in (run_dir / "queue_train.log").read_text()
    assert q.read_bytes() == before and not archive_dir(q).exists() and running_training(q) is None


@pytest.mark.slow
def test_queue_trains_an_adapter_in_the_background_and_archives(tmp_path, capsys):
    """The seed-003 flow: feedback accumulates; the add that reaches the threshold starts a background training
    (`--auto`); records added meanwhile stay queued; after the artifact verifies, exactly the trained records are
    archived."""
    from adapterlab.artifact import verify_artifact
    extra = ("queue.threshold=10", "train.max_steps=1", "hw.batch_size=2", "data.val_fraction=0")
    cfg = cfg_for(tmp_path, *extra)
    q = queue_path(cfg)
    kinds = ["critical"] * 3 + ["improvement"] * 3 + ["good"] * 3
    append_records(q, [feedback_record(cfg, k, f"Question {i}?", f"Answer {i}.") for i, k in enumerate(kinds)])
    assert run_cli("queue", "add", "--critical", "--query", "Never use unwrap?", "--response", "Use ? instead.",
                   "--auto", *cli_sets(tmp_path, *extra)) == 0
    out = capsys.readouterr().out
    assert "10/10" in out and "training 10 queued record(s) in the background" in out
    run_dir = Path(out.split("run folder: ")[1].split()[0])
    trained_on = (run_dir / "queue_snapshot.jsonl").read_bytes()
    assert len(trained_on.splitlines()) == 10
    # a second training of the same queue is refused while this one runs
    with pytest.raises(QueueError, match="already running"):
        start_training("ci", "cpu", sets(tmp_path, *extra), force=True)
    late = [feedback_record(cfg, "good", f"late {i}", "r") for i in range(2)]
    append_records(q, late)

    st = wait_for_training(run_dir, timeout=900)   # data → compat → train notebooks, as `adapterlab run`
    assert st["state"] == "succeeded", (st, (run_dir / "queue_train.log").read_text()[-3000:])
    artifact = Path(st["artifact"])
    assert verify_artifact(artifact) == [] and (artifact / "adapter_model.safetensors").exists()
    assert Path(st["archive"]).read_bytes() == trained_on
    assert [r["query"] for r in read_queue(q)] == ["late 0", "late 1"]
    assert running_training(q) is None and not marker_path(q).exists()
    # the run used the snapshot as feedback data, weighted
    assert "[queue] artifact" in (run_dir / "queue_train.log").read_text()
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["inputs"]["train"]["formats"] == {"feedback": 10}
    assert {c["label"]: c["records"] for c in stats["weights"]["classes"]} == {"critical": 4, "improvement": 3, "good": 3}
    meta = json.loads((artifact / "metadata.json").read_text())
    assert meta["datasets"][0]["examples"] == 10
