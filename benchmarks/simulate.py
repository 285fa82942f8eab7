"""Simulation throughput: spectra per second written to zarr on a LocalCluster.

Usage::

    python benchmarks/simulate.py --n 100000 [--chunk-size 2048] [--out DIR]

Prints spectra/s, the projected time for 1M x 4096, and the ratio against
the target (1M in <= 600 s), plus the floor of the same run: generating the
same rows in memory without writing (compute-only), so the write overhead is
visible.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from snrmoe_dask.cluster import compute, dask_session
from snrmoe_dask.config import ClusterConfig, SimulateConfig, StorageConfig
from snrmoe_dask.simulate import simulate_catalog, write_catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--compressor", default="lz4")
    ap.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()

    sim = SimulateConfig(n=args.n, chunk_size=args.chunk_size)
    scratch = Path(args.out or tempfile.mkdtemp(prefix="snrmoe-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    store = scratch / "bench.zarr"
    shutil.rmtree(store, ignore_errors=True)
    results = {"n": args.n, "n_pixels": sim.n_pixels, "chunk_size": args.chunk_size, "compressor": args.compressor}
    with dask_session(ClusterConfig()) as client:
        ds = simulate_catalog(sim)
        t0 = time.perf_counter()
        compute(da.stack([ds["flux"].data.sum(axis=1), ds["error"].data.sum(axis=1)]), client=client,
                label="generate only (floor)")
        results["generate_only_s"] = time.perf_counter() - t0
        job = write_catalog(ds, store, StorageConfig(compressor=args.compressor))
        t0 = time.perf_counter()
        compute(job, client=client, label="generate + write zarr")
        results["simulate_s"] = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    results["store_gb"] = size / 1e9
    results["spectra_per_s"] = args.n / results["simulate_s"]
    results["projected_1m_s"] = 1e6 / results["spectra_per_s"] * (4096 / sim.n_pixels)
    results["ratio_vs_target_600s"] = results["projected_1m_s"] / 600.0
    results["ratio_vs_generate_floor"] = results["simulate_s"] / results["generate_only_s"]
    results["dask"] = dask.__version__
    results["numpy"] = np.__version__
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
