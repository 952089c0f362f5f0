"""The spine, for real: the embedded SmolLM2 trains, its loss falls, the base stays untouched, the adapter reloads."""
import json
from pathlib import Path

import pytest
import torch

from adapterlab.provenance import BaseModifiedError
from adapterlab.config import open_run
from adapterlab.train import read_metrics, reload_logits_gap, run_training

pytestmark = pytest.mark.slow


def test_loss_falls(ci_run):
    losses = [r["loss"] for r in read_metrics(ci_run.summary["run_dir"]) if "loss" in r]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    m = ci_run.summary["metrics"]
    assert m["val_loss_after"] < m["val_loss_before"], m


def test_run_folder_holds_what_the_stage_promises(ci_run):
    run_dir = Path(ci_run.summary["run_dir"])
    for name in ("params.yaml", "params_origin.yaml", "metrics.jsonl", "loss.png", "baseline_checksums.json",
                 "verification.json", "train_summary.json", "data/train.jsonl", "checkpoints", "plan.md", "plan.json",
                 "memory.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "trainer_state.json").exists()
    memory = ci_run.summary["memory"]                     # the plan made before loading, and what the run used
    assert memory == json.loads((run_dir / "memory.json").read_text())
    assert memory["planned_allocated"] == json.loads((run_dir / "plan.json").read_text())["torch_allocated"] > 0
    assert memory["device"] == "cpu" and memory["peak_rss"] > 0


def test_adapter_reloads_with_same_logits_in_plain_peft(ci_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    art = Path(ci_run.summary["artifact"])
    base_location = json.loads((art / "metadata.json").read_text())["base_model"]["location"]
    import yaml   # the base in the dtype the artifact records (the cpu profile's auto: bf16 on a bf16 CPU)
    dtype = getattr(torch, yaml.safe_load((art / "training_config.yaml").read_text())["hw"]["dtype"])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_location, dtype=dtype), art).eval()
    batch = ci_run.tokenizer(["Meet Ana Ruiz, 30, who works as a chef in Quito."], return_tensors="pt")
    ci_run.model.eval()
    with torch.inference_mode():
        gap = (ci_run.model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    assert gap < 1e-4
    assert reload_logits_gap(ci_run) < 1e-4   # and through adapterlab's verified loader


def test_adapter_actually_changes_the_model(ci_run):
    """The reload test above would pass for an adapter that does nothing; this one would not."""
    batch = ci_run.tokenizer(["Meet Ana Ruiz, 30, who works as a chef in Quito."], return_tensors="pt")
    with torch.inference_mode():
        with_adapter = ci_run.model(**batch).logits
        with ci_run.model.disable_adapter():
            without = ci_run.model(**batch).logits
    assert (with_adapter - without).abs().max().item() > 1e-3


def test_trainable_base_parameter_is_refused(tmp_path, monkeypatch):
    import adapterlab.train as train
    real_attach = train.attach_lora

    def attach_and_unfreeze(model, cfg):
        peft_model = real_attach(model, cfg)
        peft_model.base_model.model.model.norm.weight.requires_grad_(True)
        return peft_model

    monkeypatch.setattr(train, "attach_lora", attach_and_unfreeze)
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}", "train.max_steps=1"])
    with pytest.raises(BaseModifiedError, match=r"base parameter\(s\) would train.*model\.norm\.weight"):
        run_training(cfg, run_dir)
    assert not list(run_dir.glob("artifact*"))


def test_base_tensor_changed_during_training_is_caught_and_named(tmp_path, monkeypatch):
    """A callback that nudges one frozen base weight mid-run stands in for any bug that writes to the base."""
    from transformers import TrainerCallback
    import adapterlab.train as train

    class Saboteur(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                model.base_model.model.model.layers[3].mlp.down_proj.weight[0, 0] += 1.0

    real_callback = train.metrics_callback
    monkeypatch.setattr(train, "metrics_callback", lambda path: [real_callback(path), Saboteur()][1])
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}", "train.max_steps=1", "data.val_fraction=0"])
    with pytest.raises(BaseModifiedError, match=r"layers\.3\.mlp\.down_proj\.weight: base tensor bytes changed"):
        run_training(cfg, run_dir)
    assert json.loads((run_dir / "verification.json").read_text())["base_tensors_changed"]
    assert not list(run_dir.glob("artifact*"))


def test_cpu_completion_loss_is_trls_loss_at_less_cost(tmp_path):
    """The cpu profile's trainer (LM head on the trained positions only) against TRL's own `SFTTrainer` on the same
    real batch of the embedded model: the same loss, gradients and logged token metrics."""
    from trl import SFTTrainer
    from adapterlab.compat import build_sft_trainer
    from adapterlab.data import prepare_data
    from adapterlab.models import load_base_model
    from adapterlab.train import attach_lora, sft_settings, trainer_class
    # fp32: the two computations agree to fp32 precision; in bf16 (the cpu profile's `auto` on a bf16 CPU) only to bf16's
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}", "hw.dtype=float32"])
    model, tok, _ = load_base_model(cfg)
    data = prepare_data(cfg, run_dir, tok)
    model = attach_lora(model, cfg)
    ours_cls = trainer_class(cfg, data.train)
    assert ours_cls is not None and issubclass(ours_cls, SFTTrainer)   # the profile turns it on
    settings = {**sft_settings(cfg, run_dir), "report_to": []}
    ours = build_sft_trainer(model, tok, data.train, settings, trainer_cls=ours_cls)
    trl = build_sft_trainer(model, tok, data.train, settings)
    batch = next(iter(trl.get_train_dataloader()))
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < trained < batch["labels"][:, 1:].numel()        # prompt and padding are left out of the loss
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    model.train()
    results = {}
    for name, trainer in (("trl", trl), ("ours", ours)):
        torch.manual_seed(0)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(trained))
        loss.backward()
        logged = trainer._metrics["train"]
        results[name] = (loss.item(), lora.grad.clone(), logged["mean_token_accuracy"][-1], logged["entropy"][-1])
    (l_trl, g_trl, acc_trl, ent_trl), (l_ours, g_ours, acc_ours, ent_ours) = results["trl"], results["ours"]
    assert abs(l_ours - l_trl) < 1e-4 * max(1.0, abs(l_trl)), (l_ours, l_trl)
    assert torch.allclose(g_ours, g_trl, rtol=1e-3, atol=1e-6)
    assert abs(acc_ours - acc_trl) < 1e-6 and abs(ent_ours - ent_trl) < 1e-3 * max(1.0, ent_trl)
