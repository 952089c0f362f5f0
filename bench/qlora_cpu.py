#!/usr/bin/env python
"""The 4-bit (QLoRA) training step against the full-precision one, on this CPU, same model and data.

    python bench/qlora_cpu.py                       # every arm this CPU can run, 6 steps each (~3 min on 2 cores)
    python bench/qlora_cpu.py --steps 4 --write-results   # ... and append a dated table to bench/RESULTS.md

Each arm is `adapterlab.train.run_training` on the `ci` experiment (embedded SmolLM2-135M, LoRA r=8 on q/v, the
json_contacts sample), no validation split, the same seed and micro-batch; only the hardware profile differs:
  full-fp32        the cpu profile, `hw.dtype=float32`
  full-bf16        the cpu profile, `hw.dtype=bfloat16` (only where the CPU has native bf16)
  nf4-fp32         the cpu-qlora profile with `hw.compute_dtype=float32`: NF4 + double quant, fp32 matmuls
  nf4-bf16         the cpu-qlora profile with `hw.compute_dtype=bfloat16`: the GPU recipe's compute dtype (on a CPU
                   without native bf16 it is emulated: this arm shows the cost)
  cpu-qlora        the cpu-qlora profile as it ships (`compute_dtype: auto`)
Figure: training tokens per second over the steps after the first (`train_tokens_per_s` from the run's metrics),
and each arm's time per step relative to full-fp32. The first step (warm-up) is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = {
    "full-fp32": ("cpu", ["hw.dtype=float32"]),
    "full-bf16": ("cpu", ["hw.dtype=bfloat16"]),
    "nf4-fp32": ("cpu-qlora", ["hw.compute_dtype=float32"]),
    "nf4-bf16": ("cpu-qlora", ["hw.compute_dtype=bfloat16"]),
    "cpu-qlora": ("cpu-qlora", []),
}


def run_arm(name: str, steps: int) -> dict:
    from adapterlab.config import resolve_config
    from adapterlab.skeleton import read_metrics
    from adapterlab.train import run_training
    hw, extra = ARMS[name]
    with tempfile.TemporaryDirectory() as d:
        cfg, _ = resolve_config("ci", hw, [f"output.root={d}", f"train.max_steps={steps}", f"train.save_steps={steps}",
                                           "data.val_fraction=0", *extra])
        result = run_training(cfg, d)
        rows = [r for r in read_metrics(d) if "loss" in r and "num_tokens" in r]
    # steps after the first: tokens and seconds between the first and the last logged step
    (t0, n0), (t1, n1) = (rows[0]["time_s"], rows[0]["num_tokens"]), (rows[-1]["time_s"], rows[-1]["num_tokens"])
    return {"arm": name, "steps": len(rows), "tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / (len(rows) - 1),
            "final_loss": rows[-1]["loss"], "numerics": _numerics(result)}


def _numerics(result) -> str:
    from adapterlab.models import model_numerics
    n = model_numerics(result.model)
    q = n["quantization"]
    return (f"{q['quant_type']} ({q['compute_dtype']} compute), adapter {n['adapter_dtype']}" if q else
            f"{'/'.join(n['base_dtypes'])} base, adapter {n['adapter_dtype']}")


def machine() -> dict:
    import platform
    from adapterlab.precision import bf16_support, cpu_flags
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags, "bf16": bf16_support("cpu")}


def table(rows: list[dict], mach: dict) -> str:
    ref = next((r for r in rows if r["arm"] == "full-fp32"), rows[0])
    lines = [f"### QLoRA on the CPU: 4-bit vs full-precision step ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"**Machine:** {mach['cpu']}, {mach['cores']} cores, flags {', '.join(mach['flags']) or 'none'}; bf16: "
             f"{'native' if mach['bf16']['supported'] else 'not native'} ({mach['bf16']['reason']}). "
             f"`python bench/qlora_cpu.py --steps {rows[0]['steps']}`: the ci experiment, embedded SmolLM2-135M.", "",
             "| arm | numerics | tokens/s | s/step | step vs full-fp32 | final loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['numerics']} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | "
                     f"{r['s_per_step'] / ref['s_per_step']:.2f}x | {r['final_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="all", help="comma list of " + ", ".join(ARMS) + ", or all")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    mach = machine()
    names = list(ARMS) if args.arms == "all" else args.arms.split(",")
    rows = []
    for name in names:
        if name == "full-bf16" and not mach["bf16"]["supported"]:
            print(f"{name}: skipped: {mach['bf16']['reason']}")
            continue
        start = time.time()
        rows.append(run_arm(name, args.steps))
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tok/s, {rows[-1]['s_per_step']:.2f} s/step "
              f"({time.time() - start:.0f} s with load)", flush=True)
    out = table(rows, mach)
    print(out)
    if args.write_results:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write("\n" + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
