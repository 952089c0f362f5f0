"""Every bad parameter input is refused by `adapterlab run` with one line `file:line: key: problem` and exit 2,
before any stage runs, and never with a traceback. Each case names its input and the words the line must hold."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _files(tmp: Path) -> dict:
    "The bad parameter files the cases point at, written fresh per test."
    (tmp / "folder.yaml").mkdir()
    (tmp / "somedir").mkdir()
    files = {
        "inf_epochs.yaml": "experiment: inf_epochs\ntrain:\n  epochs: .inf\n",
        "nan_lr.yaml": "experiment: nan_lr\ntrain:\n  learning_rate: .nan\n",
        "dupe.yaml": "experiment: dupe\nlora:\n  r: 4\n  alpha: 8\n  r: 16\n",
        "dupe_section.yaml": "experiment: dupe_section\nlora:\n  r: 4\nseed: 1\nlora:\n  r: 16\n",
        "empty.yaml": "",
        "comments.yaml": "# nothing but a comment\n",
        "nameless.yaml": "lora:\n  r: 4\n",
        "unknown.yaml": "experiment: unknown\nlora:\n  alpah: 8\n",
        "wrongtype.yaml": "experiment: wrongtype\nlora:\n  r: eight\n",
        "range.yaml": "experiment: range\nlora:\n  dropout: 1.5\n",
        "broken.yaml": "experiment: broken\nlora:\n  r: [1,\n",
        "notamap.yaml": "- just\n- a list\n",
        "mismatch.yaml": "experiment: other\n",
        "remote.yaml": "experiment: remote\nmodel:\n  trust_remote_code: true\n",
        "slashhw.yaml": "hw:\n  name: ../evil\n",
        "hw_extra.yaml": "hw:\n  name: hw_extra\nlora:\n  r: 4\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "latin1.yaml").write_bytes("experiment: latin1\ndata:\n  system_prompt: caf\xe9\n".encode("latin-1"))
    return files


# (case id, arguments after `adapterlab run`, words the one line must contain)
CASES = [
    ("inf epochs", ["-f", "{tmp}/inf_epochs.yaml"], ["inf_epochs.yaml:3:", "train.epochs", "finite"]),
    ("nan learning rate", ["-f", "{tmp}/nan_lr.yaml"], ["nan_lr.yaml:3:", "train.learning_rate", "finite"]),
    ("inf alpha override", ["-f", "ci", "--set", "lora.alpha=.inf"], ["override", "lora.alpha", "finite"]),
    ("-inf warmup override", ["-f", "ci", "--set", "train.warmup_ratio=-.inf"], ["override", "train.warmup_ratio"]),
    ("duplicate key", ["-f", "{tmp}/dupe.yaml"], ["dupe.yaml:5:", "lora.r", "duplicate key", "line 3"]),
    ("duplicate section", ["-f", "{tmp}/dupe_section.yaml"], ["dupe_section.yaml:5:", "lora", "duplicate key", "line 2"]),
    ("empty experiment", ["-f", "{tmp}/empty.yaml"], ["empty.yaml:1:", "experiment", "empty"]),
    ("comment-only experiment", ["-f", "{tmp}/comments.yaml"], ["comments.yaml:1:", "experiment", "empty"]),
    ("nameless experiment", ["-f", "{tmp}/nameless.yaml"], ["nameless.yaml:1:", "experiment: missing"]),
    ("experiment as profile by name", ["-f", "ci", "--hw", "../experiments/ci"], ["params/hw", "not a hw name"]),
    ("experiment as profile by path", ["-f", "ci", "--hw", "params/experiments/ci.yaml"],
     ["ci.yaml:1:", "hardware profile", "pass it with -f"]),
    ("profile as experiment", ["-f", "params/hw/cpu.yaml"], ["cpu.yaml:1:", "experiment: missing", "pass it with --hw"]),
    ("profile with other sections", ["-f", "ci", "--hw", "{tmp}/hw_extra.yaml"], ["hw_extra.yaml:3:", "lora", "hardware profile"]),
    ("non-UTF-8 YAML", ["-f", "{tmp}/latin1.yaml"], ["latin1.yaml:3:", "not UTF-8"]),
    ("-f on a folder named .yaml", ["-f", "{tmp}/folder.yaml"], ["folder.yaml", "is a folder"]),
    ("-f on a folder", ["-f", "{tmp}/somedir"], ["somedir", "is a folder"]),
    ("--set with broken YAML", ["-f", "ci", "--set", "lora.r=[x"], ["override", "lora.r", "not valid YAML"]),
    ("--set a value then keys inside it", ["-f", "ci", "--set", "lora=5", "--set", "lora.r=3"],
     ["override", "lora.r", "already set to 5"]),
    ("--set keys then the section", ["-f", "ci", "--set", "lora.r=3", "--set", "lora=5"], ["override", "lora", "already set"]),
    ("--set a name with a slash", ["-f", "ci", "--set", "hw.name=a/b"], ["override", "hw.name", "plain name"]),
    ("name with a slash in a profile", ["-f", "ci", "--hw", "{tmp}/slashhw.yaml"], ["slashhw.yaml:2:", "hw.name", "plain name"]),
    ("--resume an unknown run", ["--resume", "nope"], ["nope", "no such run"]),
    ("unknown key", ["-f", "{tmp}/unknown.yaml"], ["unknown.yaml:3:", "lora.alpah", "did you mean 'lora.alpha'"]),
    ("wrong type", ["-f", "{tmp}/wrongtype.yaml"], ["wrongtype.yaml:3:", "lora.r", "expected int"]),
    ("out of range", ["-f", "{tmp}/range.yaml"], ["range.yaml:3:", "lora.dropout", "must be < 1"]),
    ("broken YAML", ["-f", "{tmp}/broken.yaml"], ["broken.yaml:", "not valid YAML"]),
    ("not a mapping", ["-f", "{tmp}/notamap.yaml"], ["notamap.yaml:1:", "expected a mapping"]),
    ("name differs from file", ["-f", "{tmp}/mismatch.yaml"], ["mismatch.yaml:1:", "experiment", "differs from its file name"]),
    ("trust_remote_code on", ["-f", "{tmp}/remote.yaml"], ["remote.yaml:3:", "model.trust_remote_code"]),
    ("unknown profile", ["-f", "ci", "--hw", "8g"], ["no hw named '8g'", "did you mean '8gb'"]),
    ("unknown experiment", ["-f", "nosuch"], ["no experiments named 'nosuch'"]),
    ("missing file", ["-f", "{tmp}/absent.yaml"], ["absent.yaml", "no such parameter file"]),
    ("--set without =", ["-f", "ci", "--set", "lora.r"], ["override", "expected section.key=value"]),
    ("--set unknown key", ["-f", "ci", "--set", "lora.rank=4"], ["override", "lora.rank", "did you mean 'lora.r'"]),
]


def _run(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(tmp)) for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"), os.environ.get("PYTHONPATH")]))}
    try:   # the CLI imports every module (torch, transformers, ...): seconds, minutes on a crowded machine
        return subprocess.run([sys.executable, "-m", "adapterlab.cli", "run", "--set", f"output.root={tmp}/out", *argv],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        return e   # reported by this case's test; the other cases still run


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    "Every case run once as its own `adapterlab` process, several at a time (each pays the CLI's import time)."
    from concurrent.futures import ThreadPoolExecutor
    tmp = tmp_path_factory.mktemp("bad-params")
    _files(tmp)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        procs = dict(zip([c[0] for c in CASES], pool.map(lambda c: _run(tmp, c[1]), CASES)))
    return tmp, procs


@pytest.mark.parametrize("case, args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_parameter_is_one_line_and_exit_2(outcomes, case, args, words):
    tmp, procs = outcomes
    proc = procs[case]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"{case}: still running after {proc.timeout}s: {proc.output!r}"
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"{case}: expected one line, got:\n{err}"
    for w in words:
        assert w in lines[0], f"{case}: {w!r} not in {lines[0]!r}"
    assert not (tmp / "out").exists(), f"{case}: a run folder was created for refused parameters"
