"""DP-SGD time per epoch against non-private training, on the demo's model and sites.

The demo study (early-warning-48h: an MLP with one hidden layer of 16, batch 64,
SGD) on each built-in hospital's training rows. One epoch is what fedcare trains
per round:

* ``plain``: ``train_local`` as a non-DP study runs it (shuffled batches of 64);
* ``dp``: ``train_local`` with DP-SGD as a DP study runs it (Poisson sampling at
  64 / rows, ``ceil(rows / 64)`` steps, per-sample clipping by ghost norms with the
  backward pass written out, Gaussian noise);
* ``opacus-hooks``: the same DP-SGD step with per-sample gradients from Opacus'
  hook-based ``GradSampleModule`` (Opacus' default), for comparison.

Each variant runs ``--repeats`` epochs per site after one warm-up epoch, the
variants interleaved so that background load hits all of them alike; the figure
is the median epoch time summed over sites. Ratios are against ``plain`` measured
in the same run. Goal: dp / plain <= 1.5.

    .venv/bin/python benchmarks/dp_sgd.py [--repeats 30] [--json dp_sgd.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcare.data import demo_study
from fedcare.models.builders import build_model, initial_parameters
from fedcare.models.params import set_flat
from fedcare.simulation.sites import builtin_sites
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study
from fedcare.training import train_local
from fedcare.training.dp_sgd import DpSgdSettings, noise_rows, noisy_mean, poisson_batches
from fedcare.training.sgd import SGD

SIGMA = 1.0
CLIP = 1.0


def _settings(study: Study, n: int) -> DpSgdSettings:
    rate = min(1.0, study.training.batch_size / n)
    return DpSgdSettings(rate, SIGMA, CLIP, max(1, math.ceil(1 / rate - 1e-9)), secret_seed=7)


def plain_epoch(study: Study, site: SiteDataset, start: np.ndarray) -> None:
    train_local(study.model, study.training, start, site.x_train, site.y_train, seed=1)


def dp_epoch(study: Study, site: SiteDataset, start: np.ndarray) -> None:
    dp = _settings(study, site.n_train)
    train_local(study.model, study.training, start, site.x_train, site.y_train, seed=1, dp=dp)


def opacus_hooks_epoch(study: Study, site: SiteDataset, start: np.ndarray) -> None:
    """DP-SGD with Opacus' GradSampleModule (hooks) for the per-sample gradients."""
    from opacus.grad_sample import GradSampleModule

    dp = _settings(study, site.n_train)
    model = build_model(study.model, site.x_train.shape[1:])
    set_flat(model, start)
    gsm = GradSampleModule(model, loss_reduction="sum")
    params = list(gsm.parameters())
    optimizer = SGD(params, lr=study.training.learning_rate)
    x, y = torch.from_numpy(site.x_train), torch.from_numpy(site.y_train)
    secret = torch.Generator().manual_seed(dp.secret_seed)
    batches = poisson_batches(site.n_train, dp.sampling_rate, dp.steps, secret)
    size = sum(p.numel() for p in params)
    noise = noise_rows(dp.steps, size, SIGMA * CLIP, secret)
    for index, row in zip(batches, noise, strict=True):
        for p in params:
            p.grad_sample = None
        loss = nn.functional.binary_cross_entropy_with_logits(
            gsm(x[index]).squeeze(-1), y[index], reduction="sum"
        )
        loss.backward()
        samples = [p.grad_sample for p in params]
        norms = torch.sqrt(sum(s.reshape(s.shape[0], -1).pow(2).sum(1) for s in samples))
        factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        sums = [torch.einsum("i,i...->...", factor, s) for s in samples]
        grads = noisy_mean(sums, row, dp.sampling_rate * site.n_train)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
    gsm._close()


VARIANTS: dict[str, Callable[[Study, SiteDataset, np.ndarray], None]] = {
    "plain": plain_epoch,
    "dp": dp_epoch,
    "opacus-hooks": opacus_hooks_epoch,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the CLI does
    study = demo_study()
    sites, _ = builtin_sites(study, seed=2026)  # the demo's default data seed
    start = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    times: dict[str, dict[str, list[float]]] = {v: {s.name: [] for s in sites} for v in VARIANTS}
    for site in sites:
        for fn in VARIANTS.values():
            fn(study, site, start)  # warm-up: imports, first-call costs
    for _ in range(args.repeats):
        for name, fn in VARIANTS.items():
            for site in sites:
                began = time.perf_counter()
                fn(study, site, start)
                times[name][site.name].append(time.perf_counter() - began)
    per_epoch = {
        name: sum(statistics.median(ts) for ts in by_site.values())
        for name, by_site in times.items()
    }
    rows = sum(s.n_train for s in sites)
    print(
        f"demo model ({study.model.kind.value} {list(study.model.hidden)}), {len(sites)} sites, "
        f"{rows} training rows, batch {study.training.batch_size}; median of {args.repeats}"
    )
    print(f"{'variant':<14}{'ms / epoch':>12}{'x plain':>10}")
    for name, seconds in per_epoch.items():
        print(f"{name:<14}{seconds * 1e3:>12.1f}{seconds / per_epoch['plain']:>10.2f}")
    ratio = per_epoch["dp"] / per_epoch["plain"]
    print(f"goal dp <= 1.5x plain: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)")
    if args.json is not None:
        result = {
            "ms_per_epoch": {k: v * 1e3 for k, v in per_epoch.items()},
            "ratio_dp_over_plain": ratio,
            "ratio_opacus_hooks_over_plain": per_epoch["opacus-hooks"] / per_epoch["plain"],
            "training_rows": rows,
            "repeats": args.repeats,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
