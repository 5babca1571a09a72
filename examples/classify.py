"""Classify images with a trained model: the same as ``minicnn classify``.

    python examples/classify.py photo.jpg [more.png ...] [--top-k 3] [--json]
"""

import sys

from minicnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
