"""docs/backprop.md cannot drift from the code: its examples run, its links resolve."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parent.parent / "docs" / "backprop.md"
# [`Name.method`](../minicnn/file.py#L12) or [`function`](../minicnn/file.py#L12)
LINK = re.compile(r"\[`(?:\w+\.)?(\w+)`\]\(\.\./(minicnn/[\w/]+\.py)#L(\d+)\)")


def test_every_example_in_the_walkthrough_runs_and_prints_what_it_shows():
    options = doctest.NORMALIZE_WHITESPACE
    np.set_printoptions(legacy=False)
    result = doctest.testfile(str(DOC), module_relative=False, optionflags=options,
                              globs={}, verbose=False)
    assert result.attempted >= 20
    assert result.failed == 0


def test_every_code_link_points_at_the_function_it_names():
    links = LINK.findall(DOC.read_text())
    assert len(links) >= 14
    root = DOC.parent.parent
    for name, path, line in links:
        lines = (root / path).read_text().splitlines()
        assert re.search(rf"\bdef {name}\(", lines[int(line) - 1]), \
            f"{path}#L{line} is not 'def {name}(': {lines[int(line) - 1]!r}"


def test_every_layer_of_the_seed_network_is_covered():
    text = DOC.read_text()
    for heading in ("## Softmax cross-entropy", "## Linear", "## ReLU", "## Flatten",
                    "## Max pooling", "## Convolution, by im2col", "## Gradient checking"):
        assert heading in text
