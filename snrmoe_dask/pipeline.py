"""The batch job behind ``snrmoe run``: the stages of SPEC section 3 in order.

Each stage writes its artefact under the run directory and is recorded with
its wall time in ``run.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .bins import snr_bin
from .catalog import open_catalog, pixel_quality, quality_totals, summarize_catalog
from .cluster import compute
from .config import CatalogConfig, Config, SimulateConfig, StorageConfig
from .simulate import simulate_catalog, write_catalog

__all__ = ["run_simulate", "snr_distribution", "catalog_info", "run_pipeline", "versions"]


def snr_distribution(snr: np.ndarray, cfg: CatalogConfig) -> dict[str, Any]:
    """Median, max and per-bin fractions of an S/N array (the SPEC 6 calibration)."""
    bins = snr_bin(snr, cfg.snr_edges)
    return {
        "median": float(np.median(snr)),
        "max": float(np.max(snr)),
        "fractions": {name: float((bins == i).mean()) for i, name in enumerate(cfg.snr_bin_names)},
    }


def run_simulate(sim: SimulateConfig, out: str | Path, storage: StorageConfig, *, client=None,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Simulate a catalog to ``out`` on the current cluster; returns its S/N distribution."""
    ds = simulate_catalog(sim)
    job = write_catalog(ds, out, storage, overwrite=overwrite)
    t0 = time.perf_counter()
    compute(job, client=client, label=f"simulate {sim.n} spectra -> {out}", progress=progress)
    seconds = time.perf_counter() - t0
    cat = open_catalog(out, require_labels=("snr",))
    dist = snr_distribution(np.asarray(cat["snr"].values), CatalogConfig())
    return {"n": sim.n, "seconds": seconds, "spectra_per_second": sim.n / seconds, "snr": dist}


def catalog_info(path: str | Path, cfg: CatalogConfig, *, client=None, progress: bool = True) -> dict[str, Any]:
    """Open, validate and summarise a catalog (one pass over the cube for pixel counts)."""
    ds = open_catalog(path, require_labels=(), config=cfg)
    (q,) = compute(pixel_quality(ds, cfg.min_good_fraction), client=client, label="pixel quality",
                   progress=progress)
    return summarize_catalog(ds, quality_totals(q), cfg)


def versions() -> dict[str, str]:
    pkgs = ("snrmoe", "numpy", "dask", "distributed", "xarray", "zarr", "scipy", "scikit-learn")
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in pkgs:
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            out[p] = "not installed"
    return out


def _simulated_with(path: Path, sim: SimulateConfig) -> bool:
    """True if ``path`` is a valid catalog simulated with exactly ``sim``."""
    try:
        ds = open_catalog(path, require_labels=())
    except Exception:  # noqa: BLE001 - anything unreadable is simply redone
        return False
    return ds.attrs.get("simulate_config") == json.dumps(sim.model_dump(mode="json"), sort_keys=True)


def run_pipeline(cfg: Config, *, client=None, overwrite: bool = False) -> dict[str, Any]:
    """Run every implemented stage for ``cfg``; returns and writes ``run.json``."""
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "stages": {},
    }
    catalog = Path(cfg.run.catalog) if cfg.run.catalog else out / "catalog.zarr"
    if cfg.run.catalog is None:
        if not overwrite and _simulated_with(catalog, cfg.simulate):
            record["stages"]["simulate"] = {"skipped": "catalog with the same simulate config exists"}
        else:
            t0 = time.perf_counter()
            sim = run_simulate(cfg.simulate, catalog, cfg.storage, client=client, overwrite=True)
            record["stages"]["simulate"] = {"seconds": time.perf_counter() - t0, **sim}
    from .model import evaluate_model, fit_model

    t0 = time.perf_counter()
    model = fit_model(catalog, out / "model", cfg, client=client)
    record["stages"]["fit"] = {"seconds": time.perf_counter() - t0, "n_experts": len(model.meta["experts"]),
                               "train_rows": model.meta["train_rows"], **model.meta["timings"]}
    # the catalog summary comes from the fit's feature table: the same read of the cube
    t0 = time.perf_counter()
    features = xr.open_zarr(out / "model" / "features.zarr", consolidated=False).load()
    ds = open_catalog(catalog, require_labels=(), config=cfg.catalog)
    info = summarize_catalog(ds, quality_totals(features), cfg.catalog)
    record["stages"]["info"] = {"seconds": time.perf_counter() - t0}
    (out / "catalog_summary.json").write_text(json.dumps(info, indent=2))
    record["catalog"] = str(catalog)
    record["summary"] = info

    t0 = time.perf_counter()
    metrics = evaluate_model(model, catalog, cfg, client=client)
    record["stages"]["evaluate"] = {"seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    record["metrics"] = metrics
    (out / "run.json").write_text(json.dumps(record, indent=2))
    return record
