"""`adapterlab chat` driven through a pseudo-terminal (pexpect), as a person would: ask, correct with /critical up to
the queue's threshold, see the background training start, see the chat switch to the adapter it produced, and
/status name it; the next answer comes from it."""
import json
import re
import sys
from pathlib import Path

import pexpect
import pytest

PROMPT = "you> "
QUESTIONS = ["Return a JSON object with the keys \"name\", \"age\", \"city\" and \"job\" for this text: "
             "Ivo Marek, 38, is a baker in Brno.",
             "Return a JSON object with the keys \"name\", \"age\", \"city\" and \"job\" for this text: "
             "Ana Silva, 27, is a nurse in Porto."]
CORRECTIONS = ['{"name": "Ivo Marek", "age": 38, "city": "Brno", "job": "baker"}',
               '{"name": "Ana Silva", "age": 27, "city": "Porto", "job": "nurse"}']


def _answer(child, label: str) -> str:
    child.expect(re.escape(f"[{label}] ") + r"(.*?)\r\n" + re.escape(PROMPT))
    return child.match.group(1).decode().replace("\r\n", "\n").strip()  # the terminal shows \n as \r\n


@pytest.mark.slow
def test_chat_feedback_trains_and_switches_to_the_new_adapter(ci_run, tmp_path):
    artifact = Path(ci_run.summary["artifact"])
    queue = tmp_path / "queue" / "feedback.jsonl"
    args = ["-m", "adapterlab.cli", "chat", f"contacts={artifact}", "-f", "ci", "--max-new-tokens", "8",
            "--set", "queue.threshold=2", "--set", f"queue.path={queue}", "--set", f"output.root={tmp_path / 'out'}",
            "--set", "train.max_steps=2", "--set", "hw.batch_size=2", "--set", "data.val_fraction=0",
            "--set", "serve.poll_seconds=0.5"]
    child = pexpect.spawn(sys.executable, args, timeout=600, dimensions=(50, 400))
    child.logfile_read = open(tmp_path / "chat.log", "wb")
    try:
        child.expect(r"with adapter contacts .*training at 2\)")
        child.expect_exact(PROMPT)
        child.sendline("/critical before any answer")
        child.expect_exact("nothing to give feedback on yet")
        answers = []
        for n, (question, correction) in enumerate(zip(QUESTIONS, CORRECTIONS), 1):
            child.sendline(question)
            answers.append(_answer(child, "contacts"))
            child.sendline(f"/critical {correction}")
            child.expect_exact(f"queued critical (weight 10): {n}/2")
        child.expect(r"training started in the background on 2 record\(s\) \(pid (\d+)\)")
        child.expect_exact(PROMPT)
        child.sendline("/status")
        child.expect(r"training: (starting|running)")

        child.expect(r"switched to adapter (\S+)\r\n", timeout=1200)
        new = child.match.group(1).decode()
        assert new != "contacts" and "queue-ci" in new
        child.sendline("/status")
        child.expect(r"answering with: adapter (\S+) \((\S+)\)")
        assert child.match.group(1).decode() == new
        new_artifact = Path(child.match.group(2).decode())
        child.expect(r"adapters loaded: contacts, " + re.escape(new))
        child.expect(r"queue: 0/2 \(critical 0, improvement 0, good 0\)")  # the trained records were archived
        child.expect(r"last training: training succeeded: adapter " + re.escape(new) + " verified and loaded")
        child.expect_exact(PROMPT)
        child.sendline(QUESTIONS[0])
        _answer(child, new)  # the next answer comes from the new adapter

        child.sendline("/medium")  # the seed's /medium is the queue's improvement class: the answer at weight 3
        child.expect_exact("queued improvement (weight 3): 1/2")
        child.sendline("/base")
        child.expect_exact("answering with the base model alone")
        child.sendline(QUESTIONS[0])
        _answer(child, "base")
        child.sendline("/adapter nope")
        child.expect_exact("error: no adapter named 'nope'")
        child.sendline("/adapter contacts")
        child.expect_exact("answering with adapter contacts")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (tmp_path / "chat.log").read_text(errors="replace")[-3000:]

    # what the worker trained on: the two corrections as chosen answers, the model's answers as rejected
    run_dir = new_artifact.parent
    trained = [json.loads(l) for l in (run_dir / "queue_snapshot.jsonl").read_text().splitlines()]
    assert [r["response"] for r in trained] == CORRECTIONS and [r["weight"] for r in trained] == [10.0, 10.0]
    assert [r["rejected"] for r in trained] == answers and [r["query"] for r in trained] == QUESTIONS
    archived = list((queue.parent / "archive").glob("*.jsonl"))
    assert len(archived) == 1 and archived[0].read_bytes() == (run_dir / "queue_snapshot.jsonl").read_bytes()
    # the records are what the preference stage reads: critical corrections become (chosen, rejected) pairs
    from adapterlab.config import resolve_config
    from adapterlab.preference import pairs_from_queue
    cfg, _ = resolve_config("ci", "cpu")
    pairs, skipped = pairs_from_queue(trained, cfg)
    assert [(p.chosen, p.rejected) for p in pairs] == [(c, a) for c, a in zip(CORRECTIONS, answers) if c != a]
