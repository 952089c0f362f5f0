"""The fix-regression registry (`adapterlab.regression_checks`, run by `adapterlab.regressions`): every historical
failure reproduces on the installed libraries, adapterlab's path survives the same inputs, and removing the responsible guard brings the failure back."""
import argparse
import importlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from adapterlab import regression_checks as C
from adapterlab import regressions as R

pytestmark = pytest.mark.slow  # real MiniLM and SmolLM2; about a minute for the whole module on 2 cores


@pytest.fixture(scope="module")
def inputs():
    return C.check_inputs("minilm_heads", "cpu")


def test_registry_covers_every_seed_failure_and_every_guard():
    assert [c.seed for c in C.REGISTRY] == ["000 (TRL ADR)"] + [f"001 Fix #{n}" for n in range(16, 21)]
    assert {g for c in C.REGISTRY for g in c.guards} == set(C.all_guards())


@pytest.mark.parametrize("check", C.REGISTRY, ids=lambda c: c.id)
def test_naive_configuration_reproduces_the_original_failure(check, inputs):
    exc = check.reproduce(inputs)
    assert exc is not None, f"{check.id}: the naive configuration no longer fails"
    assert check.reproduces(exc), f"{check.id}: expected {check.error_type.__name__} /{check.error_pattern}/, got {exc!r}"


@pytest.mark.parametrize("check", C.REGISTRY, ids=lambda c: c.id)
def test_adapterlab_path_survives_the_same_inputs(check, inputs):
    evidence = check.guarded(inputs)
    assert isinstance(evidence, str) and evidence


@pytest.mark.parametrize("check,guard", [(c, g) for c in C.REGISTRY for g in c.guards],
                         ids=lambda x: getattr(x, "id", None) or str(x).rsplit(".", 1)[-1])
def test_removing_the_guard_makes_the_check_fail(check, guard, inputs, monkeypatch):
    module_name, attr = guard.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module_name), attr, C.all_guards()[guard].removed)
    with pytest.raises(Exception):
        check.guarded(inputs)


def test_guard_removed_restores_the_guard():
    from adapterlab import heads
    original = heads.align_targets
    with C.guard_removed("adapterlab.heads.align_targets"):
        assert heads.align_targets is not original
        assert heads.align_targets([1.0] * 5, 3, "exact") == ([1.0] * 5, [1.0] * 5)
    assert heads.align_targets is original


def test_stage_writes_the_table_and_passes(inputs, tmp_path):
    checks = (C.get_check("collator-tensors"), C.get_check("target-alignment"))
    results = R.regression_stage(tmp_path, inputs, prove_guards=True, checks=checks)
    assert all(r.ok for r in results)
    rows = json.loads((tmp_path / "regressions" / "table.json").read_text())
    assert [r["id"] for r in rows] == ["collator-tensors", "target-alignment"]
    assert all(r["reproduced"] and r["guarded"] and r["guards_needed"] for r in rows)
    table = (tmp_path / "regressions" / "table.md").read_text()
    assert "| check | seed | original error | reproduced?" in table
    assert "AttributeError: 'list' object has no attribute 'float'" in table


def test_stage_fails_on_a_check_that_does_not_reproduce_or_is_not_guarded(inputs, tmp_path):
    def raises_other(_):
        raise KeyError("something else")
    vacuous = C.RegressionCheck("vacuous", "test", "a bug that cannot happen", "ZeroDivisionError: division by zero",
                                ZeroDivisionError, r"division by zero", naive=lambda _: 1 + 1,
                                adapterlab=lambda _: "fine", guards=())
    unguarded = C.RegressionCheck("unguarded", "test", "a bug adapterlab still has", "ZeroDivisionError: division by zero",
                                  ZeroDivisionError, r"division by zero", naive=lambda _: 1 / 0,
                                  adapterlab=raises_other, guards=())
    with pytest.raises(R.RegressionFailure) as e:
        R.regression_stage(tmp_path, inputs, checks=(vacuous, unguarded))
    msg = str(e.value)
    assert "vacuous: the naive configuration did not reproduce" in msg and "(it raised: nothing)" in msg
    assert "unguarded: adapterlab's path failed: KeyError: 'something else'" in msg
    rows = json.loads((tmp_path / "regressions" / "table.json").read_text())  # evidence written before judging
    assert [(r["reproduced"], r["guarded"]) for r in rows] == [(False, True), (True, False)]


def test_a_guard_that_is_not_needed_is_reported(inputs, tmp_path, monkeypatch):
    check = C.get_check("collator-tensors")
    # A guard list naming a function the check does not depend on: removing it changes nothing, which must show.
    monkeypatch.setitem(C.EXTERNAL_GUARDS, "adapterlab.heads.pool_hidden_states",
                        C.all_guards()["adapterlab.heads.drop_task_type"].__class__(
                            "pool_hidden_states", "test", "not a guard of this check",
                            removed=C.H.pool_hidden_states))
    fake = C.RegressionCheck(**{**vars(check), "guards": ("adapterlab.heads.pool_hidden_states",)})
    result = R.run_check(fake, inputs)
    assert result.reproduced and result.guarded and result.guards_needed is False and not result.ok
    assert any("still passes with adapterlab.heads.pool_hidden_states removed" in f for f in R.failures([result]))


def test_cli_registers_regressions():
    parser = argparse.ArgumentParser()
    R.add_cli(parser.add_subparsers())
    args = parser.parse_args(["regressions", "--check", "target-alignment", "--no-guard-proof"])
    assert args.func is R._cmd_regressions and args.check == ["target-alignment"] and args.no_guard_proof
    assert parser.parse_args(["regressions", "-f", "ci"]).experiment == "ci"


def test_stage_runs_on_the_runs_own_model(tmp_path):
    """In a causal-LM run's folder the stage reads the run's own snapshots: the TRL check on that run's model, the
    heads checks named as not run (the run has no encoder), and the table says which model was used."""
    from adapterlab.config import open_run
    cfg, run_dir = open_run("ci", "cpu", [f"output.root={tmp_path}"], tmp_path / "run")
    inputs, out = R.open_regressions_run("minilm_heads", "cpu", run_dir=run_dir, lm_experiment="ci")
    assert out == run_dir and inputs.kinds == {"causal_lm"} and inputs.heads is None
    assert inputs.lm_cfg.model.base_model == cfg.model.base_model and inputs.cfg.experiment == "ci"
    results = R.regression_stage(run_dir, inputs, prove_guards=False)
    assert [r.id for r in results] == ["sft-kwargs"] and results[0].ok
    table = (run_dir / "regressions" / "table.md").read_text()
    assert f"Checks run on causal LM: `{cfg.model.base_model}` (experiment `ci`)" in table
    assert "Not run here (this experiment has no encoder model): lora-task-type" in table
