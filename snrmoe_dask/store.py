"""The model store: what ``fit`` writes and ``evaluate`` / ``predict`` read.

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
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .bins import phys_bin, snr_bin
from .cache import CACHE_DIR, open_row_cache
from .catalog import CatalogError
from .config import CatalogConfig, ConfigError, load_config
from .experts import (
    FAMILIES,
    ExpertSpec,
)
from .gates import GATE_SPECS, Gate
from .zarrstore import consolidate

__all__ = ["MODEL_VERSION", "Model", "ModelError", "ModelMeta", "load_model", "save_model", "check_grid",
           "routing_bins", "rows_source", "versions"]

MODEL_VERSION = "2"


class ModelMeta(BaseModel):
    """What ``model.json`` must hold for the model to be used (validated at load; other keys are kept).

    The store's description in one typed place: ``evaluate``, ``predict``, the
    estimator and the report read these fields, so a damaged or foreign
    ``model.json`` is refused at load with the field it lacks, not with a
    ``KeyError`` halfway through a job.
    """

    model_config = ConfigDict(extra="allow")

    kind: Literal["snrmoe.model"]
    version: Literal["2"]
    target: str
    n_pixels: int = Field(ge=1)
    bin_edges: dict[str, list[float]]
    snr_bin_names: list[str] = Field(min_length=1)
    phys_bin_names: list[str] = Field(min_length=1)
    experts: list[dict[str, Any]] = Field(min_length=1)
    min_good_fraction: float = Field(ge=0.0, le=1.0)
    gates: dict[str, Any] = Field(default_factory=dict)
    wavelength_range: list[float] | None = None
    config: dict[str, Any] | None = None

    @field_validator("bin_edges")
    @classmethod
    def _edges(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for key in ("snr_edges", "teff_edges", "mh_edges"):
            if key not in v:
                raise ValueError(f"missing '{key}'")
        return v


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
def routing_bins(ds: xr.Dataset, edges: dict, snr_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S/N and physical bin of each row (from ``snr_values`` and the catalog's teff and [M/H])."""
    return (snr_bin(snr_values, edges["snr_edges"]),
            phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64))


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
    consolidate(model_dir / "experts.zarr")
    if gates:
        save_gates(model_dir / "gates.zarr", gates)
        consolidate(model_dir / "gates.zarr")
    if baselines is not None:
        baselines.to_zarr(model_dir / "baselines.zarr", mode="w", zarr_format=3, consolidated=False)
        consolidate(model_dir / "baselines.zarr")
    (model_dir / "model.json").write_text(json.dumps(meta, indent=2))


def load_model(model_dir: str | Path) -> Model:
    """Load and validate a model store (no pickle anywhere).

    Raises
    ------
    ModelError
        If ``model.json`` or ``experts.zarr`` is missing or they disagree.
    """
    model_dir = Path(model_dir).absolute()  # the row cache is read by workers whose working directory is not ours
    meta_path = model_dir / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"{model_dir}: no model.json (not a model store, or the fit did not complete)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "snrmoe.model" or str(meta.get("version")) != MODEL_VERSION:
        raise ModelError(f"{meta_path}: not a snrmoe model store of version {MODEL_VERSION}")
    try:
        ModelMeta.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(k) for k in err["loc"]) or "model.json"
        raise ModelError(f"{meta_path}: '{where}': {err['msg']}") from None
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
        if name not in experts:
            raise ModelError(f"{model_dir}/experts.zarr: variable '{name}' is missing")
        if not np.all(np.isfinite(experts[name].values)):
            raise ModelError(f"{model_dir}: experts.zarr '{name}' has non-finite values")
    _check_bins_and_gates(model_dir, meta, experts)
    gates = load_gates(model_dir / "gates.zarr", meta.get("gates", {}))
    model = Model(experts, meta, gates, _load_baselines(model_dir, meta))
    model.path = model_dir
    return model


