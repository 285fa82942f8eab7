from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from snrmoe_dask.cluster import (
    compute,
    dask_session,
    load_jobqueue_profile,
    local_cluster_kwargs,
    release_memory,
    worker_environ,
)
from snrmoe_dask.config import WORKER_MALLOC_ENV, ClusterConfig


def test_local_kwargs_bind_to_localhost_and_size_to_machine():
    kw = local_cluster_kwargs(ClusterConfig())
    assert kw["host"] == "127.0.0.1"
    assert "host" not in local_cluster_kwargs(ClusterConfig(processes=False))
    assert kw["dashboard_address"].startswith("127.0.0.1")
    assert kw["n_workers"] * kw["threads_per_worker"] >= 1


def test_local_session_computes_and_reports_dashboard(capsys):
    cfg = ClusterConfig(processes=False, dashboard_address="127.0.0.1:0", threads_per_worker=2)
    with dask_session(cfg) as client:
        assert client is not None
        assert client.scheduler.address.startswith(("tcp://127.0.0.1", "inproc://"))
        x = da.ones((100, 10), chunks=(10, 10))
        (s,) = compute(x.sum(), client=client, label="sum")
    assert s == 1000
    assert "dashboard" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["distributed", "threads"])
def test_progress_in_a_batch_log_is_lines_without_carriage_returns(scheduler, capsys):
    """stderr is captured (not a terminal): a line per 10 % of the tasks and a last line, never a redrawn bar."""
    import dask

    x = da.ones((2000, 10), chunks=(10, 10))
    if scheduler == "distributed":
        cfg = ClusterConfig(processes=False, dashboard_address="127.0.0.1:0", threads_per_worker=2)
        with dask_session(cfg) as client:
            capsys.readouterr()
            (s,) = compute((x + 1).sum(), client=client, label="sum")
    else:
        with dask.config.set(scheduler="threads"):
            (s,) = compute((x + 1).sum(), label="sum")
    assert s == 40000
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "[sum]" and lines[-1].startswith("  finished: ") and lines[-1].endswith(" s")
    percents = [int(line.split("%")[0]) for line in lines[1:-1]]
    assert len(percents) >= 5 and percents == sorted(percents) and percents[-1] >= 90


def test_threads_session_and_unknown_scheduler():
    with dask_session(ClusterConfig(scheduler="threads"), quiet=True) as client:
        assert client is None
        (s,) = compute(da.arange(10, chunks=3).sum(), label="sum", progress=False)
        assert s == 45
    with pytest.raises(ValueError, match="unknown scheduler 'mpi'"):
        with dask_session(ClusterConfig(scheduler="mpi"), quiet=True):
            pass


@pytest.mark.parametrize("kind, directive", [("slurm", "#SBATCH"), ("pbs", "#PBS")])
def test_jobqueue_profiles_generate_job_scripts(kind, directive):
    pytest.importorskip("dask_jobqueue")
    from snrmoe_dask.cluster import jobqueue_cluster

    prof = load_jobqueue_profile(kind)
    assert prof["cores"] >= 1
    cluster = jobqueue_cluster(kind, ClusterConfig(scheduler=kind))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert directive in script
    assert "distributed.cli.dask_worker" in script or "dask worker" in script or "dask-worker" in script
    assert f"--nthreads {prof['cores'] // prof['processes']}" in script
    # the worker nanny on the node spawns with the configured malloc settings (parsed as dask does)
    line = next(ln for ln in script.splitlines() if "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON" in ln)
    env = json.loads(line.split("=", 1)[1].strip("'"))
    assert env["MALLOC_MMAP_THRESHOLD_"] == WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # distributed's own defaults are kept


def test_local_worker_processes_get_the_spawn_environment():
    cfg = ClusterConfig(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                        worker_env={"MALLOC_TRIM_THRESHOLD_": "123456789", "SNRMOE_PROBE": "x"})
    with dask_session(cfg, quiet=True) as client:
        env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "SNRMOE_PROBE",
                                                                  "OMP_NUM_THREADS")})
    (got,) = env.values()
    assert got == {"MALLOC_TRIM_THRESHOLD_": "123456789", "SNRMOE_PROBE": "x", "OMP_NUM_THREADS": "1"}
    assert worker_environ(ClusterConfig(worker_env=None))["MALLOC_TRIM_THRESHOLD_"] == "65536"  # distributed's


def test_release_memory_returns_the_workers_heap_and_drops_the_solve_buffers():
    from snrmoe_dask.stats import process_scratch

    def hold_a_buffer():
        with process_scratch() as scratch:
            scratch.take("probe", (256, 256), np.float64)
            return len(scratch)

    def buffers():
        with process_scratch() as scratch:
            return len(scratch)

    cfg = ClusterConfig(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    with dask_session(cfg, quiet=True) as client:
        assert list(client.run(hold_a_buffer).values()) == [1]
        release_memory(client)
        assert list(client.run(buffers).values()) == [0]
    hold_a_buffer()  # without a client: this process
    release_memory(None)
    assert buffers() == 0


def test_missing_profile(tmp_path):
    f = tmp_path / "jq.yaml"
    f.write_text("slurm: {cores: 2}\n")
    with pytest.raises(ValueError, match="no 'pbs' profile"):
        load_jobqueue_profile("pbs", f)
    assert np.isclose(load_jobqueue_profile("slurm", f)["cores"], 2)


def test_tls_profile_puts_certificates_in_worker_job_scripts(tmp_path):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    import yaml

    from snrmoe_dask.cluster import jobqueue_cluster

    prof = yaml.safe_load(Path(_jobqueue_file()).read_text())
    prof["slurm"].update(security=True, shared_temp_directory=str(tmp_path), walltime="01:30:00", memory="48GB")
    f = tmp_path / "jq.yaml"
    f.write_text(yaml.safe_dump(prof))
    cluster = jobqueue_cluster("slurm", ClusterConfig(scheduler="slurm", jobqueue_file=str(f)))
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
    finally:
        cluster.close()
    assert "#SBATCH -t 01:30:00" in script
    assert "--memory-limit 44.70GiB" in script or "--memory-limit 48" in script
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert flag in script
    assert str(tmp_path) in script  # the certificates are read from the shared directory


def test_profiles_bind_the_dashboard_to_localhost():
    for kind in ("slurm", "pbs"):
        assert load_jobqueue_profile(kind)["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")


def test_batch_script_runs_the_study_with_resume():
    import subprocess

    script = Path(_jobqueue_file()).with_name("snrmoe-slurm.sbatch")
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --requeue" in text
    assert 'snrmoe run "$CONFIG" --scheduler slurm --resume' in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell syntax
    readme = script.with_name("README.md").read_text()
    for topic in ("SSH tunnel", "TLS", "adaptive", "spill"):
        assert topic in readme


def _jobqueue_file():
    from snrmoe_dask.cluster import _default_jobqueue_file

    return _default_jobqueue_file()
