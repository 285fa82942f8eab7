"""snrmoe: S/N-conditioned mixture of Ridge experts for stellar logg, out of core on Dask."""

from __future__ import annotations

from .bins import cell_index, phys_bin, snr_bin, tertile_edges
from .catalog import CatalogError, open_catalog, pixel_quality, summarize_catalog, validate_catalog
from .cluster import compute, dask_session
from .config import Config, ConfigError, load_config
from .ingest import IngestError, ingest
from .physics import ForwardModel, Instrument, forward_model, true_snr
from .simulate import simulate_catalog, write_catalog
from .split import assign_split, frozen_test_mask

__all__ = [
    "CatalogError",
    "Config",
    "ConfigError",
    "ForwardModel",
    "IngestError",
    "Instrument",
    "assign_split",
    "cell_index",
    "compute",
    "dask_session",
    "forward_model",
    "frozen_test_mask",
    "ingest",
    "load_config",
    "open_catalog",
    "phys_bin",
    "pixel_quality",
    "simulate_catalog",
    "snr_bin",
    "summarize_catalog",
    "tertile_edges",
    "true_snr",
    "validate_catalog",
    "write_catalog",
]
