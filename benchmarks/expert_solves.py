"""The expert solves alone, from a model store's statistics: wall time per layout, and the old path as the peer.

Usage::

    python benchmarks/expert_solves.py MODEL_DIR [--precision float32] [--json OUT]

Loads ``MODEL_DIR/stats.zarr`` (written by ``snrmoe fit``) and solves all 86
experts in several layouts, in the same run:

* ``serial``: one task at a time with every core in the BLAS, one-stage
  ``?sytrd`` reductions (the layout before 2026-12-07);
* ``threads``: as many tasks at once as cores, one BLAS thread each, ``?sytrd``;
* ``two_stage_serial`` / ``two_stage_threads``: the same two layouts with
  LAPACK's two-stage reduction (:mod:`snrmoe_dask.twostage`); what ``fit``
  does is ``two_stage_threads`` (``fit.solves_at_once`` = threads);
* ``peer (eigh)``: the previous method, a float32 eigendecomposition with
  vectors per expert (``?syevd``) to score the α grid, on a sample of
  experts, extrapolated to all.

It also prints the **kernel floor** of the method, measured in the same run:
the serial solves call the O(P^3) kernels a known number of times (a
tridiagonal reduction ``?sytrd`` per distinct Gram matrix, the sketch of a
low-rank cell, a float64 Cholesky ``dpotrf`` where a refinement does not
converge and for each hierarchical prior); each
kernel is timed alone on a matrix of this size, and the floor is the counts
times those times (the sketches and the refinements of low-rank cells at their
measured time; a solve whose factor is cached is counted apart, not in the
floor). ``full-rank floor`` is the same for a catalog large enough that
every cell has more rows than pixels (1M spectra): one reduction per expert
that is not a hierarchical twin, one refinement per expert (at its mean time
in the serial run) and one Cholesky per hierarchical prior (the parent
refitted without the cell).

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

import snrmoe_dask.experts
import snrmoe_dask.ridge
import snrmoe_dask.twostage
from snrmoe_dask.blas import cholesky_upper
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


class KernelCounts:
    """Counts and seconds of the solve kernels while active (wraps the module functions the solves look up)."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self._saved: list = []

    def _wrap(self, module, name: str, kind) -> None:
        """``kind(args, kwargs)`` names the call before it runs; it may return a function of the result."""
        fn = getattr(module, name)

        def counted(*a, **k):
            label = kind(a, k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            entry = self.calls.setdefault(label(out) if callable(label) else label, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return out

        self._saved.append((module, name, fn))
        setattr(module, name, counted)

    def __enter__(self) -> KernelCounts:
        ridge = snrmoe_dask.ridge

        def solve_kind(a, k):  # _exact_solve(gram, b, alpha, factors, ...): a factorisation unless its alpha is cached
            factors = a[3] if len(a) > 3 else k.get("factors")
            return "float64 solve, cached factor" if factors and a[2] in factors else "float64 solve (Cholesky)"

        self._wrap(snrmoe_dask.experts, "spectrum", lambda a, k: lambda sp: (
            "sketch (low-rank cell)" if isinstance(sp, ridge.RangeSpectrum) else "reduction ?sytrd"))
        self._wrap(ridge, "_exact_solve", solve_kind)
        # the leave-cells-out prior is factored in place (experts imports it by name)
        self._wrap(snrmoe_dask.experts, "cholesky_solve_in_place", lambda a, k: "float64 solve (Cholesky)")
        self._wrap(ridge, "refined_solve", lambda a, k: lambda w: (
            "refinement, accepted" if w is not None else "refinement, refused (then Cholesky)"))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)


def _best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_seconds(p: int, precision: str, cores: int) -> dict:
    """One ``?sytrd`` (``precision``) and one float64 Cholesky of a positive definite ``p x p`` matrix, alone."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((p + p // 2, p)).astype(np.float32)
    g = (x.T @ x).astype(np.float64)
    sytrd, lwork = ((scipy.linalg.lapack.ssytrd, scipy.linalg.lapack.ssytrd_lwork) if precision == "float32"
                    else (scipy.linalg.lapack.dsytrd, scipy.linalg.lapack.dsytrd_lwork))
    lw = int(lwork(p)[0])
    with threadpool_limits(cores):
        t_red = _best_of(lambda: sytrd(np.asfortranarray(g.astype(precision)), lower=1, overwrite_a=1, lwork=lw))
        t_copy = _best_of(lambda: np.asfortranarray(g.astype(precision)))
        t_chol = _best_of(lambda: cholesky_upper(np.asfortranarray(g)))
        t_gcopy = _best_of(lambda: np.asfortranarray(g))
    return {"reduction_s": t_red - t_copy, "cholesky_s": t_chol - t_gcopy, **cholesky_pairs(g)}


def cholesky_pairs(g: np.ndarray) -> dict:
    """The float64 Cholesky the solves use (:func:`snrmoe_dask.blas.cholesky_upper`) against the BLAS library's own
    ``dpotrf`` (:func:`scipy.linalg.cho_factor`): one alone on one BLAS thread, and two at once on two Python
    threads of one BLAS thread each (as ``fit`` runs two solves at once)."""
    from concurrent.futures import ThreadPoolExecutor

    def blocked(a: np.ndarray) -> None:
        if cholesky_upper(a):
            raise np.linalg.LinAlgError("not positive definite")

    kernels = {"lapack": lambda a: scipy.linalg.cho_factor(a, overwrite_a=True, check_finite=False),
               "blocked": blocked}

    def timed(fn, at_once: int, repeats: int = 3) -> float:
        """Best wall time of ``at_once`` factorisations on as many threads, each of its own copy (made untimed)."""
        best = float("inf")
        with ThreadPoolExecutor(at_once) as pool:
            for _ in range(repeats):
                copies = [np.asfortranarray(g) for _ in range(at_once)]
                t0 = time.perf_counter()
                for f in [pool.submit(fn, a) for a in copies]:
                    f.result()  # a failed factorisation fails the benchmark, not a fast time
                best = min(best, time.perf_counter() - t0)
        return best

    out = {}
    with threadpool_limits(1):
        for name, fn in kernels.items():
            out[f"cholesky_{name}_one_thread_s"] = timed(fn, 1)
            out[f"cholesky_{name}_two_at_once_s"] = timed(fn, 2)
    return out


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

    def solve_all(at_once: int, two_stage: bool) -> float:
        """Every expert, ``at_once`` solves at a time on ``cores // at_once`` BLAS threads each."""
        blas = max(1, cores // at_once)
        lazy = fit_experts(stats, specs, fit.alphas_relative, fit.min_cell_rows, fit.max_df_fraction, args.precision,
                           blas_threads=blas, at_once=at_once)
        saved = snrmoe_dask.twostage.AVAILABLE
        snrmoe_dask.twostage.AVAILABLE = saved and two_stage  # spectrum() reads it at each call
        try:
            t0 = time.perf_counter()
            with threadpool_limits(blas), dask.config.set(scheduler="threads", num_workers=at_once):
                dask.compute(lazy)
            return time.perf_counter() - t0
        finally:
            snrmoe_dask.twostage.AVAILABLE = saved

    with KernelCounts() as counts:
        out["serial_s"] = solve_all(1, False)
    out["kernels_in_serial"] = {k: {"calls": n, "seconds": round(sec, 2)} for k, (n, sec) in counts.calls.items()}
    kern = kernel_seconds(stats.n_features, args.precision, cores)
    out.update({f"kernel_{k}": v for k, v in kern.items()})
    n_red = counts.calls.get("reduction ?sytrd", [0, 0.0])[0]
    n_chol = counts.calls.get("float64 solve (Cholesky)", [0, 0.0])[0]
    # the sketches and refinements (O(P^2 k), no LAPACK kernel of their own to time alone) at their measured time
    sketch_s = sum(counts.calls.get(k, [0, 0.0])[1] for k in ("sketch (low-rank cell)", "refinement, accepted",
                                                            "refinement, refused (then Cholesky)"))
    out["floor_s"] = n_red * kern["reduction_s"] + n_chol * kern["cholesky_s"] + sketch_s
    out["serial_vs_floor"] = out["serial_s"] / out["floor_s"]
    full_red = sum(1 for s in specs if not s.shrink)
    full_chol = sum(1 for s in specs if s.shrink)  # the priors; every expert's own solve is a refinement
    refined = counts.calls.get("refinement, accepted", [0, 0.0])
    per_refinement = refined[1] / refined[0] if refined[0] else 0.0
    out["full_rank_floor_s"] = (full_red * kern["reduction_s"] + full_chol * kern["cholesky_s"]
                                + len(specs) * per_refinement)
    out["full_rank_counts"] = {"reductions": full_red, "choleskys": full_chol, "refinements": len(specs)}
    out["threads_s"] = solve_all(cores, False)
    if snrmoe_dask.twostage.AVAILABLE:
        out["two_stage_serial_s"] = solve_all(1, True)
        out["two_stage_threads_s"] = solve_all(cores, True)
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
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"floor: {n_red} reductions x {kern['reduction_s']:.3f} s + {n_chol} Choleskys x {kern['cholesky_s']:.3f} s "
          f"+ sketches and refinements {sketch_s:.1f} s = {out['floor_s']:.1f} s; "
          f"serial solves {out['serial_s']:.1f} s = {out['serial_vs_floor']:.2f}x the floor")
    print(f"float64 Cholesky at P = {stats.n_features}, one BLAS thread: LAPACK's dpotrf "
          f"{kern['cholesky_lapack_one_thread_s']:.3f} s alone, "
          f"{kern['cholesky_lapack_two_at_once_s']:.3f} s for two at once; blocked (snrmoe_dask.blas.cholesky_upper) "
          f"{kern['cholesky_blocked_one_thread_s']:.3f} s alone, "
          f"{kern['cholesky_blocked_two_at_once_s']:.3f} s for two at once "
          f"(= {kern['cholesky_lapack_two_at_once_s'] / kern['cholesky_blocked_two_at_once_s']:.2f}x)")
    print(f"full-rank floor (every cell with more rows than pixels): {full_red} reductions + {full_chol} Choleskys "
          f"+ {len(specs)} refinements at {per_refinement:.3f} s = {out['full_rank_floor_s']:.1f} s")
    best = min(out["serial_s"], out["threads_s"])
    print(f"ratio best layout / peer (eigh) {best / out['peer_eigh_projected_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
