"""Watching a run and looking back at it: the ci pipeline run under a pseudo-terminal shows live train and eval
progress, writes TensorBoard event files (read back with TensorBoard's own reader) and one MLflow run (read back with
MlflowClient: params, per-step and eval metrics, the artifact), and logs no secret."""
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterlab.config import open_run, project_root
from adapterlab.pipeline import read_status
from adapterlab.tracking import StageProgress, read_tracking

FAKE_SECRET = "hf_adapterlabTestSecretDoNotLog0123456789"


def _run_in_pty(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    "Run `cmd` with a pseudo-terminal as stdout/stderr (what a user's terminal or tmux gives it); all it wrote."
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=project_root(), env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:   # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError("the pipeline did not finish in time:\n" + b"".join(chunks).decode(errors="replace")[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    "The ci pipeline, MLflow on, in a pseudo-terminal, with a secret in the environment: `(run_dir, terminal output)`."
    root = tmp_path_factory.mktemp("tracked")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TENSORBOARD_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_TOKEN=FAKE_SECRET,
               ADAPTERLAB_HOME=str(project_root()), COLUMNS="120")
    sets = [f"output.root={root}", "tracking.mlflow=true", "eval.max_examples=4"]
    rc, out = _run_in_pty([sys.executable, "-m", "adapterlab.cli", "run", "-f", "ci", "--hw", "cpu",
                           *[a for s in sets for a in ("--set", s)]], env, timeout=1800)
    (root / "terminal.txt").write_text(out, encoding="utf-8")   # what the terminal got, for a reader of a failure
    assert rc == 0, out[-4000:]
    (run_dir,) = [d for d in (root / "runs").iterdir() if d.is_dir()]
    return run_dir, out


@pytest.mark.slow
def test_the_terminal_shows_live_train_and_eval_progress(tracked_run):
    run_dir, out = tracked_run
    screens = [s for line in out.split("\n") for s in line.split("\r")]   # what a terminal showed, redraw by redraw
    train = [s for s in screens if s.strip().startswith("train:") and "/6" in s and "loss" in s and "tok/s" in s]
    assert len(train) >= 2, out[-3000:]                          # redrawn as steps came: live, not at the end
    assert any("6/6" in s for s in train)
    evals = [s for s in screens if s.strip().startswith(("base:", "adapter:")) and "/4" in s]   # eval's generation bars
    assert evals, out[-3000:]
    assert "[3/5] train        done in" in out and "[5/5] eval         done in" in out
    print("\n".join(sorted(set(train))[-3:] + sorted(set(evals))[-3:]))


@pytest.mark.slow
def test_tensorboard_event_file_has_the_loss_of_every_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _ = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in loss] == [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 4) for e in loss] == [round(r["loss"], 4) for r in logged if "loss" in r]


