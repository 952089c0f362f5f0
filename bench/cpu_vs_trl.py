#!/usr/bin/env python
"""CPU benchmark: adapterlab's training step against a bare TRL `SFTTrainer` script, in one run.

    python bench/cpu_vs_trl.py                      # the headline: bare TRL vs adapterlab (~3-4 min on 2 cores)
    python bench/cpu_vs_trl.py --arms all           # every knob on its own, to see what each one buys
    python bench/cpu_vs_trl.py --steps 12 --json outputs/bench/cpu.json

Same model (SmolLM2-135M-Instruct, the embedded model), same data (the json_contacts sample as conversational
prompt/completion, so the loss is on the answer only), same LoRA (the json_contacts experiment: r=16, all-linear),
same micro-batch, learning rate and schedule, same seed and the same LoRA initialisation. Each arm runs in its own
process (so its peak RSS is its own), and the arms take their optimizer steps in turn (arm 1 step 1, arm 2 step 1,
..., arm 1 step 2, ...), so a machine whose load drifts slows every arm alike. Each arm reports:

- tokens/s over all tokens the model saw (pad included) and over the non-pad ("useful") tokens, from the time of the
  training steps after the warm-up ones (forward, backward, optimizer; the collation before a step is not timed);
- peak RSS of the process (model load included);
- the final loss: mean completion-token loss on the held-out eval file, computed by the same code for every arm, so
  "equal loss" is checked on one yardstick and not on each trainer's own logging.

Arms (`--arms` takes a comma list, or `all`):
  trl            bare TRL: `SFTConfig` defaults except what CPU needs (use_cpu, bf16=False), batch, lr, steps,
                 max_length; LoRA through `peft_config`
  trl-nogc       the same with gradient_checkpointing=False (TRL turns checkpointing on by default)
  compact        trl-nogc + loss from the LM head at the trained positions only (no full-vocab logits elsewhere;
                 TRL's metrics kept): adapterlab.train.completion_logits_trainer_class
  compact-gbl    compact + length-grouped batches (train_sampling_strategy="group_by_length")
  compact-pf     compact + padding-free batches (all examples of a micro-batch in one row, block-diagonal attention)
  compact-t1     compact with torch.set_num_threads(1)
  adapterlab     exactly what `adapterlab.train` does on the cpu profile (attach_lora, sft_settings, compat, its
                 trainer class), with only the step count, saving and logging changed for the benchmark

Evaluation waits until every arm has taken its last step, and runs one arm at a time, so it slows no timed step.
Results and what they mean: bench/RESULTS.md.
The machine this runs on is shared in development; the numbers are only comparable within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HEADLINE_ARMS = ["trl", "trl-nogc", "compact", "adapterlab"]
ALL_ARMS = ["trl", "trl-nogc", "compact", "compact-gbl", "compact-pf", "compact-t1", "adapterlab"]


# ---------------------------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------------------------
def load_everything(experiment: str = "json_contacts", hw: str = "cpu"):
    "Model, tokenizer, train/eval datasets (conversational prompt/completion) and the resolved adapterlab config."
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from adapterlab.config import resolve_config
    from adapterlab.data import load_examples, to_prompt_completion
    from adapterlab.models import resolve_model

    cfg, _ = resolve_config(experiment, hw)
    loc = resolve_model(cfg.model.base_model).location
    tok = AutoTokenizer.from_pretrained(loc)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(loc, dtype=torch.float32)
    rows = lambda spec: [{k: v for k, v in to_prompt_completion(e).items() if k in ("prompt", "completion")}
                         for e in load_examples(spec)]
    return model, tok, Dataset.from_list(rows(cfg.data.train)), Dataset.from_list(rows(cfg.data.eval)), cfg


def lora_config(cfg):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias=cfg.lora.bias, task_type="CAUSAL_LM")


def bare_settings(cfg, out_dir: str, steps: int) -> dict:
    "What a bare TRL script sets: the CPU switches, batch, lr, steps, length. Everything else stays TRL's default."
    return dict(output_dir=out_dir, use_cpu=True, bf16=False, per_device_train_batch_size=cfg.hw.batch_size,
                gradient_accumulation_steps=cfg.hw.grad_accum, learning_rate=cfg.train.learning_rate,
                max_steps=steps, max_length=cfg.hw.max_seq_length, logging_steps=1, report_to=[],
                save_strategy="no", seed=cfg.seed, disable_tqdm=True)


BENCH_OVERRIDES = dict(save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True, eval_strategy="no")


def make_trainer(arm: str, model, tok, train_ds, cfg, out_dir: str, steps: int):
    from trl import SFTConfig, SFTTrainer
    if arm == "adapterlab":
        import adapterlab.train as T
        from adapterlab.compat import build_sft_trainer
        model = T.attach_lora(model, cfg)
        settings = {**T.sft_settings(cfg, Path(out_dir)), **BENCH_OVERRIDES, "max_steps": steps}
        return build_sft_trainer(model, tok, train_ds, settings, trainer_cls=T.trainer_class(cfg, train_ds))
    s = bare_settings(cfg, out_dir, steps)
    cls = SFTTrainer
    if arm == "trl-nogc":
        s["gradient_checkpointing"] = False
    elif arm.startswith("compact"):
        s["gradient_checkpointing"] = False
        from adapterlab.train import completion_logits_trainer_class
        cls = completion_logits_trainer_class(SFTTrainer)
        if arm == "compact-gbl":
            s["train_sampling_strategy"] = "group_by_length"
        if arm == "compact-pf":
            # the data stage already rejects records longer than hw.max_seq_length, so nothing is cut here
            s.update(padding_free=True, max_length=None)
    elif arm != "trl":
        raise SystemExit(f"unknown arm {arm!r}; known: {', '.join(ALL_ARMS)}")
    # seeded like adapterlab.train.attach_lora, so every arm starts from the same LoRA initialisation
    import torch
    torch.manual_seed(cfg.seed)
    return cls(model=model, args=SFTConfig(**s), train_dataset=train_ds, processing_class=tok,
               peft_config=lora_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
class TokenCountingCollator:
    "Wraps the trainer's collator and records, per micro-batch, all tokens, non-pad tokens and trained tokens."

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        b = self.inner(examples)
        ids = b["input_ids"]
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else int(ids.numel())
        self.batches.append(dict(all=int(ids.numel()), real=real, trained=int((b["labels"][..., 1:] != -100).sum()),
                                 examples=len(examples)))
        return b


def lockstep_clock(counter: TokenCountingCollator, accum: int):
    """A callback that waits for the driver's go before each optimizer step (so arms take turns) and reports the
    step's seconds and tokens after it."""
    from transformers import TrainerCallback

    class LockstepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("driver went away")
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            secs = time.perf_counter() - self.t
            step = counter.batches[-accum:]
            print("STEP " + json.dumps({"s": secs, **{k: sum(b[k] for b in step) for k in step[0]}}), flush=True)

    return LockstepClock()


