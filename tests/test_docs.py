"""docs/ cannot drift from the code: its examples run, its links resolve, and the code
backprop.md links to is the code that runs on the reference kernels."""

from __future__ import annotations

import doctest
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from minicnn import backend, build_model, kernels
from minicnn.cli import main
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.train import forward_backward

ROOT = Path(__file__).resolve().parent.parent
BACKPROP = ROOT / "docs" / "backprop.md"
FAST_KERNELS = ROOT / "docs" / "fast-kernels.md"
# [`Name.method`](../minicnn/file.py#L12) or [`function`](../minicnn/file.py#L12)
LINK = re.compile(r"\[`(?:(\w+)\.)?(\w+)`\]\(\.\./(minicnn/[\w/]+\.py)#L(\d+)\)")
SEED_NETWORK_PART = "## Beyond the seed network"


def links(text: str) -> list[tuple[str, str, str, int]]:
    """[(class or "", function, path, line), ...] of the code links in ``text``."""
    return [(cls or "", name, path, int(line)) for cls, name, path, line in LINK.findall(text)]


@pytest.mark.parametrize("doc", [BACKPROP, FAST_KERNELS], ids=lambda p: p.name)
def test_every_example_runs_and_prints_what_it_shows(doc):
    options = doctest.NORMALIZE_WHITESPACE
    np.set_printoptions(legacy=False)
    result = doctest.testfile(str(doc), module_relative=False, optionflags=options,
                              globs={}, verbose=False)
    assert result.attempted >= 10
    assert result.failed == 0


@pytest.mark.parametrize("doc,count", [(BACKPROP, 16), (FAST_KERNELS, 6)],
                         ids=lambda v: getattr(v, "name", v))
def test_every_code_link_points_at_the_function_it_names(doc, count):
    found = links(doc.read_text())
    assert len(found) >= count
    for _, name, path, line in found:
        lines = (ROOT / path).read_text().splitlines()
        assert re.search(rf"\bdef {name}\(", lines[line - 1]), \
            f"{path}#L{line} is not 'def {name}(': {lines[line - 1]!r}"


def test_backprop_links_the_reference_and_fast_kernels_the_fast_code():
    assert all(not path.startswith("minicnn/fast/") for *_, path, _ in links(BACKPROP.read_text()))
    assert all(path.startswith("minicnn/fast/") for *_, path, _ in links(FAST_KERNELS.read_text()))


def test_every_layer_of_the_seed_network_is_covered():
    text = BACKPROP.read_text()
    for heading in ("## Softmax cross-entropy", "## Linear", "## ReLU", "## Flatten",
                    "## Max pooling", "## Convolution, by im2col", "## Gradient checking"):
        assert heading in text


# --- the linked code is the code that runs --------------------------------------------

def seed_network_links() -> set[tuple[str, int]]:
    """(path, line of the def) of every function linked in the seed network's part."""
    text = BACKPROP.read_text().split(SEED_NETWORK_PART)[0]
    return {(path, line) for _, _, path, line in links(text)}


def calls_into_minicnn(run) -> set[tuple[str, int]]:
    """(path relative to the repo, first line) of every minicnn function ``run()`` calls."""
    called = set()
    package = str(ROOT / "minicnn")

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            path = Path(frame.f_code.co_filename).relative_to(ROOT).as_posix()
            called.add((path, frame.f_code.co_firstlineno))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return called


def formula_functions(called) -> set[tuple[str, int]]:
    """The called functions that compute a layer's or the loss's formulas: forward,
    backward, im2col, col2im in the reference files."""
    names = {"forward", "backward", "im2col", "col2im"}
    found = set()
    for path, line in called:
        if path.startswith(("minicnn/layers/", "minicnn/im2col.py", "minicnn/losses.py")):
            text = (ROOT / path).read_text().splitlines()[line - 1]
            if (match := re.search(r"def (\w+)\(", text)) and match.group(1) in names:
                found.add((path, line))
    return found


def test_the_linked_code_is_what_a_reference_training_step_of_lenet_runs():
    model = kernels.prepare(build_model("lenet"), "reference").set_needs_input_grad(False)
    x = backend.make_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    called = calls_into_minicnn(lambda: forward_backward(model, SoftmaxCrossEntropy(), x, labels))
    assert not {path for path, _ in called if path.startswith("minicnn/fast/")}
    assert seed_network_links() - called == set(), "linked but never run"
    assert formula_functions(called) == seed_network_links() & formula_functions(called)


def test_trace_on_the_reference_kernels_walks_exactly_the_linked_functions(capsys):
    called = calls_into_minicnn(lambda: main(["trace", "--kernels", "reference"]))
    assert "on the reference kernels" in capsys.readouterr().out
    assert not {path for path, _ in called if path.startswith("minicnn/fast/")}
    # trace runs the layers one by one itself (printing each), not through Sequential
    container = {(p, line) for p, line in seed_network_links() if p.endswith("base.py")}
    assert formula_functions(called) - container == seed_network_links() - container


def test_trace_on_the_fast_kernels_runs_fast_code(capsys):
    called = calls_into_minicnn(lambda: main(["trace", "--kernels", "fast"]))
    assert "on the fast kernels" in capsys.readouterr().out
    assert {path for path, _ in called if path.startswith("minicnn/fast/")}


@pytest.mark.parametrize("doc", [BACKPROP, FAST_KERNELS], ids=lambda p: p.name)
def test_every_example_is_in_a_code_fence(doc):
    """doctest runs a >>> line anywhere; a reader sees it as code only inside ``` fences."""
    inside, outside = False, []
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if line.startswith("```"):
            inside = not inside
        elif line.lstrip().startswith(">>>") and not inside:
            outside.append(number)
    assert not inside and outside == [], f"{doc.name}: >>> outside a fence on lines {outside}"
