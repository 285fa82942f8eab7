"""Fit and evaluate: the model store and the stages that write and read it.

Model store (``MODEL_DIR/``)::

    model.json      bin edges, expert names/families/parents/fallbacks, config,
                    provenance (catalog, rows, versions), per-cell row counts
    experts.zarr    coef (expert, wavelength), intercept, alpha, gcv,
                    resid_var, df, n_rows, at_grid_edge  -- numbers only
    stats.zarr      the summed sufficient statistics (refit / append without
                    re-reading old rows)
    features.zarr   the per-spectrum feature table of the fitted catalog

Nothing is pickled: every file is zarr or JSON.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from dask.utils import parse_bytes

from .bins import cell_index, phys_bin, phys_bin_names, snr_bin
from .catalog import CatalogError, bin_edges, open_catalog
from .cluster import compute
from .config import Config
from .evaluate import expert_predictions, regression_metrics, route_oracle
from .experts import FAMILIES, ExpertSpec, expert_specs, experts_dataset, fit_experts
from .features import feature_table
from .reduce import auto_chains, features_dataset, one_pass
from .split import TRAIN
from .stats import SufficientStats

__all__ = ["MODEL_VERSION", "Model", "fit_model", "load_model", "evaluate_model", "ModelError"]

MODEL_VERSION = "1"


class ModelError(ValueError):
    """A model store is missing, incomplete or inconsistent."""


class Model:
    """A loaded model store: experts as arrays plus their JSON description."""

    def __init__(self, experts: xr.Dataset, meta: dict[str, Any]):
        self.experts = experts
        self.meta = meta
        fields = ("name", "family", "member", "parent", "shrink")
        self.specs = [ExpertSpec(cells=tuple(s["cells"]), **{k: s[k] for k in fields}) for s in meta["experts"]]
        self.index = {s.name: i for i, s in enumerate(self.specs)}

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
        if family == "global":
            return np.full(snr_b.shape, self.index["global"])
        if family == "oracle_snr":
            lut = np.array([self.index[f"oracle_snr/{s}"] for s in self.snr_names])
            return lut[snr_b]
        if family == "oracle_phys":
            lut = np.array([self.index[f"oracle_phys/{p}"] for p in self.phys_names])
            return lut[phys_b]
        if family in ("oracle_joint", "hierarchical"):
            lut = np.array([[self.index[f"{family}/{p}|{s}"] for s in self.snr_names] for p in self.phys_names])
            return lut[phys_b, snr_b]
        raise ValueError(f"unknown family '{family}' (known: {FAMILIES})")


# ------------------------------------------------------------------ helpers
def _routing_bins(ds: xr.Dataset, edges: dict, snr_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (snr_bin(snr_values, edges["snr_edges"]),
            phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64))


def _n_threads(client) -> int:
    if client is None:
        return os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))


def _save_stats(stats: SufficientStats, path: str) -> dict:
    stats.to_zarr(path)
    return {"n_per_cell": stats.n.tolist(), "meta": stats.meta}


def save_model(model_dir: Path, experts: xr.Dataset, meta: dict) -> None:
    """Write ``experts.zarr`` and then ``model.json`` (the completion marker)."""
    experts.to_zarr(model_dir / "experts.zarr", mode="w", zarr_format=3, consolidated=False)
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
    for name in ("coef", "intercept"):
        if not np.all(np.isfinite(experts[name].values)):
            raise ModelError(f"{model_dir}: experts.zarr '{name}' has non-finite values")
    return Model(experts, meta)


# ---------------------------------------------------------------------- fit
def fit_model(catalog: str | Path, model_dir: str | Path, cfg: Config, *, client=None,
              progress: bool = True) -> Model:
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

    timings: dict[str, float] = {}
    feature_blocks = None
    if "snr" in ds:
        snr_route, snr_source = np.asarray(ds["snr"].values, np.float64), "snr (true S/N label)"
    else:  # real data: route training cells by the estimate -> features first (an extra pass)
        _, fblocks = one_pass(ds, np.zeros(n), np.full(n, -1), n_cells=1, chains=1)
        t0 = time.perf_counter()
        (feature_blocks,) = compute(fblocks, client=client, label="features (S/N estimate)", progress=progress)
        timings["features_pass_s"] = time.perf_counter() - t0
        snr_route = features_dataset(feature_blocks, ds, cfg.catalog.min_good_fraction)["snr_est"].values
        snr_source = "snr_est (no true S/N label in the catalog)"
    # NaN S/N only occurs for spectra without good pixels, which the fold leaves out anyway
    s_b, p_b = _routing_bins(ds, edges, np.nan_to_num(snr_route, nan=0.0))
    cell = np.where(ds["split"].values == TRAIN, cell_index(p_b, s_b, n_snr), -1).astype(np.int64)
    y = np.asarray(ds[target].values, np.float64)

    n_chunks = len(ds["flux"].chunks[0])
    threads = _n_threads(client)
    chains = cfg.fit.chains or auto_chains(threads, n_chunks, n_cells, p, cfg.fit.flush_rows, cfg.fit.precision,
                                           parse_bytes(cfg.fit.memory_budget))
    meta_stats = {"n_snr": n_snr, "n_phys": len(phys_names), "bin_edges": edges, "catalog": str(catalog)}
    stats_d, feats_d = one_pass(ds, y, cell, n_cells=n_cells, chains=chains, flush_rows=cfg.fit.flush_rows,
                                precision=cfg.fit.precision, min_good_fraction=cfg.catalog.min_good_fraction,
                                meta=meta_stats, blas_threads=max(1, threads // chains))
    specs = expert_specs(snr_names, phys_names)
    fits_d = fit_experts(stats_d, specs, cfg.fit.alphas_relative, cfg.fit.min_cell_rows, cfg.fit.max_df_fraction,
                         cfg.fit.alpha_search_precision)
    saved_d = dask.delayed(_save_stats)(stats_d, str(model_dir / "stats.zarr"))
    t0 = time.perf_counter()
    want_feats = feats_d if feature_blocks is None else []
    feats, fits, saved = compute(want_feats, fits_d, saved_d, client=client,
                                 label=f"one pass ({chains} accumulator chain(s)) + {len(specs)} experts",
                                 progress=progress)
    timings["pass_and_fit_s"] = time.perf_counter() - t0
    feature_blocks = feature_blocks if feature_blocks is not None else feats

    features = features_dataset(feature_blocks, ds, cfg.catalog.min_good_fraction)
    features["split"] = ds["split"]
    features.to_zarr(model_dir / "features.zarr", mode="w", zarr_format=3, consolidated=False)
    fallbacks = {name: f["fallback"] for name, f in fits.items() if f["fallback"]}
    for name, parent in fallbacks.items():
        warnings.warn(f"expert '{name}' has {fits[name]['n']:.0f} train rows (< min_cell_rows="
                      f"{cfg.fit.min_cell_rows}); it falls back to '{parent}'", stacklevel=2)
    edge_hits = [name for name, f in fits.items() if f["at_grid_edge"]]
    experts = experts_dataset(specs, fits, ds["wavelength"].values)
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
        "train_rows": int((cell >= 0).sum()),
        "train_rows_excluded_unusable": saved["meta"].get("train_rows_excluded_unusable", 0),
        "rows_per_cell": saved["n_per_cell"],
        "accumulation": {"chains": chains, "precision": cfg.fit.precision, "flush_rows": cfg.fit.flush_rows},
        "catalog": str(catalog),
        "catalog_rows": n,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    save_model(model_dir, experts, meta)
    return Model(experts, meta)


# ----------------------------------------------------------------- evaluate
def evaluate_model(model: Model, catalog: str | Path, cfg: Config, *, client=None, progress: bool = True) -> dict:
    """Score every family on the frozen test subset; returns the metrics dict."""
    target = model.meta["target"]
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog)
    if ds.sizes["wavelength"] != model.meta["n_pixels"] or not np.allclose(
            [float(ds["wavelength"][0]), float(ds["wavelength"][-1])], model.meta["wavelength_range"]):
        raise CatalogError(f"{catalog}: wavelength grid differs from the model's "
                           f"({model.meta['n_pixels']} px, {model.meta['wavelength_range']} A)")
    rows = np.flatnonzero(ds["frozen_test"].values)
    if rows.size == 0:
        raise CatalogError(f"{catalog}: the frozen test subset is empty")
    pred_d = expert_predictions(ds, model.experts["coef"].values, model.experts["intercept"].values, rows)
    sub = ds.isel(spectrum=rows)
    feats_d = feature_table(sub, cfg.catalog.min_good_fraction)
    pred, feats = compute(pred_d, feats_d, client=client, label=f"predict {rows.size} test rows",
                          progress=progress)
    usable = feats["usable"].values
    y = np.asarray(sub[target].values, np.float64)
    snr_values = np.asarray(sub["snr"].values if "snr" in sub else feats["snr_est"].values, np.float64)
    s_b, p_b = _routing_bins(sub, model.edges, np.nan_to_num(snr_values, nan=0.0))
    pred, y, s_b, p_b = pred[usable], y[usable], s_b[usable], p_b[usable]
    metrics: dict[str, Any] = {
        "n_test": int(usable.sum()),
        "n_test_excluded_unusable": int((~usable).sum()),
        "target": target,
        "catalog": str(catalog),
        "snr_routing_source": "snr (true S/N label)" if "snr" in sub else "snr_est",
        "models": {},
    }
    for family in FAMILIES:
        yhat = route_oracle(pred, model.family_index(family, s_b, p_b))
        metrics["models"][family] = regression_metrics(y, yhat, s_b, p_b, model.snr_names, model.phys_names)
    g = metrics["models"]["global"]["r2"]
    metrics["delta_r2_vs_global"] = {f: (m["r2"] - g if m["r2"] is not None and g is not None else None)
                                     for f, m in metrics["models"].items()}
    return metrics
