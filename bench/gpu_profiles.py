#!/usr/bin/env python
"""GPU benchmark: a Llama-3.1-8B-shaped model (random weights) trained under each GPU profile, measured against the plan.

    python bench/gpu_profiles.py                          # profiles 8gb,16gb,24gb,80gb on the visible CUDA GPU
    python bench/gpu_profiles.py --profiles 8gb --steps 8 --json outputs/bench/gpu.json
    python bench/gpu_profiles.py --smoke                  # CPU, a tiny Llama, the same code path (no figures)

For each profile, in its own process (fresh CUDA memory statistics):

1. resolve the profile (`json_contacts` experiment: its LoRA shape), check that bitsandbytes 4-bit runs here, and ask
   the planner (`adapterlab.plan.fit_plan`) for the micro-batch that fits the profile's budget, and the peak;
2. build the architecture with random weights as a local safetensors checkpoint (once, cached), load it the way
   adapterlab loads a base model (`adapterlab.models.load_base_model`: NF4, double quant, bf16 compute), attach LoRA
   the way the train stage does (`adapterlab.train.attach_lora`: prepare_model_for_kbit_training, non-reentrant
   checkpointing), and build the trainer through `adapterlab.compat` with `adapterlab.train.sft_settings`
   (paged 8-bit AdamW as the profile says);
3. train on random token sequences of exactly `hw.max_seq_length` tokens (the worst case the plan assumes), and
   report peak memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved`, and what the device reports used),
   tokens/s and MFU, next to the plan.

MFU counts 6 × (non-embedding parameters + LM head) + 12 × layers × hidden × sequence FLOPs per token (the PaLM
convention: forward + backward as if every weight were trained, attention non-causal); for QLoRA the hardware does
less (frozen base: no weight gradients) and more (checkpointing recomputes the forward), so read it as the usual
yardstick, not as the hardware's efficiency.

Planner accuracy compares `plan.torch_allocated` with `torch.cuda.max_memory_allocated()`: both leave out the CUDA
context, the allocator's slack and paged optimizer state (unified memory), so they measure the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU_PROFILES = ["8gb", "16gb", "24gb", "80gb"]

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity). Pass --peak-tflops for other devices.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "RTX 4060": 61.0, "RTX 3070": 41.0, "T4": 65.0,
}
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, tie_word_embeddings=False)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    hits = [v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in name.lower()]
    return max(hits) if hits else None


def model_config(arch: str, smoke: bool):
    from transformers import LlamaConfig
    from adapterlab.arch import preset_config
    return LlamaConfig(**TINY) if smoke else preset_config(arch)


def random_checkpoint(config, name: str, device: str) -> Path:
    """A safetensors model folder with random weights (std 0.02, norms 1) and the embedded tokenizer, built tensor by
    tensor on `device` so it never needs the whole bf16 model in memory; cached under the adapterlab cache."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from adapterlab.models import cache_dir, resolve_model
    out = cache_dir() / "bench" / f"random-{name}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[key] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 2 << 30:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct").location).save_pretrained(out)
    (out / "done").write_text("ok")
    return out


def flops_per_token(config, seq_len: int) -> float:
    from adapterlab.arch import arch_from_config
    a = arch_from_config(config)
    dense = a.layers * a.layer_linear_params() + a.vocab * a.hidden   # the LM head is a matmul; embeddings are not
    return 6 * dense + 12 * a.layers * a.hidden * seq_len


