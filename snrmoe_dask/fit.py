"""The fit stage: one read of the catalog, then every expert, baseline and gate (``snrmoe fit``).

The pass (:func:`~snrmoe_dask.reduce.one_pass`) yields the feature table, the
per-cell statistics, the baselines' and (optionally) the audit's statistics,
and the row cache of the val and frozen-test rows. The statistics are solved
where they live (one solve at a time, every core in the BLAS); the gates are
fitted on the cached val rows. :func:`assemble_model` turns solved experts
into a :class:`~snrmoe_dask.store.Model`; the scikit-learn estimator uses the
same function.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.utils import parse_bytes

from . import twostage
from .audit import write_audit
from .baselines import (
    BASELINES,
    TERM_NAMES,
    baselines_dataset,
    solve_baselines,
)
from .bins import cell_index, phys_bin, phys_bin_names, snr_bin
from .cache import cache_dir_name, cached_rows, catalog_fingerprint, open_model_rows, plan_row_cache, remove_row_cache
from .catalog import bin_edges, open_catalog
from .checkpoint import Checkpoint, plan_token
from .cluster import check_workers_see, compute, release_memory
from .config import Config
from .experts import (
    ExpertSpec,
    expert_specs,
    experts_dataset,
    fit_experts,
    with_blas_threads,
)
from .features import FEATURE_NAMES, QUALITY_FEATURES
from .foldinputs import FOLD_INPUTS
from .leakage import audit_plan, audit_result, audit_solutions
from .metrics import expert_predictions
from .mixture import (
    apply_model_gate,
    calibrate_sigma,
    fit_gates,
    gate_inputs,
    physical_names,
)
from .outputs import claimed
from .pca import pca_from_stats
from .prior import Prior, Provenance
from .reduce import SnrRouting, auto_chains, features_dataset, fold_blas_pieces, one_pass
from .split import TRAIN, VAL, id_hash
from .stats import SufficientStats, tri_size
from .store import (
    MODEL_VERSION,
    Model,
    ModelError,
    routing_bins,
    rows_source,
    save_model,
    versions,
)
from .zarrstore import consolidate

__all__ = ["fit_model", "assemble_model", "auto_checkpoint_every", "solve_statistics", "finish_model", "Solved"]


def _n_threads(client) -> int:
    if client is None:
        return os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))


def _threads_per_worker(client) -> int:
    if client is None:
        return os.cpu_count() or 1
    return max(1, min(client.nthreads().values()))


def _solves_at_once(cfg: Config, threads: int) -> int:
    """Solves a worker of ``threads`` threads runs at a time: ``fit.solves_at_once``, by default one per thread
    where the two-stage reduction is available, else one (two ``?sytrd`` at once contend for memory)."""
    default = threads if twostage.AVAILABLE else 1
    return max(1, min(cfg.fit.solves_at_once or default, threads))


def _clock(_stats) -> float:
    return time.time()


def _save_stats(stats: SufficientStats, path: str) -> dict:
    stats.to_zarr(path)
    return {"n_per_cell": stats.n.tolist(), "meta": stats.meta}


def _fit_and_save_baselines(stats: SufficientStats, bstats, relative_alphas, max_df_fraction, search_precision,
                            path: str) -> dict:
    bstats.to_zarr(path)
    return solve_baselines(stats, bstats, relative_alphas, max_df_fraction, search_precision)


# ---------------------------------------------------------------------- fit
def fit_model(catalog: str | Path, model_dir: str | Path, cfg: Config, *, client=None,
              progress: bool = True, resume: bool = False, overwrite: bool = False, replace_model: bool = False,
              audit_out: str | Path | None = None, prior: Prior | None = None, command: str = "snrmoe fit") -> Model:
    """Features + sufficient statistics in one pass, then every expert family.

    Parameters
    ----------
    catalog : path-like
        Catalog store with labels ``logg``, ``teff``, ``mh`` (and ``snr``, the
        true S/N used for oracle cells; without it the S/N estimate is used).
    model_dir : path-like
        Output model store: must not exist, be empty, or be an interrupted
        fit (continued with ``resume``, started again with ``overwrite``). A
        complete model is replaced only with ``replace_model`` (``run``
        redoing its own study); a catalog or any other folder never
        (:func:`~snrmoe_dask.outputs.claim_output`).
    cfg : Config
    client : distributed.Client, optional
    resume : bool
        Continue the pass from ``MODEL_DIR/checkpoints`` if they belong to the
        same plan (same catalog layout, cells and settings); otherwise they
        are discarded.
    audit_out : path-like, optional
        Also run the leakage audit (:mod:`snrmoe_dask.audit`) in the same pass
        and write it there (the catalog needs ``snr`` and ``mag``).
    prior : Prior, optional
        An existing model whose statistics, feature table and row caches the
        new model starts from (:mod:`snrmoe_dask.update`): the result is the
        model of its catalogs and ``catalog``; only ``catalog`` is read.
    command : str
        The command named in the output's lock.

    Returns
    -------
    Model
    """
    model_dir = Path(model_dir).absolute()  # checkpoints and the row cache are written by workers
    with claimed(model_dir, "model", command, overwrite=overwrite, resume=resume, replace_model=replace_model):
        return _fit_model(catalog, model_dir, cfg, client=client, progress=progress, resume=resume,
                          audit_out=audit_out, prior=prior)


def _fit_model(catalog, model_dir: Path, cfg: Config, *, client, progress: bool, resume: bool, audit_out,
               prior: Prior | None = None) -> Model:
    """Read ``catalog`` once, then solve and finish the model; with ``prior`` (an existing model's statistics,
    feature table and row caches), the model of the prior's catalogs and this one (``snrmoe update``)."""
    t_start = time.perf_counter()
    target = cfg.fit.target
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog, routes_by_snr=True)
    if prior is not None:
        prior.check_catalog(ds, catalog, cfg)
    check_workers_see(client, catalog, cfg.cluster.connect_timeout)  # before any task reads it
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    edges = bin_edges(ds, cfg.catalog) if prior is None else prior.edges
    model_dir.mkdir(parents=True, exist_ok=True)  # only once the catalog is known to be fit for the fit
    (model_dir / "model.json").unlink(missing_ok=True)  # a partial rerun must not look complete
    if prior is not None:
        prior.link_caches(model_dir)
    snr_names, phys_names = list(cfg.catalog.snr_bin_names), phys_bin_names(edges["teff_edges"], edges["mh_edges"])
    n_snr = len(snr_names)
    n_cells = len(phys_names) * n_snr

    # the val and frozen-test rows are cached by the pass, for the gates and evaluate (one cache per catalog)
    cache_dir = model_dir / cache_dir_name(0 if prior is None else len(prior.catalogs))
    if not resume:
        remove_row_cache(cache_dir)
    cache_keep = cached_rows(ds, cfg.fit.cache_max_val_rows, cfg.catalog.split_salt)
    row_cache = plan_row_cache(ds, cache_keep, cache_dir, np.r_[0, np.cumsum(ds["flux"].chunks[0])],
                               {"max_val_rows": cfg.fit.cache_max_val_rows,
                                "split": cfg.catalog.model_dump(mode="json")})
    train = ds["split"].values == TRAIN
    p_b = phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64)
    routing = None
    if "snr" in ds:
        snr_source = "snr (true S/N label)"
        # finite: open_catalog(routes_by_snr=True) refused a NaN with its count (it used to land in bin X here)
        s_b = snr_bin(np.asarray(ds["snr"].values, np.float64), edges["snr_edges"])
        cell = np.where(train, cell_index(p_b, s_b, n_snr), -1).astype(np.int64)
    else:  # real data: the fold routes each train row by its S/N estimate, from the block it already holds
        snr_source = "snr_est (no true S/N label in the catalog)"
        routing = SnrRouting(n_snr, tuple(edges["snr_edges"]))
        cell = np.where(train, p_b, -1).astype(np.int64)
    y = np.asarray(ds[target].values, np.float64)
    audit = audit_plan(ds, cfg) if audit_out is not None else None

    n_chunks = len(ds["flux"].chunks[0])
    threads = _n_threads(client)
    baselines = tuple(cfg.fit.baselines)
    # the whitened baseline's accumulator is one more cell in every chain
    chains = cfg.fit.chains or auto_chains(threads, n_chunks, n_cells + ("whitened" in baselines), p,
                                           cfg.fit.flush_rows, cfg.fit.precision, parse_bytes(cfg.fit.memory_budget))
    meta_stats = {"n_snr": n_snr, "n_phys": len(phys_names), "bin_edges": edges, "catalog": str(catalog)}
    checkpoint = _checkpoint(model_dir, cfg, catalog, ds, y, cell, n_cells, chains, baselines, resume, audit)
    features_resumed = len(checkpoint.features_done()) if checkpoint else 0
    try:  # the pass's fold inputs are a store in model_dir (written by one_pass), removed however it ends
        stats_d, feats_d, bstats_d, audit_d = one_pass(
            ds, y, cell, n_cells=n_cells, chains=chains, flush_rows=cfg.fit.flush_rows, precision=cfg.fit.precision,
            min_good_fraction=cfg.catalog.min_good_fraction, meta=meta_stats,
            blas_pieces=cfg.fit.blas_pieces or fold_blas_pieces(threads, chains, _threads_per_worker(client)),
            baselines=baselines,
            checkpoint=checkpoint, read_ahead=cfg.fit.read_ahead, row_cache=row_cache, routing=routing, audit=audit,
            inputs_store=model_dir / FOLD_INPUTS)
        if prior is not None:  # the statistics add: the prior's are loaded where they are summed, not in the client
            stats_d = dask.delayed(prior.add_stats, pure=True)(stats_d, dask_key_name=f"add prior stats-{stats_d.key}")
            if baselines:
                bstats_d = dask.delayed(prior.add_baseline_stats, pure=True)(
                    bstats_d, dask_key_name=f"add prior baseline stats-{stats_d.key}")
        blas = _threads_per_worker(client)
        audit_sol_d = None
        if audit is not None:
            audit_sol_d = dask.delayed(audit_solutions, pure=True)(
                audit_d, audit.n_groups, cfg.fit, _solves_at_once(cfg, blas), blas,
                dask_key_name=f"solve audit-{stats_d.key}")
        solved = solve_statistics(stats_d, bstats_d if baselines else None, expert_specs(snr_names, phys_names), cfg,
                                  model_dir, client, progress, extra={"features": feats_d, "audit": audit_sol_d},
                                  label=f"one pass ({chains} accumulator chain(s))")
    finally:
        shutil.rmtree(model_dir / FOLD_INPUTS, ignore_errors=True)  # a rerun writes it again
    feature_blocks, audit_sol = solved.extra["features"], solved.extra.get("audit")
    features = features_dataset(feature_blocks, ds, cfg.catalog.min_good_fraction)
    finish_audit = None
    if audit is not None:
        frozen = np.flatnonzero(ds["frozen_test"].values)
        test_src, test_rows, _ = rows_source(model_dir, ds, frozen)
        test_features = np.concatenate(feature_blocks)[frozen]  # the pass's feature rows: not computed again
        finish_audit = AuditScoring(client, audit_sol, test_src.isel(spectrum=test_rows).load(), audit, cfg,
                                    test_features, audit_out, ds)
    features["split"] = ds["split"]
    this = {"path": str(Path(catalog).absolute()), "rows": int(n), "fingerprint": catalog_fingerprint(ds),
            "train_rows": int((cell >= 0).sum()), "snr_routing_source": snr_source}
    if prior is not None:
        provenance = prior.provenance.then("update", this)
    else:
        given = [k for k in ("teff_edges", "mh_edges") if getattr(cfg.catalog, k) is not None]
        tertiles = [k for k in ("teff_edges", "mh_edges") if k not in given]
        provenance = Provenance.first(this, "; ".join(
            ([f"config ({', '.join(given)})"] if given else [])
            + ([f"training-label tertiles of {catalog} ({', '.join(tertiles)})"] if tertiles else [])))
    excluded = solved.saved["meta"].get("train_rows_excluded_unusable", 0)
    accumulation = {"chains": chains, "precision": cfg.fit.precision, "flush_rows": cfg.fit.flush_rows,
                    "checkpoint_every": checkpoint.every if checkpoint else 0,
                    "chunks_from_checkpoint": solved.saved["meta"].get("chunks_from_checkpoint", 0),
                    "chunks_folded": solved.saved["meta"].get("chunks_folded", 0),
                    "feature_blocks_from_checkpoint": features_resumed}
    model = finish_model(solved, features if prior is None else prior.features_with(features), provenance,
                    wavelength=ds["wavelength"].values, edges=edges, cfg=cfg, model_dir=model_dir, client=client,
                    progress=progress, snr_source=snr_source, t_start=t_start, accumulation=accumulation,
                    train_rows_excluded_unusable=excluded,
                    catalog_ds=ds if prior is None else None, alongside=finish_audit)
    if checkpoint is not None:
        checkpoint.clear()  # the statistics are in stats.zarr now
    return model


