"""Fit and evaluate: the model store and the stages that write and read it.

Model store (``MODEL_DIR/``)::

    model.json      bin edges, expert names/families/parents/fallbacks, config,
                    provenance (catalog, rows, versions), per-cell row counts
    experts.zarr    coef (expert, wavelength), intercept, alpha, gcv,
                    resid_var, df, n_rows, at_grid_edge, and the PCA of the
                    train flux: pca_mean (wavelength), pca_components (pc,
                    wavelength) -- numbers only
    gates.zarr      one group per gate: parameters and input scalers
    baselines.zarr  the whitened and conditional control baselines: coef
                    (baseline, wavelength), term_coef (term), intercept, alpha
    baseline_stats/ their sufficient statistics (whitened.zarr, cross.zarr)
    gate_table.zarr the val rows' gate inputs, expert predictions and labels
    stats.zarr      the summed sufficient statistics (refit / append without
                    re-reading old rows)
    features.zarr   the per-spectrum feature table of the fitted catalog

Nothing is pickled: every file is zarr or JSON.
"""

from __future__ import annotations

import json
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

from .audit import audit_plan, audit_result, audit_solutions, write_audit
from .baselines import (
    BASELINES,
    TERM_NAMES,
    add_conditional_terms,
    baseline_predictions,
    baselines_dataset,
    solve_baselines,
)
from .bins import cell_index, phys_bin, phys_bin_names, snr_bin
from .cache import CACHE_DIR, cached_rows, open_row_cache, plan_row_cache, remove_row_cache
from .catalog import CatalogError, bin_edges, open_catalog
from .ceiling import efficiency
from .checkpoint import Checkpoint, plan_token
from .cluster import compute
from .config import Config
from .evaluate import expert_predictions, r2_score, regression_metrics, route_oracle
from .experts import (
    FAMILIES,
    ORACLE_FAMILIES,
    ExpertSpec,
    expert_specs,
    experts_dataset,
    fit_experts,
    with_blas_threads,
)
from .features import FEATURE_NAMES, QUALITY_FEATURES, feature_table
from .gates import GATE_SPECS, ORACLE_OF, Gate, entropy, mixture
from .mixture import (
    GAUSS_1SIGMA,
    GAUSS_2SIGMA,
    apply_model_gate,
    calibrate_sigma,
    fit_gates,
    gate_inputs,
    gate_tau,
    physical_names,
)
from .pca import pca_from_stats
from .reduce import SnrRouting, auto_chains, features_dataset, fold_blas_threads, one_pass
from .split import TRAIN, VAL, id_hash
from .stats import SufficientStats

__all__ = ["MODEL_VERSION", "Model", "fit_model", "load_model", "evaluate_model", "ModelError"]

MODEL_VERSION = "2"


class ModelError(ValueError):
    """A model store is missing, incomplete or inconsistent."""