def run_profile(profile: str, arch: str, steps: int, warmup: int, smoke: bool, peak: float | None) -> dict:
    import torch
    import bitsandbytes
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from adapterlab.compat import build_sft_trainer
    from adapterlab.config import resolve_config
    from adapterlab.models import load_base_model
    from adapterlab.plan import fit_plan, gib, plan_memory, plan_vs_measured
    from adapterlab.precision import check_4bit
    from adapterlab.train import attach_lora, sft_settings

    device = "cpu" if smoke else "cuda"
    overrides = ["hw.device=cpu", "hw.max_seq_length=128", "hw.memory_budget_gb=78"] if smoke else []
    cfg, _ = resolve_config("json_contacts", profile, overrides)
    check_4bit(device)
    config = model_config(arch, smoke)
    cfg, plan = fit_plan(config, cfg)
    folder = random_checkpoint(config, "tiny" if smoke else arch, device)
    cfg.model.base_model = str(folder)

    torch.manual_seed(cfg.seed)
    model, tok, _ = load_base_model(cfg)
    model = attach_lora(model, cfg)
    emb_dtype = model.get_input_embeddings().weight.dtype
    if emb_dtype == torch.float32:   # the train stage kept prepare_model_for_kbit_training's float32 upcast: plan it
        plan = plan_memory(config, cfg, upcast_unquantized=True)
    seq = cfg.hw.max_seq_length
    n_rows = cfg.hw.batch_size * cfg.hw.grad_accum * steps
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(3, min(len(tok), config.vocab_size), (n_rows, seq),
                                                       generator=g).tolist()})

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as run_dir:
        settings = sft_settings(cfg, Path(run_dir))
        settings.update(max_steps=steps, save_strategy="no", logging_steps=1, completion_only_loss=False,
                        max_length=seq, report_to=[], disable_tqdm=True, num_train_epochs=1)
        trainer = build_sft_trainer(model, tok, ds, settings, callbacks=[clock])
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    measured = {}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        measured = dict(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                        device_used_at_end=total - free, device_total=total)
        name = torch.cuda.get_device_name()
    else:
        import resource
        measured = dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        name = "cpu (smoke test: figures mean nothing)"
    secs = clock.ends[-1] - clock.ends[warmup - 1]
    tokens = (steps - warmup) * cfg.hw.batch_size * cfg.hw.grad_accum * seq
    tps = tokens / secs
    tflops = peak_tflops(name, peak)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(profile=profile, arch="tiny" if smoke else arch, device=name, seq_len=seq,
                micro_batch=cfg.hw.batch_size, grad_accum=cfg.hw.grad_accum,
                gradient_checkpointing=cfg.hw.gradient_checkpointing, optimizer=cfg.hw.optimizer,
                embeddings_dtype=str(emb_dtype).replace("torch.", ""),
                planned=dict(torch_allocated=plan.torch_allocated, total=plan.total, fits=plan.fits,
                             components=plan.components),
                measured=measured, comparison=plan_vs_measured(plan, measured),
                tokens_per_s=tps, mfu=(tps * flops_per_token(config, seq) / (tflops * 1e12)) if tflops else None,
                peak_tflops=tflops, steps=steps, warmup=warmup, train_wall_s=wall, final_loss=losses[-1] if losses else None,
                versions=dict(torch=torch.__version__, cuda=torch.version.cuda, bitsandbytes=bitsandbytes.__version__,
                              transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__))


def markdown(results: list[dict]) -> str:
    g = lambda b: f"{b / 2**30:.2f}"
    lines = ["| profile | device | seq × micro-batch (accum) | ckpt | planned alloc GiB | measured max_allocated GiB "
             "| error | max_reserved GiB | device used GiB | planned total GiB | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, c = r["measured"], r["comparison"]
        err = f"{100 * c['error']:+.1f}%" if "error" in c else "n/a"
        lines.append(
            f"| {r['profile']} | {r['device']} | {r['seq_len']} × {r['micro_batch']} ({r['grad_accum']}) | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {g(r['planned']['torch_allocated'])} | "
            f"{g(m['max_allocated']) if 'max_allocated' in m else 'n/a'} | {err} | "
            f"{g(m['max_reserved']) if 'max_reserved' in m else 'n/a'} | "
            f"{g(m['device_used_at_end']) if 'device_used_at_end' in m else 'n/a'} | {g(r['planned']['total'])} | "
            f"{r['tokens_per_s']:.0f} | {'%.1f%%' % (100 * r['mfu']) if r['mfu'] else 'n/a'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default=",".join(GPU_PROFILES))
    ap.add_argument("--arch", default="llama-3.1-8b", help="architecture preset (adapterlab.arch.ARCH_PRESETS)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--smoke", action="store_true", help="run the code path on the CPU with a tiny model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        r = run_profile(args.worker, args.arch, args.steps, args.warmup, args.smoke, args.peak_tflops)
        print("RESULT " + json.dumps(r))
        return 0
    results = []
    for profile in args.profiles.split(","):
        cmd = [sys.executable, __file__, "--worker", profile, "--arch", args.arch, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else []) + \
              (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode or line is None:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
            print(f"profile {profile} failed (exit {p.returncode})", file=sys.stderr)
            results.append(None)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  {profile}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    ok = [r for r in results if r]
    if ok:
        v = ok[0]["versions"]
        print(f"\n{ok[0]['device']}; torch {v['torch']} (CUDA {v['cuda']}), bitsandbytes {v['bitsandbytes']}, "
              f"transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}\n")
        print(markdown(ok))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(ok, indent=2))
    return 0 if ok and len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
