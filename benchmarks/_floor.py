"""The floor for benchmarks/scale.py: the same SGD steps as the federated workload in a
bare PyTorch loop, no federation (no aggregation, no protocol, no evaluation)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sites = []
    for path in sorted(args.data_dir.glob("site-*.csv")):
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
        n_train = round(len(table) * (1 - args.holdout_fraction))
        sites.append(
            (torch.from_numpy(table[:n_train, :-1]), torch.from_numpy(table[:n_train, -1]))
        )
    started = time.perf_counter()
    steps = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.rounds):
        for x, y in sites:
            model = torch.nn.Linear(x.shape[1], 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            for _ in range(args.epochs):
                order = torch.randperm(len(x), generator=generator)
                for batch in torch.split(order, args.batch_size):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        model(x[batch]).reshape(-1), y[batch]
                    )
                    loss.backward()
                    optimizer.step()
                    steps += 1
    print(f"{steps} SGD steps in {time.perf_counter() - started:.3f} s")


if __name__ == "__main__":
    main()
