"""The spine, for real: the embedded SmolLM2 trains, its loss falls, the base stays untouched, the adapter reloads."""
import json
from pathlib import Path

import pytest
import torch

from adapterlab.artifact import BaseModifiedError
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
                 "verification.json", "train_summary.json", "data/train.jsonl", "checkpoints"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "trainer_state.json").exists()


def test_adapter_reloads_with_same_logits_in_plain_peft(ci_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    art = Path(ci_run.summary["artifact"])
    base_location = json.loads((art / "metadata.json").read_text())["base_model"]["location"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_location), art).eval()
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
