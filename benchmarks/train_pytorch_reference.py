"""Train the seed network in PyTorch (CPU) with minicnn's recipe, as a reference.

Same data loader, normalization, flips, batch size, SGD settings and
one-cycle schedule as ``minicnn train``; prints test accuracy and seconds per
epoch so the two can be compared on the same machine:

    python benchmarks/train_pytorch_reference.py --data-dir ../shared/data/cifar-10-batches-py
    python benchmarks/train_pytorch_reference.py --cycle-momentum   # PyTorch's OneCycleLR default

Needs torch (pip install torch); minicnn itself never does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from minicnn import data


def lenet():
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 128), nn.ReLU(),
                         nn.Linear(128, 84), nn.ReLU(), nn.Linear(84, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--cycle-momentum", action="store_true",
                        help="let OneCycleLR cycle momentum between 0.85 and 0.95")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train, test = data.load_cifar10(args.data_dir)
    x_train = torch.from_numpy(data.normalize(train.images))
    y_train = torch.from_numpy(train.labels)
    x_test = torch.from_numpy(data.normalize(test.images))
    y_test = torch.from_numpy(test.labels)

    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * -(-len(y_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps,
                                                   cycle_momentum=args.cycle_momentum)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cycle_momentum={args.cycle_momentum}")
    total = 0.0
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(y_train)))
        flips = torch.from_numpy(rng.random(len(y_train)) < 0.5)
        for begin in range(0, len(order), args.batch_size):
            index = order[begin:begin + args.batch_size]
            x = x_train[index]
            x = torch.where(flips[index][:, None, None, None], x.flip(3), x)
            loss = torch.nn.functional.cross_entropy(model(x), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - start
        total += seconds
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:>3}/{args.epochs}  test acc {accuracy:.2%}  {seconds:.1f}s "
              f"({len(y_train) / seconds:.0f} img/s)", flush=True)
    print(f"final test accuracy {accuracy:.2%}; {total:.0f}s of training")


if __name__ == "__main__":
    main()
