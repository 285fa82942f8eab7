"""One entry point for the Dask cluster, and computing with progress.

``--scheduler`` values:

* ``local`` (default): an embedded LocalCluster sized to the machine;
* ``tcp://host:port``: an existing scheduler;
* ``slurm`` / ``pbs``: dask-jobqueue with a profile from ``cluster/jobqueue.yaml``;
* ``threads`` / ``synchronous``: no distributed cluster (debugging, tiny runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import yaml
from dask.callbacks import Callback

from .config import ClusterConfig

__all__ = ["dask_session", "compute", "check_workers_see", "jobqueue_cluster", "load_jobqueue_profile",
           "local_cluster_kwargs", "release_memory", "worker_environ"]


def local_cluster_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """LocalCluster arguments for this machine.

    One worker with one thread per core by default: the X.T @ X kernels are
    BLAS-bound and release the GIL, so threads share the cube blocks without
    copying, and the nanny pins BLAS to one thread per task, so concurrency
    comes from dask tasks, not from BLAS oversubscription.
    """
    ncores = os.cpu_count() or 1
    kwargs = {
        "n_workers": cfg.n_workers or 1,
        "threads_per_worker": cfg.threads_per_worker or max(1, ncores // (cfg.n_workers or 1)),
        "processes": cfg.processes,
        "memory_limit": cfg.memory_limit,
        "dashboard_address": cfg.dashboard_address,
        "local_directory": cfg.local_directory,
    }
    if cfg.processes:  # in-process clusters talk over inproc://, nothing listens on the network
        kwargs["host"] = "127.0.0.1"
    return kwargs


#: seconds a worker waits for the results of the stage just gathered to be released before it trims
RELEASE_WAIT_S = 5.0


def _trim_heap() -> int:
    """Drop this process's solve buffers and give its free heap back to the OS (glibc ``malloc_trim``).
    Returns 1 if memory was returned."""
    import ctypes
    import ctypes.util

    from .stats import clear_process_scratch

    clear_process_scratch()  # the solve buffers are only reused within a stage
    try:
        return int(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return 0


async def _trim_worker_heap(dask_worker, wait_s: float = RELEASE_WAIT_S) -> int:
    """:func:`_trim_heap` on a worker, once the keys it held are released (the release messages travel
    apart from ``client.run``). A coroutine, so the worker's event loop processes them while it waits."""
    import asyncio

    deadline = time.monotonic() + wait_s
    while len(dask_worker.data) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _trim_heap()


def release_memory(client=None) -> None:
    """After a stage whose results have been gathered: return the workers' (or, without a client, this
    process's) freed heap to the OS. With ``worker_env``'s malloc settings freed memory stays in the heap
    for the next allocation (fresh pages cost seconds per GB on some VMs); between stages it would only
    add to the peak of the process tree."""
    if client is None:
        _trim_heap()
    else:
        client.run(_trim_worker_heap)


def worker_environ(cfg: ClusterConfig) -> dict[str, str]:
    """``distributed.nanny.pre-spawn-environ`` with ``cfg.worker_env`` on top (read at nanny start)."""
    env = {k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()}
    env.update({k: str(v) for k, v in (cfg.worker_env or {}).items()})
    return env


def _default_jobqueue_file() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "_cluster" / "jobqueue.yaml", here.parent / "cluster" / "jobqueue.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError("cluster/jobqueue.yaml not found; set cluster.jobqueue_file")


def load_jobqueue_profile(kind: str, path: str | Path | None = None) -> dict[str, Any]:
    """The ``slurm`` or ``pbs`` block of the jobqueue profiles file."""
    file = Path(path) if path else _default_jobqueue_file()
    data = yaml.safe_load(file.read_text()) or {}
    if kind not in data:
        raise ValueError(f"{file} has no '{kind}' profile (found: {sorted(data)})")
    return {k: v for k, v in (data[kind] or {}).items() if v is not None}


