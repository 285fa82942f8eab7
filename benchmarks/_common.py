"""Shared benchmark helpers: process-tree peak memory and catalog preparation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil

from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.cluster import compute
from snrmoe_dask.config import SimulateConfig, StorageConfig
from snrmoe_dask.simulate import simulate_catalog, write_catalog


class PeakRSS:
    """Sample the resident memory of this process and all its children (e.g. dask workers)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes) every ~interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.current()
            self.peak = max(self.peak, now)
            self.samples.append((time.perf_counter() - self.t0, now))
            time.sleep(self.interval)

    def peak_between(self, start: float, stop: float) -> int:
        """Peak bytes sampled between ``start`` and ``stop`` seconds after entering."""
        return max((b for t, b in self.samples if start <= t <= stop), default=0)

    def __enter__(self) -> PeakRSS:
        self.t0 = time.perf_counter()
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def ensure_catalog(path: Path, n: int, client, seed: int = 0, chunk_size: int = 2048) -> Path:
    """Simulate ``n`` spectra to ``path`` unless a catalog of that size and seed is there."""
    cfg = SimulateConfig(n=n, seed=seed, chunk_size=chunk_size)
    try:
        ds = open_catalog(path, require_labels=())
        if ds.attrs.get("simulate_config") == json.dumps(cfg.model_dump(mode="json"), sort_keys=True):
            return path
    except Exception:  # noqa: BLE001 - missing or stale: rebuild
        pass
    compute(write_catalog(simulate_catalog(cfg), path, StorageConfig(), overwrite=True), client=client,
            label=f"simulate {n}")
    return path
