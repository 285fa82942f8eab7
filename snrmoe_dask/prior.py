"""What a fitted model contributes to the next one: its statistics, feature table, row caches and provenance.

Sufficient statistics add, so the model of catalogs A and B is the statistics
of A (on disk beside A's model) plus those of B, solved again. A
:class:`Prior` is a model store read for that purpose: ``snrmoe update`` adds
one pass over a new catalog to it, ``snrmoe merge`` adds another prior. The
catalogs behind a prior are never read again (they may have moved): the gates
refit on the val rows cached beside the model, the frozen test of each
catalog is cached there too, and ``model.json`` lists every catalog that went
in (:class:`Provenance`).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .baselines import BaselineStats
from .cache import cache_dir_name, open_model_rows
from .catalog import CatalogError
from .config import Config
from .stats import SufficientStats
from .store import ModelError, check_grid, load_model

__all__ = ["Prior", "Provenance", "PriorError", "link_caches"]


class PriorError(ValueError):
    """A model that cannot be updated or merged, or a catalog that cannot be added to it (one line)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Provenance:
    """Every catalog that went into a model (path, rows, fingerprint of its ids and shape), and the steps."""

    catalogs: list[dict]
    history: list[dict]
    edges_source: str

    @classmethod
    def first(cls, catalog: dict, edges_source: str) -> Provenance:
        return cls([catalog], [{"op": "fit", "catalogs": [catalog["path"]], "at": _now()}], edges_source)

    def then(self, op: str, *more: dict) -> Provenance:
        """This provenance followed by ``op`` (``update``, ``merge``) adding ``more`` catalogs; the bin edges
        stay the first model's (an update keeps them, so a fit on the catalogs joined can reproduce them)."""
        source = self.edges_source if "; kept by" in self.edges_source else f"{self.edges_source}; kept by {op}"
        return Provenance(self.catalogs + list(more),
                          self.history + [{"op": op, "catalogs": [c["path"] for c in more], "at": _now()}], source)

    @classmethod
    def of(cls, meta: dict) -> Provenance | None:
        if not isinstance(meta.get("catalogs"), list) or not isinstance(meta.get("history"), list):
            return None
        return cls(list(meta["catalogs"]), list(meta["history"]), str(meta.get("bin_edges_source", "")))


