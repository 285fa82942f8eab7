"""A real external cluster: `dask scheduler` and two `dask worker` processes started in another folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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


@pytest.fixture
def external_cluster(tmp_path):
    """Scheduler + 2 single-threaded workers whose working directory is an empty folder elsewhere; stopped by pid."""
    if DASK is None:
        pytest.skip("the dask command line is not installed")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
                               ":0"], cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--dashboard-address", ":0"], cwd=elsewhere, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, elsewhere
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


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
