"""Issue 14, "your data": each format a researcher brings goes through the real pipeline from the user's own
experiment file, not only through the data stage.

Cost is kept small on purpose (a full `adapterlab run` is minutes on a CPU):
- one full `adapterlab run` from a user-written experiment YAML (data → compat → train → regressions → eval) whose
  `data.train` lists a fixture of every format and file type (text, OpenAI messages, a ShareGPT JSON array, Parquet
  and conversational prompt/completion, explicit and implicit preference, alpaca CSV, feedback, a `save_to_disk`
  folder); a second, a preference file with implicit prompts, runs the same pipeline and then `--also preference`
  (DPO on the same file);
- each format and file type alone, and the files a user makes (OpenAI messages with `name`, multi-turn, nulls in
  Parquet) through the data stage's `prepare_data` and two real optimizer steps of the train stage's trainer,
  sharing one loaded base model;
- files a user makes that the fixtures do not have: each is read as its format or refused in one line naming the
  file, the line/row and the field, and `adapterlab run` on a file with too many bad records exits 2 in one line
  with the rejects kept.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapterlab.config import project_root, resolve_config
from adapterlab.data import check_files, prepare_data

FORMATS_DIR = Path(__file__).parent / "fixtures" / "formats"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "ADAPTERLAB_HOME": str(project_root())}
STAGES = ["data", "compat", "train", "regressions", "eval"]


def adapterlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterlab.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=1800)


def user_experiment(folder: Path, name: str, train: str, *, pairs: str | None = None) -> Path:
    """What a user writes: their own data files copied into their own folder, and an experiment YAML naming them
    (absolute paths), at the smallest honest size (a few steps, a few eval prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in {train, "eval.jsonl", *([pairs] if pairs else [])}:
        src = FORMATS_DIR / f
        (shutil.copytree if src.is_dir() else shutil.copy)(src, folder / f)
    text = f"""# my own data, my own experiment
experiment: {name}
seed: 0
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}}
data:
  train: {folder / train}
  eval: {folder / 'eval.jsonl'}
  val_fraction: 0.125
train: {{epochs: 1, max_steps: 2, learning_rate: 0.003, save_steps: 2}}
eval: {{max_new_tokens: 6, max_examples: 4, bootstrap_samples: 100}}
output: {{root: {folder / 'out'}}}
"""
    if pairs:
        text += f"preference: {{pairs: {folder / pairs}, max_steps: 2, batch_size: 2, learning_rate: 0.001}}\n"
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def the_run(folder: Path) -> Path:
    runs = list((folder / "out" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def assert_a_good_run(proc, folder: Path, formats: dict, stages=STAGES) -> Path:
    "Done, every stage done, a verified artifact, and a record of the run that names the data's format."
    from adapterlab.artifact import verify_artifact
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = the_run(folder)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "done" and [s for s in status["stages"]] == stages, status
    assert all(r["status"] == "done" for r in status["stages"].values()), status
    assert verify_artifact(run / "artifact") == []
    summary = json.loads((run / "train_summary.json").read_text())
    assert not summary["verification"]["base_tensors_changed"] and not summary["verification"]["artifact_problems"]
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["inputs"]["train"]["formats"] == formats and stats["inputs"]["train"]["rejected"] == 0
    # the data stage's record of the run names the formats it read
    data_nb = (run / "notebooks" / "01_data.ipynb").read_text()
    assert f"formats {formats}" in data_nb
    report = (run / "report.md").read_text()
    assert "the eval stage did not run" not in report and "## Evaluation" in report
    listed = ", ".join(f"{k} ({v})" for k, v in formats.items())
    assert f"| {listed} |" in report        # the report's data table names the formats it read
    # plain-text answers: text metrics chosen, no JSON metric (issue 14: eval fits the task)
    ev = (run / "eval" / "report.md").read_text()
    assert "| exact_match" in ev and "json_validity: left out by auto" in ev and "| json_validity" not in ev
    return run


ALL_FORMATS = {"text": 32, "messages": 24 + 32, "sharegpt": 32, "prompt_completion": 64, "preference": 64,
               "instruction": 32, "feedback": 32}   # FORMAT_CASES read together: messages, prompt_completion and preference have two files each


@pytest.mark.slow
def test_every_format_and_file_type_trains_in_one_users_run(tmp_path):
    """One `adapterlab run` whose `data.train` lists a fixture of every format and file type (JSONL, a ShareGPT JSON
    array, Parquet, CSV, a save_to_disk folder): each is read as what it is, and the run trains, verifies, evaluates."""
    me = tmp_path / "me"
    exp = user_experiment(me, "my_formats", "sharegpt.json")
    for f, _ in FORMAT_CASES:
        src = FORMATS_DIR / f
        if not (me / f).exists(): (shutil.copytree if src.is_dir() else shutil.copy)(src, me / f)
    listed = "[" + ", ".join(str(me / f) for f, _ in FORMAT_CASES) + "]"
    exp.write_text(exp.read_text().replace(f"train: {me / 'sharegpt.json'}", f"train: {listed}"))
    proc = adapterlab("run", "--hw", "cpu", "-f", str(exp), cwd=tmp_path)
    run = assert_a_good_run(proc, me, ALL_FORMATS)
    stats = json.loads((run / "data" / "stats.json").read_text())
    sources = stats["inputs"]["train"]["sources"]
    assert [(s["source"], s["formats"]) for s in sources] == [   # messages.jsonl: 24 multi-turn conversations
        (str(me / f), {fmt: 24 if f == "messages.jsonl" else 32}) for f, fmt in FORMAT_CASES]
    assert all(s["rejected"] == 0 for s in sources)
    kept = [json.loads(l) for l in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert {r["source"].rsplit(":", 1)[0].split(": row")[0] for r in kept} <= {str(me / f) for f, _ in FORMAT_CASES}
    shared = [r for r in kept if r["source"].startswith(str(me / "sharegpt.json"))]
    assert shared and [m["role"] for m in shared[0]["messages"]] == ["system", "user", "assistant"]  # its system turn
    prov = json.loads((run / "provenance.json").read_text())["data"]["train"]
    assert [p["spec"] for p in prov] == [str(me / f) for f, _ in FORMAT_CASES] and all(len(p["sha256"]) == 64 for p in prov)
    report = (run / "report.md").read_text()
    assert "| train (all) |" in report and f"| `{me / 'alpaca.csv'}` | instruction (32) |" in report


@pytest.mark.slow
def test_a_preference_file_trains_then_runs_dpo_with_also_preference(tmp_path):
    "Implicit-prompt pairs (two transcripts): SFT learns the chosen answers, then DPO on the same file."
    me = tmp_path / "me"
    exp = user_experiment(me, "my_pairs", "preference_implicit.jsonl", pairs="preference_implicit.jsonl")
    proc = adapterlab("run", "--hw", "cpu", "-f", str(exp), "--also", "preference", cwd=tmp_path)
    run = assert_a_good_run(proc, me, {"preference": 32}, STAGES + ["preference"])
    pairs = [json.loads(l) for l in (run / "preference" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 32 and pairs[0]["chosen"] == "cold" and pairs[0]["rejected"] != "cold"
    assert "## Preference tuning (DPO)" in (run / "report.md").read_text()


# --- every other format and file type: the data stage and the train stage's trainer ----------------------------------

FORMAT_CASES = [  # fixture (tests/fixtures/formats, written by make_formats.py), the format auto-detection must find
    ("text.jsonl", "text"), ("messages.jsonl", "messages"), ("sharegpt.json", "sharegpt"),
    ("prompt_completion.parquet", "prompt_completion"), ("prompt_completion_conversational.jsonl", "prompt_completion"),
    ("preference.jsonl", "preference"), ("preference_implicit.jsonl", "preference"), ("alpaca.csv", "instruction"),
    ("feedback.jsonl", "feedback"), ("messages_saved", "messages"),
]


def cfg_for(tmp_path, *overrides):
    cfg, _ = resolve_config("ci", "cpu", [f"output.root={tmp_path}", *overrides])
    return cfg


@pytest.fixture(scope="module")
def base_model():
    from adapterlab.models import load_base_model
    cfg, _ = resolve_config("ci", "cpu")
    model, tokenizer, _ = load_base_model(cfg)
    return model, tokenizer


def data_and_two_steps(tmp_path, base_model, train: Path, fmt: str) -> list[dict]:
    """`train` through the data stage and two real optimizer steps of the train module's trainer on the embedded
    model: every record read as `fmt`, the LoRA weights move, the loss is finite, every assistant turn is a row."""
    import torch
    from adapterlab.compat import build_sft_trainer
    from adapterlab.train import attach_lora, sft_settings, trainer_class
    base, tok = base_model
    cfg = cfg_for(tmp_path, f"data.train={train}", f"data.eval={FORMATS_DIR / 'eval.jsonl'}",
                  "data.val_fraction=0", "train.max_steps=2", "hw.batch_size=4", "hw.grad_accum=1")
    prep = prepare_data(cfg, tmp_path / "run", tok)
    st = prep.stats
    assert st["inputs"]["train"]["formats"] == {fmt: st["inputs"]["train"]["records"]} and st["inputs"]["train"]["rejected"] == 0
    assert len(prep.train) == st["split"]["train_turns"] >= st["split"]["train"] >= 24
    rows = prep.train.to_list()
    assert all(r["completion"][0]["role"] == "assistant" and r["prompt"][-1]["role"] != "assistant" for r in rows)
    model = attach_lora(base, cfg)
    try:
        settings = {**sft_settings(cfg, tmp_path / "run"), "save_strategy": "no", "logging_steps": 1, "report_to": []}
        trainer = build_sft_trainer(model, tok, prep.train, settings, trainer_cls=trainer_class(cfg, prep.train))
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        out = trainer.train()
        assert trainer.state.global_step == 2 and math.isfinite(out.training_loss) and out.training_loss > 0
        assert any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)
    finally:
        model.unload()                    # the shared base model, without this test's adapter, for the next one
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("fixture, fmt", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_each_format_normalises_and_trains(tmp_path, base_model, fixture, fmt):
    rows = data_and_two_steps(tmp_path, base_model, FORMATS_DIR / fixture, fmt)
    if fixture == "messages.jsonl":   # multi-turn: the second turn's row has the first exchange as its prompt
        second = next(r for r in rows if len(r["prompt"]) == 4)
        assert [m["role"] for m in second["prompt"]] == ["system", "user", "assistant", "user"]
        assert second["prompt"][1]["name"] == "ann"


# --- files a user makes that the fixtures do not have -----------------------------------------------------------------

PAIRS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
         ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"),
         ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"),
         ("cheap", "expensive"), ("near", "far"), ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("first", "last")]
u = lambda t, **k: {"role": "user", "content": t, **k}
a = lambda t, **k: {"role": "assistant", "content": t, **k}


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def write_user_file(folder: Path, name: str) -> Path:
    "One file a user might bring, by name (24 opposite-word records unless the point is that it is broken)."
    import datasets
    p = folder / name
    q = [f"Opposite of {w}?" for w, _ in PAIRS]
    if name == "extra_columns.csv":          # alpaca with the columns a spreadsheet export carries along
        p.write_text("id,instruction,input,output,source,score\n"
                     + "".join(f"{i},Give the opposite.,{w},{o},wiki,0.5\n" for i, (w, o) in enumerate(PAIRS)))
    elif name == "nested_messages.parquet":  # messages as a list of structs; `name` on some turns (null elsewhere)
        datasets.Dataset.from_list([{"messages": [u(x, name="ann" if i % 2 else None), a(o)], "id": i}
                                    for i, (x, (_, o)) in enumerate(zip(q, PAIRS))]).to_parquet(str(p))
    elif name == "sharegpt_system.jsonl":
        _jsonl(p, [{"conversations": [{"from": "system", "value": "One word."}, {"from": "human", "value": x},
                                      {"from": "gpt", "value": o}]} for x, (_, o) in zip(q, PAIRS)])
    elif name == "messages_named.jsonl":     # OpenAI messages with `name` on both sides, a system turn first
        _jsonl(p, [{"messages": [{"role": "system", "content": "One word."}, u(x, name="bob"), a(o, name="bot")]}
                   for x, (_, o) in zip(q, PAIRS)])
    elif name == "wrapped.json":             # {"data": [records]}, as many exported datasets are
        p.write_text(json.dumps({"data": [{"prompt": x, "completion": o} for x, (_, o) in zip(q, PAIRS)]}))
    elif name == "splits_saved":             # a DatasetDict saved with save_to_disk: its train split is read
        datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": x, "completion": o} for x, (_, o) in zip(q, PAIRS)]),
                              "test": datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])}).save_to_disk(str(p))
    elif name == "tool_calls.jsonl":         # a tool call and a tool turn: refused with the reason
        call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                       "function": {"name": "opposite", "arguments": "{}"}}]}
        _jsonl(p, [{"messages": [u(q[0]), call, {"role": "tool", "tool_call_id": "1", "content": "cold"}, a("cold")]},
                   {"messages": [u(q[1]), a("small"), {"role": "tool", "content": "x"}, a("small")]}]
               + [{"messages": [u(x), a(o)]} for x, (_, o) in zip(q[2:], PAIRS[2:])])
    elif name == "a_bad_line.jsonl":         # a line cut off by a crashed writer, a typo in a role
        rows = [json.dumps({"messages": [u(x), a(o)]}) for x, (_, o) in zip(q, PAIRS)]
        rows[1], rows[2] = rows[1][:-3], json.dumps({"messages": [u(q[2]), {"role": "assitant", "content": "down"}]})
        _jsonl(p, rows)
    elif name == "null_cell.parquet":        # a completion left empty
        datasets.Dataset.from_list([{"prompt": x, "completion": None if i == 3 else o}
                                    for i, (x, (_, o)) in enumerate(zip(q, PAIRS))]).to_parquet(str(p))
    elif name == "question_answer.csv":      # columns that name no format
        p.write_text("question,answer\n" + "".join(f"{x},{o}\n" for x, (_, o) in zip(q, PAIRS)))
    elif name == "empty.jsonl":
        p.write_bytes(b"")
    else:
        raise ValueError(name)
    return p


