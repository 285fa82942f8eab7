"""One config path: YAML -> validated pydantic object that rejects unknown keys.

Precedence is CLI flag > YAML file > shipped default (``config/default.yaml``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CatalogConfig",
    "SimulateConfig",
    "StorageConfig",
    "ClusterConfig",
    "FitConfig",
    "RunConfig",
    "Config",
    "ConfigError",
    "config_dir",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CatalogConfig(_Strict):
    """How a catalog is split and binned."""

    split_fractions: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    split_salt: int = 0
    test_size: int = Field(10_000, ge=1)
    min_good_fraction: float = Field(0.5, gt=0.0, le=1.0)
    grid_tolerance_pixels: float = Field(1e-3, ge=0.0)
    snr_edges: list[float] = Field(default_factory=lambda: [2.0, 4.0, 7.0])
    snr_bin_names: list[str] = Field(default_factory=lambda: ["X", "L", "M", "H"])
    teff_edges: list[float] | None = None
    mh_edges: list[float] | None = None

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError("split_fractions needs exactly the keys train, val, test")
        if any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1.0) > 1e-9:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {v}")
        return v

    @field_validator("snr_edges", "teff_edges", "mh_edges")
    @classmethod
    def _increasing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) == 0 or not all(math.isfinite(e) for e in v)
                              or any(b <= a for a, b in zip(v, v[1:]))):
            raise ValueError(f"bin edges must be a non-empty, strictly increasing list of finite numbers, got {v}")
        return v

    @model_validator(mode="after")
    def _names_match(self) -> CatalogConfig:
        if len(self.snr_bin_names) != len(self.snr_edges) + 1:
            raise ValueError(
                f"snr_bin_names has {len(self.snr_bin_names)} names but snr_edges defines "
                f"{len(self.snr_edges) + 1} bins"
            )
        return self


class SimulateConfig(_Strict):
    """The synthetic PFS-like catalog."""

    n: int = Field(20_000, ge=1)
    seed: int = Field(0, ge=0)
    noise_level: float = Field(1.0, gt=0.0)
    mag_min: float = 20.5
    mag_max: float = 22.5
    chunk_size: int = Field(2048, ge=1)
    n_pixels: int = Field(4096, ge=16)
    wave_min: float = 7100.0
    wave_max: float = 8850.0
    teff_range: tuple[float, float] = (3500.0, 6500.0)
    logg_range: tuple[float, float] = (0.0, 5.0)
    mh_range: tuple[float, float] = (-2.5, 0.75)
    alpha_m_range: tuple[float, float] = (-0.25, 0.5)
    error_model: Literal["noiseless", "noisy"] = "noiseless"

    @model_validator(mode="after")
    def _ranges(self) -> SimulateConfig:
        pairs = {
            "mag": (self.mag_min, self.mag_max),
            "wave": (self.wave_min, self.wave_max),
            "teff_range": self.teff_range,
            "logg_range": self.logg_range,
            "mh_range": self.mh_range,
            "alpha_m_range": self.alpha_m_range,
        }
        for name, (lo, hi) in pairs.items():
            if not hi > lo:
                raise ValueError(f"{name}: upper bound {hi} must exceed lower bound {lo}")
        if self.teff_range[0] <= 0:
            raise ValueError("teff_range must be positive (Kelvin)")
        return self


class StorageConfig(_Strict):
    """How catalogs are written to zarr."""

    compressor: Literal["lz4", "zstd", "blosclz", "none"] = "lz4"
    clevel: int = Field(1, ge=0, le=9)
    ingest_chunk_size: int = Field(2048, ge=1)


WORKER_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "4294967296",
                     "MALLOC_TRIM_THRESHOLD_": "8589934592"}


class ClusterConfig(_Strict):
    """Which Dask cluster to use."""

    scheduler: str = "local"
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str = "auto"
    dashboard_address: str = "127.0.0.1:8787"
    connect_timeout: float = Field(10.0, gt=0.0)
    processes: bool = True
    jobqueue_file: str | None = None
    jobs: int = Field(1, ge=0)
    adapt_max_jobs: int | None = Field(None, ge=1)
    local_directory: str | None = None
    # environment of the worker processes the LocalCluster's nannies spawn, on top of
    # ``distributed.nanny.pre-spawn-environ``. The default keeps freed memory in one glibc heap
    # (every thread, blocks and Gram-sized buffers alike) for the next allocation instead of mapping
    # fresh zeroed pages; :func:`~snrmoe_dask.cluster.release_memory` returns it between stages.
    # None: off.
    worker_env: dict[str, str] | None = Field(default_factory=lambda: dict(WORKER_MALLOC_ENV))


class FitConfig(_Strict):
    """One-pass statistics and the Ridge experts."""

    target: Literal["logg"] = "logg"
    alphas_relative: list[float] = Field(
        default_factory=lambda: [float(f"{10.0 ** e:.6g}") for e in np.arange(-6.0, 2.01, 0.5)]
    )
    min_cell_rows: int = Field(50, ge=1)
    max_df_fraction: float = Field(0.5, gt=0.0, le=1.0)
    alpha_search_precision: Literal["float32", "float64"] = "float32"
    # expert solves a worker runs at once, each on threads_per_worker // this BLAS threads; null = one per thread
    # (one at a time where SciPy's LAPACK lacks the two-stage reduction)
    solves_at_once: int | None = Field(None, ge=1)
    precision: Literal["float32", "float64"] = "float32"
    flush_rows: int = Field(1024, ge=1)
    chains: int | None = Field(None, ge=1)
    memory_budget: str = "8GB"
    # val rows cached beside the model for the gates (a hash-selected subset above this; frozen-test rows always)
    cache_max_val_rows: int | None = Field(200_000, ge=1)
    baselines: list[Literal["whitened", "conditional"]] = Field(
        default_factory=lambda: ["whitened", "conditional"])
    checkpoint_every: int | None = Field(None, ge=0)
    # auto cadence (checkpoint_every null): about 4 checkpoints per chain, but never before the chain has read
    # this many times the bytes a checkpoint writes (its whole float64 state): a checkpoint of a small pass
    # would cost more than redoing the pass (default job: 3 checkpoints of 2.8 GB were 32 s of a 47 s pass)
    checkpoint_min_read_ratio: float = Field(2.0, ge=0.0)
    # chunks a chain may read before it has folded them: bounds the blocks waiting in worker memory
    read_ahead: int = Field(4, ge=1)
    # single-threaded BLAS calls a fold runs at once (column panels of each Gram update); null = the worker's
    # threads per chain, so a fold uses every core while the chunk reads and features take turns with it
    blas_pieces: int | None = Field(None, ge=1)

    @field_validator("alphas_relative")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v or any(a <= 0 for a in v):
            raise ValueError(f"alphas_relative must be a non-empty list of positive numbers, got {v}")
        return sorted(v)

    @field_validator("memory_budget")
    @classmethod
    def _bytes(cls, v: str) -> str:
        from dask.utils import parse_bytes

        try:
            parse_bytes(v)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"memory_budget must be a size such as '8GB', got {v!r}") from exc
        return v


class GatesConfig(_Strict):
    """Deployable gates, fitted on the val rows."""

    fallback_tau: float = Field(0.3, ge=0.0, le=1.0)
    default: str = "auto"
    select_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    n_pca: int = Field(4, ge=0, le=64)
    l2: float = Field(1e-3, ge=0.0)
    logreg_c: float = Field(1.0, gt=0.0)
    max_iter: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)
    snr_cliff: float = 2.0
    calibration_min_rows: int = Field(150, ge=2)
    # fewest usable val rows to fit gates at all, and fewest left to fit on once the selection rows are drawn
    min_val_rows: int = Field(20, ge=3)
    min_fit_rows: int = Field(10, ge=2)
    # most val rows a gate fits on (a hash-selected subset above it; the selection rows are all used). At 1M,
    # 50k of the 75k fit rows: the gate fits 1.5x faster and the default gate's selection R2 moved by 0.001
    max_fit_rows: int | None = Field(50_000, ge=2)
    # gates fitted at once, one thread (and one BLAS thread) each; null = the machine's cores
    n_jobs: int | None = Field(None, ge=1)

    @field_validator("default")
    @classmethod
    def _known(cls, v: str) -> str:
        from .gates import GATE_SPECS

        if v != "auto" and v not in GATE_SPECS:
            raise ValueError(f"unknown gate '{v}' (known: auto, {', '.join(GATE_SPECS)})")
        return v


class CeilingConfig(_Strict):
    """The Bayes ceiling of logg (docs/method.md), for simulated catalogs."""

    enabled: bool = True
    spectra_per_snr_bin: int = Field(150, ge=2)
    samples: int = Field(768, ge=16)
    prior_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    proposal_scale: float = Field(1.5, gt=0.0)
    seed: int = Field(0, ge=0)
    # arithmetic of the forward model at the importance samples (the Jacobian placing the proposal is float64):
    # float32 is 3x faster per sample and moves the ceiling by far less than its Monte Carlo standard error
    forward_precision: Literal["float32", "float64"] = "float32"


class EvaluateConfig(_Strict):
    """Standard errors of the frozen-test metrics."""

    n_bootstrap: int = Field(200, ge=2)
    seed: int = Field(0, ge=0)


class AuditConfig(_Strict):
    """The leakage audit."""

    logg_r2_max: float = 0.05
    snr_r2_min: float = 0.5
    n_mag_groups: int = Field(5, ge=2)
    seed: int = Field(0, ge=0)
    # train rows the audit's Ridge fits use (a hash-selected subset above this): its statistics ride the fit's
    # pass, two more Gram matrices per row, so the bound keeps the audit a small share of the pass at any N
    max_rows: int = Field(100_000, ge=100)
    # rows per float32 partial Gram per magnitude group before it is added in float64. The error vectors' Gram
    # matrices are ill-conditioned: at 1M (100k audit rows) 1,024-row partials gave full R2 0.657 and S1 -22.6,
    # 256-row partials 0.820 +- 0.003 and 0.749 +- 0.006 (the expert cells' flux Grams are fine at 1,024)
    flush_rows: int = Field(256, ge=1)
    # the small representations: RidgeCV's alpha grid, gradient boosting's iterations, and the fewest train rows
    small_ridge_alphas: list[float] | None = Field(None, min_length=1)  # None: 25 values from 1e-6 to 1e6
    hgb_max_iter: int = Field(300, ge=1)
    min_small_rows: int = Field(10, ge=2)

    @field_validator("small_ridge_alphas")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(np.isfinite(a) and a > 0 for a in v):
            raise ValueError(f"small_ridge_alphas must be positive finite numbers, got {v}")
        return v


class RunConfig(_Strict):
    """Where a batch run writes and what it reads."""

    out: str = "runs/default"
    catalog: str | None = None  # an existing catalog; null = simulate one
    ingest: str | None = None  # HDF5/NPZ file or folder to ingest into OUT/catalog.zarr
    seeds: list[int] | None = None  # repeat the study per seed (simulation seed and split salt)
    audit: bool = True
    report: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> RunConfig:
        if self.catalog is not None and self.ingest is not None:
            raise ValueError("set at most one of run.catalog and run.ingest")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"run.seeds must be a non-empty list of distinct integers, got {self.seeds}")
        return self


class Config(_Strict):
    """The whole validated configuration."""

    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    ceiling: CeilingConfig = Field(default_factory=CeilingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def config_dir() -> Path:
    """Folder of the shipped YAML configs (``config/`` in the source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_config", here.parent / "config"):
        if (cand / "default.yaml").is_file():
            return cand
    raise FileNotFoundError("shipped config/default.yaml not found next to the snrmoe_dask package")


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'")
        else:
            lines.append(f"'{loc}': {err['msg']}")
    return f"invalid config ({source}): " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the shipped defaults, then ``path``, then ``overrides``.

    Parameters
    ----------
    path : path-like, optional
        A YAML file with any subset of the sections of ``config/default.yaml``.
    overrides : dict, optional
        Nested ``{section: {key: value}}`` from CLI flags; ``None`` values are
        ignored so unset flags do not clobber the file.

    Raises
    ------
    ConfigError
        On an unknown key, a wrong type or an invalid value, naming the key.
    """
    data = _read_yaml(config_dir() / "default.yaml")
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _deep_update(data, _read_yaml(p))
        source = str(p)
    if overrides:
        clean = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()}
        data = _deep_update(data, {s: kv for s, kv in clean.items() if kv})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