class AuditScoring:
    """The audit's scoring of the frozen-test rows, run beside the gate fits.

    :meth:`start` once the gate table is computed (the table's cluster tasks are on the gate stage's critical
    path, the scoring is not); :meth:`finish` after the gates are fitted: it waits, writes the audit and returns
    its timing. With a client the scoring is a task on the cluster: the client fits the gates meanwhile, whose
    MLP fit leaves a core idle for most of the stage, and no thread of the client shares its warning filters
    with the scoring's. Without one it runs in the client when started.
    """

    def __init__(self, client, audit_sol: dict, test: xr.Dataset, plan, cfg: Config, test_features: np.ndarray,
                 audit_out, ds: xr.Dataset):
        self.client, self.audit_sol, self.test, self.test_features = client, audit_sol, test, test_features
        self.plan = plan.without_rows()  # the scoring needs the plan's bins and counts, not a column per row
        self.cfg, self.audit_out, self.ds = cfg, audit_out, ds
        self._t0: float | None = None
        self._scores: dict | None = None
        self._future, self._inputs = None, ()

    def start(self) -> None:
        if self._t0 is not None:
            return
        self._t0 = time.perf_counter()
        if self.client is None:
            self._scores = audit_result(self.audit_sol, self.test, self.plan, self.cfg, self.test_features)
            return
        self._inputs = self.client.scatter([self.audit_sol, self.test, self.test_features])  # not in the task
        self._future = self.client.submit(audit_result, self._inputs[0], self._inputs[1], self.plan, self.cfg,
                                          self._inputs[2], pure=False,
                                          key=f"audit scoring-{tokenize(self.audit_out, self._t0)}")

    def finish(self) -> dict:
        self.start()  # a gate stage that ended before its table (too few val rows) did not start it
        if self._future is not None:
            try:
                self._scores = self._future.result()
            finally:  # the test rows and the result leave the cluster now, not when this object is collected
                for f in (self._future, *self._inputs):
                    f.release()
                self._future, self._inputs = None, ()
        write_audit(self._scores, self.audit_out, self.ds, self.cfg)
        return {"audit_s": time.perf_counter() - self._t0}


