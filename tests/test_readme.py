"""The README stays true: its commands are the ones CI runs, its options exist."""

from __future__ import annotations

import re
from pathlib import Path

from minicnn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL_AND_CLASSIFY = "pip install -e . && python examples/classify.py examples/images/*.png"
INSTALL_AND_TEST = 'pip install -e ".[test]" && python -m pytest'


def test_the_two_fresh_machine_commands_are_in_the_readme():
    assert INSTALL_AND_CLASSIFY in README
    assert INSTALL_AND_TEST in README


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL_AND_TEST in ci


def subcommand_options(name: str) -> set:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return {s for a in subparsers.choices[name]._actions for s in a.option_strings} - {"-h"}


def test_train_options_named_in_the_readme_are_real_ones():
    section = README.split("### Train", 1)[1].split("###", 1)[0]
    named = set(re.findall(r"(--[a-z][a-z-]+)", section))
    assert len(named) >= 10, "the Train section should name the main options"
    assert named <= subcommand_options("train") | {"--help"}, named - subcommand_options("train")


def test_python_examples_in_the_readme_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    runnable = [block for block in blocks if block.startswith("import")]
    assert runnable, "the README should show a runnable example"
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {})