def jobqueue_cluster(kind: str, cfg: ClusterConfig):
    """A dask-jobqueue SLURMCluster or PBSCluster from the profile (not yet scaled)."""
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise RuntimeError("--scheduler slurm|pbs needs dask-jobqueue: pip install 'snrmoe[cluster]'") from exc
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
    profile = load_jobqueue_profile(kind, cfg.jobqueue_file)
    if cfg.worker_env:  # the nanny on the node reads its spawn environment from dask config
        env = json.dumps(worker_environ(cfg), sort_keys=True)
        profile["job_script_prologue"] = [*profile.get("job_script_prologue", []),
                                          f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{env}'"]
    return cls(**profile)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def dask_session(cfg: ClusterConfig | None = None, *, quiet: bool = False) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (or ``None`` for threads/synchronous).

    The dashboard link is printed to stderr. The cluster is closed on exit.
    """
    cfg = cfg or ClusterConfig()
    sched = cfg.scheduler
    if sched in ("threads", "synchronous", "sync"):
        with dask.config.set(scheduler="synchronous" if sched.startswith("sync") else "threads"):
            _say(f"dask: {sched} scheduler (no dashboard)", quiet)
            yield None
        return

    from distributed import Client, LocalCluster

    if sched == "local":
        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(cfg)}):
            cluster = LocalCluster(**local_cluster_kwargs(cfg))
    elif sched.startswith(("tcp://", "tls://")):
        cluster = None
    elif sched in ("slurm", "pbs"):
        cluster = jobqueue_cluster(sched, cfg)
        if cfg.adapt_max_jobs:
            cluster.adapt(minimum_jobs=0, maximum_jobs=cfg.adapt_max_jobs)
        else:
            cluster.scale(jobs=cfg.jobs)
    else:
        raise ValueError(
            f"unknown scheduler '{sched}': use local, tcp://host:port, slurm, pbs, threads or synchronous"
        )
    if cluster is not None:
        client = Client(cluster)
    else:
        try:
            client = Client(sched, timeout=cfg.connect_timeout)
        except (OSError, TimeoutError) as exc:  # distributed raises OSError("Timed out trying to connect ...")
            raise ValueError(f"cannot reach the Dask scheduler at {sched} within {cfg.connect_timeout:g} s "
                             f"(cluster.connect_timeout): {type(exc).__name__}") from None
    try:
        _say(f"dask: scheduler {client.scheduler.address}, dashboard {client.dashboard_link}", quiet)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class _LineProgress(Callback):
    """Progress for batch logs: one line per 10 % of tasks done (no carriage returns)."""

    def _start_state(self, dsk, state):
        self._t0 = time.perf_counter()
        self._total = max(1, sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")))
        self._next = 0.1

    def _posttask(self, key, result, dsk, state, worker_id):
        frac = len(state["finished"]) / self._total
        if frac >= self._next:
            print(f"  {frac:4.0%} of {self._total} tasks, {time.perf_counter() - self._t0:.0f} s", file=sys.stderr,
                  flush=True)
            self._next = (int(frac * 10) + 1) / 10

    def _finish(self, dsk, state, errored):
        status = "error" if errored else "finished"
        print(f"  {status}: {self._total} tasks in {time.perf_counter() - self._t0:.1f} s", file=sys.stderr,
              flush=True)


def _line_progress_bar(futures) -> None:
    """``distributed``'s text progress as batch-log lines: one per 10 % of the tasks and one at the end, with
    the elapsed time (its own bar redraws one line with carriage returns: 240 KB in a default job's log)."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class LineBar(TextProgressBar):
        _next = 0.1

        def _draw_bar(self, remaining, all, **kwargs):
            frac = (1 - remaining / all) if all else 1.0
            if frac >= self._next and frac < 1.0:
                print(f"  {frac:4.0%} of {all} tasks, {self.elapsed:.0f} s", file=sys.stderr, flush=True)
                self._next = (int(frac * 10) + 1) / 10

        def _draw_stop(self, remaining=0, all=0, status="finished", **kwargs):
            print(f"  {status}: {all} tasks in {self.elapsed:.1f} s", file=sys.stderr, flush=True)

    LineBar(futures, complete=True)


def compute(*collections, client=None, label: str = "compute", progress: bool = True):
    """Compute dask collections, showing progress on stderr; returns a tuple.

    With a distributed client this uses ``distributed.progress`` on futures
    (also visible on the dashboard); otherwise ``dask.diagnostics.ProgressBar``.
    When stderr is not a terminal (a batch job's log), progress is one line per
    10 % of the tasks and one at the end, never a carriage-return bar.
    """
    if not progress:
        if client is not None:
            return tuple(client.gather(client.compute(list(collections))))
        return dask.compute(*collections)
    print(f"[{label}]", file=sys.stderr, flush=True)
    if client is not None:
        from distributed import progress as dist_progress

        futures = client.compute(list(collections))
        if not sys.stderr.isatty():
            _line_progress_bar(futures)
            return tuple(client.gather(futures))
        with contextlib.redirect_stdout(sys.stderr):
            dist_progress(futures)  # its scheduler feed is cancelled noisily at shutdown if slowed
        print("", file=sys.stderr)
        return tuple(client.gather(futures))
    from dask.diagnostics import ProgressBar

    with ProgressBar(out=sys.stderr) if sys.stderr.isatty() else _LineProgress():
        return dask.compute(*collections)


def check_workers_see(client, path: str | Path, timeout: float = 30.0) -> None:
    """Fail unless every worker of ``client`` opens the same store at ``path`` as this process.

    Tasks open the catalog by its absolute path on the worker's own filesystem: a worker where that path is
    missing would fail every read (and the pass wait for it), one where another store sits there would fold
    another catalog's flux with our labels. Each worker computes
    :func:`~snrmoe_dask.catalog.store_fingerprint` of the path, within ``timeout`` seconds
    (``cluster.connect_timeout``); a missing, different or silent worker raises one :class:`ValueError`
    naming it. Without a distributed client (threads) there is nothing to check.
    """
    from .catalog import CatalogError, store_fingerprint

    if client is None or not hasattr(client, "scheduler_info"):
        return
    from distributed import wait

    path = str(Path(path).absolute())
    mine = store_fingerprint(path)
    workers = sorted(client.nthreads())  # every worker (scheduler_info lists only the first few by default)
    futures = {w: client.submit(store_fingerprint, path, workers=[w], allow_other_workers=False, pure=False,
                                key=f"check catalog on {w}-{os.getpid()}-{time.monotonic_ns()}") for w in workers}
    try:
        _, pending = wait(list(futures.values()), timeout=timeout)
    except Exception:  # noqa: BLE001 - distributed raises its own TimeoutError on some versions
        pending = {f for f in futures.values() if not f.done()}
    for f in pending:
        f.cancel()
    silent = [w for w, f in futures.items() if f in pending]
    if silent:
        raise CatalogError(f"worker(s) {', '.join(silent)} did not open catalog {path} within {timeout:g} s "
                           "(cluster.connect_timeout)")
    for w, f in futures.items():
        if f.status == "error":
            exc = f.exception()
            raise CatalogError(f"worker {w} cannot open catalog {path}: {exc} (every worker must see the catalog "
                               "at the same path: a shared filesystem)")
        if f.result() != mine:
            raise CatalogError(f"worker {w} sees a different store at {path} than this process (a copy on its own "
                               "filesystem?): every worker must read the same catalog")