@dataclass
class Solved:
    """What the solve stage returns: the experts' and baselines' fits, PCA, and the extra tasks computed with them."""

    fits: dict
    pca: dict | None
    base_fits: dict | None
    saved: dict
    extra: dict
    timings: dict


def solve_statistics(stats_d, bstats_d, specs: list[ExpertSpec], cfg: Config, model_dir: Path, client,
                     progress: bool, *, extra: dict | None = None, label: str = "statistics") -> Solved:
    """Every expert, the baselines and PCA from the statistics (a delayed object: the pass, or a sum of stores),
    and ``stats.zarr`` written after them; ``extra`` delayed tasks (the feature blocks, the audit's solutions)
    are computed in the same call, so the solves start the moment the pass ends."""
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    baselines = tuple(cfg.fit.baselines) if bstats_d is not None else ()
    # the statistics live on one worker: its threads run the solves, ``at_once`` at a time, each with its share of
    # the BLAS threads. The audit's solves go first (its Gram matrices ``at_once`` at a time too), so its statistics
    # (10 packed triangles, 0.67 GB at P = 4096) are released before the experts' solves add their buffers; the
    # baselines come after every expert
    blas = _threads_per_worker(client)
    at_once = _solves_at_once(cfg, blas)
    serial = dask.delayed(with_blas_threads, pure=True)
    fits_d = fit_experts(stats_d, specs, cfg.fit.alphas_relative, cfg.fit.min_cell_rows, cfg.fit.max_df_fraction,
                         cfg.fit.alpha_search_precision, blas_threads=max(1, blas // at_once), at_once=at_once,
                         after=extra.get("audit"))
    # PCA's eigendecomposition on the solves' BLAS threads: it runs beside them, and its last bits depend on the count
    pca_d = (serial(max(1, blas // at_once), None, pca_from_stats, stats_d, cfg.gates.n_pca,
                    dask_key_name=f"pca_from_stats-{stats_d.key}") if cfg.gates.n_pca else dask.delayed(None))
    last = list(fits_d.values())
    base_d = dask.delayed(None)
    if baselines:
        base_d = last = serial(blas, last, _fit_and_save_baselines, stats_d, bstats_d, cfg.fit.alphas_relative,
                               cfg.fit.max_df_fraction, cfg.fit.alpha_search_precision,
                               str(model_dir / "baseline_stats"), dask_key_name=f"solve baselines-{stats_d.key}")
    # the statistics are written after the solves, not beside them: a concurrent 2.3 GB write slowed the
    # solves' BLAS threads (default job: experts 67 s in-process, 79 s on the worker)
    saved_d = serial(None, last, _save_stats, stats_d,
                     str(model_dir / "stats.zarr"), dask_key_name=f"save stats-{stats_d.key}")
    clock_d = dask.delayed(_clock)(stats_d)  # a cheap task that runs as soon as the statistics are complete
    t0, t0_unix = time.perf_counter(), time.time()
    names = list(extra)
    fits, saved, pca, base_fits, stats_end, *rest = compute(
        fits_d, saved_d, pca_d, base_d, clock_d, *extra.values(), client=client, progress=progress,
        label=f"{label} + {len(specs)} experts + {len(baselines)} baselines"
              + (" + audit" if "audit" in extra else ""))
    timings = {"pass_and_fit_s": time.perf_counter() - t0,
               "pass_s": stats_end - t0_unix}  # the worker's clock: the same host, or NTP-close on a cluster
    release_memory(client)  # the statistics and the solve buffers are gone: the gate stage starts lean
    return Solved(fits, pca, base_fits, saved, dict(zip(names, rest)), timings)


def finish_model(solved: Solved, features: xr.Dataset, provenance: Provenance, *, wavelength: np.ndarray, edges: dict,
            cfg: Config, model_dir: Path, client, progress: bool, snr_source: str, t_start: float,
            accumulation: dict, train_rows_excluded_unusable: int, catalog_ds: xr.Dataset | None = None,
            alongside: AuditScoring | None = None) -> Model:
    """Write the feature table, assemble the experts, fit the gates on the cached val rows of every catalog the
    statistics came from (or ``catalog_ds``'s own, when its row cache is not complete), and save the model
    (``model.json`` last). ``alongside`` (the audit's scoring) starts once the gate table is computed and is
    finished, its timings kept, once the gates are fitted, before the model is saved."""
    features.to_zarr(model_dir / "features.zarr", mode="w", zarr_format=3, consolidated=False)
    consolidate(model_dir / "features.zarr")
    fits, base_fits = solved.fits, solved.base_fits
    snr_names, phys_names = list(cfg.catalog.snr_bin_names), phys_bin_names(edges["teff_edges"], edges["mh_edges"])
    specs = expert_specs(snr_names, phys_names)
    fallbacks = {name: f["fallback"] for name, f in fits.items() if f["fallback"]}
    if fallbacks:  # one line for all of them; model.json lists each with its rows and parent
        warnings.warn(f"{len(fallbacks)} expert(s) have fewer than fit.min_cell_rows={cfg.fit.min_cell_rows} train "
                      f"rows and fall back to their parent (listed in model.json 'fallbacks'): "
                      f"{', '.join(sorted(fallbacks))}", stacklevel=3)
    baselines_ds = baselines_dataset(base_fits, wavelength) if base_fits else None
    model = assemble_model(
        specs, fits, wavelength, pca=solved.pca, edges=edges, snr_names=snr_names, phys_names=phys_names,
        target=cfg.fit.target, min_good_fraction=cfg.catalog.min_good_fraction,
        snr_routing_source=snr_source,
        baselines={"fitted": [b for b in BASELINES if b in (base_fits or {})], "terms": list(TERM_NAMES),
                   "alpha": {b: f["alpha"] for b, f in (base_fits or {}).items()},
                   "at_grid_edge": {b: f["at_grid_edge"] for b, f in (base_fits or {}).items()}},
        train_rows=int(sum(c["train_rows"] for c in provenance.catalogs)),
        train_rows_excluded_unusable=int(train_rows_excluded_unusable),
        rows_per_cell=solved.saved["n_per_cell"],
        accumulation=accumulation,
        catalog=provenance.catalogs[-1]["path"] if len(provenance.catalogs) == 1 else
        [c["path"] for c in provenance.catalogs],
        catalog_rows=int(sum(c["rows"] for c in provenance.catalogs)),
        catalogs=provenance.catalogs, history=provenance.history, bin_edges_source=provenance.edges_source,
        fallbacks={name: {"train_rows": int(fits[name]["n"]), "parent": parent} for name, parent in fallbacks.items()},
        config=cfg.model_dump(mode="json"), versions=versions())
    experts, meta = model.experts, model.meta
    t0 = time.perf_counter()
    src = open_model_rows(model_dir, provenance.catalogs, role="val", max_val_rows=cfg.fit.cache_max_val_rows,
                          salt=cfg.catalog.split_salt)
    meta_source = "row cache"
    if src is None and catalog_ds is not None:
        src, meta_source = catalog_ds, "catalog (no complete row cache)"
    if src is None:
        raise ModelError(f"{model_dir}: the row cache of a catalog is missing or damaged; the gates cannot be "
                         "fitted without its val rows")
    gates, meta["gates"] = _fit_gate_stage(model, src, features, edges, cfg, model_dir, client, progress,
                                           after_table=alongside.start if alongside is not None else None)
    meta["gates"]["val_rows_source"] = meta_source
    timings = dict(solved.timings)
    timings["gates_s"] = time.perf_counter() - t0
    if alongside is not None:
        timings.update(alongside.finish())  # overlapped the gate fits: its seconds are part of gates_s's wall time
    meta["timings"] = {**timings, "total_s": time.perf_counter() - t_start}
    save_model(model_dir, experts, meta, gates, baselines_ds)
    model = Model(experts, meta, gates, baselines_ds)
    model.path = model_dir
    return model


def assemble_model(specs: list[ExpertSpec], fits: dict, wavelength: np.ndarray, *, pca: dict | None, edges: dict,
                   snr_names: list[str], phys_names: list[str], target: str, min_good_fraction: float,
                   **meta: Any) -> Model:
    """The model of solved experts (no gates yet): experts, PCA axes and ``model.json``'s description.

    One function for ``snrmoe fit`` and :class:`~snrmoe_dask.estimator.SNRMoERegressor`; ``meta`` adds
    the caller's provenance (catalog, accumulation, config, ...).
    """
    wavelength = np.asarray(wavelength, np.float64)
    experts = experts_dataset(specs, fits, wavelength)
    if pca is not None:
        experts["pca_mean"] = ("wavelength", pca["mean"])
        experts["pca_components"] = (("pc", "wavelength"), pca["components"])
        experts["pca_explained_variance"] = ("pc", pca["explained_variance"])
    described = {
        "kind": "snrmoe.model",
        "version": MODEL_VERSION,
        "target": target,
        "n_pixels": int(wavelength.size),
        "wavelength_range": [float(wavelength[0]), float(wavelength[-1])],
        "bin_edges": edges,
        "snr_bin_names": list(snr_names),
        "phys_bin_names": list(phys_names),
        "experts": [{**asdict(s), "cells": list(s.cells), "fallback": fits[s.name]["fallback"]} for s in specs],
        "alpha_at_grid_edge": [name for name, f in fits.items() if f["at_grid_edge"]],
        "min_good_fraction": min_good_fraction,
        **meta,
    }
    return Model(experts, described)


def auto_checkpoint_every(ds: xr.Dataset, chains: int, gram_matrices: int, min_read_ratio: float) -> int:
    """Folds per chain between checkpoints when ``fit.checkpoint_every`` is null.

    About four checkpoints per chain, but at least ``min_read_ratio`` times the bytes one checkpoint writes
    (``gram_matrices`` packed float64 triangles: the cells, the whitened baseline, the audit's groups) read
    between two of them. Deterministic in the catalog's layout, so a resumed pass flushes at the same folds.
    """
    chunks = ds["flux"].chunks[0]
    per_chain = max(1, -(-len(chunks) // chains))
    p = ds.sizes["wavelength"]
    row_bytes = p * sum(ds[v].dtype.itemsize for v in ("flux", "error", "mask") if v in ds)
    chunk_bytes = max(1, max(chunks) * row_bytes)
    state_bytes = gram_matrices * tri_size(p) * 8
    return max(1, -(-per_chain // 4), math.ceil(min_read_ratio * state_bytes / chunk_bytes))


def _checkpoint(model_dir: Path, cfg: Config, catalog, ds: xr.Dataset, y: np.ndarray, cell: np.ndarray, n_cells: int,
                chains: int, baselines: tuple[str, ...], resume: bool, audit=None) -> Checkpoint | None:
    """The pass's checkpoint directory (``None`` if ``fit.checkpoint_every`` is 0)."""
    every = cfg.fit.checkpoint_every
    if every is None:
        every = auto_checkpoint_every(ds, chains, n_cells + ("whitened" in baselines)
                                      + (2 * audit.n_groups if audit is not None else 0),
                                      cfg.fit.checkpoint_min_read_ratio)
    if every == 0:
        shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)
        return None
    token = plan_token(catalog=str(Path(catalog).resolve()), shape=list(ds["flux"].shape),
                       chunks=[int(c) for c in ds["flux"].chunks[0]], ids=np.asarray(ds["spectrum"].values),
                       y=y, cell=cell, n_cells=n_cells, chains=chains, flush_rows=cfg.fit.flush_rows,
                       precision=cfg.fit.precision, min_good=cfg.catalog.min_good_fraction,
                       baselines=list(baselines), every=every,
                       audit=None if audit is None else plan_token(group=audit.group, targets=audit.targets,
                                                                   layout=[audit.flush_rows, audit.precision]))
    return Checkpoint(str(model_dir / "checkpoints"), every, token).open(resume)


def _fit_gate_stage(model: Model, src: xr.Dataset, features: xr.Dataset, edges: dict, cfg: Config,
                    model_dir: Path, client, progress: bool,
                    after_table: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """Project the usable val rows of ``src`` (the row caches, or a catalog) on every expert (+ PCA), write the
    gate table, fit the gates. ``features`` is the feature table of every row, by position (``src['position']``).
    ``after_table`` is called once the projections are computed."""
    n_pca = cfg.gates.n_pca
    meta: dict[str, Any] = {"fallback_tau": cfg.gates.fallback_tau, "snr_cliff": cfg.gates.snr_cliff,
                            "inputs": {"quality": list(QUALITY_FEATURES), "physical": physical_names(n_pca)},
                            "fitted": {}, "default": None, "selection": {}}
    pos = src["position"].values if "position" in src else np.arange(src.sizes["spectrum"])
    val_local = np.flatnonzero((src["split"].values == VAL) & features["usable"].values[pos])
    val = pos[val_local]
    rows = src.isel(spectrum=val_local)
    ids = rows["spectrum"].values
    y = np.asarray(rows[cfg.fit.target].values, np.float64)
    by_true_snr = str(model.meta.get("snr_routing_source", "")).startswith("snr (")
    snr_route = np.asarray(rows["snr"].values, np.float64) if by_true_snr else features["snr_est"].values[val]
    select = id_hash(ids, cfg.catalog.split_salt, stream=2) < cfg.gates.select_fraction
    if val.size < cfg.gates.min_val_rows or select.sum() < 2 or (~select).sum() < cfg.gates.min_fit_rows:
        warnings.warn(f"only {val.size} usable val rows: gates are not fitted (predict needs a gate)", stacklevel=3)
        return {}, meta
    coef, icpt = model.projection()
    (proj,) = compute(expert_predictions(src, coef, icpt, val_local), client=client,
                      label=f"gate table: {val.size} val rows x {coef.shape[0]} projections", progress=progress)
    if after_table is not None:
        after_table()
    n_exp = len(model.specs)
    pred, pca = proj[:, :n_exp], proj[:, n_exp:]
    feats = np.column_stack([features[c].values[val] for c in FEATURE_NAMES])
    table = gate_inputs(feats, pca)
    s_b, p_b = routing_bins(rows, edges, np.nan_to_num(snr_route, nan=0.0))
    # the gates fit on at most gates.max_fit_rows of the other val rows (hash-selected; the selection rows all stay)
    fit_rows = ~select
    if cfg.gates.max_fit_rows is not None and fit_rows.sum() > cfg.gates.max_fit_rows:
        h = id_hash(ids, cfg.catalog.split_salt, stream=6)
        fit_rows &= h <= np.sort(h[fit_rows])[cfg.gates.max_fit_rows - 1]
    use = fit_rows | select
    gates, selection, default = fit_gates(model, {k: v[use] for k, v in table.items()}, pred[use], y[use],
                                          s_b[use], p_b[use], select[use], cfg.gates)
    snr_est = features["snr_est"].values[val]
    for gate in gates.values():  # sigma calibrated on the val rows held out of the gate fits, as deployed
        out = apply_model_gate(model, gate, table, pred)
        gate.info["sigma_calibration"] = calibrate_sigma(y - out["yhat"], out["sigma"], out["yhat"], snr_est,
                                                         edges["snr_edges"], cfg.gates.calibration_min_rows,
                                                         calibrate=select)
    gate_table = xr.Dataset(
        {"quality": (("spectrum", "quality_feature"), table["quality"]),
         "physical": (("spectrum", "physical_feature"), table["physical"]),
         "expert_pred": (("spectrum", "expert"), pred), "y": ("spectrum", y),
         "snr_bin": ("spectrum", s_b), "phys_bin": ("spectrum", p_b), "select": ("spectrum", select),
         "gate_fit": ("spectrum", fit_rows)},
        coords={"spectrum": ids},
        # names as JSON attributes: zarr v3 has no stable string dtype yet
        attrs={"quality_feature": json.dumps(list(QUALITY_FEATURES)),
               "physical_feature": json.dumps(physical_names(n_pca)),
               "expert": json.dumps([s.name for s in model.specs])})
    gate_table.to_zarr(model_dir / "gate_table.zarr", mode="w", zarr_format=3, consolidated=False)
    consolidate(model_dir / "gate_table.zarr")
    meta["fitted"] = {name: {"family": g.spec.family, "inputs": list(g.spec.inputs), "kind": g.kind,
                             "n_classes": g.n_classes, "experts": [model.specs[i].name for i in
                                                                   model.members(g.spec.family)], **g.info}
                      for name, g in gates.items()}
    meta["selection"] = selection
    meta["default"] = default
    meta["val_rows"] = {"fit": int(fit_rows.sum()), "select": int(select.sum()),
                        "not_used_above_max_fit_rows": int((~use).sum())}
    return gates, meta


