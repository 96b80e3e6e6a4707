"""The ``ClientApp`` of the Flower side of ``benchmarks/vs_flower.py``.

It lives in its own module, not in the script Flower runs, so that Ray's worker
processes import it by name (``flower_sim`` puts this folder on their path) and
each worker keeps one cached copy of its site's data across rounds.

Each supernode is one site: ``site-<partition-id + 1>.csv`` (columns x1..x13, y).
The site shuffles its rows with the seed and holds out the given fraction for
evaluation. Training is plain torch: ``Linear(13, 1)``, ``BCEWithLogitsLoss``, SGD.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

N_FEATURES = 13


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(N_FEATURES, 1)


@functools.cache
def load_site(path: str, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """One site's (x_train, y_train, x_eval, y_eval), read once per Ray worker."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
    rng = np.random.default_rng(seed)
    rows = table[rng.permutation(len(table))]
    n_eval = round(len(rows) * holdout_fraction)
    train, evaluation = rows[n_eval:], rows[:n_eval]
    return (
        torch.from_numpy(train[:, :N_FEATURES].copy()),
        torch.from_numpy(train[:, N_FEATURES:].copy()),
        torch.from_numpy(evaluation[:, :N_FEATURES].copy()),
        torch.from_numpy(evaluation[:, N_FEATURES:].copy()),
    )


def site_data(context: Context, config: ConfigRecord) -> tuple[torch.Tensor, ...]:
    partition = int(context.node_config["partition-id"])
    path = Path(str(config["data-dir"])) / f"site-{partition + 1}.csv"
    return load_site(str(path), float(config["holdout-fraction"]), int(config["seed"]))


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    config: ConfigRecord = message.content["config"]
    x, y, _, _ = site_data(context, config)
    model = make_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batch_size = int(config["batch-size"])
    generator = torch.Generator().manual_seed(int(config["seed"]) + int(config["server-round"]))
    model.train()
    total = 0.0
    for _ in range(int(config["epochs"])):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    metrics = MetricRecord({"train-loss": total / len(x), "num-examples": len(x)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    config: ConfigRecord = message.content["config"]
    _, _, x, y = site_data(context, config)
    model = make_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
        accuracy = float(((logits > 0).float() == y).float().mean())
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)
