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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from dask.utils import parse_bytes

from .audit import write_audit
from .baselines import (
    BASELINES,
    TERM_NAMES,
    baselines_dataset,
    solve_baselines,
)
from .bins import cell_index, phys_bin, phys_bin_names, snr_bin
from .cache import CACHE_DIR, cached_rows, open_row_cache, plan_row_cache, remove_row_cache
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
from .reduce import SnrRouting, auto_chains, features_dataset, fold_blas_pieces, one_pass
from .split import TRAIN, VAL, id_hash
from .stats import SufficientStats, tri_size
from .store import (
    MODEL_VERSION,
    Model,
    routing_bins,
    rows_source,
    save_model,
    versions,
)

__all__ = ["fit_model", "assemble_model", "auto_checkpoint_every"]


def _n_threads(client) -> int:
    if client is None:
        return os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))


def _threads_per_worker(client) -> int:
    if client is None:
        return os.cpu_count() or 1
    return max(1, min(client.nthreads().values()))


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
              audit_out: str | Path | None = None) -> Model:
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

    Returns
    -------
    Model
    """
    model_dir = Path(model_dir).absolute()  # checkpoints and the row cache are written by workers
    with claimed(model_dir, "model", "snrmoe fit", overwrite=overwrite, resume=resume, replace_model=replace_model):
        return _fit_model(catalog, model_dir, cfg, client=client, progress=progress, resume=resume,
                          audit_out=audit_out)


def _fit_model(catalog, model_dir: Path, cfg: Config, *, client, progress: bool, resume: bool, audit_out) -> Model:
    t_start = time.perf_counter()
    target = cfg.fit.target
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog, routes_by_snr=True)
    check_workers_see(client, catalog, cfg.cluster.connect_timeout)  # before any task reads it
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    edges = bin_edges(ds, cfg.catalog)
    model_dir.mkdir(parents=True, exist_ok=True)  # only once the catalog is known to be fit for the fit
    (model_dir / "model.json").unlink(missing_ok=True)  # a partial rerun must not look complete
    snr_names, phys_names = list(cfg.catalog.snr_bin_names), phys_bin_names(edges["teff_edges"], edges["mh_edges"])
    n_snr = len(snr_names)
    n_cells = len(phys_names) * n_snr

    # the val and frozen-test rows are cached by whichever pass reads the chunks first (gates, evaluate)
    if not resume:
        remove_row_cache(model_dir / CACHE_DIR)
    cache_keep = cached_rows(ds, cfg.fit.cache_max_val_rows, cfg.catalog.split_salt)
    row_cache = plan_row_cache(ds, cache_keep, model_dir / CACHE_DIR, np.r_[0, np.cumsum(ds["flux"].chunks[0])],
                               {"max_val_rows": cfg.fit.cache_max_val_rows,
                                "split": cfg.catalog.model_dump(mode="json")})
    timings: dict[str, float] = {}
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
    stats_d, feats_d, bstats_d, audit_d = one_pass(
        ds, y, cell, n_cells=n_cells, chains=chains, flush_rows=cfg.fit.flush_rows, precision=cfg.fit.precision,
        min_good_fraction=cfg.catalog.min_good_fraction, meta=meta_stats,
        blas_pieces=cfg.fit.blas_pieces or fold_blas_pieces(threads, chains, _threads_per_worker(client)),
        baselines=baselines,
        checkpoint=checkpoint, read_ahead=cfg.fit.read_ahead, row_cache=row_cache, routing=routing, audit=audit)
    specs = expert_specs(snr_names, phys_names)
    # one solve at a time with all the worker's cores in the BLAS (the statistics live on one worker). The
    # audit's and the baselines' solves join the queue; the audit's go first, so its Gram matrices (10 packed
    # triangles, 0.67 GB at P = 4096) are released before the experts' solves add their buffers
    blas = _threads_per_worker(client)
    serial = dask.delayed(with_blas_threads, pure=True)
    audit_sol_d = (serial(blas, None, audit_solutions, audit_d, audit.n_groups, cfg.fit,
                          dask_key_name=f"solve audit-{stats_d.key}") if audit is not None else dask.delayed(None))
    fits_d = fit_experts(stats_d, specs, cfg.fit.alphas_relative, cfg.fit.min_cell_rows, cfg.fit.max_df_fraction,
                         cfg.fit.alpha_search_precision, blas_threads=blas, one_at_a_time=True,
                         after=audit_sol_d if audit is not None else None)
    pca_d = dask.delayed(pca_from_stats)(stats_d, cfg.gates.n_pca) if cfg.gates.n_pca else dask.delayed(None)
    last = list(fits_d.values())[-1]
    base_d = dask.delayed(None)
    if baselines:
        base_d = last = serial(blas, last, _fit_and_save_baselines, stats_d, bstats_d, cfg.fit.alphas_relative,
                               cfg.fit.max_df_fraction, cfg.fit.alpha_search_precision,
                               str(model_dir / "baseline_stats"), dask_key_name=f"solve baselines-{stats_d.key}")
    # the statistics are written after the solves, not beside them: a concurrent 2.3 GB write slowed the
    # solves' BLAS threads (default job: experts 67 s in-process, 79 s on the worker)
    saved_d = serial(None, last, _save_stats, stats_d,
                     str(model_dir / "stats.zarr"), dask_key_name=f"save stats-{stats_d.key}")
    clock_d = dask.delayed(_clock)(stats_d)  # a cheap task that runs as soon as the pass has finished
    t0, t0_unix = time.perf_counter(), time.time()
    feature_blocks, fits, saved, pca, base_fits, audit_sol, pass_end = compute(
        feats_d, fits_d, saved_d, pca_d, base_d, audit_sol_d, clock_d, client=client, progress=progress,
        label=f"one pass ({chains} accumulator chain(s)) + {len(specs)} experts + {len(baselines)} baselines"
              + (" + audit" if audit is not None else ""))
    timings["pass_and_fit_s"] = time.perf_counter() - t0
    timings["pass_s"] = pass_end - t0_unix  # the worker's clock: the same host, or NTP-close on a cluster
    release_memory(client)  # the statistics and the solve buffers are gone: the gate stage starts lean

    features = features_dataset(feature_blocks, ds, cfg.catalog.min_good_fraction)
    snr_route = np.asarray(ds["snr"].values, np.float64) if routing is None else features["snr_est"].values
    if audit is not None:
        t0 = time.perf_counter()
        frozen = np.flatnonzero(ds["frozen_test"].values)
        test_src, test_rows, _ = rows_source(model_dir, ds, frozen)
        test_features = np.concatenate(feature_blocks)[frozen]  # the pass's feature rows: not computed again
        write_audit(audit_result(audit_sol, test_src.isel(spectrum=test_rows).load(), audit, cfg, test_features),
                    audit_out, ds, cfg)
        timings["audit_s"] = time.perf_counter() - t0
    features["split"] = ds["split"]
    features.to_zarr(model_dir / "features.zarr", mode="w", zarr_format=3, consolidated=False)
    fallbacks = {name: f["fallback"] for name, f in fits.items() if f["fallback"]}
    for name, parent in fallbacks.items():
        warnings.warn(f"expert '{name}' has {fits[name]['n']:.0f} train rows (< min_cell_rows="
                      f"{cfg.fit.min_cell_rows}); it falls back to '{parent}'", stacklevel=2)
    baselines_ds = baselines_dataset(base_fits, ds["wavelength"].values) if base_fits else None
    model = assemble_model(
        specs, fits, ds["wavelength"].values, pca=pca, edges=edges, snr_names=snr_names, phys_names=phys_names,
        target=target, min_good_fraction=cfg.catalog.min_good_fraction,
        snr_routing_source=snr_source,
        baselines={"fitted": [b for b in BASELINES if b in (base_fits or {})], "terms": list(TERM_NAMES),
                   "alpha": {b: f["alpha"] for b, f in (base_fits or {}).items()},
                   "at_grid_edge": {b: f["at_grid_edge"] for b, f in (base_fits or {}).items()}},
        train_rows=int((cell >= 0).sum()),
        train_rows_excluded_unusable=saved["meta"].get("train_rows_excluded_unusable", 0),
        rows_per_cell=saved["n_per_cell"],
        accumulation={"chains": chains, "precision": cfg.fit.precision, "flush_rows": cfg.fit.flush_rows,
                      "checkpoint_every": checkpoint.every if checkpoint else 0,
                      "chunks_from_checkpoint": saved["meta"].get("chunks_from_checkpoint", 0),
                      "chunks_folded": saved["meta"].get("chunks_folded", 0),
                      "feature_blocks_from_checkpoint": features_resumed},
        catalog=str(catalog), catalog_rows=n, config=cfg.model_dump(mode="json"), versions=versions())
    experts, meta = model.experts, model.meta
    t0 = time.perf_counter()
    gates, meta["gates"] = _fit_gate_stage(model, ds, features, y, snr_route, edges, cfg, model_dir, client, progress)
    timings["gates_s"] = time.perf_counter() - t0
    meta["timings"] = {**timings, "total_s": time.perf_counter() - t_start}
    save_model(model_dir, experts, meta, gates, baselines_ds)
    if checkpoint is not None:
        checkpoint.clear()  # the statistics are in stats.zarr now
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


def _fit_gate_stage(model: Model, ds: xr.Dataset, features: xr.Dataset, y: np.ndarray, snr_route: np.ndarray,
                    edges: dict, cfg: Config, model_dir: Path, client, progress: bool) -> tuple[dict, dict]:
    """Project the usable val rows on every expert (+ PCA), write the gate table, fit the gates."""
    n_pca = cfg.gates.n_pca
    meta: dict[str, Any] = {"fallback_tau": cfg.gates.fallback_tau, "snr_cliff": cfg.gates.snr_cliff,
                            "inputs": {"quality": list(QUALITY_FEATURES), "physical": physical_names(n_pca)},
                            "fitted": {}, "default": None, "selection": {}}
    src = open_row_cache(model_dir / CACHE_DIR, ds, role="val")  # as the pass cached them: no second read
    meta["val_rows_source"] = "row cache" if src is not None else "catalog (no complete row cache)"
    if src is None:
        src = ds
    pos = src["position"].values if "position" in src else np.arange(src.sizes["spectrum"])
    val_local = np.flatnonzero((src["split"].values == VAL) & features["usable"].values[pos])
    val = pos[val_local]
    select = id_hash(ds["spectrum"].values[val], cfg.catalog.split_salt, stream=2) < cfg.gates.select_fraction
    if val.size < cfg.gates.min_val_rows or select.sum() < 2 or (~select).sum() < cfg.gates.min_fit_rows:
        warnings.warn(f"only {val.size} usable val rows: gates are not fitted (predict needs a gate)", stacklevel=3)
        return {}, meta
    coef, icpt = model.projection()
    (proj,) = compute(expert_predictions(src, coef, icpt, val_local), client=client,
                      label=f"gate table: {val.size} val rows x {coef.shape[0]} projections", progress=progress)
    n_exp = len(model.specs)
    pred, pca = proj[:, :n_exp], proj[:, n_exp:]
    feats = np.column_stack([features[c].values[val] for c in FEATURE_NAMES])
    table = gate_inputs(feats, pca)
    s_b, p_b = routing_bins(ds.isel(spectrum=val), edges, np.nan_to_num(snr_route[val], nan=0.0))
    # the gates fit on at most gates.max_fit_rows of the other val rows (hash-selected; the selection rows all stay)
    fit_rows = ~select
    if cfg.gates.max_fit_rows is not None and fit_rows.sum() > cfg.gates.max_fit_rows:
        h = id_hash(ds["spectrum"].values[val], cfg.catalog.split_salt, stream=6)
        fit_rows &= h <= np.sort(h[fit_rows])[cfg.gates.max_fit_rows - 1]
    use = fit_rows | select
    gates, selection, default = fit_gates(model, {k: v[use] for k, v in table.items()}, pred[use], y[val][use],
                                          s_b[use], p_b[use], select[use], cfg.gates)
    snr_est = features["snr_est"].values[val]
    for gate in gates.values():  # sigma calibrated on the val rows held out of the gate fits, as deployed
        out = apply_model_gate(model, gate, table, pred)
        gate.info["sigma_calibration"] = calibrate_sigma(y[val] - out["yhat"], out["sigma"], out["yhat"], snr_est,
                                                         edges["snr_edges"], cfg.gates.calibration_min_rows,
                                                         calibrate=select)
    gate_table = xr.Dataset(
        {"quality": (("spectrum", "quality_feature"), table["quality"]),
         "physical": (("spectrum", "physical_feature"), table["physical"]),
         "expert_pred": (("spectrum", "expert"), pred), "y": ("spectrum", y[val]),
         "snr_bin": ("spectrum", s_b), "phys_bin": ("spectrum", p_b), "select": ("spectrum", select),
         "gate_fit": ("spectrum", fit_rows)},
        coords={"spectrum": ds["spectrum"].values[val]},
        # names as JSON attributes: zarr v3 has no stable string dtype yet
        attrs={"quality_feature": json.dumps(list(QUALITY_FEATURES)),
               "physical_feature": json.dumps(physical_names(n_pca)),
               "expert": json.dumps([s.name for s in model.specs])})
    gate_table.to_zarr(model_dir / "gate_table.zarr", mode="w", zarr_format=3, consolidated=False)
    meta["fitted"] = {name: {"family": g.spec.family, "inputs": list(g.spec.inputs), "kind": g.kind,
                             "n_classes": g.n_classes, "experts": [model.specs[i].name for i in
                                                                   model.members(g.spec.family)], **g.info}
                      for name, g in gates.items()}
    meta["selection"] = selection
    meta["default"] = default
    meta["val_rows"] = {"fit": int(fit_rows.sum()), "select": int(select.sum()),
                        "not_used_above_max_fit_rows": int((~use).sum())}
    return gates, meta


