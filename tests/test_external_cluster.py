"""A real external cluster: `dask scheduler` and two `dask worker` processes started in another folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from snrmoe_dask.cli import main

DASK = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _cluster(elsewhere: Path, wraps=(None, None)):
    """Scheduler + one single-threaded worker per entry of ``wraps`` (a command prefix the worker runs under, or
    None), working directory ``elsewhere``; yields (address, worker processes); stopped by pid."""
    if DASK is None:
        pytest.skip("the dask command line is not installed")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
                               ":0"], cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for wrap in wraps:
            procs.append(subprocess.Popen([*(wrap or []), DASK, "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--dashboard-address", ":0"], cwd=elsewhere, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(len(wraps), timeout=60)
        yield address, procs[1:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def external_cluster(tmp_path):
    """Scheduler + 2 single-threaded workers whose working directory is an empty folder elsewhere; stopped by pid."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with _cluster(elsewhere) as (address, _):
        yield address, elsewhere


def test_fit_and_evaluate_with_relative_paths_on_an_external_cluster_equal_the_local_run(
        external_cluster, fit_catalog, tmp_path, monkeypatch):
    address, elsewhere = external_cluster
    here = tmp_path / "here"
    here.mkdir()
    shutil.copytree(fit_catalog, here / "cat.zarr")
    # a different catalog at the same relative path in the workers' folder: it must not be read
    decoy = elsewhere / "cat.zarr"
    shutil.copytree(fit_catalog, decoy)
    f = zarr.open_array(str(decoy / "flux"), mode="r+")
    f[:] = np.asarray(f[:])[::-1]
    cfg = here / "c.yaml"
    # float64 statistics: the cluster folds in other blocks and chains than the threads, and float32 sums in another
    # order move an ill-conditioned cell's coefficients by up to 1 % (seen on a clean-clone CI run)
    cfg.write_text("catalog: {test_size: 250}\nfit: {min_cell_rows: 10, precision: float64}\n"
                   "ceiling: {enabled: false}\n")
    monkeypatch.chdir(here)
    for sched, out in ((address, "m_ext"), ("threads", "m_loc")):
        assert main(["fit", "cat.zarr", "--out", out, "--config", "c.yaml", "--scheduler", sched]) == 0
        assert main(["evaluate", out, "cat.zarr", "--out", out + ".json", "--config", "c.yaml",
                     "--scheduler", sched]) == 0
    ext = xr.open_zarr(here / "m_ext" / "experts.zarr", consolidated=False)
    loc = xr.open_zarr(here / "m_loc" / "experts.zarr", consolidated=False)
    np.testing.assert_allclose(ext["coef"].values, loc["coef"].values, rtol=1e-6, atol=1e-9)
    m_ext, m_loc = (json.loads((here / f"{k}.json").read_text()) for k in ("m_ext", "m_loc"))
    assert abs(m_ext["models"]["global"]["r2"] - m_loc["models"]["global"]["r2"]) < 1e-6
    # nothing (checkpoints, row cache) was written into the workers' folder
    assert not [p.name for p in elsewhere.iterdir() if p.name != "cat.zarr" and not p.name.startswith("dask-")]


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare (Linux mount namespaces)")
@pytest.mark.parametrize("view", ["missing", "different"])
def test_a_worker_that_cannot_see_the_catalog_stops_the_fit_in_one_line(fit_catalog, tmp_path, capsys, view):
    """One worker runs in its own mount namespace, where the catalog's folder is empty (``missing``) or holds
    another catalog at the same absolute path (``different``): the fit exits 2 at once, naming the worker,
    instead of hanging at 0 % or folding the other catalog's flux."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    shutil.copytree(fit_catalog, here / "cat.zarr")
    shutil.copytree(fit_catalog, elsewhere / "cat.zarr")
    f = zarr.open_array(str(elsewhere / "cat.zarr" / "flux"), mode="r+")
    f[:] = np.asarray(f[:])[::-1]
    hide = f"mount -t tmpfs none {here}" if view == "missing" else f"mount --bind {elsewhere} {here}"
    blind = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'{hide} && exec "$@"', "sh"]
    with _cluster(elsewhere, wraps=(None, blind)) as (address, _):
        t0 = time.monotonic()
        code = main(["fit", str(here / "cat.zarr"), "--out", str(tmp_path / "m"), "--scheduler", address])
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and took < 60
    assert ("cannot open catalog" if view == "missing" else "sees a different store") in err
    assert not (tmp_path / "m" / "model.json").exists()


def test_a_worker_killed_mid_pass_on_an_external_cluster_leaves_the_model_unchanged(fit_catalog, tmp_path):
    """SIGKILL one of two external workers once the pass has folded a chunk: the fit completes on the other
    and its coefficients and R2 equal an undisturbed local fit."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    cfg = here / "c.yaml"
    cfg.write_text("catalog: {test_size: 250}\nfit: {min_cell_rows: 10, precision: float64}\n"
                   "ceiling: {enabled: false}\n")
    with _cluster(elsewhere) as (address, workers):
        from distributed import Client

        cmd = [sys.executable, "-c", "import sys; from snrmoe_dask.cli import main; sys.exit(main())", "fit",
               str(fit_catalog), "--out", str(here / "m_ext"), "--config", str(cfg), "--scheduler", address]
        fit = subprocess.Popen(cmd, cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with Client(address, timeout=30) as c:
            def folds(dask_scheduler):
                return sum(1 for ts in dask_scheduler.tasks.values()
                           if "acc-fold" in str(ts.key) and ts.state == "memory")
            deadline = time.monotonic() + 120
            while c.run_on_scheduler(folds) < 1:
                assert fit.poll() is None and time.monotonic() < deadline, "the pass never folded a chunk"
                time.sleep(0.01)
        victim = workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        _, err = fit.communicate(timeout=600)
        assert victim.wait(10) == -signal.SIGKILL
    assert fit.returncode == 0, err
    assert main(["fit", str(fit_catalog), "--out", str(here / "m_loc"), "--config", str(cfg),
                 "--scheduler", "threads"]) == 0
    ext = xr.open_zarr(here / "m_ext" / "experts.zarr", consolidated=False)
    loc = xr.open_zarr(here / "m_loc" / "experts.zarr", consolidated=False)
    np.testing.assert_allclose(ext["coef"].values, loc["coef"].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ext["intercept"].values, loc["intercept"].values, rtol=1e-9, atol=1e-9)
