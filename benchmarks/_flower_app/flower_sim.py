"""The Flower half of ``benchmarks/vs_flower.py``: one FedAvg run in Flower's simulation.

Run by ``vs_flower.py`` with the Python of the separate Flower venv
(``benchmarks/.venv-flower``), never with the project's own venv: Flower is not a
fedcare dependency. It drives Flower through its Python simulation API
(``flwr.simulation.run_simulation`` with a message-API ``ServerApp`` and
``ClientApp``, Ray backend), not through ``flwr run``.

Workload, identical to the fedcare side: every ``site-N.csv`` in ``--data-dir``
(columns x1..x13 and y) is one supernode. Each site shuffles its rows with the
seed and keeps ``--holdout-fraction`` of them for evaluation. Model: torch
``Linear(13, 1)`` with ``BCEWithLogitsLoss``; local training is ``--epochs`` epochs
of SGD (``--lr``, ``--batch-size``); the server runs FedAvg weighted by the number
of training examples for ``--rounds`` rounds, with federated evaluation each round.

The ClientApp is in ``flower_client.py`` beside this file. A short JSON summary
(rounds, final metrics) is written to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

# The ClientApp is imported by module name, here and in Ray's workers: Flower's Ray
# backend hands this process's sys.path to them as PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_client import client_app, make_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to Ray in total")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    return parser.parse_args()


def make_server_app(args: argparse.Namespace, n_sites: int, summary: dict[str, Any]) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(args.seed)
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=n_sites,
            min_evaluate_nodes=n_sites,
            min_available_nodes=n_sites,
            weighted_by_key="num-examples",
        )
        common = {
            "data-dir": str(args.data_dir.resolve()),
            "holdout-fraction": args.holdout_fraction,
            "seed": args.seed,
        }
        # FedAvg adds "server-round" to each round's config; the clients seed
        # their shuffling with it.
        train_config = ConfigRecord(
            {
                **common,
                "epochs": args.epochs,
                "batch-size": args.batch_size,
                "lr": args.lr,
            }
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_model().state_dict()),
            num_rounds=args.rounds,
            train_config=train_config,
            evaluate_config=ConfigRecord(common),
        )
        last = max(result.evaluate_metrics_clientapp, default=None)
        summary["rounds"] = len(result.train_metrics_clientapp)
        if last is not None:
            summary["final_eval"] = dict(result.evaluate_metrics_clientapp[last])

    return server_app


def main() -> None:
    args = parse_args()
    n_sites = len(sorted(args.data_dir.glob("site-*.csv")))
    if n_sites == 0:
        raise SystemExit(f"no site-*.csv files in {args.data_dir}")
    summary: dict[str, Any] = {"sites": n_sites}
    started = time.perf_counter()
    run_simulation(
        server_app=make_server_app(args, n_sites, summary),
        client_app=client_app,
        num_supernodes=n_sites,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.num_cpus, "num_gpus": 0},
        },
    )
    summary["simulation_s"] = time.perf_counter() - started
    if summary.get("rounds") != args.rounds:
        raise SystemExit(f"Flower finished {summary.get('rounds')} of {args.rounds} rounds")
    loss = summary.get("final_eval", {}).get("eval-loss")
    if loss is None or not math.isfinite(loss):
        raise SystemExit(f"Flower's final evaluation is missing or not finite: {summary}")
    args.result.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