@dataclass
class Prior:
    """A model store read as the start of another model (nothing large is held: the statistics load in a task)."""

    model_dir: Path
    meta: dict
    provenance: Provenance

    @classmethod
    def load(cls, model_dir: str | Path) -> Prior:
        """Check that ``model_dir`` holds what an update needs, each gap one line naming it."""
        model_dir = Path(model_dir).absolute()
        model = load_model(model_dir)  # raises ModelError naming what a tampered store lacks
        meta = model.meta
        missing = [name for name in ("stats.zarr", "features.zarr")
                   if not (model_dir / name / "zarr.json").is_file()]
        if meta.get("baselines", {}).get("fitted") and not (model_dir / "baseline_stats").is_dir():
            missing.append("baseline_stats")
        if missing:
            raise PriorError(f"{model_dir}: model store has no {', '.join(missing)} (fitted by an older version?); "
                             "refit it to update or merge it")
        provenance = Provenance.of(meta)
        if provenance is None:
            raise PriorError(f"{model_dir}: model.json lists no catalogs (fitted by an older version); refit it "
                             "to update or merge it")
        if meta.get("config") is None:
            raise PriorError(f"{model_dir}: model.json has no config; refit it to update or merge it")
        if open_model_rows(model_dir, provenance.catalogs, role=None) is None:
            raise PriorError(f"{model_dir}: the row cache of a catalog is missing or damaged (rows*/): the gates "
                             "of an updated model refit on those val rows; refit it")
        return cls(model_dir, meta, provenance)

    # -------------------------------------------------------------- what it holds
    @property
    def edges(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.meta["bin_edges"].items()}

    @property
    def catalogs(self) -> list[dict]:
        return self.provenance.catalogs

    def config(self, cluster: dict | None = None) -> Config:
        """The model's own config (split, bins, α grid, cells), with the bin edges it was fitted with made
        explicit; ``cluster`` replaces the cluster section (where this run computes is the caller's choice)."""
        raw = dict(self.meta["config"])
        raw["catalog"] = {**raw["catalog"], "teff_edges": self.edges["teff_edges"],
                          "mh_edges": self.edges["mh_edges"]}
        if cluster is not None:
            raw["cluster"] = cluster
        return Config.model_validate(raw)

    def features(self) -> xr.Dataset:
        return xr.open_zarr(self.model_dir / "features.zarr", consolidated=False).load()

    def ids(self) -> np.ndarray:
        return np.asarray(xr.open_zarr(self.model_dir / "features.zarr", consolidated=False)["spectrum"].values)

    def features_with(self, new: xr.Dataset) -> xr.Dataset:
        """This model's feature table followed by ``new``'s rows (the positions the caches are offset to)."""
        return xr.concat([self.features(), new], dim="spectrum", data_vars="minimal", coords="minimal",
                         compat="override", join="override", combine_attrs="override")

    def caches(self) -> list[Path]:
        return [self.model_dir / cache_dir_name(k) for k in range(len(self.catalogs))]

    def link_caches(self, out: Path) -> None:
        link_caches([self], out)

    # -------------------------------------------------------------- run in tasks
    def add_stats(self, stats: SufficientStats) -> SufficientStats:
        """This model's statistics plus ``stats`` (in this model's shifts), loaded where the sum is taken."""
        total = SufficientStats.from_zarr(self.model_dir / "stats.zarr")
        excluded = total.meta.get("train_rows_excluded_unusable", 0) + stats.meta.get("train_rows_excluded_unusable", 0)
        meta = dict(stats.meta)
        total.iadd(stats)
        total.meta = {**meta, "train_rows_excluded_unusable": int(excluded)}
        return total

    def add_baseline_stats(self, bstats: BaselineStats | None) -> BaselineStats:
        mine = BaselineStats.from_zarr(self.model_dir / "baseline_stats")
        return mine if bstats is None else mine + bstats

    # -------------------------------------------------------------- checks
    def check_catalog(self, ds: xr.Dataset, catalog, cfg: Config) -> None:
        """A catalog that may be added: the model's grid, the labels its cells were routed by, no id seen."""
        model = load_model(self.model_dir)
        try:
            check_grid(model, ds, catalog, cfg.catalog.grid_tolerance_pixels)
        except CatalogError as exc:
            raise PriorError(str(exc)) from None
        routed_by_snr = str(self.meta.get("snr_routing_source", "")).startswith("snr (")
        if routed_by_snr != ("snr" in ds):
            have = "has" if "snr" in ds else "has no"
            raise PriorError(f"{catalog}: catalog {have} a true 'snr' label, but the model's cells were routed by "
                             f"{self.meta.get('snr_routing_source')}; the statistics would not add up")
        seen = np.intersect1d(self.ids(), np.asarray(ds["spectrum"].values))
        if seen.size:
            raise PriorError(f"{catalog}: {seen.size} spectrum ids are already in model {self.model_dir} (e.g. "
                             f"{', '.join(str(i) for i in seen[:5])}); a spectrum must not be counted twice")

    def check_mergeable(self, other: Prior) -> None:
        """Two models that combine into the model of their catalogs joined: same grid, bins, α grid, split."""
        a, b = self.meta, other.meta
        ga, gb = _grid(self.model_dir), _grid(other.model_dir)
        checks = {"wavelength grid": (ga.shape == gb.shape and np.allclose(ga, gb, rtol=0, atol=1e-9), True),
                  "bin edges": (a["bin_edges"], b["bin_edges"]),
                  "S/N bin names": (a["snr_bin_names"], b["snr_bin_names"]),
                  "alpha grid (fit.alphas_relative)": (a["config"]["fit"]["alphas_relative"],
                                                       b["config"]["fit"]["alphas_relative"]),
                  "split (catalog.split_salt, split_fractions, test_size)": (
                      [a["config"]["catalog"][k] for k in ("split_salt", "split_fractions", "test_size")],
                      [b["config"]["catalog"][k] for k in ("split_salt", "split_fractions", "test_size")]),
                  "cells' S/N routing": (a.get("snr_routing_source"), b.get("snr_routing_source")),
                  "target": (a["target"], b["target"]),
                  "baselines": (a.get("baselines", {}).get("fitted"), b.get("baselines", {}).get("fitted")),
                  "statistics precision (fit.precision)": (a["config"]["fit"]["precision"],
                                                           b["config"]["fit"]["precision"])}
        for what, (x, y) in checks.items():
            if x != y:
                raise PriorError(f"models {self.model_dir} and {other.model_dir} differ in their {what}; they "
                                 "cannot be merged")
        seen = np.intersect1d(self.ids(), other.ids())
        if seen.size:
            raise PriorError(f"models {self.model_dir} and {other.model_dir} share {seen.size} spectrum ids (e.g. "
                             f"{', '.join(str(i) for i in seen[:5])}); their catalogs must be disjoint")


def link_caches(priors: list[Prior], out: Path) -> None:
    """The row caches of the priors' catalogs into ``out``, in order (hard links: a cache is never changed in
    place, so the old model keeps its own; a copy where links cannot be made)."""
    k = 0
    for prior in priors:
        for src in prior.caches():
            dst = out / cache_dir_name(k)
            shutil.rmtree(dst, ignore_errors=True)
            try:
                shutil.copytree(src, dst, copy_function=os.link)
            except OSError:
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            k += 1


def _grid(model_dir: Path) -> np.ndarray:
    try:
        return np.asarray(xr.open_zarr(model_dir / "experts.zarr", consolidated=False)["wavelength"].values)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{model_dir}/experts.zarr unreadable: {exc}") from None