USER_FILES_THAT_TRAIN = [("extra_columns.csv", "instruction"), ("nested_messages.parquet", "messages"),
                         ("sharegpt_system.jsonl", "sharegpt"), ("messages_named.jsonl", "messages"),
                         ("wrapped.json", "prompt_completion"), ("splits_saved", "prompt_completion")]
USER_FILES_REFUSED = [  # file, exit status of `data check`, its exact lines on stdout (FILE:LINE or FILE: row N, field)
    ("tool_calls.jsonl", 1, ["tool_calls.jsonl:1: messages[1].tool_calls: tool calls are not trained",
                             "tool_calls.jsonl:2: messages[2].role: tool calls are not trained"]),
    ("a_bad_line.jsonl", 1, ["a_bad_line.jsonl:2: (json): not valid JSON: Expecting ',' delimiter",
                             "a_bad_line.jsonl:3: messages[1].role: must be one of system, user, assistant; got 'assitant'"]),
    ("null_cell.parquet", 1, ["null_cell.parquet: row 4: completion: missing"]),
    ("question_answer.csv", 2, ["question_answer.csv: (columns): no column names a format adapterlab reads "
                                "(columns: question, answer)"]),
    ("empty.jsonl", 2, ["empty.jsonl: no records (the file is empty)"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", USER_FILES_THAT_TRAIN, ids=[c[0] for c in USER_FILES_THAT_TRAIN])
def test_a_users_own_file_trains(tmp_path, base_model, name, fmt):
    rows = data_and_two_steps(tmp_path, base_model, write_user_file(tmp_path, name), fmt)
    # the training rows hold each message as written: no key that a message did not have (Arrow's structs would add
    # `name: None` to every message once one has a name, and a chat template would render it)
    assert all(v is not None for r in rows for m in r["prompt"] + r["completion"] for v in m.values()), rows
    first = rows[0]["prompt"] + rows[0]["completion"]
    if name in ("sharegpt_system.jsonl", "messages_named.jsonl"):
        assert first[0] == {"role": "system", "content": "One word."}
    if name == "messages_named.jsonl":
        assert first[1]["name"] == "bob" and first[2]["name"] == "bot"
    if name == "nested_messages.parquet":   # a null `name` is no name; a given one is kept
        assert {m.get("name") for r in rows for m in r["prompt"]} == {"ann", None}


@pytest.mark.parametrize("name, status, lines", USER_FILES_REFUSED, ids=[c[0] for c in USER_FILES_REFUSED])
def test_a_users_broken_file_is_refused_in_one_line_per_problem(tmp_path, name, status, lines, monkeypatch):
    import io
    write_user_file(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert check_files([name], out=out, err=err) == status
    got = out.getvalue().splitlines()
    assert len(got) == len(lines) and all(g.startswith(want) for g, want in zip(got, lines)), got


@pytest.mark.slow
def test_a_run_on_a_file_with_too_many_bad_lines_exits_2_in_one_line_and_keeps_the_rejects(tmp_path):
    me = tmp_path / "me"
    exp = user_experiment(me, "my_broken", "messages.jsonl")
    write_user_file(me, "a_bad_line.jsonl")
    exp.write_text(exp.read_text().replace(str(me / "messages.jsonl"), str(me / "a_bad_line.jsonl")))
    proc = adapterlab("run", "--hw", "cpu", "-f", str(exp), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "a_bad_line.jsonl: 2 of 24 records rejected" in line and "first: line 2: (json): not valid JSON" in line
    run = the_run(me)
    rejects = [json.loads(l) for l in (run / "data" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "(json)"), (3, "messages[1].role")]
    assert json.loads((run / "status.json").read_text())["stages"]["data"]["status"] == "failed"


def test_data_convert_reads_a_file_named_from_the_current_folder(tmp_path, monkeypatch):
    "`adapterlab data convert FILE OUT` in the user's own folder, as `data check` does (not relative to the project)."
    from adapterlab.cli import main
    write_user_file(tmp_path, "extra_columns.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "convert", "extra_columns.csv", "out.jsonl"]) == 0
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1] == {"role": "assistant", "content": "cold"}
    assert {k: first[k] for k in ("id", "source", "score")} == {"id": 0, "source": "wiki", "score": 0.5}  # kept in meta
