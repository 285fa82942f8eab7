"""The expert solves alone, from a model store's statistics: wall time per layout, and the old path as the peer.

Usage::

    python benchmarks/expert_solves.py MODEL_DIR [--precision float32] [--json OUT]

Loads ``MODEL_DIR/stats.zarr`` (written by ``snrmoe fit``) and solves all 86
experts three ways, in the same run:

* ``serial``: one task at a time with every core in the BLAS (what ``fit`` does);
* ``threads``: the tasks on a pool of threads (as many as cores), BLAS
  single-threaded in each (how a dask worker runs them);
* ``peer (eigh)``: the previous method, a float32 eigendecomposition with
  vectors per expert (``?syevd``) to score the α grid, on a sample of
  experts, extrapolated to all.

Prints seconds per layout, seconds per expert of each scoring (the
tridiagonal reduction, or the range of a low-rank cell, + the Cholesky solve,
vs an eigendecomposition), and checks that the scoring chooses the same α as
a float64 eigendecomposition for the sampled experts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import dask
import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from snrmoe_dask.config import FitConfig
from snrmoe_dask.experts import expert_specs, fit_experts
from snrmoe_dask.ridge import ridge_alphas, solve_ridge, spectrum
from snrmoe_dask.stats import SufficientStats


def _names(stats: SufficientStats) -> tuple[list[str], list[str]]:
    snr = ["X", "L", "M", "H"][: stats.meta.get("n_snr", 4)]
    n_phys = stats.meta.get("n_phys", stats.n_cells // len(snr))
    side = int(round(np.sqrt(n_phys)))
    return snr, [f"T{t}_M{m}" for t in range(side) for m in range(side)]


def _eigh_gcv_alpha(cs, grid, precision: str, max_df_fraction: float) -> float:
    """The GCV choice from an eigendecomposition with vectors (the previous method; float64: the reference)."""
    d, v = scipy.linalg.eigh(cs.gram.astype(precision), driver="evd", check_finite=False)
    d = np.clip(d.astype(np.float64), 0, None)
    z = v.astype(np.float64).T @ cs.xty
    df = np.array([np.sum(d / (d + a)) for a in grid])
    gcv = np.array([cs.n * max(cs.yy - np.sum(z**2 * (d + 2 * a) / (d + a) ** 2), 0) for a in grid])
    gcv = np.where(cs.n - 1 - df > 0, gcv / np.maximum(cs.n - 1 - df, 1e-300) ** 2, np.inf)
    if cs.n <= cs.gram.shape[0]:  # singular Gram matrix: the same df cap as solve_ridge
        gcv = np.where(df <= max_df_fraction * cs.n, gcv, np.inf)
    return float(grid[int(np.argmin(gcv))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--precision", default="float32", choices=["float32", "float64"])
    ap.add_argument("--peer-sample", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    fit = FitConfig()
    stats = SufficientStats.from_zarr(args.model_dir / "stats.zarr")
    snr, phys = _names(stats)
    specs = expert_specs(snr, phys)
    cores = os.cpu_count() or 1
    out: dict = {"experts": len(specs), "cells": stats.n_cells, "pixels": stats.n_features, "cores": cores,
                 "precision": args.precision, "train_rows": float(stats.n.sum())}

    def solve_all(scheduler: str, blas: int) -> float:
        lazy = fit_experts(stats, specs, fit.alphas_relative, fit.min_cell_rows, fit.max_df_fraction, args.precision,
                           blas_threads=blas, one_at_a_time=scheduler == "sync")
        t0 = time.perf_counter()
        with threadpool_limits(blas), dask.config.set(scheduler=scheduler, num_workers=cores):
            dask.compute(lazy)
        return time.perf_counter() - t0

    out["serial_s"] = solve_all("sync", cores)
    out["threads_s"] = solve_all("threads", 1)
    big = [s for s in specs if not s.shrink and float(stats.n[list(s.cells)].sum()) >= fit.min_cell_rows]
    sample = big[:: max(1, len(big) // args.peer_sample)][: args.peer_sample]
    same, t_tri, t_eigh = [], 0.0, 0.0
    with threadpool_limits(cores):
        for s in sample:
            cs = stats.cells(s.cells)
            grid = ridge_alphas(cs, fit.alphas_relative)
            t0 = time.perf_counter()
            a_tri = solve_ridge(cs, grid, spec=spectrum(cs, args.precision), max_df_fraction=fit.max_df_fraction).alpha
            t1 = time.perf_counter()
            _eigh_gcv_alpha(cs, grid, args.precision, fit.max_df_fraction)
            t2 = time.perf_counter()
            t_tri, t_eigh = t_tri + t1 - t0, t_eigh + t2 - t1
            same.append(a_tri == _eigh_gcv_alpha(cs, grid, "float64", fit.max_df_fraction))
    reductions = sum(1 for s in specs if not s.shrink)
    out["sampled_experts"] = [s.name for s in sample]
    out["scoring_s_per_expert"] = t_tri / len(sample)
    out["eigh_s_per_expert"] = t_eigh / len(sample)
    out["peer_eigh_projected_s"] = out["serial_s"] + reductions * (out["eigh_s_per_expert"]
                                                                   - out["scoring_s_per_expert"])
    out["same_alpha_as_float64_eigh"] = all(same)
    for k, v in out.items():
        print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}")
    best = min(out["serial_s"], out["threads_s"])
    print(f"ratio best layout / peer (eigh) {best / out['peer_eigh_projected_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
