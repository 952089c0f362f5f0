"""The command line: `adapterlab --help` reads a static table and imports no command module (no torch); the table
matches what the modules register; every command has a description and examples that parse; one override flag
(`--set`) and one default experiment everywhere."""
import argparse
import contextlib
import io
import shlex
import subprocess
import sys

import pytest

from adapterlab.cli import COMMANDS, build_parser, main
from adapterlab.config import project_root, resolve_config

# Encoder-head commands take a heads experiment (one with a `heads:` section), which the causal-LM default is not.
HEADS_COMMANDS = {"heads-train"}   # `regressions` takes either kind and defaults like every stage


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def test_top_level_help_imports_no_command_module():
    code = ("import sys, contextlib, io\nfrom adapterlab.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'peft')"
            " or m.startswith('adapterlab.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project_root(), check=True)
    assert proc.stdout.strip() == "['adapterlab.cli']"


def test_the_table_lists_exactly_what_the_modules_register():
    import adapterlab
    from pathlib import Path
    with_cli = {f"adapterlab.{p.stem}" for p in Path(adapterlab.__file__).parent.glob("*.py") if "\ndef add_cli(" in p.read_text()}
    assert with_cli == {m for m, _, _ in COMMANDS.values()}, "a module with add_cli has no row in cli.COMMANDS"
    parser = build_parser(None)     # every module imported, each registering its real commands
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, (module, help, examples) in COMMANDS.items():
        real = sub.choices[name]
        runnable = real.get_default("func") is not None or any(isinstance(a, argparse._SubParsersAction) for a in real._actions)
        assert real.add_help and runnable, f"{module} does not register `{name}`"   # (a stand-in has neither)
    assert set(sub.choices) == set(COMMANDS)
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert all(listed[n] == help for n, (_, help, _) in COMMANDS.items()), "the table's help and the module's differ"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_description_and_examples_that_parse(command):
    text = _help(command)
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert sub.description and "examples:" in text
    for example in COMMANDS[command][2]:
        argv = shlex.split(example)[1:]
        assert build_parser(command).parse_args(argv).command == command, example


def test_run_help_lists_the_experiments_and_hardware_profiles():
    text = _help("run")
    experiments = sorted(p.stem for p in (project_root() / "params" / "experiments").glob("*.yaml"))
    profiles = sorted(p.stem for p in (project_root() / "params" / "hw").glob("*.yaml"))
    assert f"experiments (-f): {', '.join(experiments)}" in text
    assert f"hardware profiles (--hw): {', '.join(profiles)}" in text


def _all_parsers():
    parser = build_parser(None)
    todo = [("", parser)]
    while todo:
        name, p = todo.pop()
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}".strip(), s) for n, s in a.choices.items()]


def test_one_override_flag_and_one_default_experiment_everywhere():
    default = resolve_config.__defaults__[0]
    assert default == "json_contacts" == build_parser("run").parse_args(["run"]).experiment
    with_set = 0
    for name, p in _all_parsers():
        options = {o: a for a in p._actions for o in a.option_strings}
        if "--override" in options:   # kept only as a hidden, deprecated alias of --set
            assert options["--override"].dest == "set" and options["--override"].help == argparse.SUPPRESS, name
        with_set += "--set" in options
        if "--experiment" in options:
            assert "-f" in options, f"{name}: --experiment without -f"
            if name.split()[0] not in HEADS_COMMANDS:
                # None: an optional extra (`compat adr -f X` also places X's settings), not another default
                assert options["--experiment"].default in (default, None), f"{name}: {options['--experiment'].default}"
    assert with_set >= 10
    args = build_parser("eval").parse_args(["eval", "RUN", "--override", "eval.max_examples=2", "--set", "seed=1"])
    assert args.set == ["eval.max_examples=2", "seed=1"]


def test_stage_notebooks_default_to_the_same_experiment():
    import json
    default = resolve_config.__defaults__[0]
    for stage in ("data", "compat", "train", "regressions", "eval", "preference"):
        nb = json.loads((project_root() / "nbs" / f"{stage}.ipynb").read_text())
        (params,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
        assert f'experiment = "{default}"' in "".join(params["source"]), stage
