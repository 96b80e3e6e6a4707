"""Secure aggregation (SecAgg+) against plain aggregation of the same vectors, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/secagg.py                       # the grid
    .venv/bin/python benchmarks/secagg.py --sites 100 --params 1000000 --dropout 0.1 \
        --json secagg.json                                      # one point

Grid: sites n in {10, 50, 100} x parameters d in {100 000, 1 000 000} x dropout
{0 %, 10 %}. Every party runs in this process, one after another, through the
same objects as ``fedcare simulate`` (``fedcare.privacy.secagg``); each call is
timed on its own, so a site's time is only its own work.

Per point:

* ``site_s``: the mean over sites of one site's secure-aggregation work:
  clipping, weighting and quantising its update, key advertisement, sealing
  shares, masking, and answering the unmasking request (max also shown).
  ``plain_site_s``: encoding the same float32 update for upload.
* ``coordinator_s``: the coordinator's whole work (relaying, summing masked
  inputs, rebuilding secrets and removing masks); ``unmask_s`` is the last
  part alone. ``plain_coordinator_s``: the weighted sum of the same float32
  vectors and the weight sum, accumulated the same way (as they arrive).
* ``upload_ratio``: bytes one site sends (signed keys, sealed shares, masked
  vector, unmasking reply; the mean over survivors) over the bytes of its
  plain float32 update payload.

Dropped sites (the first ``round(dropout * n)`` after a seeded shuffle) vanish
after sharing keys, before sending their masked input: the costly case, where
the coordinator must rebuild their mask keys and remove their pairwise masks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedcare.federation.messages import SiteUpdate, UpdateHeader, encode_update
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.graph import default_degree
from fedcare.privacy.secagg.local import make_identities
from fedcare.privacy.secagg.quantize import decode_sum, encode, plan_quantization
from fedcare.privacy.secagg.server import SecAggServer
from fedcare.privacy.secagg.session import round_setup
from fedcare.privacy.secagg.wire import MaskedHeader, decode_masked, encode_masked

T = TypeVar("T")
STUDY = "5e" * 32
CLIP = 10.0
GRID_SITES = (10, 50, 100)
GRID_PARAMS = (100_000, 1_000_000)
GRID_DROPOUT = (0.0, 0.1)


def site_vector(i: int, d: int) -> tuple[np.ndarray, float]:
    """Site ``i``'s update and weight, the same every time they are asked for."""
    rng = np.random.default_rng(1000 + i)
    return (rng.normal(size=d) * 0.01).astype(np.float32), float(rng.uniform(0.05, 1.0))