@pytest.mark.slow
def test_one_mlflow_run_holds_params_step_metrics_eval_metrics_and_the_artifact(tracked_run):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3's opt-in to the local file store
    from mlflow.tracking import MlflowClient
    run_dir, _ = tracked_run
    record = read_tracking(run_dir)["mlflow"]
    client = MlflowClient((run_dir.parents[1] / "mlruns").as_uri())
    runs = client.search_runs([record["experiment_id"]])
    assert [r.info.run_id for r in runs] == [record["run_id"]]          # one MLflow run for the adapterlab run
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["adapterlab.lora.r"] == "8" and params["adapterlab.experiment"] == "ci"   # ours
    assert float(params["learning_rate"]) == 0.002 and params["max_steps"] == "6"             # the trainer's
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for name, m in report["metrics"].items():
        assert run.data.metrics[f"eval/adapter/{name}"] == pytest.approx(m["adapter"])
        assert run.data.metrics[f"eval/base/{name}"] == pytest.approx(m["base"])
        assert run.data.tags[f"eval.verdict.{name}"] == m["verdict"]
    adapter = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter
    assert {"report.md", "params.yaml"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    logged = json.dumps([params, run.data.tags]) + (run_dir / "logs").joinpath("03_train.log").read_text()
    assert FAKE_SECRET not in logged and "hub_token" not in {k for k, v in params.items() if v not in ("None", "<HUB_TOKEN>")}


@pytest.mark.slow
def test_the_report_answers_first(tracked_run):
    run_dir, _ = tracked_run
    md = (run_dir / "report.md").read_text()
    head = md.split("\n## ")[0]
    assert "**Verdict:" in head and "95% interval of the change" in head and "json_validity" in head
    assert md.index("**Verdict:") < md.index("## Data")
    assert "✅" not in md and "❌" not in md
    assert "white-space:pre-wrap" in (run_dir / "report.html").read_text()
    assert read_status(run_dir)["status"] == "done"


def test_progress_off_a_terminal_is_a_few_lines_per_phase(tmp_path):
    cfg, run = open_run("ci", "cpu", [f"output.root={tmp_path}", "train.max_steps=100"])
    out = io.StringIO()
    with StageProgress("train", run, cfg, run / "logs" / "train.log", out=out, tty=False, poll_s=0.01) as p:
        with open(run / "metrics.jsonl", "a") as f:
            for step in range(1, 101):
                f.write(json.dumps({"step": step, "epoch": step / 100, "time_s": step * 0.5, "loss": 2.0,
                                    "num_tokens": 100 * step}) + "\n")
        for n in range(0, 201):
            p.write(f"\rgenerate adapter: {n // 2}%|###| {n}/200 [00:01<00:02, 50ex/s]")
    lines = out.getvalue().splitlines()
    train = [l for l in lines if l.startswith("  train:")]
    gen = [l for l in lines if l.startswith("  generate adapter:")]
    assert 2 <= len(train) <= cfg.tracking.progress_lines + 1 and train[-1].startswith("  train: 100/100")
    assert 2 <= len(gen) <= cfg.tracking.progress_lines + 1 and gen[-1].startswith("  generate adapter: 200/200")
    assert "\r" not in out.getvalue()


def test_bars_are_drawn_on_a_terminal_that_reports_no_size(tmp_path):
    """A fresh pseudo-terminal (CI runners, `script`, the pty test above) reports 0 rows and 0 columns; tqdm took that
    as a screen of -1 rows and drew no bar at all, which is how the pty test once saw no live progress."""
    cfg, run = open_run("ci", "cpu", [f"output.root={tmp_path}"])
    master, slave = pty.openpty()
    term = open(slave, "w", encoding="utf-8", closefd=False)
    shown = b""

    def read_terminal() -> bytes:   # a pty hands its bytes over asynchronously: read until it has been quiet a while
        got = b""
        while select.select([master], [], [], 0.5)[0]:
            got += os.read(master, 65536)
        return got

    try:
        assert os.get_terminal_size(slave) == (0, 0)
        with StageProgress("train", run, cfg, run / "logs" / "train.log", out=term, poll_s=0.01):
            for step in (1, 2, 3):
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "time_s": step * 0.5, "loss": 2.0 / step,
                                        "num_tokens": 100 * step}) + "\n")
                shown += read_terminal()
        shown += read_terminal()
    finally:
        term.close()
        os.close(slave)
        os.close(master)
    screens = shown.decode("utf-8", errors="replace").split("\r")
    drawn = [s for s in screens if s.strip().startswith("train:") and f"/{cfg.train.max_steps}" in s and "loss" in s]
    assert len(drawn) >= 2 and any("tok/s" in s for s in drawn), shown


def test_the_live_line_moves_during_gradient_accumulation_and_validation(tmp_path):
    """A step of 16 micro-batches, or a long validation pass, logs nothing to metrics.jsonl until it ends; the trainer
    callback's progress.json (written by `skeleton.metrics_callback` on each micro-batch and eval batch) moves the line
    in between: on a terminal at every change, off one at most once per heartbeat (issue 26)."""
    from types import SimpleNamespace as NS
    from adapterlab.skeleton import metrics_callback
    cfg, run = open_run("ci", "cpu", [f"output.root={tmp_path}", "train.max_steps=2", "hw.grad_accum=16",
                                      "tracking.heartbeat_s=0.01"])
    out = io.StringIO()
    cb = metrics_callback(run / "metrics.jsonl")   # driven as the Trainer drives it
    state, args = NS(global_step=0, max_steps=2, is_world_process_zero=True), NS(gradient_accumulation_steps=16)
    with StageProgress("train", run, cfg, run / "logs" / "train.log", out=out, tty=False, poll_s=0.01):
        for _ in range(2):
            cb.on_prediction_step(args, state, None, eval_dataloader=range(5))
            cb.written = 0.0
            time.sleep(0.1)
        cb.on_evaluate(args, state, None)
        for _ in range(3):
            cb.written = 0.0   # as if a second had passed since the last write
            cb.on_substep_end(args, state, None)
            time.sleep(0.1)
    lines = out.getvalue().splitlines()
    assert any(l.startswith("  validation: ") and l.endswith("/5") for l in lines), lines
    micro = [l for l in lines if "micro-batch" in l]
    assert micro and micro[-1].startswith("  train: 0/2  micro-batch 3/16 of step 1"), lines