def _check_bins_and_gates(model_dir: Path, meta: dict, experts: xr.Dataset) -> None:
    """The bin names match the edges, the PCA axes the gates' inputs, and every fallback threshold is a number."""
    where = model_dir / "model.json"
    e = meta["bin_edges"]
    if len(meta["snr_bin_names"]) != len(e["snr_edges"]) + 1:
        raise ModelError(f"{where}: 'snr_bin_names' has {len(meta['snr_bin_names'])} names for "
                         f"{len(e['snr_edges']) + 1} S/N bins")
    n_phys = (len(e["teff_edges"]) + 1) * (len(e["mh_edges"]) + 1)
    if len(meta["phys_bin_names"]) != n_phys:
        raise ModelError(f"{where}: 'phys_bin_names' has {len(meta['phys_bin_names'])} names for {n_phys} "
                         f"Teff x [M/H] bins")
    gates = meta.get("gates") or {}
    n_pca = sum(1 for name in gates.get("inputs", {}).get("physical", []) if name.startswith("pca_"))
    if n_pca:
        for name in ("pca_components", "pca_mean"):
            if name not in experts:
                raise ModelError(f"{model_dir}/experts.zarr: variable '{name}' is missing (the gates use {n_pca} "
                                 f"PCA axes)")
        comps = experts["pca_components"]
        if comps.shape != (n_pca, meta["n_pixels"]) or experts["pca_mean"].shape != (meta["n_pixels"],):
            raise ModelError(f"{model_dir}/experts.zarr: 'pca_components' has shape {comps.shape} and 'pca_mean' "
                             f"{experts['pca_mean'].shape}; the gates need ({n_pca}, {meta['n_pixels']}) and "
                             f"({meta['n_pixels']},)")
    taus = {"gates.fallback_tau": gates.get("fallback_tau", 0.0)}
    taus.update({f"gates.fitted.{k}.fallback_tau": v.get("fallback_tau", 0.0)
                 for k, v in (gates.get("fitted") or {}).items() if isinstance(v, dict)})
    for key, tau in taus.items():
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
            raise ModelError(f"{where}: '{key}' is {tau!r}; it must be a number in [0, 1]")


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


# ----------------------------------------------------------------- evaluate
def check_grid(model: Model, ds: xr.Dataset, catalog, tolerance_pixels: float = 1e-3) -> None:
    """Refuse a catalog whose wavelength grid is not the model's: the same pixel count and every wavelength within
    ``tolerance_pixels`` x the model's median pixel spacing (config ``catalog.grid_tolerance_pixels``)."""
    theirs = np.asarray(ds["wavelength"].values, np.float64)
    if theirs.size != model.meta["n_pixels"]:
        raise CatalogError(f"{catalog}: wavelength grid has {theirs.size} pixels, the model's "
                           f"{model.meta['n_pixels']}")
    ours = np.asarray(model.experts["wavelength"].values, np.float64)
    step = float(np.median(np.abs(np.diff(ours)))) if ours.size > 1 else 1.0
    off = np.abs(theirs - ours) / step
    if not np.all(off <= tolerance_pixels):  # NaN wavelengths fail too
        worst = int(np.nanargmax(np.where(np.isfinite(off), off, np.inf)))
        n_off = int(np.sum(~(off <= tolerance_pixels)))
        raise CatalogError(f"{catalog}: wavelength grid differs from the model's at {n_off} of {theirs.size} "
                           f"pixels (pixel {worst}: {theirs[worst]:.4f} vs {ours[worst]:.4f} A; tolerance "
                           f"{tolerance_pixels:g} pixel spacings, catalog.grid_tolerance_pixels)")


#: the catalog settings a model was fitted with that decide its split and its bins
SPLIT_KEYS = ("split_fractions", "split_salt", "test_size", "snr_edges", "snr_bin_names", "teff_edges", "mh_edges")


def model_catalog_config(model: Model, given: CatalogConfig) -> CatalogConfig:
    """The catalog settings to score ``model`` with: its own split and bins (``model.json``), the rest from ``given``.

    A key of :data:`SPLIT_KEYS` that ``given`` sets to something other than
    both the shipped default and the model's value is a conflict (a different
    salt would score training rows as "frozen test") and raises
    :class:`~snrmoe_dask.config.ConfigError` naming the key.
    """
    stored = (model.meta.get("config") or {}).get("catalog")
    if stored is None:  # a model without its config: nothing to compare with
        return given
    shipped = load_config().catalog
    for key in SPLIT_KEYS:
        mine, theirs, default = getattr(given, key), stored.get(key), getattr(shipped, key)
        if key in stored and mine != theirs and mine != default:
            raise ConfigError(f"catalog.{key} is {mine} in this config, but the model was fitted with {theirs}; the "
                              f"split and bins come from the model: drop the key or refit")
    return given.model_copy(update={k: stored[k] for k in SPLIT_KEYS if k in stored})


def rows_source(model_dir: Path | None, ds: xr.Dataset, rows: np.ndarray) -> tuple[xr.Dataset, np.ndarray, str]:
    """Where to read catalog rows (sorted positions, such as the frozen test): the model's row cache when it
    holds every one of them (written from this catalog by the fit's pass), else the catalog; with the rows'
    positions there. The frozen-test parts alone are tried first: they are all the audit and evaluate read."""
    if model_dir is not None:
        for role in ("test", None):
            cache = open_row_cache(model_dir / CACHE_DIR, ds, role=role)
            if cache is None:
                continue
            pos = cache["position"].values
            at = np.searchsorted(pos, rows)
            if np.all(at < pos.size) and np.array_equal(pos[np.minimum(at, pos.size - 1)], rows):
                return cache, at, "row cache"
    return ds, rows, "catalog"


def versions() -> dict[str, str]:
    pkgs = ("snrmoe", "numpy", "dask", "distributed", "xarray", "zarr", "scipy", "scikit-learn")
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in pkgs:
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            out[p] = "not installed"
    return out
