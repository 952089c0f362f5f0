#!/usr/bin/env python
"""CPU benchmark: adapterlab's training step against TRL configured the way a competent CPU user would, in one run.

    python bench/cpu_vs_trl.py                         # every arm, 3 repeats (~15-25 min on 2 quiet cores)
    python bench/cpu_vs_trl.py --write-results         # ... and append a dated table to bench/RESULTS.md
    python bench/cpu_vs_trl.py --arms trl-bf16,adapterlab --repeats 1 --steps 4    # a quick look

Same model (SmolLM2-135M-Instruct, the embedded model), same data (the json_contacts sample as conversational
prompt/completion, so the loss is on the answer only), same LoRA (the json_contacts experiment: r=16, all-linear),
same micro-batch, learning rate and schedule, same seed and the same LoRA initialisation. Each arm runs in its own
process, and the arms take their optimizer steps in turn (arm 1 step 1, arm 2 step 1, ..., arm 1 step 2, ...), so a
machine whose load drifts slows every arm alike. A repeat is a fresh set of processes; figures are min/median/max
over the repeats.

Arms (`--arms` takes a comma list, or `all`; an arm this machine cannot run is listed with the exact reason):
  trl              bare TRL: `SFTConfig` defaults except what CPU needs (use_cpu, bf16=False); TRL's default
                   gradient checkpointing stays on. The old baseline, kept for reference.
  trl-nogc         TRL, gradient checkpointing off, fp32
  trl-bf16         TRL, checkpointing off, `bf16=True` (autocast) -- only where the CPU has bf16
  trl-bf16-pf      trl-bf16 + `padding_free=True`
  trl-bf16-compile trl-bf16 + `torch_compile=True` (compilation happens in the untimed warm-up steps)
  trl-bf16-liger   trl-bf16 + `use_liger_kernel=True` -- only if liger-kernel imports and its kernel runs on CPU
  adapterlab-fp32  exactly what `adapterlab.train` does on the cpu profile, with `--set hw.dtype=float32`
  adapterlab       exactly what `adapterlab.train` does on the cpu profile as it ships (params/hw/cpu.yaml, since
                   2026-12-03 `hw.dtype: auto`): bf16 base weights, fp32 LoRA weights and optimizer state, where the
                   CPU has bf16 (`precision.bf16_support`; fp32 elsewhere). (The older `adapterlab-bf16` arm, the
                   profile with `--set hw.dtype=auto` when it shipped float32, is this arm now.)
  llamafactory     LLaMA-Factory, when it installs (`--llamafactory-python`, a throwaway venv's python);
                   otherwise listed with the reason

Each arm reports, over the steps after the warm-up ones (forward, backward, optimizer; collation not timed):
- useful tokens/s (non-pad tokens), and tokens/s over all tokens the model saw;
- MFU: 6 · N · useful tokens/s ÷ the measured matmul peak of the arm's compute dtype, N = every parameter of the
  base model (134.5M, embeddings included). A convention, not a FLOP count: a LoRA step skips the frozen weights'
  gradients (≈4·N·tokens) and adapterlab skips the LM head on untrained positions, so read it as "useful work";
- eval loss: mean completion-token loss on the held-out eval file, computed by the same code for every arm on the
  same fp32 base model with the arm's trained LoRA weights loaded into it (one yardstick, whatever the arm trained in).
"Equal eval loss": within `--loss-tol` (relative) of the reference arm's; a ratio outside it is flagged.
Peaks: the best GFLOP/s of a 2048² matmul in fp32 and in bf16, measured before and after the arms (best of both).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TRL_ARMS = ["trl", "trl-nogc", "trl-bf16", "trl-bf16-pf", "trl-bf16-compile", "trl-bf16-liger"]
OURS = ["adapterlab-fp32", "adapterlab"]
ALL_ARMS = TRL_ARMS + OURS + ["llamafactory"]
BF16_ARMS = {"trl-bf16", "trl-bf16-pf", "trl-bf16-compile", "trl-bf16-liger"}
DEFAULT_LOSS_TOL = 0.10     # relative: |eval loss − reference| / reference


# ---------------------------------------------------------------------------------------------------------------
# What this machine can run
# ---------------------------------------------------------------------------------------------------------------
# What trying them in throwaway venvs on 2026-12-02 gave (the driver prints these with its own finding)
LIGER_TRIED = ("in a throwaway venv, liger-kernel 0.8.5 + triton 3.9.0 install and import, and the kernel fails on "
               "CPU tensors with `RuntimeError: 0 active drivers ([]). There should only be one.` (Triton has no "
               "CPU backend; Liger's kernels are Triton kernels)")
LLAMAFACTORY_TRIED = (
    "llamafactory 0.9.5 pins transformers<=5.6.0, trl<=0.24.0, peft<=0.18.1, accelerate<=1.11.0, datasets<=4.0.0 and "
    "needs torchaudio/torchvision, against this project's transformers 5.24, trl 1.16, peft 0.21: in a throwaway venv "
    "`pip install llamafactory` was still downloading a CUDA torch stack (2.5 GB of nvidia-*/triton wheels) at the "
    "10-minute limit, and `pip install --no-deps llamafactory` over the project's stack fails to import "
    "(`ModuleNotFoundError: No module named 'torchaudio'`)")


def liger_status() -> str | None:
    "None when liger-kernel imports and its fused linear cross-entropy runs on CPU tensors; else the exact reason."
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:
        return (f"liger-kernel does not import here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                + LIGER_TRIED)
    try:
        import torch
        x, w = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16)
        LigerFusedLinearCrossEntropyLoss()(w, x, torch.randint(0, 32, (8,))).backward()
    except Exception as e:
        return f"liger-kernel imports but its kernel does not run on CPU tensors: {type(e).__name__}: " \
               f"{str(e).splitlines()[0][:200]}"
    return None


def llamafactory_status(python: str | None) -> str | None:
    if not python:
        return LLAMAFACTORY_TRIED + "; pass --llamafactory-python (a venv where it imports) to check again"
    r = subprocess.run([python, "-c", "import llamafactory; print(llamafactory.__version__)"], capture_output=True,
                       text=True)
    if r.returncode:
        return f"llamafactory does not import in {python}: {r.stderr.strip().splitlines()[-1][:300]}"
    return "installed (llamafactory " + r.stdout.strip() + ") but not wired into the lock-step driver: not run"


def unavailable(arm: str, bf16: dict, lf_python: str | None) -> str | None:
    if arm in BF16_ARMS and not bf16["supported"]:
        return f"this CPU has no fast bf16 ({bf16['reason']})"
    if arm == "trl-bf16-liger":
        return liger_status()
    if arm == "llamafactory":
        return llamafactory_status(lf_python)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Shared setup (in each worker)
# ---------------------------------------------------------------------------------------------------------------
def load_everything(arm: str, experiment: str = "json_contacts", hw: str = "cpu"):
    "Model (in the arm's weight dtype), tokenizer, train/eval datasets and the resolved adapterlab config."
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from adapterlab.config import resolve_config
    from adapterlab.formats import to_prompt_completion
    from adapterlab.readers import load_examples
    from adapterlab.models import load_base_model, load_tokenizer, resolve_model
    from adapterlab.precision import with_resolved_dtypes

    cfg, _ = resolve_config(experiment, hw, {"adapterlab-fp32": ["hw.dtype=float32"]}.get(arm, []))
    cfg = with_resolved_dtypes(cfg)
    source = resolve_model(cfg.model.base_model)
    if arm.startswith("adapterlab"):
        model, tok, _ = load_base_model(cfg, source)          # hw.dtype takes effect here
    else:
        tok = load_tokenizer(source, cfg)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
    rows = lambda spec: [{k: v for k, v in to_prompt_completion(e).items() if k in ("prompt", "completion")}
                         for e in load_examples(spec)]
    return model, tok, Dataset.from_list(rows(cfg.data.train)), Dataset.from_list(rows(cfg.data.eval)), cfg, source


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
    import torch
    from trl import SFTConfig, SFTTrainer
    if arm.startswith("adapterlab"):
        import adapterlab.train as T
        from adapterlab.compat import build_sft_trainer
        model = T.attach_lora(model, cfg)
        settings = {**T.sft_settings(cfg, Path(out_dir)), **BENCH_OVERRIDES, "max_steps": steps}
        return build_sft_trainer(model, tok, train_ds, settings, trainer_cls=T.trainer_class(cfg, train_ds))
    s = bare_settings(cfg, out_dir, steps)
    if arm != "trl":
        s["gradient_checkpointing"] = False
    if arm in BF16_ARMS:
        s["bf16"] = True
    if arm == "trl-bf16-pf":
        # the data stage already rejects records longer than hw.max_seq_length, so nothing is cut here
        s.update(padding_free=True, max_length=None)
    if arm == "trl-bf16-compile":
        s["torch_compile"] = True
    if arm == "trl-bf16-liger":
        s["use_liger_kernel"] = True
    torch.manual_seed(cfg.seed)  # seeded like adapterlab.train.attach_lora: every arm starts from the same LoRA init
    return SFTTrainer(model=model, args=SFTConfig(**s), train_dataset=train_ds, processing_class=tok,
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


def yardstick_eval_loss(trained, cfg, source, tok, eval_ds) -> float:
    "The arm's trained LoRA weights on a fresh fp32 base, evaluated by `eval_loss`: the same yardstick for every arm."
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    state = {k: v.detach().float() for k, v in get_peft_model_state_dict(trained).items()}
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32), lora_config(cfg))
    missing = set_peft_model_state_dict(fresh, state).unexpected_keys
    if missing:
        raise RuntimeError(f"LoRA keys the yardstick model does not have: {missing[:5]}")
    return eval_loss(fresh, tok, eval_ds)


def worker(arm: str, steps: int, threads: int | None, eval_rows: int | None = None) -> int:
    "One arm: build, say READY, train step by step on the driver's go, then report."
    import resource
    import torch
    import transformers
    import trl
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    model, tok, train_ds, eval_ds, cfg, source = load_everything(arm)
    if eval_rows:
        eval_ds = eval_ds.select(range(min(eval_rows, len(eval_ds))))
    n_params = sum(p.numel() for p in model.parameters())
    weight_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory() as out:
        tr = make_trainer(arm, model, tok, train_ds, cfg, out, steps)
        counter = TokenCountingCollator(tr.data_collator)
        tr.data_collator = counter
        tr.add_callback(lockstep_clock(counter, cfg.hw.grad_accum))
        lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for n, p in tr.model.named_parameters()
                              if p.requires_grad})
        print("READY", flush=True)
        tr.train()
        if sys.stdin.readline().strip() != "eval":   # wait: another arm's eval must not slow an arm still training
            raise SystemExit("driver went away")
    train_losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    compute = "bfloat16" if (tr.args.bf16 or weight_dtype == "bfloat16") else "float32"
    print("RESULT " + json.dumps(dict(
        arm=arm, trainer=type(tr).__name__, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        last_train_loss=train_losses[-1] if train_losses else None,
        eval_loss=yardstick_eval_loss(tr.model, cfg, source, tok, eval_ds), n_params=n_params,
        weight_dtype=weight_dtype, trainable_dtypes=lora_dtypes, autocast_bf16=bool(tr.args.bf16),
        compute_dtype=compute, threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, trl=trl.__version__, batch=cfg.hw.batch_size,
        grad_accum=cfg.hw.grad_accum, lr=cfg.train.learning_rate, lora_r=cfg.lora.r,
        gradient_checkpointing=bool(tr.args.gradient_checkpointing))), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Driver: one process per arm, steps taken in turn, then the table
# ---------------------------------------------------------------------------------------------------------------
class Arm:
    def __init__(self, name: str, steps: int, threads: int | None, eval_rows: int | None = None):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        if eval_rows:
            cmd += ["--eval-rows", str(eval_rows)]
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


def measure_peaks(n: int = 2048, repeats: int = 5) -> dict:
    "Best GFLOP/s of an n×n matmul per dtype (what MFU divides by)."
    from adapterlab.precision import matmul_gflops
    return {dt: matmul_gflops(dt, n=n, repeats=repeats) for dt in ("float32", "bfloat16")}


def one_repeat(names: list[str], steps: int, warmup: int, threads: int | None, log, eval_rows=None) -> list[dict]:
    arms = []
    try:
        for name in names:        # one at a time: building is not timed, but it should not slow a neighbour's start
            arms.append(Arm(name, steps, threads, eval_rows))
            arms[-1].expect("READY")
        for i in range(steps):
            for arm in arms:
                d = arm.step()
                log(f"  step {i + 1}/{steps} {arm.name:<17} {d['s']:6.2f} s")
        return [arm.finish(warmup) for arm in arms]
    finally:
        for arm in arms:
            if arm.p.poll() is None:
                arm.p.kill()


def spread(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def summarize(repeats: list[list[dict]], peaks: dict, ref: str, loss_tol: float) -> list[dict]:
    "Per arm: min/median/max of the per-repeat figures, MFU at the median, and the ratio to the reference arm."
    by_arm: dict[str, list[dict]] = {}
    for rep in repeats:
        for r in rep:
            by_arm.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in by_arm.items():
        first = rs[0]
        real, alls = [r["tok_s_real"] for r in rs], [r["tok_s_all"] for r in rs]
        peak = peaks[first["compute_dtype"]]
        mfu = [6 * first["n_params"] * x / (peak * 1e9) for x in real]
        out.append(dict(arm=arm, repeats=len(rs), tok_s_real=spread(real), tok_s_all=spread(alls),
                        s_per_step=spread([r["s_per_step"] for r in rs]), mfu=spread(mfu),
                        eval_loss=statistics.median(r["eval_loss"] for r in rs),
                        eval_loss_range=(min(r["eval_loss"] for r in rs), max(r["eval_loss"] for r in rs)),
                        train_loss=statistics.median(r["last_train_loss"] for r in rs),
                        peak_rss_mb=max(r["peak_rss_mb"] for r in rs), pad_fraction=first["pad_fraction"],
                        compute_dtype=first["compute_dtype"], weight_dtype=first["weight_dtype"],
                        trainable_dtypes=first["trainable_dtypes"], gradient_checkpointing=first["gradient_checkpointing"],
                        per_repeat=rs))
    # per-repeat ratios against each arm (same repeat = same machine state), then their spread
    idx = {arm: i for i, arm in enumerate(by_arm)}
    for s in out:
        s["vs"] = {}
        for other in out:
            ratios = [a["tok_s_real"] / b["tok_s_real"] for a, b in zip(s["per_repeat"], other["per_repeat"])]
            s["vs"][other["arm"]] = spread(ratios)
    return sorted(out, key=lambda s: idx[s["arm"]])


def equal_loss(a: dict, b: dict, tol: float) -> bool:
    return abs(a["eval_loss"] - b["eval_loss"]) <= tol * b["eval_loss"]


def best_trl(summary: list[dict]) -> dict | None:
    trl = [s for s in summary if s["arm"] in TRL_ARMS]
    return max(trl, key=lambda s: s["tok_s_real"][1]) if trl else None


def fmt3(t, f="{:.1f}") -> str:
    return "/".join(f.format(x) for x in t)


def table(summary: list[dict], ours: str, tol: float) -> str:
    ref = next((s for s in summary if s["arm"] == ours), summary[-1])
    head = (f"{'arm':<17} {'dtype (weights/compute)':<24} {'useful tok/s min/med/max':>26} {'MFU % min/med/max':>18} "
            f"{'s/step med':>10} {'eval loss':>9} {'RSS MB':>7} {f'{ours} ×':>17}")
    lines = [head, "-" * len(head)]
    for s in summary:
        r = ref["vs"][s["arm"]]
        flag = "" if equal_loss(ref, s, tol) else " (loss≠)"
        lines.append(f"{s['arm']:<17} {s['weight_dtype'] + '/' + s['compute_dtype']:<24} {fmt3(s['tok_s_real']):>26} "
                     f"{fmt3(tuple(100 * m for m in s['mfu'])):>18} {s['s_per_step'][1]:>10.2f} "
                     f"{s['eval_loss']:>9.4f} {s['peak_rss_mb']:>7.0f} {r[1]:>8.2f}×{flag:<8}")
    return "\n".join(lines)


def headline(summary: list[dict], ours: str, tol: float, peaks: dict) -> list[str]:
    by = {s["arm"]: s for s in summary}
    out = []
    b = best_trl(summary)
    if ours in by and b:
        a = by[ours]
        lo, med, hi = a["vs"][b["arm"]]
        eq = equal_loss(a, b, tol)
        out.append(f"{ours} / best TRL arm ({b['arm']}), useful tokens/s: {med:.2f}× (min {lo:.2f}, max {hi:.2f} over "
                   f"{a['repeats']} repeats); eval loss {a['eval_loss']:.4f} vs {b['eval_loss']:.4f} "
                   f"({100 * (a['eval_loss'] / b['eval_loss'] - 1):+.1f}%: "
                   f"{'equal' if eq else 'NOT equal'} within the ±{100 * tol:.0f}% tolerance). Target ≥ 1.5×: "
                   f"{'met' if med >= 1.5 and eq else 'not met'}.")
        out.append(f"{ours} MFU: {100 * a['mfu'][1]:.1f}% of the measured {a['compute_dtype']} peak "
                   f"({peaks[a['compute_dtype']]:.0f} GFLOP/s). Target ≥ 50%: {'met' if a['mfu'][1] >= 0.5 else 'not met'}.")
    return out


def machine() -> dict:
    from adapterlab.precision import bf16_support, cpu_flags
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    return dict(cpu=model, cores=os.cpu_count(), flags=flags, bf16=bf16_support("cpu"),
                python=platform.python_version())


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def results_markdown(args, mach, peaks, summary, skipped, lines, load_before, load_after, wall) -> str:
    r0 = summary[0]["per_repeat"][0]
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"### {today}: `python bench/cpu_vs_trl.py {' '.join(args.argv)}`".rstrip(), "",
          f"**Machine:** {mach['cpu']}, {mach['cores']} cores, flags {', '.join(mach['flags']) or 'none'}; bf16: "
          f"{'yes' if mach['bf16']['supported'] else 'no'} ({mach['bf16']['reason']}). Load average (1/5/15 min) "
          f"{load_before} before, {load_after} after. torch {r0['torch']}, transformers {r0['transformers']}, "
          f"trl {r0['trl']}, python {mach['python']}, {r0['threads']} threads.", "",
          f"**Workload:** SmolLM2-135M-Instruct, LoRA r={r0['lora_r']} all-linear, micro-batch {r0['batch']}×"
          f"{r0['grad_accum']}, {r0['steps']} steps per arm ({r0['warmup']} untimed), {args.repeats} repeats, "
          f"{wall:.0f} s in all. Measured matmul peaks (2048², best): fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s. MFU = 6 · {r0['n_params'] / 1e6:.1f}M · useful tokens/s ÷ peak "
          f"of the arm's compute dtype. Equal eval loss = within ±{100 * args.loss_tol:.0f}% (relative).", "",
          "| arm | weights / compute | useful tok/s min / med / max | MFU % (med) | eval loss | "
          f"{args.ours} × (med) | equal loss |", "|---|---|---|---|---|---|---|"]
    ref = next(s for s in summary if s["arm"] == args.ours) if any(s["arm"] == args.ours for s in summary) else None
    for s in summary:
        ratio = f"{ref['vs'][s['arm']][1]:.2f}×" if ref else "n/a"
        eq = ("yes" if equal_loss(ref, s, args.loss_tol) else "**no**") if ref else "n/a"
        md.append(f"| {s['arm']} | {s['weight_dtype']} / {s['compute_dtype']} | {fmt3(s['tok_s_real'])} | "
                  f"{100 * s['mfu'][1]:.1f} | {s['eval_loss']:.4f} | {ratio} | {eq} |")
    for arm, why in skipped.items():
        md.append(f"| {arm} | — | not run: {why} | | | | |")
    md += ["", *[f"- {l}" for l in lines], ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default="all", help="comma list, or 'all'")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="fresh lock-step runs of every arm (min/median/max)")
    ap.add_argument("--loss-tol", type=float, default=DEFAULT_LOSS_TOL, help="relative eval-loss tolerance of 'equal loss'")
    ap.add_argument("--ours", default="adapterlab", help="the arm whose ratios are the headline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--llamafactory-python", default=None, help="python of a venv with llamafactory installed")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--write-results", action="store_true", help="append a dated table to bench/RESULTS.md")
    ap.add_argument("--eval-rows", type=int, default=None,
                    help="evaluate on the first N eval examples only (a quick check of the code path; default: all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    args.argv = raw
    if args.worker:
        return worker(args.worker, args.steps, args.threads, args.eval_rows)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    sys.path.insert(0, str(ROOT / "lib"))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    names = ALL_ARMS if args.arms == "all" else args.arms.split(",")
    unknown = [n for n in names if n not in ALL_ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ALL_ARMS)}")
    load_before, t0 = load_avg(), time.perf_counter()
    mach = machine()
    skipped = {n: why for n in names if (why := unavailable(n, mach["bf16"], args.llamafactory_python))}
    runnable = [n for n in names if n not in skipped]
    for n, why in skipped.items():
        log(f"skipping {n}: {why}")
    peaks = measure_peaks()
    log(f"matmul peaks before: fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    repeats = []
    for k in range(args.repeats):
        log(f"repeat {k + 1}/{args.repeats}: {', '.join(runnable)}")
        repeats.append(one_repeat(runnable, args.steps, args.warmup, args.threads, log, args.eval_rows))
    after = measure_peaks()
    peaks = {k: max(peaks[k], after[k]) for k in peaks}
    load_after, wall = load_avg(), time.perf_counter() - t0
    summary = summarize(repeats, peaks, args.ours, args.loss_tol)
    r0 = repeats[0][0]
    print(f"\nCPU benchmark ({wall:.0f} s): SmolLM2-135M-Instruct + LoRA r={r0['lora_r']} all-linear, batch "
          f"{r0['batch']}×{r0['grad_accum']}, {r0['steps']} steps per arm taken in turn ({r0['warmup']} untimed), "
          f"{args.repeats} repeat(s), {r0['threads']} threads; torch {r0['torch']}, transformers {r0['transformers']}, "
          f"trl {r0['trl']}")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, flags {', '.join(mach['flags'])}; bf16: "
          f"{mach['bf16']['reason']}; load average {load_before} before, {load_after} after")
    print(f"measured matmul peaks (2048², best before/after): fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    print(f"MFU = 6 · N · useful tokens/s ÷ peak of the arm's compute dtype, N = {r0['n_params'] / 1e6:.1f}M base "
          f"parameters; eval loss: the arm's LoRA on the fp32 base, same code for every arm; equal loss = within "
          f"±{100 * args.loss_tol:.0f}% of {args.ours}'s (else flagged loss≠)\n")
    print(table(summary, args.ours, args.loss_tol))
    for n, why in skipped.items():
        print(f"{n:<17} not run: {why}")
    lines = headline(summary, args.ours, args.loss_tol, peaks)
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(machine=mach, peaks=peaks, summary=summary, skipped=skipped,
                                                   load_before=load_before, load_after=load_after), indent=2, default=str))
    if args.write_results:
        path = ROOT / "bench" / "RESULTS.md"
        text = path.read_text()
        section = results_markdown(args, mach, peaks, summary, skipped, lines, load_before, load_after, wall)
        marker = "## CPU: adapterlab vs the best TRL a competent user would write"
        if marker not in text:
            text = text.replace("## CPU: adapterlab's train step vs bare TRL",   # first run: a new section above
                                marker + " — `python bench/cpu_vs_trl.py`\n\n" + section +
                                "\n## CPU: adapterlab's train step vs bare TRL", 1)
        else:
            head, _, rest = text.partition(marker)
            end = rest.find("\n## ") + 1 or len(rest)            # this section ends at the next `## `
            intro_end = rest.find("\n### ", 0, end) + 1 or end    # its dated tables start at the first `### `
            text = head + marker + rest[:intro_end] + section + "\n" + rest[intro_end:]   # newest first
        path.write_text(text)
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
