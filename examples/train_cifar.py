"""Train a model on CIFAR-10: the same as ``minicnn train``.

    python examples/train_cifar.py --backend cupy --epochs 20 --out runs/lenet_cifar10.npz
"""

import sys

from minicnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