def eval_loss(model, tok, eval_ds, batch_size: int = 8) -> float:
    "Mean completion-token NLL on the eval set: one yardstick for every arm (right padding, chat template)."
    import torch
    import torch.nn.functional as F
    model.eval()
    total, count = 0.0, 0
    rows = list(eval_ds)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, lab = [], []
            for r in rows[i:i + batch_size]:
                p = tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
                f = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)
                ids.append(f)
                lab.append([-100] * len(p) + f[len(p):])
            n = max(map(len, ids))
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
            x = torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x in ids])
            y = torch.tensor([l + [-100] * (n - len(l)) for l in lab])
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1), reduction="sum",
                                     ignore_index=-100).item()
            count += int((y[:, 1:] != -100).sum())
    return total / count


def worker(arm: str, steps: int, threads: int | None) -> int:
    "One arm: build, say READY, train step by step on the driver's go, then report."
    import resource
    import torch
    import transformers
    import trl
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    if arm == "compact-t1":
        torch.set_num_threads(1)
    model, tok, train_ds, eval_ds, cfg = load_everything()
    with tempfile.TemporaryDirectory() as out:
        tr = make_trainer(arm, model, tok, train_ds, cfg, out, steps)
        counter = TokenCountingCollator(tr.data_collator)
        tr.data_collator = counter
        tr.add_callback(lockstep_clock(counter, cfg.hw.grad_accum))
        print("READY", flush=True)
        tr.train()
        if sys.stdin.readline().strip() != "eval":   # wait: another arm's eval must not slow an arm still training
            raise SystemExit("driver went away")
    train_losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    print("RESULT " + json.dumps(dict(
        arm=arm, trainer=type(tr).__name__, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        last_train_loss=train_losses[-1] if train_losses else None, eval_loss=eval_loss(tr.model, tok, eval_ds),
        threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        trl=trl.__version__, batch=cfg.hw.batch_size, grad_accum=cfg.hw.grad_accum, lr=cfg.train.learning_rate,
        lora_r=cfg.lora.r, gradient_checkpointing=bool(tr.args.gradient_checkpointing))), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Driver: one process per arm, steps taken in turn, then the table
# ---------------------------------------------------------------------------------------------------------------
class Arm:
    def __init__(self, name: str, steps: int, threads: int | None):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.name, self.steps_data = name, []
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  bufsize=1)

    def expect(self, prefix: str) -> str:
        for line in self.p.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.err.seek(0)
        raise RuntimeError(f"arm {self.name} died (exit {self.p.wait()}):\n{self.err.read()[-4000:]}")

    def step(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        d = json.loads(self.expect("STEP "))
        self.steps_data.append(d)
        return d

    def finish(self, warmup: int) -> dict:
        self.p.stdin.write("eval\n")
        self.p.stdin.flush()
        r = json.loads(self.expect("RESULT "))
        self.p.wait()
        timed = self.steps_data[warmup:]
        secs = sum(d["s"] for d in timed)
        tot = lambda k: sum(d[k] for d in timed)
        r.update(steps=len(self.steps_data), warmup=warmup, timed_steps=len(timed), seconds=secs,
                 s_per_step=secs / len(timed), tokens_all=tot("all"), tokens_real=tot("real"),
                 tokens_trained=tot("trained"), examples=tot("examples"), tok_s_all=tot("all") / secs,
                 tok_s_real=tot("real") / secs, pad_fraction=1 - tot("real") / tot("all"),
                 step_seconds=[round(d["s"], 3) for d in self.steps_data])
        return r


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["arm"] == "trl"), results[0])
    head = (f"{'arm':<12} {'s/step':>7} {'tok/s all':>10} {'tok/s real':>11} {'pad %':>6} {'peak RSS MB':>12} "
            f"{'train loss':>11} {'eval loss':>10} {'× trl real':>11}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['arm']:<12} {r['s_per_step']:>7.2f} {r['tok_s_all']:>10.1f} {r['tok_s_real']:>11.1f} "
                     f"{100 * r['pad_fraction']:>6.1f} {r['peak_rss_mb']:>12.0f} {r['last_train_loss']:>11.4f} "
                     f"{r['eval_loss']:>10.4f} {r['tok_s_real'] / base['tok_s_real']:>10.2f}×")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default=",".join(HEADLINE_ARMS), help="comma list, or 'all'")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    if args.worker:
        return worker(args.worker, args.steps, args.threads)
    names = ALL_ARMS if args.arms == "all" else args.arms.split(",")
    t0 = time.perf_counter()
    arms = []
    for name in names:            # one at a time: building is not timed, but it should not slow a neighbour's start
        arms.append(Arm(name, args.steps, args.threads))
        arms[-1].expect("READY")
    for i in range(args.steps):
        for arm in arms:
            d = arm.step()
            print(f"  step {i + 1}/{args.steps} {arm.name:<12} {d['s']:6.2f} s", file=sys.stderr)
    results = [arm.finish(args.warmup) for arm in arms]
    r0 = results[0]
    print(f"\nCPU benchmark ({time.perf_counter() - t0:.0f} s): SmolLM2-135M-Instruct + LoRA r={r0['lora_r']} "
          f"all-linear, batch {r0['batch']}×{r0['grad_accum']}, {r0['steps']} steps per arm taken in turn "
          f"({r0['warmup']} untimed), {r0['threads']} threads; torch {r0['torch']}, transformers "
          f"{r0['transformers']}, trl {r0['trl']}\n")
    print(table(results))
    by = {r["arm"]: r for r in results}
    for name in ("adapterlab",):
        if "trl" in by and name in by:
            a, b = by[name], by["trl"]
            line = (f"\n{name} / bare TRL, useful (non-pad) tokens/s: {a['tok_s_real'] / b['tok_s_real']:.2f}× "
                    f"(all tokens: {a['tok_s_all'] / b['tok_s_all']:.2f}×); eval loss {a['eval_loss']:.4f} vs "
                    f"{b['eval_loss']:.4f} ({100 * (a['eval_loss'] / b['eval_loss'] - 1):+.1f}%)")
            if "trl-nogc" in by:
                line += f"; vs bare TRL without checkpointing: {a['tok_s_real'] / by['trl-nogc']['tok_s_real']:.2f}×"
            print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
