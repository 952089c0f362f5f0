"""Parameter merging and validation: every bad input names the file, line and key."""
from pathlib import Path

import pytest
import torch
import yaml

from adapterlab.config import (ConfigError, HardwareError, check_hardware, load_run_config, open_run, resolve_config)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layers_merge_in_documented_order(tmp_path):
    cfg, origin = resolve_config("ci", "cpu", ["train.learning_rate=0.01"])
    assert cfg.experiment == "ci" and cfg.lora.r == 8                     # experiment beats defaults
    assert cfg.hw.batch_size == 8 and origin["hw.batch_size"].startswith("params/hw/cpu.yaml:")  # hw beats experiment
    assert cfg.train.learning_rate == 0.01 and origin["train.learning_rate"] == "override"
    assert origin["lora.r"] == "params/experiments/ci.yaml:5"
    assert origin["train.lr_scheduler"].startswith("params/defaults.yaml:")


def test_unknown_key_names_file_line_and_closest_name(tmp_path):
    exp = write(tmp_path / "bad.yaml", "experiment: bad\nlora:\n  r: 4\n  alpah: 8\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(exp, "cpu")
    assert f"bad.yaml:4: lora.alpah: unknown key; did you mean 'lora.alpha'?" in str(e.value)


def test_unknown_section_is_reported(tmp_path):
    exp = write(tmp_path / "bad.yaml", "experiment: bad\ntrainer:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: trainer: unknown key; did you mean 'train'\?"):
        resolve_config(exp, "cpu")


@pytest.mark.parametrize("line, message", [
    ("  r: eight", "lora.r: expected int, got 'eight'"),
    ("  r: 0", "lora.r: must be ≥ 1; got 0"),
    ("  r: true", "lora.r: expected int, got True"),
    ("  dropout: 1.5", "lora.dropout: must be < 1; got 1.5"),
    ("  bias: some", "lora.bias: must be one of none, all, lora_only; got 'some'"),
])
def test_wrong_types_and_ranges(tmp_path, line, message):
    exp = write(tmp_path / "bad.yaml", f"experiment: bad\nlora:\n{line}\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(exp, "cpu")
    assert f"bad.yaml:3: {message}" in str(e.value)


def test_all_problems_reported_together(tmp_path):
    exp = write(tmp_path / "bad.yaml", "experiment: bad\nseed: -1\ntrain:\n  learning_rate: 2\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(exp, "cpu")
    assert "bad.yaml:2: seed: must be ≥ 0" in str(e.value) and "bad.yaml:4: train.learning_rate: must be < 1" in str(e.value)


def test_broken_yaml_names_the_line(tmp_path):
    exp = write(tmp_path / "bad.yaml", "experiment: bad\nlora:\n  r: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        resolve_config(exp, "cpu")


def test_experiment_name_must_match_file(tmp_path):
    exp = write(tmp_path / "mine.yaml", "experiment: other\n")
    with pytest.raises(ConfigError, match="differs from its file name 'mine'"):
        resolve_config(exp, "cpu")


def test_unknown_profile_suggests_closest():
    with pytest.raises(ConfigError, match="no hw named '8g'.*did you mean '8gb'"):
        resolve_config("ci", "8g")


def test_hw_profile_can_be_a_path(tmp_path):
    hw = write(tmp_path / "mybox.yaml", "hw:\n  name: mybox\n  batch_size: 2\n")
    cfg, origin = resolve_config("ci", hw)
    assert cfg.hw.name == "mybox" and cfg.hw.batch_size == 2 and origin["hw.batch_size"].endswith("mybox.yaml:3")


def test_gpu_profiles_are_qlora():
    for name in ("8gb", "16gb", "24gb", "80gb"):
        cfg, _ = resolve_config("json_contacts", name)
        assert (cfg.hw.device, cfg.hw.quantization, cfg.hw.double_quant, cfg.hw.compute_dtype, cfg.hw.optimizer) == (
            "cuda", "nf4", True, "bfloat16", "paged_adamw_8bit")
        assert cfg.model.base_model == cfg.hw.base_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_profile_without_cuda_fails_fast_unless_moved_to_cpu():
    cfg, origin = resolve_config("json_contacts", "8gb")
    with pytest.raises(HardwareError, match=r"params/hw/8gb.yaml:\d+: hw profile '8gb' needs a CUDA GPU.*hw.device=cpu"):
        check_hardware(cfg, origin)
    cfg, _ = resolve_config("json_contacts", "8gb", ["hw.device=cpu"])
    check_hardware(cfg)


def test_papermill_f_injection_keeps_hw_precedence(tmp_path):
    injected = yaml.safe_load(Path("params/experiments/ci.yaml").read_text())
    injected.pop("experiment")
    injected["hw"] = {"batch_size": 99}  # an experiment's hw keys stay below the profile's
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}"], injected=injected)
    assert cfg.hw.batch_size == 8 and cfg.lora.r == 8


def test_run_snapshot_roundtrip_and_never_reused(tmp_path):
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}"])
    assert load_run_config(run_dir) == cfg
    origin = yaml.safe_load((run_dir / "params_origin.yaml").read_text())
    assert origin["output.root"] == "override"
    _, second = open_run("ci", "cpu", [f"output.root={tmp_path}"])
    assert second != run_dir