class Model:
    """A loaded model store: experts and gates as arrays plus their JSON description."""

    def __init__(self, experts: xr.Dataset, meta: dict[str, Any], gates: dict[str, Gate] | None = None,
                 baselines: xr.Dataset | None = None):
        self.experts = experts
        self.meta = meta
        self.path: Path | None = None  # the store it was loaded from (load_model)
        self.baselines = baselines
        fields = ("name", "family", "member", "parent", "shrink")
        self.specs = [ExpertSpec(cells=tuple(s["cells"]), **{k: s[k] for k in fields}) for s in meta["experts"]]
        self.index = {s.name: i for i, s in enumerate(self.specs)}
        self.gates = gates or {}

    @property
    def default_gate(self) -> str:
        return self.meta["gates"]["default"]

    def members(self, family: str) -> np.ndarray:
        """Expert indices of a family in class order (S/N bins, physical bins, or phys x S/N cells)."""
        if family == "global":
            return np.array([self.index["global"]])
        if family == "oracle_snr":
            return np.array([self.index[f"oracle_snr/{s}"] for s in self.snr_names])
        if family == "oracle_phys":
            return np.array([self.index[f"oracle_phys/{p}"] for p in self.phys_names])
        if family in ("oracle_joint", "hierarchical"):
            return np.array([self.index[f"{family}/{p}|{s}"] for p in self.phys_names for s in self.snr_names])
        raise ValueError(f"unknown family '{family}' (known: {FAMILIES})")

    def class_labels(self, family: str, snr_b: np.ndarray, phys_b: np.ndarray) -> np.ndarray:
        """True class of each row within ``family`` (the position in :meth:`members`)."""
        if family == "global":
            return np.zeros(snr_b.shape, np.int64)
        if family == "oracle_snr":
            return np.asarray(snr_b, np.int64)
        if family == "oracle_phys":
            return np.asarray(phys_b, np.int64)
        return np.asarray(phys_b, np.int64) * len(self.snr_names) + np.asarray(snr_b, np.int64)

    def projection(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows to project flux on: every expert, then the PCA axes (coef (E + n_pca, P), intercept)."""
        coef = self.experts["coef"].values
        icpt = self.experts["intercept"].values
        if "pca_components" in self.experts:
            comps = self.experts["pca_components"].values
            coef = np.vstack([coef, comps])
            icpt = np.concatenate([icpt, -comps @ self.experts["pca_mean"].values])
        return np.asarray(coef, np.float64), np.asarray(icpt, np.float64)

    @property
    def edges(self) -> dict[str, list[float]]:
        return self.meta["bin_edges"]

    @property
    def snr_names(self) -> list[str]:
        return self.meta["snr_bin_names"]

    @property
    def phys_names(self) -> list[str]:
        return self.meta["phys_bin_names"]

    def family_index(self, family: str, snr_b: np.ndarray, phys_b: np.ndarray) -> np.ndarray:
        """Expert index per row when routed by (true) bins within ``family``."""
        return self.members(family)[self.class_labels(family, snr_b, phys_b)]


# ------------------------------------------------------------------ helpers
def _routing_bins(ds: xr.Dataset, edges: dict, snr_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (snr_bin(snr_values, edges["snr_edges"]),
            phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64))


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


def save_gates(path: Path, gates: dict[str, Gate]) -> None:
    """One xarray group per gate in ``gates.zarr`` (plain arrays, no pickle)."""
    for name, gate in gates.items():
        arrays = gate.to_arrays()
        ds = xr.Dataset({k: tuple((tuple(f"{k}_{i}" for i in range(v.ndim)), v)) for k, v in arrays.items()})
        ds.to_zarr(path, group=name, mode="w", zarr_format=3, consolidated=False)


def load_gates(path: Path, gates_meta: dict) -> dict[str, Gate]:
    """Read and validate the gates listed in ``model.json``."""
    out = {}
    for name, info in gates_meta.get("fitted", {}).items():
        if name not in GATE_SPECS:
            raise ModelError(f"{path}: unknown gate '{name}'")
        spec = GATE_SPECS[name]
        try:
            arrays = {k: v.values for k, v in xr.open_zarr(path, group=name, consolidated=False).load().items()}
            gate = Gate.from_arrays(spec, info["kind"], int(info["n_classes"]), arrays, info)
            probe = {"quality": np.zeros((1, len(gates_meta["inputs"]["quality"]))),
                     "physical": np.zeros((1, len(gates_meta["inputs"]["physical"])))}
            w = gate.weights(probe)
        except Exception as exc:  # noqa: BLE001 - a damaged gate is one problem to the user
            raise ModelError(f"{path}: gate '{name}' is unreadable or inconsistent: {exc}") from None
        if w.shape != (1, gate.n_classes) or not np.all(np.isfinite(w)):
            raise ModelError(f"{path}: gate '{name}' gives weights of shape {w.shape}, expected (1, {gate.n_classes})")
        for k, v in gate.params.items():
            if not np.all(np.isfinite(v)):
                raise ModelError(f"{path}: gate '{name}' parameter '{k}' has non-finite values")
        out[name] = gate
    return out


def save_model(model_dir: Path, experts: xr.Dataset, meta: dict, gates: dict[str, Gate] | None = None,
               baselines: xr.Dataset | None = None) -> None:
    """Write ``experts.zarr``, ``gates.zarr``, ``baselines.zarr`` and then ``model.json`` (the completion marker)."""
    experts.to_zarr(model_dir / "experts.zarr", mode="w", zarr_format=3, consolidated=False)
    if gates:
        save_gates(model_dir / "gates.zarr", gates)
    if baselines is not None:
        baselines.to_zarr(model_dir / "baselines.zarr", mode="w", zarr_format=3, consolidated=False)
    (model_dir / "model.json").write_text(json.dumps(meta, indent=2))


def load_model(model_dir: str | Path) -> Model:
    """Load and validate a model store (no pickle anywhere).

    Raises
    ------
    ModelError
        If ``model.json`` or ``experts.zarr`` is missing or they disagree.
    """
    model_dir = Path(model_dir)
    meta_path = model_dir / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"{model_dir}: no model.json (not a model store, or the fit did not complete)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path}: not valid JSON ({exc})") from None
    if meta.get("kind") != "snrmoe.model" or str(meta.get("version")) != MODEL_VERSION:
        raise ModelError(f"{meta_path}: not a snrmoe model store of version {MODEL_VERSION}")
    try:
        experts = xr.open_zarr(model_dir / "experts.zarr", consolidated=False).load()
    except Exception as exc:  # noqa: BLE001 - any unreadable store is the same problem to a user
        raise ModelError(f"{model_dir}/experts.zarr unreadable: {exc}") from None
    n_exp = len(meta["experts"])
    if experts.sizes.get("expert") != n_exp:
        raise ModelError(f"{model_dir}: experts.zarr has {experts.sizes.get('expert')} experts, model.json {n_exp}")
    if experts.sizes.get("wavelength") != meta["n_pixels"]:
        raise ModelError(f"{model_dir}: experts.zarr has {experts.sizes.get('wavelength')} pixels, "
                         f"model.json says {meta['n_pixels']}")
    for name in ("coef", "intercept", "resid_var"):
        if not np.all(np.isfinite(experts[name].values)):
            raise ModelError(f"{model_dir}: experts.zarr '{name}' has non-finite values")
    gates = load_gates(model_dir / "gates.zarr", meta.get("gates", {}))
    model = Model(experts, meta, gates, _load_baselines(model_dir, meta))
    model.path = model_dir
    return model


def _load_baselines(model_dir: Path, meta: dict) -> xr.Dataset | None:
    """Read and validate ``baselines.zarr`` if ``model.json`` lists baselines."""
    names = meta.get("baselines", {}).get("fitted", [])
    if not names:
        return None
    try:
        ds = xr.open_zarr(model_dir / "baselines.zarr", consolidated=False).load()
        stored = json.loads(ds.attrs["baseline"])
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{model_dir}/baselines.zarr unreadable: {exc}") from None
    if stored != names or ds["coef"].shape != (len(names), meta["n_pixels"]):
        raise ModelError(f"{model_dir}/baselines.zarr holds {stored} with coef {ds['coef'].shape}; model.json "
                         f"expects {names} over {meta['n_pixels']} pixels")
    for name in ("coef", "intercept", "term_coef"):
        if not np.all(np.isfinite(ds[name].values)):
            raise ModelError(f"{model_dir}/baselines.zarr '{name}' has non-finite values")
    return ds


# ---------------------------------------------------------------------- fit
def fit_model(catalog: str | Path, model_dir: str | Path, cfg: Config, *, client=None,
              progress: bool = True, resume: bool = False, audit_out: str | Path | None = None) -> Model:
    """Features + sufficient statistics in one pass, then every expert family.

    Parameters
    ----------
    catalog : path-like
        Catalog store with labels ``logg``, ``teff``, ``mh`` (and ``snr``, the
        true S/N used for oracle cells; without it the S/N estimate is used).
    model_dir : path-like
        Output model store (created).
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
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").unlink(missing_ok=True)  # a partial rerun must not look complete
    target = cfg.fit.target
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog)
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    edges = bin_edges(ds, cfg.catalog)
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
        # NaN S/N only occurs for spectra without good pixels, which the fold leaves out anyway
        s_b = snr_bin(np.nan_to_num(np.asarray(ds["snr"].values, np.float64), nan=0.0), edges["snr_edges"])
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
        blas_threads=fold_blas_threads(threads, chains), baselines=baselines,
        checkpoint=checkpoint, row_cache=row_cache, routing=routing, audit=audit)
    specs = expert_specs(snr_names, phys_names)
    # one solve at a time with all the worker's cores in the BLAS (the statistics live on one worker)
    blas = _threads_per_worker(client)
    fits_d = fit_experts(stats_d, specs, cfg.fit.alphas_relative, cfg.fit.min_cell_rows, cfg.fit.max_df_fraction,
                         cfg.fit.alpha_search_precision, blas_threads=blas, one_at_a_time=True)
    saved_d = dask.delayed(_save_stats)(stats_d, str(model_dir / "stats.zarr"))
    pca_d = dask.delayed(pca_from_stats)(stats_d, cfg.gates.n_pca) if cfg.gates.n_pca else dask.delayed(None)
    # the baselines' and the audit's solves join the experts' queue: one O(P^3) solve in memory at a time
    serial = dask.delayed(with_blas_threads, pure=True)
    last = list(fits_d.values())[-1]
    base_d = dask.delayed(None)
    if baselines:
        base_d = last = serial(blas, last, _fit_and_save_baselines, stats_d, bstats_d, cfg.fit.alphas_relative,
                               cfg.fit.max_df_fraction, cfg.fit.alpha_search_precision,
                               str(model_dir / "baseline_stats"), dask_key_name=f"solve baselines-{stats_d.key}")
    audit_sol_d = (serial(blas, last, audit_solutions, audit_d, audit.n_groups, cfg.fit,
                          dask_key_name=f"solve audit-{stats_d.key}") if audit is not None else dask.delayed(None))
    clock_d = dask.delayed(_clock)(stats_d)  # a cheap task that runs as soon as the pass has finished
    t0, t0_unix = time.perf_counter(), time.time()
    feature_blocks, fits, saved, pca, base_fits, audit_sol, pass_end = compute(
        feats_d, fits_d, saved_d, pca_d, base_d, audit_sol_d, clock_d, client=client, progress=progress,
        label=f"one pass ({chains} accumulator chain(s)) + {len(specs)} experts + {len(baselines)} baselines"
              + (" + audit" if audit is not None else ""))
    timings["pass_and_fit_s"] = time.perf_counter() - t0
    timings["pass_s"] = pass_end - t0_unix  # the worker's clock: the same host, or NTP-close on a cluster

    features = features_dataset(feature_blocks, ds, cfg.catalog.min_good_fraction)
    snr_route = np.asarray(ds["snr"].values, np.float64) if routing is None else features["snr_est"].values
    if audit is not None:
        t0 = time.perf_counter()
        test_src, test_rows, _ = _rows_source(model_dir, ds, np.flatnonzero(ds["frozen_test"].values))
        write_audit(audit_result(audit_sol, test_src.isel(spectrum=test_rows).load(), audit, cfg), audit_out, ds,
                    cfg)
        timings["audit_s"] = time.perf_counter() - t0
    features["split"] = ds["split"]
    features.to_zarr(model_dir / "features.zarr", mode="w", zarr_format=3, consolidated=False)
    fallbacks = {name: f["fallback"] for name, f in fits.items() if f["fallback"]}
    for name, parent in fallbacks.items():
        warnings.warn(f"expert '{name}' has {fits[name]['n']:.0f} train rows (< min_cell_rows="
                      f"{cfg.fit.min_cell_rows}); it falls back to '{parent}'", stacklevel=2)
    edge_hits = [name for name, f in fits.items() if f["at_grid_edge"]]
    experts = experts_dataset(specs, fits, ds["wavelength"].values)
    if pca is not None:
        experts["pca_mean"] = ("wavelength", pca["mean"])
        experts["pca_components"] = (("pc", "wavelength"), pca["components"])
        experts["pca_explained_variance"] = ("pc", pca["explained_variance"])
    baselines_ds = baselines_dataset(base_fits, ds["wavelength"].values) if base_fits else None
    from .pipeline import versions  # local import: pipeline imports this module

    meta = {
        "kind": "snrmoe.model",
        "version": MODEL_VERSION,
        "target": target,
        "n_pixels": p,
        "wavelength_range": [float(ds["wavelength"][0]), float(ds["wavelength"][-1])],
        "bin_edges": edges,
        "snr_bin_names": snr_names,
        "phys_bin_names": phys_names,
        "snr_routing_source": snr_source,
        "experts": [{**asdict(s), "cells": list(s.cells), "fallback": fits[s.name]["fallback"]} for s in specs],
        "alpha_at_grid_edge": edge_hits,
        "baselines": {"fitted": [b for b in BASELINES if b in (base_fits or {})], "terms": list(TERM_NAMES),
                      "alpha": {b: f["alpha"] for b, f in (base_fits or {}).items()},
                      "at_grid_edge": {b: f["at_grid_edge"] for b, f in (base_fits or {}).items()}},
        "train_rows": int((cell >= 0).sum()),
        "train_rows_excluded_unusable": saved["meta"].get("train_rows_excluded_unusable", 0),
        "rows_per_cell": saved["n_per_cell"],
        "accumulation": {"chains": chains, "precision": cfg.fit.precision, "flush_rows": cfg.fit.flush_rows,
                         "checkpoint_every": checkpoint.every if checkpoint else 0,
                         "chunks_from_checkpoint": saved["meta"].get("chunks_from_checkpoint", 0),
                         "chunks_folded": saved["meta"].get("chunks_folded", 0),
                         "feature_blocks_from_checkpoint": features_resumed},
        "catalog": str(catalog),
        "catalog_rows": n,
        "min_good_fraction": cfg.catalog.min_good_fraction,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    model = Model(experts, meta)
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


def _checkpoint(model_dir: Path, cfg: Config, catalog, ds: xr.Dataset, y: np.ndarray, cell: np.ndarray, n_cells: int,
                chains: int, baselines: tuple[str, ...], resume: bool, audit=None) -> Checkpoint | None:
    """The pass's checkpoint directory (``None`` if ``fit.checkpoint_every`` is 0)."""
    per_chain = max(1, -(-len(ds["flux"].chunks[0]) // chains))
    every = cfg.fit.checkpoint_every if cfg.fit.checkpoint_every is not None else max(1, -(-per_chain // 4))
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
    src = open_row_cache(model_dir / CACHE_DIR, ds)  # the val rows as the pass cached them: no second read
    meta["val_rows_source"] = "row cache" if src is not None else "catalog (no complete row cache)"
    if src is None:
        src = ds
    pos = src["position"].values if "position" in src else np.arange(src.sizes["spectrum"])
    val_local = np.flatnonzero((src["split"].values == VAL) & features["usable"].values[pos])
    val = pos[val_local]
    select = id_hash(ds["spectrum"].values[val], cfg.catalog.split_salt, stream=2) < cfg.gates.select_fraction
    if val.size < 20 or select.sum() < 2 or (~select).sum() < 10:
        warnings.warn(f"only {val.size} usable val rows: gates are not fitted (predict needs a gate)", stacklevel=3)
        return {}, meta
    coef, icpt = model.projection()
    (proj,) = compute(expert_predictions(src, coef, icpt, val_local), client=client,
                      label=f"gate table: {val.size} val rows x {coef.shape[0]} projections", progress=progress)
    n_exp = len(model.specs)
    pred, pca = proj[:, :n_exp], proj[:, n_exp:]
    feats = np.column_stack([features[c].values[val] for c in FEATURE_NAMES])
    table = gate_inputs(feats, pca)
    s_b, p_b = _routing_bins(ds.isel(spectrum=val), edges, np.nan_to_num(snr_route[val], nan=0.0))
    gates, selection, default = fit_gates(model, table, pred, y[val], s_b, p_b, select, cfg.gates)
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
         "snr_bin": ("spectrum", s_b), "phys_bin": ("spectrum", p_b), "select": ("spectrum", select)},
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
    meta["val_rows"] = {"fit": int((~select).sum()), "select": int(select.sum())}
    return gates, meta


# ----------------------------------------------------------------- evaluate
def check_grid(model: Model, ds: xr.Dataset, catalog) -> None:
    """Refuse a catalog whose wavelength grid is not the model's."""
    if ds.sizes["wavelength"] != model.meta["n_pixels"] or not np.allclose(
            [float(ds["wavelength"][0]), float(ds["wavelength"][-1])], model.meta["wavelength_range"]):
        raise CatalogError(f"{catalog}: wavelength grid ({ds.sizes['wavelength']} px, "
                           f"{float(ds['wavelength'][0]):.1f}-{float(ds['wavelength'][-1]):.1f} A) differs from "
                           f"the model's ({model.meta['n_pixels']} px, {model.meta['wavelength_range']} A)")


def predict_catalog(model: Model, catalog: str | Path, out: str | Path, cfg: Config, *, gate: str | None = None,
                    client=None, progress: bool = True) -> xr.Dataset:
    """Apply the model to every spectrum of a catalog (labels not needed) and write a zarr.

    The store is written as ``OUT.partial`` and renamed when complete, so an
    interrupted predict never leaves an output that looks finished.
    """
    import shutil

    from .mixture import predict_dataset

    if not model.gates:
        raise ModelError("this model has no fitted gates (too few val rows at fit time); refit with a val split")
    ds = open_catalog(catalog, require_labels=(), config=cfg.catalog)
    check_grid(model, ds, catalog)
    pred = predict_dataset(model, ds, gate)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    job = pred.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
    compute(job, client=client, label=f"predict {ds.sizes['spectrum']} spectra (gate {pred.attrs['gate']})",
            progress=progress)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return xr.open_zarr(out, consolidated=False)


def _rows_source(model_dir: Path | None, ds: xr.Dataset, rows: np.ndarray) -> tuple[xr.Dataset, np.ndarray, str]:
    """Where to read catalog rows (the frozen test): the model's row cache when it holds every one of them
    (written from this catalog by the fit's pass), else the catalog; with the rows' positions there."""
    cache = open_row_cache(model_dir / CACHE_DIR, ds) if model_dir is not None else None
    if cache is not None:
        pos = cache["position"].values
        at = np.searchsorted(pos, rows)
        if np.all(at < pos.size) and np.array_equal(pos[np.minimum(at, pos.size - 1)], rows):
            return cache, at, "row cache"
    return ds, rows, "catalog"


def evaluate_model(model: Model, catalog: str | Path, cfg: Config, *, client=None, progress: bool = True,
                   predictions_out: str | Path | None = None) -> dict:
    """Score every family on the frozen test subset; returns the metrics dict.

    With ``predictions_out``, the usable test rows' labels, bins and every
    model's prediction are written there (zarr; the report's scatter and
    heatmap figures read it).
    """
    target = model.meta["target"]
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog)
    check_grid(model, ds, catalog)
    rows = np.flatnonzero(ds["frozen_test"].values)
    if rows.size == 0:
        raise CatalogError(f"{catalog}: the frozen test subset is empty")
    src, rows, rows_source = _rows_source(model.path, ds, rows)
    coef, icpt = model.projection()
    pred_d = expert_predictions(src, coef, icpt, rows)
    sub = src.isel(spectrum=rows)
    feats_d = feature_table(sub, cfg.catalog.min_good_fraction)
    lazy = {"proj": pred_d, "feats": feats_d}
    if model.baselines is not None:
        lazy["base"] = baseline_predictions(src, model.baselines, rows)
    with_ceiling = cfg.ceiling.enabled and str(ds.attrs.get("simulated", "")).lower() == "true"
    # the ceiling's spectra are drawn from the labels, so their flux comes from this same read of the test rows
    ceiling_rows = ceiling_spectra(sub, model.edges, cfg) if with_ceiling else np.empty(0, np.int64)
    if ceiling_rows.size:
        lazy["ceiling_flux"] = sub["flux"].data[ceiling_rows]
    done = dict(zip(lazy, compute(*lazy.values(), client=client, label=f"predict {rows.size} test rows",
                                  progress=progress)))
    proj, feats, base_pred = done["proj"], done["feats"], done.get("base")
    ceiling_flux = done.get("ceiling_flux", np.empty((0, ds.sizes["wavelength"])))
    usable = feats["usable"].values
    y = np.asarray(sub[target].values, np.float64)
    snr_values = np.asarray(sub["snr"].values if "snr" in sub else feats["snr_est"].values, np.float64)
    s_b, p_b = _routing_bins(sub, model.edges, np.nan_to_num(snr_values, nan=0.0))
    n_exp = len(model.specs)
    feat_rows = np.column_stack([feats[c].values for c in FEATURE_NAMES])[usable]
    table = gate_inputs(feat_rows, proj[usable, n_exp:])
    pred, y, s_b, p_b = proj[usable, :n_exp], y[usable], s_b[usable], p_b[usable]
    base_names = json.loads(model.baselines.attrs["baseline"]) if model.baselines is not None else []
    if base_names:  # the conditional model's S/N terms come from the features computed above (no second kernel)
        base_pred = add_conditional_terms(base_pred[usable], feat_rows, model.baselines).T
    metrics: dict[str, Any] = {
        "n_test": int(usable.sum()),
        "n_test_excluded_unusable": int((~usable).sum()),
        "target": target,
        "catalog": str(catalog),
        "test_rows_source": rows_source,
        "snr_routing_source": "snr (true S/N label)" if "snr" in sub else "snr_est",
        "models": {},
    }
    yhats: dict[str, np.ndarray] = {}
    for family in FAMILIES:
        yhats[family] = route_oracle(pred, model.family_index(family, s_b, p_b))
        metrics["models"][family] = regression_metrics(y, yhats[family], s_b, p_b, model.snr_names,
                                                       model.phys_names)
    for j, name in enumerate(base_names):
        yhats[name] = base_pred[j]
        metrics["models"][name] = regression_metrics(y, yhats[name], s_b, p_b, model.snr_names, model.phys_names)
        metrics["models"][name]["baseline"] = True
    softs: dict[str, np.ndarray] = {}
    if model.gates:
        metrics["default_gate"] = model.default_gate
        metrics["gate_entropy_by_snr_bin"] = {}
        for name, gate in model.gates.items():
            m, entropy_by_bin, yhats[name], softs[name] = gate_metrics(model, gate, table, pred, y, s_b, p_b,
                                                                       feat_rows[:, FEATURE_NAMES.index("snr_est")])
            metrics["models"][name] = m
            metrics["gate_entropy_by_snr_bin"][name] = entropy_by_bin
    g = metrics["models"]["global"]["r2"]
    metrics["delta_r2_vs_global"] = {f: (m["r2"] - g if m["r2"] is not None and g is not None else None)
                                     for f, m in metrics["models"].items()}
    add_standard_errors(metrics, y, yhats, softs, s_b, model.snr_names, cfg.evaluate)
    if with_ceiling:
        t0 = time.perf_counter()
        keep = usable[ceiling_rows]
        ceiling = ceiling_stage(sub, model.edges, cfg, client=client, progress=progress, usable=usable,
                                rows=ceiling_rows[keep], flux=np.asarray(ceiling_flux)[keep])
        metrics["ceiling_seconds"] = time.perf_counter() - t0
        metrics["ceiling"] = ceiling["summary"]
        for name, m in metrics["models"].items():
            m["ceiling"] = "flux_oracle_bins" if name in ORACLE_FAMILIES else "flux"
            m["efficiency"] = efficiency(m, ceiling["summary"][m["ceiling"]])
    if predictions_out is not None:
        keep = np.flatnonzero(usable)
        names = list(yhats)
        out = xr.Dataset(
            {"logg": ("spectrum", y), "yhat": (("spectrum", "model"), np.column_stack([yhats[k] for k in names])),
             "snr_bin": ("spectrum", s_b), "phys_bin": ("spectrum", p_b),
             "snr_est": ("spectrum", feats["snr_est"].values[keep]),
             **({"snr": ("spectrum", np.asarray(sub["snr"].values)[keep])} if "snr" in sub else {})},
            coords={"spectrum": sub["spectrum"].values[keep]},
            attrs={"model": json.dumps(names), "snr_bin_names": json.dumps(model.snr_names),
                   "phys_bin_names": json.dumps(model.phys_names)})
        out.to_zarr(predictions_out, mode="w", zarr_format=3, consolidated=False)
    return metrics


def ceiling_spectra(ds: xr.Dataset, edges: dict, cfg: Config) -> np.ndarray:
    """Positions in ``ds`` of the spectra the Bayes ceiling samples: up to ``spectra_per_snr_bin`` per true S/N bin."""
    from .ceiling import choose_spectra

    snr_b = snr_bin(np.asarray(ds["snr"].values, np.float64), edges["snr_edges"])
    return choose_spectra(snr_b, len(cfg.catalog.snr_bin_names), cfg.ceiling.spectra_per_snr_bin, cfg.ceiling.seed)


def ceiling_stage(ds: xr.Dataset, edges: dict, cfg: Config, *, client=None, progress: bool = True,
                  usable: np.ndarray | None = None, rows: np.ndarray | None = None,
                  flux: np.ndarray | None = None) -> dict:
    """Both Bayes ceilings of logg for the rows of ``ds`` (a simulated catalog's test rows).

    The spectra of :func:`ceiling_spectra` (or ``rows``, with their already
    read ``flux``) have their posteriors importance-sampled
    (:func:`~snrmoe_dask.ceiling.posterior_block`). Without ``flux`` the
    drawn rows' flux is read here, each chunk that holds one once. ``usable``
    restricts the rows whose logg variance R²_max is measured against.

    Returns ``{"summary": ceiling_summary(...), "post": (m, 4) array, "spectrum": ids of the m drawn rows}``.
    """
    from .ceiling import bayes_ceiling_tasks, ceiling_summary

    snr_names = list(cfg.catalog.snr_bin_names)
    n_snr = len(snr_names)
    snr_b = snr_bin(np.asarray(ds["snr"].values, np.float64), edges["snr_edges"])
    p_b = phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64)
    if rows is None:
        rows = ceiling_spectra(ds, edges, cfg)
    if flux is None:
        (flux,) = compute(ds["flux"].data[rows], client=client, label=f"Bayes ceiling: flux of {rows.size} spectra",
                          progress=False)
    cell0 = p_b[rows] * n_snr + snr_b[rows]
    parts = bayes_ceiling_tasks(ds, rows, np.asarray(flux, np.float64), cell0, edges, n_snr, cfg.ceiling)
    (parts,) = compute(parts, client=client, label=f"Bayes ceiling: posteriors of {rows.size} spectra",
                       progress=progress)
    post = np.concatenate(parts) if parts else np.empty((0, 4))
    keep = np.ones(snr_b.shape, bool) if usable is None else np.asarray(usable, bool)
    summary = ceiling_summary(post, snr_b[rows], np.asarray(ds["logg"].values, np.float64)[keep], snr_b[keep],
                              snr_names)
    summary["method"] = (f"Bayes minimum MSE of logg under the simulator's uniform prior box, by importance sampling "
                         f"({cfg.ceiling.samples} samples per spectrum) of {rows.size} test spectra, up to "
                         f"{cfg.ceiling.spectra_per_snr_bin} per S/N bin")
    return {"summary": summary, "post": post, "spectrum": np.asarray(ds["spectrum"].values)[rows]}


def add_standard_errors(metrics: dict, y: np.ndarray, yhats: dict, softs: dict, s_b: np.ndarray,
                        snr_names, cfg) -> None:
    """Paired-bootstrap standard errors of every R², ΔR² and ρ in ``metrics`` (in place)."""
    from .bootstrap import bootstrap_counts, r2_draws, rho_with_se, se

    counts = bootstrap_counts(y.size, cfg.n_bootstrap, cfg.seed)
    bins = {b: s_b == i for i, b in enumerate(snr_names)}
    sub = {b: (counts[:, sel], y[sel]) for b, sel in bins.items()}

    def draws(yhat):
        return r2_draws(y, yhat, counts), {b: (r2_draws(yb, yhat[bins[b]], cb)) for b, (cb, yb) in sub.items()}

    d = {name: draws(v) for name, v in yhats.items()}
    models = metrics["models"]
    g_all, g_bin = d["global"]
    metrics["delta_r2_se_vs_global"] = {}
    for name, m in models.items():
        all_, per = d[name]
        m["r2_se"] = se(all_)
        for b, v in per.items():
            m["per_snr_bin"][b]["r2_se"] = se(v)
        metrics["delta_r2_se_vs_global"][name] = se(all_ - g_all) if all_ is not None and g_all is not None else None
        if name in softs:
            m["soft_r2_se"] = se(r2_draws(y, softs[name], counts))
        if "oracle" in m:
            o_all, o_bin = d[m["oracle"]]
            m.update(rho_with_se(all_, g_all, o_all, (m["r2"], models["global"]["r2"], models[m["oracle"]]["r2"])))
            m["rho_per_snr_bin"], m["rho_se_per_snr_bin"] = {}, {}
            for b in snr_names:
                r = rho_with_se(per[b], g_bin[b], o_bin[b], (m["per_snr_bin"][b]["r2"],
                                                             models["global"]["per_snr_bin"][b]["r2"],
                                                             models[m["oracle"]]["per_snr_bin"][b]["r2"]))
                m["rho_per_snr_bin"][b], m["rho_se_per_snr_bin"][b] = r["rho"], r["rho_se"]
    metrics["bootstrap"] = {"draws": cfg.n_bootstrap, "seed": cfg.seed, "paired": True, "over": "frozen-test rows"}


def coverage(y: np.ndarray, yhat: np.ndarray, sigma: np.ndarray, s_b: np.ndarray, snr_names) -> dict:
    """Share of rows within ±1σ and ±2σ, overall and per (true) S/N bin.

    ``se_if_calibrated`` is the binomial standard error a perfectly calibrated
    σ would show on that many test rows, ``sqrt(p (1 - p) / n)`` at the
    Gaussian ``p``: the yardstick for whether a miss is more than sampling.
    """
    z = np.abs(y - yhat) / sigma

    def frac(sel):
        n = int(sel.sum())
        return {"1sigma": float(np.mean(z[sel] <= 1.0)) if n else None,
                "2sigma": float(np.mean(z[sel] <= 2.0)) if n else None, "n": n,
                "se_if_calibrated": {k: (float(np.sqrt(p * (1 - p) / n)) if n else None)
                                     for k, p in (("1sigma", GAUSS_1SIGMA), ("2sigma", GAUSS_2SIGMA))}}

    out = frac(np.ones(z.shape, bool))
    out["per_snr_bin"] = {b: frac(s_b == i) for i, b in enumerate(snr_names)}
    return out


def gate_metrics(model: Model, gate: Gate, table: dict, pred: np.ndarray, y: np.ndarray, s_b: np.ndarray,
                 p_b: np.ndarray, snr_est: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """The ``metrics.json`` block of one gate, its mean entropy per S/N bin, its deployed and soft predictions."""
    out = apply_model_gate(model, gate, table, pred, snr_est=snr_est)
    m = regression_metrics(y, out["yhat"], s_b, p_b, model.snr_names, model.phys_names)
    m["oracle"] = ORACLE_OF[gate.spec.family]
    m["soft_r2"] = r2_score(y, out["soft"])
    m["fallback_tau"] = gate_tau(model, gate)
    m["coverage"] = coverage(y, out["yhat"], out["sigma"], s_b, model.snr_names)
    # ablations: the soft mixture with one input block held at its training mean (what the gate really uses)
    members = model.members(gate.spec.family)
    m["ablation"] = {"what": "soft-mixture R² with the other input block held at its training mean",
                     **{f"{keep}_only": r2_score(y, mixture(gate.weights(table, ablate=drop), pred[:, members]))
                        for keep, drop in (("quality", "physical"), ("physical", "quality"))}}
    m["sigma_calibrated"] = "sigma_calibration" in gate.info
    labels = model.class_labels(gate.spec.family, s_b, p_b)
    guess = out["weights"].argmax(axis=1)
    k = gate.n_classes
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (labels, guess), 1)
    names = [model.specs[i].member for i in model.members(gate.spec.family)]
    m["gate_confusion"] = {"labels": names, "rows": "true bin", "columns": "argmax of the gate weights",
                           "matrix": conf.tolist(), "accuracy": float(np.trace(conf) / max(1, conf.sum()))}
    m["classifying"] = gate.spec.training == "logreg"
    m["fallback_fraction"] = float(out["fallback"].mean()) if out["fallback"].size else None
    m["gate"] = {"family": gate.spec.family, "inputs": list(gate.spec.inputs), "training": gate.spec.training}
    ent = entropy(out["weights"])
    by_bin = {b: (float(ent[s_b == i].mean()) if (s_b == i).any() else None) for i, b in enumerate(model.snr_names)}
    return m, by_bin, out["yhat"], out["soft"]
