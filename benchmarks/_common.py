"""Shared benchmark helpers: process-tree peak memory, catalog preparation, peer fits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from snrmoe_dask.catalog import good_pixel_mask, open_catalog
from snrmoe_dask.cluster import compute
from snrmoe_dask.config import SimulateConfig, StorageConfig
from snrmoe_dask.simulate import simulate_catalog, write_catalog
from snrmoe_dask.stats import impute_bad_pixels


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


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the dask workers) so far."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


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


def r2(y, yhat) -> float:
    return float(1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2))


def load_rows(ds, rows: np.ndarray) -> np.ndarray:
    """Flux of ``rows`` in memory, float64, bad pixels imputed as the pass does."""
    out = np.empty((rows.size, ds.sizes["wavelength"]), np.float64)
    for lo in range(0, rows.size, 8192):
        r = rows[lo:lo + 8192]
        f, e = ds["flux"].data[r].compute(), ds["error"].data[r].compute()
        out[lo:lo + r.size] = impute_bad_pixels(f, good_pixel_mask(f, e))
    return out


def daskml_ridge(x, y, xt, yt, alpha: float, solver: str, max_iter: int, ref_coef) -> dict:
    """``dask_ml.linear_model.LinearRegression(penalty="l2")`` at the Ridge problem of ``alpha``.

    dask-glm minimises sum((y - X b)^2) + ||b||^2 / (2 C) and penalises its
    intercept column, so the Ridge problem is C = 1 / (2 alpha) on centred data
    without an intercept. ``x`` is centred in place (a second in-memory copy
    would not fit at the largest N); the seconds include the centring. Runs
    on the threads scheduler: X is in this process and must not be shipped
    to a cluster.
    """
    import dask
    import dask.array as da
    from dask_ml.linear_model import LinearRegression

    t0 = time.perf_counter()
    xm, ym = x.mean(axis=0), y.mean()
    x -= xm
    lr = LinearRegression(penalty="l2", C=0.5 / alpha, solver=solver, max_iter=max_iter, fit_intercept=False)
    with dask.config.set(scheduler="threads"):
        lr.fit(da.from_array(x, chunks=(8192, x.shape[1])), da.from_array(y - ym, chunks=8192))
    seconds = time.perf_counter() - t0
    coef = np.asarray(lr.coef_)
    return {"solver": solver, "max_iter": max_iter, "rows": int(x.shape[0]), "seconds": seconds,
            "r2": r2(yt, (xt - xm) @ coef + ym),
            "coef_rel_err_vs_sklearn": float(np.abs(coef - ref_coef).max() / np.abs(ref_coef).max())}


# ------------------------------------------------------- bytes read from a catalog, counted at the store
def _install_read_counter(root: str) -> bool:
    """Count every ``get`` of zarr's LocalStore under ``root`` in this process: (unix time, key, bytes).

    The counter lives on the ``LocalStore`` class, so it persists in a worker process between tasks and
    ``client.run`` calls. Returns True (so ``client.run`` has something to show per worker).
    """
    import time as _time

    from zarr.storage import LocalStore

    if not hasattr(LocalStore, "_bench_reads"):
        original = LocalStore.get
        LocalStore._bench_reads, LocalStore._bench_roots = [], set()

        async def get(self, key, prototype=None, byte_range=None):
            out = await original(self, key, prototype, byte_range)
            full = f"{self.root}/{key}"
            if out is not None and any(full.startswith(r) for r in LocalStore._bench_roots):
                LocalStore._bench_reads.append((_time.time(), full, len(out)))
            return out

        LocalStore.get = get
    LocalStore._bench_roots.add(str(root).rstrip("/") + "/")
    return True


def _collected_reads() -> list:
    from zarr.storage import LocalStore

    return list(getattr(LocalStore, "_bench_reads", []))


class CatalogReads:
    """Bytes read from one catalog store by the client and every worker of ``client``, measured at zarr's
    ``LocalStore.get`` (compressed chunk bytes, as they come off the disk or the page cache)."""

    def __init__(self, root: Path, client):
        import cloudpickle

        self.root, self.client = str(Path(root).resolve()), client
        cloudpickle.register_pickle_by_value(__import__(__name__))  # workers cannot import benchmarks/
        _install_read_counter(self.root)
        if client is not None:
            client.run(_install_read_counter, self.root)

    def events(self) -> list[tuple[float, str, int]]:
        out = _collected_reads()
        if self.client is not None:
            for reads in self.client.run(_collected_reads).values():
                out.extend(reads)
        return [e for e in out if e[1].startswith(self.root + "/")]

    def summary(self, windows: dict[str, tuple[float, float]]) -> dict:
        """Bytes per window (unix-time intervals), split into the cube (flux/error/mask) and the rest; and how
        often the cube's chunks were read over all windows (chunk keys only, not metadata)."""
        events = self.events()
        cube = ("flux", "error", "mask")
        out = {}
        for name, (t0, t1) in windows.items():
            sel = [e for e in events if t0 <= e[0] <= t1]
            out[name] = {"bytes": int(sum(e[2] for e in sel)),
                         "cube_bytes": int(sum(e[2] for e in sel if e[1][len(self.root) + 1:].split("/")[0] in cube))}
        keys = [e[1] for e in events if e[1][len(self.root) + 1:].split("/")[0] in cube and "/c/" in e[1]]
        out["cube_chunks_read"] = len(set(keys))
        out["cube_chunk_reads"] = len(keys)
        return out


def store_bytes(root: Path) -> int:
    """Size of a store on disk (every file)."""
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def machine_probe(p: int = 4096, rows: int = 2048, repeats: int = 3, seed: int = 0) -> dict:
    """How fast this shared machine is right now, on the study's two kernels, one BLAS thread each.

    ``syrk_s``: a float32 ``rows x p`` Gram update (the pass's kernel); ``sytrd_s``: a float32 tridiagonal
    reduction of a ``p x p`` matrix (the expert solves' kernel); ``pack_s``: adding a float32 triangle into
    a packed float64 total (memory-bound). Medians of ``repeats``. The machine's speed moves by 2-3 x
    between hours, so a run's timings are only comparable with another run's next to their probes.
    """
    import scipy.linalg.lapack

    from snrmoe_dask.blas import blas_threads, syrk_update
    from snrmoe_dask.stats import pack_lower, tri_size

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, p)).astype(np.float32)
    gram = np.empty((p, p), np.float32, order="F")
    total = np.zeros(tri_size(p))
    lwork = max(1, int(scipy.linalg.lapack.ssytrd_lwork(p)[0]))  # blocked, as the solves call it
    times: dict[str, list[float]] = {"syrk_s": [], "sytrd_s": [], "pack_s": []}
    with blas_threads(1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            syrk_update(gram, a, beta=0.0)
            times["syrk_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pack_lower(gram.T, total)
            times["pack_s"].append(time.perf_counter() - t0)
            work = gram.copy(order="F")  # its upper triangle holds a^T a: reduce that triangle
            t0 = time.perf_counter()
            scipy.linalg.lapack.ssytrd(work, lower=0, overwrite_a=1, lwork=lwork)
            times["sytrd_s"].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)), 4) for k, v in times.items()} | {"p": p, "rows": rows,
                                                                          "repeats": repeats}
