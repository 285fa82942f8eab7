"""Expert families as sums of cells, and their lazy fit on the cluster.

A cell is ``phys * n_snr + snr``. Families:

* ``global``        1 expert, every cell;
* ``oracle_snr``    one per S/N bin (sum over physical bins);
* ``oracle_phys``   one per Teff x [M/H] bin (sum over S/N bins);
* ``oracle_joint``  one per cell;
* ``hierarchical``  one per cell, ridge-shrunk toward its physical-bin parent:
  ``min ||y - Xw||^2 + a ||w - w_parent||^2``, where ``w_parent`` is the
  parent refitted without the cell's own rows (parent statistics minus the
  cell's, at the parent's alpha). A parent that saw the cell's rows would
  already fit them, so GCV would undercount the degrees of freedom the prior
  spends and favour strong shrinkage.

An expert whose rows number fewer than ``min_rows`` falls back to its parent
(``global`` for the S/N and physical families, the physical-bin expert for
joint and hierarchical cells) and records it in ``fallback``. ``global`` has
no parent: it is always fitted, from 2 rows up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize

from .blas import blas_threads as blas_threads_in_process
from .ridge import cholesky_solve_in_place, ridge_alphas, ridge_coef, solve_ridge, spectrum
from .stats import Scratch, SufficientStats, process_scratch

__all__ = ["FAMILIES", "ORACLE_FAMILIES", "ExpertSpec", "expert_specs", "leave_cells_out_prior", "solve_expert",
           "fit_experts", "experts_dataset", "with_blas_threads"]

FAMILIES = ("global", "oracle_snr", "oracle_phys", "oracle_joint", "hierarchical")
#: the families routed by the true bins (compared with the ceiling that is given the bins too)
ORACLE_FAMILIES = FAMILIES[1:]


@dataclass(frozen=True)
class ExpertSpec:
    """Which cells an expert sums, and its parent."""

    name: str
    family: str
    member: str
    cells: tuple[int, ...]
    parent: str | None = None
    shrink: bool = False


def expert_specs(snr_names: Sequence[str], phys_names: Sequence[str]) -> list[ExpertSpec]:
    """Every expert of every family, parents before children."""
    ns = len(snr_names)
    all_cells = tuple(range(len(phys_names) * ns))
    specs = [ExpertSpec("global", "global", "all", all_cells)]
    for s, sname in enumerate(snr_names):
        specs.append(ExpertSpec(f"oracle_snr/{sname}", "oracle_snr", sname,
                                tuple(p * ns + s for p in range(len(phys_names))), "global"))
    for p, pname in enumerate(phys_names):
        specs.append(ExpertSpec(f"oracle_phys/{pname}", "oracle_phys", pname,
                                tuple(p * ns + s for s in range(ns)), "global"))
    for family, shrink in (("oracle_joint", False), ("hierarchical", True)):
        for p, pname in enumerate(phys_names):
            for s, sname in enumerate(snr_names):
                specs.append(ExpertSpec(f"{family}/{pname}|{sname}", family, f"{pname}|{sname}", (p * ns + s,),
                                        f"oracle_phys/{pname}", shrink))
    return specs


def _as_dict(sol, n: float) -> dict:
    return {"coef": sol.coef, "intercept": sol.intercept, "alpha": sol.alpha, "gcv": sol.gcv,
            "resid_var": sol.resid_var, "df": sol.df, "n": n, "fallback": "", "at_grid_edge": sol.at_grid_edge}


def leave_cells_out_prior(stats: SufficientStats, parent: dict, parent_cells: Sequence[int],
                          cells: Sequence[int], scratch: Scratch | None = None) -> np.ndarray:
    """The parent's coefficients refitted at its alpha without ``cells`` (additivity: no pass over rows).

    Falls back to the parent's own coefficients if the parent is itself a
    fallback or too few rows remain.
    """
    rest = tuple(c for c in parent_cells if c not in set(cells))
    if parent.get("fallback") or not rest or float(stats.n[list(rest)].sum()) < 2:
        return np.asarray(parent["coef"], np.float64)
    alpha = float(parent["alpha"])
    cs = stats.cells(rest, scratch, name="gram-rest", lower_only=True)  # factored in place: no copy, no symmetrising
    w = cholesky_solve_in_place(cs.gram, cs.xty, alpha)
    return w if w is not None else ridge_coef(stats.cells(rest, scratch, name="gram-rest"), alpha, scratch)


def solve_expert(stats: SufficientStats, spec: ExpertSpec, relative_alphas: Sequence[float], min_rows: int,
                 parent: dict | None = None, max_df_fraction: float = 1.0,
                 twin: ExpertSpec | None = None, search_precision: str = "float32",
                 parent_cells: Sequence[int] | None = None) -> dict:
    """Fit one expert from the statistics (a small dict of arrays and numbers).

    With ``twin`` (an expert over the same cells that shrinks toward
    ``parent``), both are scored from one tridiagonal reduction and the result
    is ``{spec.name: fit, twin.name: fit}``; the twin shrinks toward the
    parent refitted without these cells (:func:`leave_cells_out_prior`) when
    ``parent_cells`` is given.
    """
    n = float(stats.n[list(spec.cells)].sum())
    names = [spec.name] + ([twin.name] if twin is not None else [])
    if parent is None and n < 2:
        raise ValueError(f"expert '{spec.name}' has {n:.0f} train rows; a Ridge fit needs at least 2")
    if n < min_rows and parent is not None:
        fits = {name: {**parent, "n": n, "fallback": spec.parent, "at_grid_edge": False} for name in names}
        return fits if twin is not None else fits[spec.name]
    with process_scratch() as scratch:  # the Gram matrix, its reduction and factors in reused buffers
        return _solve_cells(stats, spec, twin, parent, parent_cells, relative_alphas, max_df_fraction,
                            search_precision, n, scratch)


def _solve_cells(stats, spec, twin, parent, parent_cells, relative_alphas, max_df_fraction, search_precision,
                 n, scratch: Scratch) -> dict:
    cs = stats.cells(spec.cells, scratch)
    alphas = ridge_alphas(cs, relative_alphas)
    sp = spectrum(cs, search_precision, scratch)
    factors: dict = {}  # the twin at the same alpha reuses the Cholesky factor
    out = {}
    for s in [spec] + ([twin] if twin is not None else []):
        prior = None
        if s.shrink and parent is not None:
            prior = (leave_cells_out_prior(stats, parent, parent_cells, spec.cells, scratch) if parent_cells is not None
                     else np.asarray(parent["coef"]))
        out[s.name] = _as_dict(solve_ridge(cs, alphas, prior=prior, max_df_fraction=max_df_fraction, spec=sp,
                                              factors=factors, scratch=scratch), n)
    return out if twin is not None else out[spec.name]


def with_blas_threads(blas_threads: int | None, _after, fn, *args):
    """``fn(*args)`` with ``blas_threads`` BLAS threads (a task); ``_after`` only orders the tasks (a task or a
    list of them): solves chained this way run one after another."""
    with blas_threads_in_process(blas_threads):  # shared with the solves running beside it (no undoing each other)
        return fn(*args)


def fit_experts(stats, specs: Sequence[ExpertSpec], relative_alphas: Sequence[float], min_rows: int,
                max_df_fraction: float = 1.0, search_precision: str = "float32", *,
                blas_threads: int | None = None, at_once: int | None = None, after=None) -> dict:
    """Lazy fits: ``{name: Delayed[dict]}``; each depends on ``stats`` and its parent.

    A hierarchical expert is fitted in the same task as the joint expert of
    its cell (one reduction for both). With ``at_once = k`` the tasks form
    ``k`` chains (task ``i`` also waits for task ``i - k``), so a worker runs
    at most ``k`` solves at a time, each with ``blas_threads`` BLAS threads
    and its own buffers (:func:`~snrmoe_dask.stats.process_scratch`). On 2
    cores two single-threaded solves at once beat one solve on two BLAS
    threads when the reductions are two-stage (median 1.33 s against 2.98 s
    per reduction at P = 4096 here; the second stage runs on one core anyway),
    not with ``?sytrd``, whose memory-bound half makes two at once slower
    (``benchmarks/expert_solves.py`` times every layout). ``after`` (a delayed
    task) is what the first ``k`` solves wait for.
    """
    solve = dask.delayed(with_blas_threads, pure=True)
    tok = tokenize(getattr(stats, "key", None), list(relative_alphas), min_rows, max_df_fraction, search_precision,
                   blas_threads, at_once)
    twins = {(s.cells, s.parent): s for s in specs if s.shrink}
    by_name = {s.name: s for s in specs}
    out: dict = {}
    tasks: list = []
    for spec in specs:
        if spec.shrink:
            continue  # fitted with its joint twin
        parent = out.get(spec.parent) if spec.parent else None
        twin = twins.get((spec.cells, spec.parent)) if spec.family == "oracle_joint" else None
        parent_cells = by_name[spec.parent].cells if (twin is not None and spec.parent) else None
        previous = None if not at_once else (tasks[-at_once] if len(tasks) >= at_once else after)
        task = solve(blas_threads, previous, solve_expert, stats, spec,
                     list(relative_alphas), min_rows, parent, max_df_fraction, twin, search_precision, parent_cells,
                     dask_key_name=f"solve expert {spec.name}-{tok}")
        tasks.append(task)
        if twin is None:
            out[spec.name] = task
        else:
            out[spec.name], out[twin.name] = task[spec.name], task[twin.name]
    missing = [s.name for s in specs if s.name not in out]
    if missing:
        raise ValueError(f"hierarchical experts without a joint twin: {missing}")
    return out


def experts_dataset(specs: Sequence[ExpertSpec], fits: dict, wavelength: np.ndarray) -> xr.Dataset:
    """Stack fitted experts into a Dataset with dims (expert, wavelength).

    Names, families and parents are attributes-as-data in ``model.json``; the
    Dataset carries them as ``expert`` index order plus the numeric fields.
    """
    rows = [fits[s.name] for s in specs]
    ds = xr.Dataset(
        {
            "coef": (("expert", "wavelength"), np.stack([np.asarray(r["coef"], np.float64) for r in rows])),
            "intercept": ("expert", np.array([r["intercept"] for r in rows], np.float64)),
            "alpha": ("expert", np.array([r["alpha"] for r in rows], np.float64)),
            "gcv": ("expert", np.array([r["gcv"] for r in rows], np.float64)),
            "resid_var": ("expert", np.array([r["resid_var"] for r in rows], np.float64)),
            "df": ("expert", np.array([r["df"] for r in rows], np.float64)),
            "n_rows": ("expert", np.array([r["n"] for r in rows], np.float64)),
            "at_grid_edge": ("expert", np.array([r["at_grid_edge"] for r in rows], bool)),
        },
        coords={"expert": np.arange(len(specs)), "wavelength": np.asarray(wavelength, np.float64)},
    )
    ds["coef"].attrs["long_name"] = "Ridge coefficients on flux (logg per count)"
    ds["alpha"].attrs["long_name"] = "penalty chosen by GCV from the expert's own statistics"
    return ds
