"""Secure aggregation (SecAgg+) against plain aggregation of the same vectors, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/secagg.py                       # the grid
    .venv/bin/python benchmarks/secagg.py --sites 100 --params 1000000 --dropout 0.1 \
        --json secagg.json                                      # one point

Grid: sites n in {10, 50, 100} x parameters d in {100 000, 1 000 000} x dropout
{0 %, 10 %}. Every party runs in this process, one after another, through the
one stage sequence (``fedcare.privacy.secagg.protocol.run_session``) that
``fedcare simulate`` and the network drive, every message in its wire form; each
call is timed on its own, so a site's time is only its own work.

Per point:

* ``site_s``: the mean over sites of one site's secure-aggregation work:
  clipping, weighting and quantising its update, key advertisement, sealing
  shares, masking, signing the survivor list (the consistency check), checking
  its neighbours' signatures and answering the unmasking request (max also shown).
  ``plain_site_s``: encoding the same float32 update for upload.
* ``coordinator_s``: the coordinator's whole work (relaying, summing masked
  inputs, rebuilding secrets and removing masks); ``unmask_s`` is the last
  part alone. ``keystream_floor_s``: the AES-CTR keystream of the masks the
  coordinator removes, written into one reused buffer on one core, with no
  adds: what unmasking cannot go below on one core (``floor_cores`` is the
  same over every core, the keystream split between them as unmasking does).
  ``plain_coordinator_s``: the weighted sum of the same float32
  vectors and the weight sum, accumulated the same way (as they arrive).
* ``upload_ratio``: bytes one site sends (signed keys, sealed shares, masked
  vector, survivor signature, unmasking reply; the mean over survivors) over the
  bytes of its plain float32 update payload.

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
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedcare.federation.messages import SiteUpdate, UpdateHeader, encode_update
from fedcare.fixed_point import plan_quantization
from fedcare.privacy.secagg.graph import default_degree
from fedcare.privacy.secagg.inmemory import client_for, make_identities
from fedcare.privacy.secagg.keys import IdentityVerifier
from fedcare.privacy.secagg.prg import available_cores
from fedcare.privacy.secagg.protocol import ClientParty, Party, ServerSession, Stage, run_session
from fedcare.privacy.secagg.quantize import decode_sum, encode
from fedcare.privacy.secagg.session import RoundSetup, round_setup

T = TypeVar("T")
STUDY = "5e" * 32
TASK = "7a" * 32
CLIP = 10.0
GRID_SITES = (10, 50, 100)
GRID_PARAMS = (100_000, 1_000_000)
GRID_DROPOUT = (0.0, 0.1)


def site_vector(i: int, d: int) -> tuple[np.ndarray, float]:
    """Site ``i``'s update and weight, the same every time they are asked for."""
    rng = np.random.default_rng(1000 + i)
    return (rng.normal(size=d) * 0.01).astype(np.float32), float(rng.uniform(0.05, 1.0))


class TimedSession(ServerSession):
    """The coordinator's session, timing each of its calls."""

    def __init__(self, setup: RoundSetup, verifier: IdentityVerifier) -> None:
        super().__init__(setup, verifier)
        self.seconds = 0.0
        self.unmask_s = 0.0

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def post(self, site: str, stage: Stage, body: bytes) -> None:
        self._timed(super().post, site, stage, body)

    def relay(self, site: str, stage: Stage) -> bytes | None:
        return self._timed(super().relay, site, stage)

    def close(self) -> None:
        before = self.seconds
        unmasking = self.stage is Stage.UNMASK
        self._timed(super().close)
        if unmasking:
            self.unmask_s = self.seconds - before


class TimedParty:
    """A site, timing its own work and counting the bytes it sends."""

    def __init__(self, party: Party) -> None:
        self.party = party
        self.seconds = 0.0
        self.sent = 0

    @property
    def name(self) -> str:
        return self.party.name

    def respond(self, stage: Stage, relayed: bytes | None) -> bytes:
        start = time.perf_counter()
        body = self.party.respond(stage, relayed)
        self.seconds += time.perf_counter() - start
        self.sent += len(body)
        return body


def keystream_floor(masks: int, d: int, bits: int, cores: int = 1) -> float:
    """Seconds to expand ``masks`` keystreams of ``d`` elements into reused buffers."""
    size = d * bits // 8
    per = -(-size // (16 * cores)) * 16
    zeros = bytes(per)
    keys = [os.urandom(32) for _ in range(masks)]

    def run(part: int) -> None:
        out = bytearray(per + 15)
        for key in keys:
            encryptor = Cipher(algorithms.AES256(key), modes.CTR(bytes(16))).encryptor()
            encryptor.update_into(zeros, out)

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(run, range(cores)))
    return time.perf_counter() - start


def measure(n: int, d: int, dropout: float, graph: str, bits: int = 32) -> dict[str, Any]:
    sites = [f"site{i:03d}" for i in range(n)]
    degree = None if graph == "complete" else default_degree(n)
    plan = plan_quantization(bits, CLIP, n)
    setup = round_setup(
        STUDY,
        1,
        sites,
        task_sha256=TASK,
        degree=degree,
        threshold_fraction=0.6,
        seed=7,
        bits=bits,
        length=d + 1,
    )
    ids = make_identities(sites)
    order = np.random.default_rng(3).permutation(n)
    dropped = {sites[i] for i in order[: round(dropout * n)]}

    def source(i: int) -> tuple[np.ndarray, float | None]:
        # Clipping, weighting and quantising the update is the site's work too.
        delta, weight = site_vector(i, d)
        return encode(delta, weight, plan, np.random.default_rng(i)), None

    parties = {
        s: TimedParty(ClientParty(client_for(setup, s, ids), partial(source, i)))
        for i, s in enumerate(sites)
    }
    session = TimedSession(setup, ids.verifier)
    total, survivors_t = run_session(session, parties, dict.fromkeys(dropped, Stage.MASKED))
    server_time = session.seconds
    unmask_s = session.unmask_s
    alive = set(survivors_t)
    masks = len(alive) + sum(1 for gone in dropped for s in alive if s in setup.neighbours[gone])
    floor_s = keystream_floor(masks, d + 1, bits)
    floor_cores_s = keystream_floor(masks, d + 1, bits, available_cores())
    start = time.perf_counter()
    weighted, weight_sum = decode_sum(total, plan)
    server_time += time.perf_counter() - start
    site_time = {s: p.seconds for s, p in parties.items()}
    sent = {s: p.sent for s, p in parties.items()}

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
    survivors = list(survivors_t)
    assert set(survivors) == set(sites) - dropped
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
        "masks_removed": masks,
        "keystream_floor_s": floor_s,
        "floor_cores_s": floor_cores_s,
        "cores": available_cores(),
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
        f"{r['masks_removed']:>6} {r['keystream_floor_s']:>8.2f} {r['floor_cores_s']:>7.2f} "
        f"{r['coordinator_ratio']:>8.1f}x {r['site_s']:>7.3f} {r['site_max_s']:>7.3f} "
        f"{r['site_ratio']:>7.1f}x {r['upload_ratio']:>7.4f}x {r['max_abs_error_of_mean']:>9.2e}"
    )


HEAD = (
    f"{'sites':>5} {'params':>9} {'drop':>6} {'graph':>8} {'k':>4} {'coord_s':>8} "
    f"{'unmask_s':>8} {'masks':>6} {'floor_1c':>8} {'floor_n':>7} {'vs plain':>9} "
    f"{'site_s':>7} {'max_s':>7} {'vs plain':>8} "
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