def measure(n: int, d: int, dropout: float, graph: str, bits: int = 32) -> dict[str, Any]:
    sites = [f"site{i:03d}" for i in range(n)]
    degree = None if graph == "complete" else default_degree(n)
    plan = plan_quantization(bits, CLIP, n)
    setup = round_setup(
        STUDY, 1, sites, degree=degree, threshold_fraction=0.6, seed=7, bits=bits, length=d + 1
    )
    ids = make_identities(sites)
    order = np.random.default_rng(3).permutation(n)
    dropped = {sites[i] for i in order[: round(dropout * n)]}
    site_time = dict.fromkeys(sites, 0.0)
    sent = dict.fromkeys(sites, 0)
    server_time = 0.0

    def on_site(site: str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        out = fn(*args)
        site_time[site] += time.perf_counter() - start
        return out

    def on_server(fn: Callable[..., T], *args: Any) -> T:
        nonlocal server_time
        start = time.perf_counter()
        out = fn(*args)
        server_time += time.perf_counter() - start
        return out

    server = SecAggServer(setup)
    clients = {
        s: SecAggClient(setup, s, ids.signers[s], ids.signers[s].certificate_pem, ids.verifier)
        for s in sites
    }
    for s, c in clients.items():
        adv = on_site(s, c.advertise)
        sent[s] += len(adv.model_dump_json())
        on_server(server.receive_advertisement, adv)
    on_server(server.close_advertising)
    for s, c in clients.items():
        bundle = on_site(s, c.share_keys, on_server(server.advertisements_for, s))
        sent[s] += len(bundle.model_dump_json())
        on_server(server.receive_shares, bundle)
    on_server(server.close_sharing)
    for i, (s, c) in enumerate(clients.items()):
        if s in dropped:
            continue
        delta, weight = site_vector(i, d)
        rng = np.random.default_rng(i)
        encoded = on_site(s, encode, delta, weight, plan, rng)
        masked = on_site(s, c.masked_input, on_server(server.shares_for, s), encoded)
        header = MaskedHeader(study_hash=STUDY, round=1, site=s, bits=bits, loss=0.0)
        payload = on_site(s, encode_masked, header, masked)
        sent[s] += len(payload)
        _, received = on_server(decode_masked, payload, d + 1, bits)
        on_server(server.receive_masked, s, received)
    request = on_server(server.close_masking)
    for s in request.survivors:
        reply = on_site(s, clients[s].unmask, request)
        sent[s] += len(reply.model_dump_json())
        on_server(server.receive_unmask, reply)
    unmask_start = time.perf_counter()
    total = server.finish()
    unmask_s = time.perf_counter() - unmask_start
    server_time += unmask_s
    weighted, weight_sum = on_server(decode_sum, total, plan)

    # Plain aggregation of the same vectors: encode at the site, decode and accumulate.
    plain_site: list[float] = []
    plain_bytes = 0
    plain_coordinator = 0.0
    acc = np.zeros(d, dtype=np.float64)
    acc_w = 0.0
    for i, s in enumerate(sites):
        if s in dropped:
            continue
        delta, weight = site_vector(i, d)
        start = time.perf_counter()
        update = SiteUpdate(
            header=UpdateHeader(study_hash=STUDY, round=1, site=s, n_samples=1, loss=0.0),
            delta=delta,
        )
        body = encode_update(update)
        plain_site.append(time.perf_counter() - start)
        plain_bytes = len(body)
        start = time.perf_counter()
        arr = np.frombuffer(body[-4 * d :], dtype="<f4")
        acc += weight * arr.astype(np.float64)
        acc_w += weight
        plain_coordinator += time.perf_counter() - start
    error = float(np.max(np.abs(weighted / weight_sum - acc / acc_w)))
    survivors = [s for s in sites if s not in dropped]
    site_times = [site_time[s] for s in survivors]
    return {
        "sites": n,
        "params": d,
        "dropout": dropout,
        "graph": graph,
        "degree": len(setup.neighbours[sites[0]]),
        "threshold": setup.threshold,
        "coordinator_s": server_time,
        "unmask_s": unmask_s,
        "plain_coordinator_s": plain_coordinator,
        "coordinator_ratio": server_time / plain_coordinator,
        "site_s": statistics.fmean(site_times),
        "site_max_s": max(site_times),
        "plain_site_s": statistics.fmean(plain_site),
        "site_ratio": statistics.fmean(site_times) / statistics.fmean(plain_site),
        "upload_bytes": statistics.fmean(sent[s] for s in survivors),
        "plain_upload_bytes": plain_bytes,
        "upload_ratio": statistics.fmean(sent[s] for s in survivors) / plain_bytes,
        "max_abs_error_of_mean": error,
    }


def conditions() -> dict[str, object]:
    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_1min": load1,
        "load_5min": load5,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def row(r: dict[str, Any]) -> str:
    return (
        f"{r['sites']:>5} {r['params']:>9} {r['dropout']:>6.0%} {r['graph']:>8} "
        f"{r['degree']:>4} {r['coordinator_s']:>8.2f} {r['unmask_s']:>8.2f} "
        f"{r['coordinator_ratio']:>8.1f}x {r['site_s']:>7.3f} {r['site_max_s']:>7.3f} "
        f"{r['site_ratio']:>7.1f}x {r['upload_ratio']:>7.4f}x {r['max_abs_error_of_mean']:>9.2e}"
    )


HEAD = (
    f"{'sites':>5} {'params':>9} {'drop':>6} {'graph':>8} {'k':>4} {'coord_s':>8} "
    f"{'unmask_s':>8} {'vs plain':>9} {'site_s':>7} {'max_s':>7} {'vs plain':>8} "
    f"{'upload':>8} {'err_mean':>9}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, help="one point: number of sites")
    parser.add_argument("--params", type=int, help="one point: parameters per update")
    parser.add_argument("--dropout", type=float, default=0.0, help="one point: share dropped")
    parser.add_argument("--graph", choices=["complete", "sparse"], default="complete")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if (args.sites is None) != (args.params is None):
        parser.error("give both --sites and --params for one point, or neither for the grid")
    points = (
        [(args.sites, args.params, args.dropout)]
        if args.sites is not None
        else [(n, d, p) for n in GRID_SITES for d in GRID_PARAMS for p in GRID_DROPOUT]
    )
    before = conditions()
    print(f"conditions: {before}")
    print(HEAD)
    results = []
    for n, d, p in points:
        result = measure(n, d, p, args.graph)
        results.append(result)
        print(row(result), flush=True)
    after = conditions()
    print(f"conditions after: {after}")
    if args.json:
        keys = ("coordinator_s", "site_s", "upload_ratio", "plain_coordinator_s")
        single = {k: results[0][k] for k in keys} if len(results) == 1 else {}
        payload = {**single, "points": results, "conditions": {"before": before, "after": after}}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
