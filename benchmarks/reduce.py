"""The one-pass reduction against its floor, measured in the same run.

    python benchmarks/reduce.py --n 100000 [--n-small 50000] [--data DIR]

For each N it times, on the same catalog and the same LocalCluster:

* **ours**: features for every row + per-cell sufficient statistics of the
  train rows (``snrmoe_dask.reduce.one_pass``), stats kept on the worker;
* **read floor**: reading the same flux/error chunks from zarr (a dask sum);
* **BLAS floor**: ``X.T @ X`` in memory on the train rows (float32, all cores);

and reports ``ours / (read + BLAS)`` and the peak resident memory of the
process tree. Running two sizes shows whether peak memory depends on N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from _common import PeakRSS, ensure_catalog, machine_probe
from dask.utils import parse_bytes
from threadpoolctl import threadpool_limits

from snrmoe_dask.bins import cell_index, phys_bin, snr_bin
from snrmoe_dask.catalog import bin_edges, open_catalog
from snrmoe_dask.cluster import compute, dask_session
from snrmoe_dask.config import ClusterConfig, FitConfig
from snrmoe_dask.reduce import auto_chains, fold_blas_pieces, one_pass
from snrmoe_dask.split import TRAIN


def blas_floor(ds, rows: np.ndarray, block: int = 16384) -> float:
    """Seconds for X.T @ X (float32) over the train rows, loaded in memory first."""
    acc = None
    total = 0.0
    with threadpool_limits(limits=os.cpu_count(), user_api="blas"):
        for lo in range(0, rows.size, block):
            x = np.ascontiguousarray(ds["flux"].data[rows[lo:lo + block]].compute())
            t0 = time.perf_counter()
            g = x.T @ x
            acc = g if acc is None else acc + g
            total += time.perf_counter() - t0
    return total


def measure(path: Path, client, fit: FitConfig, blas_pieces: int = 0) -> dict:
    ds = open_catalog(path)
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    edges = bin_edges(ds)
    cells = cell_index(phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]),
                       snr_bin(ds["snr"].values, edges["snr_edges"]), 4)
    train = ds["split"].values == TRAIN
    cells = np.where(train, cells, -1)
    threads = sum(client.nthreads().values())
    chains = fit.chains or auto_chains(threads, len(ds["flux"].chunks[0]), 36, p, fit.flush_rows, fit.precision,
                                       parse_bytes(fit.memory_budget))
    out = {"n": n, "n_pixels": p, "train_rows": int(train.sum()), "chains": chains, "threads": threads,
           "precision": fit.precision}

    # read floor: the same chunks, decompressed, summed
    t0 = time.perf_counter()
    compute(da.stack([ds["flux"].data.sum(axis=1), ds["error"].data.sum(axis=1)]), client=client,
            label="read floor")
    out["read_s"] = time.perf_counter() - t0

    out["blas_s"] = blas_floor(ds, np.flatnonzero(train))
    out["floor_s"] = out["read_s"] + out["blas_s"]

    # the fold inputs from a store beside the catalog, as the fit reads them (not embedded in the graph)
    stats, feats, _, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=chains, flush_rows=fit.flush_rows,
                               precision=fit.precision,
                               blas_pieces=blas_pieces or fit.blas_pieces or fold_blas_pieces(threads, chains),
                               inputs_store=path.with_name(path.name + ".fold-inputs.zarr"))
    rows_counted = dask.delayed(lambda s: float(s.n.sum()))(stats)
    base = PeakRSS.current()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        (n_rows, _) = compute(rows_counted, feats, client=client, label="ours: features + statistics")
        out["ours_s"] = time.perf_counter() - t0
    shutil.rmtree(path.with_name(path.name + ".fold-inputs.zarr"), ignore_errors=True)
    assert int(n_rows) <= out["train_rows"]
    out["ratio_vs_floor"] = out["ours_s"] / out["floor_s"]
    out["peak_rss_gb"] = peak.peak / 1e9
    out["baseline_rss_gb"] = base / 1e9
    out["spectra_per_s"] = n / out["ours_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n-small", type=int, default=50_000, help="second size, to show memory is flat in N (0: skip)")
    ap.add_argument("--data", default="benchmarks/data", help="where catalogs are kept between runs")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--chains", type=int, default=None)
    ap.add_argument("--memory-budget", default="8GB")
    ap.add_argument("--blas-pieces", type=int, default=0, help="BLAS calls per fold update (0: as the fit does)")
    ap.add_argument("--json", default="benchmarks/results/reduce.json")
    args = ap.parse_args()
    fit = FitConfig(precision=args.precision, chains=args.chains, memory_budget=args.memory_budget)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cores": os.cpu_count(), "memory_gb": round(__import__("psutil").virtual_memory().total
                                                                           / 1e9, 1)},
               "date": time.strftime("%Y-%m-%d"), "runs": [], "probe": {"start": machine_probe()}}
    sizes = [s for s in (args.n_small, args.n) if s]
    with dask_session(ClusterConfig(memory_limit="20GB")) as client:
        for n in sizes:
            path = ensure_catalog(data / f"sim_{n}.zarr", n, client)
            r = measure(path, client, fit, args.blas_pieces)
            results["runs"].append(r)
            print(json.dumps(r, indent=2), flush=True)
    results["probe"]["end"] = machine_probe()
    if len(results["runs"]) == 2:
        a, b = results["runs"]
        results["peak_rss_ratio_large_vs_small"] = b["peak_rss_gb"] / a["peak_rss_gb"]
        results["n_ratio"] = b["n"] / a["n"]
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
