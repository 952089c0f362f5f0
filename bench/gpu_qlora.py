#!/usr/bin/env python
"""The GPU check of QLoRA, short enough for a lent GPU (< 8 minutes on one H100): the `8gb` profile's pipeline on a
small real model, then the memory planner against the measured peak on the 8B shape.

    python bench/gpu_qlora.py                      # needs CUDA; prints a table, --write-results appends it to RESULTS.md
    python bench/gpu_qlora.py --skip-planner       # the pipeline only

1. `adapterlab run --hw 8gb -f ci --also preference` with the embedded SmolLM2-135M as the base (`hw.base_model`): NF4,
   double quant, bf16 compute, paged 8-bit AdamW, checkpointing, exactly as the profile ships otherwise, at CI size.
   Every stage must finish: the train stage's reload check (the adapter reloads onto the 4-bit base to the trained
   model's logits, `adapterlab.train.RELOAD_TOLERANCE`), the eval on both bases, DPO.
2. `bench/gpu_profiles.py --profiles 8gb --steps 4`: a Llama-3.1-8B-shaped model (random weights) under the 8gb
   profile, planned vs measured peak memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CI_SIZE = ["hw.base_model=embedded:smollm2-135m-instruct", "train.max_steps=4", "train.save_steps=4",
           "eval.max_examples=8", "eval.max_new_tokens=32", "preference.max_steps=2"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-planner", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench/gpu_qlora.py: no CUDA GPU here; run it where one is lent", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    root = REPO / "outputs" / "bench" / "gpu_qlora"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "adapterlab.cli", "run", "--hw", "8gb", "-f", "ci", "--also", "preference",
                           *[x for s in CI_SIZE + [f"output.root={root}"] for x in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True)
    pipeline_s = time.time() - start
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    run_dir = Path(proc.stdout.strip().splitlines()[-1].split("run folder: ")[-1]) if proc.returncode == 0 else None
    rows = [f"### QLoRA on a GPU ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu})", "",
            f"`python bench/gpu_qlora.py`: the 8gb profile's pipeline on SmolLM2-135M, exit {proc.returncode} in "
            f"{pipeline_s:.0f} s."]
    if run_dir is not None:
        status = json.loads((run_dir / "status.json").read_text())
        memory = json.loads((run_dir / "memory.json").read_text())
        full = json.loads((run_dir / "eval" / "report.json").read_text()).get("full_base", {})
        rows += ["", "| stage | seconds |", "|---|---|", *[f"| {n} | {r.get('seconds')} |" for n, r in status["stages"].items()],
                 "", f"memory: planned {memory.get('planned_allocated')} B allocated, measured peak "
                     f"{memory.get('max_allocated')} B; serve on the {full.get('serve_on')} base "
                     f"(logit gap {full.get('max_logit_gap')})"]
    if not args.skip_planner:
        out = REPO / "outputs" / "bench" / "gpu_8gb.json"
        subprocess.run([sys.executable, str(REPO / "bench" / "gpu_profiles.py"), "--profiles", "8gb", "--steps", "4",
                        "--json", str(out)], cwd=REPO, check=False)
        if out.exists():
            rows += ["", "planner (8B shape, 8gb profile): " + out.read_text()[:1500]]
    table = "\n".join(rows) + "\n"
    print(table)
    if args.write_results:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
