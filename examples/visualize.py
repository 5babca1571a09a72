"""Pictures of one image through a trained model: the same as ``minicnn visualize``.

    python examples/visualize.py examples/images/cat.png --html report.html
    python examples/visualize.py --weights weights/airnet_cifar10.npz --out runs/pictures
"""

import sys

from minicnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
