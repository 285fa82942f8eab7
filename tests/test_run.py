"""`snrmoe run`: stages, resume after a kill, fingerprints, seeds and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from conftest import small_sim_config, write_sim

from snrmoe_dask.config import load_config
from snrmoe_dask.metrics import r2_table
from snrmoe_dask.pipeline import run_pipeline
from snrmoe_dask.report import FIGURES

TINY = {"catalog": {"test_size": 250}, "fit": {"min_cell_rows": 10}, "cluster": {"scheduler": "threads"}}


def _cfg(tmp_path: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _snrmoe(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "snrmoe_dask.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def slow_catalog(tmp_path_factory):
    """60 chunks of 100 spectra x 512 pixels: a pass long enough to be killed in the middle."""
    return write_sim(tmp_path_factory.mktemp("kill") / "cat.zarr",
                     small_sim_config(n=6000, n_pixels=512, chunk_size=100, seed=5))


@pytest.mark.slow
def test_killed_reduction_resumes_to_identical_statistics(slow_catalog, tmp_path):
    sections = {"fit": {"min_cell_rows": 10, "chains": 1, "checkpoint_every": 4},
                "run": {"catalog": str(slow_catalog), "audit": True, "report": False},
                "ceiling": {"enabled": False}}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cfg_killed = _cfg(tmp_path, **{**sections, "run": {**sections["run"], "out": str(killed)}})
    cfg_clean = _cfg(tmp_path, **{**sections, "run": {**sections["run"], "out": str(clean)}})

    proc = _snrmoe("run", cfg_killed)
    state = killed / "model" / "checkpoints" / "chain-0" / "state.json"
    deadline = time.monotonic() + 300
    done_at_kill = []
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                done_at_kill = json.loads(state.read_text())["chunks_done"]
            except (json.JSONDecodeError, FileNotFoundError):  # being replaced right now
                continue
            if len(done_at_kill) >= 8:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-reduction:\n{proc.stdout.read()}"
    assert not (killed / "model" / "model.json").exists()  # nothing looks complete
    n_chunks = 60
    assert 8 <= len(done_at_kill) < n_chunks

    resumed = _snrmoe("run", cfg_killed, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    ref = _snrmoe("run", cfg_clean)
    out_ref, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out_ref

    acc = json.loads((killed / "model" / "model.json").read_text())["accumulation"]
    acc_ref = json.loads((clean / "model" / "model.json").read_text())["accumulation"]
    # the finished chunks were not folded again; the others were folded exactly once
    assert acc["chunks_from_checkpoint"] >= len(done_at_kill)
    assert acc["chunks_folded"] == acc_ref["chunks_folded"] - acc["chunks_from_checkpoint"]
    assert acc["chunks_folded"] < acc_ref["chunks_folded"]
    assert acc["feature_blocks_from_checkpoint"] >= len(done_at_kill)
    a = xr.open_zarr(killed / "model" / "stats.zarr", consolidated=False).load()
    b = xr.open_zarr(clean / "model" / "stats.zarr", consolidated=False).load()
    for name in ("n", "sx", "sy", "syy", "xtx", "xty", "shift"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    fa = xr.open_zarr(killed / "model" / "features.zarr", consolidated=False).load()
    fb = xr.open_zarr(clean / "model" / "features.zarr", consolidated=False).load()
    xr.testing.assert_identical(fa, fb)
    ma = json.loads((killed / "metrics.json").read_text())
    mb = json.loads((clean / "metrics.json").read_text())
    assert ma["models"] == mb["models"]
    # the audit rode the same chains: its state was checkpointed with theirs and resumes to the same figures
    aa = json.loads((killed / "audit" / "audit.json").read_text())
    ab = json.loads((clean / "audit" / "audit.json").read_text())
    assert aa["representations"] == ab["representations"] and aa["checks"] == ab["checks"]
    # the row cache survived the kill whole: the resumed gates and evaluate read it, and it equals a clean run's
    from snrmoe_dask.cache import open_row_cache

    for run in (killed, clean):
        assert json.loads((run / "model" / "model.json").read_text())["gates"]["val_rows_source"] == "row cache"
        assert json.loads((run / "metrics.json").read_text())["test_rows_source"] == "row cache"
    xr.testing.assert_equal(open_row_cache(killed / "model" / "rows").load(),
                            open_row_cache(clean / "model" / "rows").load())
    assert not (killed / "model" / "checkpoints").exists()  # removed once the fit completed
    stages = json.loads((killed / "run.json").read_text())["stages"]
    assert stages["fit"]["chunks_from_checkpoint"] == acc["chunks_from_checkpoint"]


def test_resume_skips_finished_stages_and_reruns_what_a_change_touches(tmp_path):
    cfg = load_config(_cfg(tmp_path, simulate=small_sim_config(n=1500, n_pixels=96, chunk_size=256).model_dump(),
                           run={"out": str(tmp_path / "run")}))
    first = run_pipeline(cfg)
    assert {s for s, v in first["stages"].items() if "skipped" not in v} == {"catalog", "audit", "fit", "evaluate",
                                                                             "report"}
    again = run_pipeline(cfg, resume=True)
    assert all("skipped" in v for v in again["stages"].values())
    # the ceiling only touches evaluate (and the report after it)
    changed = cfg.model_copy(update={"ceiling": cfg.ceiling.model_copy(update={"samples": 100})})
    third = run_pipeline(changed, resume=True)
    rerun = {s for s, v in third["stages"].items() if "skipped" not in v}
    assert rerun == {"evaluate", "report"}
    # a fit setting reruns fit and everything downstream, and the audit that rides the fit's pass
    changed = cfg.model_copy(update={"fit": cfg.fit.model_copy(update={"min_cell_rows": 11})})
    fourth = run_pipeline(changed, resume=True)
    assert {s for s, v in fourth["stages"].items() if "skipped" not in v} == {"fit", "audit", "evaluate", "report"}
    assert fourth["stages"]["audit"]["in_fit_pass"]
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["config"]["fit"]["min_cell_rows"] == 11 and "versions" in recorded
    # an audit setting alone: the fit is complete, so the audit reads the catalog on its own
    changed = changed.model_copy(update={"audit": changed.audit.model_copy(update={"seed": 3})})
    fifth = run_pipeline(changed, resume=True)
    assert {s for s, v in fifth["stages"].items() if "skipped" not in v} == {"audit", "report"}
    assert fifth["stages"]["audit"]["own_pass"]


def test_report_has_every_figure_and_tables_from_metrics(tmp_path):
    cfg = load_config(_cfg(tmp_path, simulate=small_sim_config(n=1500, n_pixels=96, chunk_size=256).model_dump(),
                           run={"out": str(tmp_path / "run")}))
    run_pipeline(cfg)
    run_dir = tmp_path / "run"
    for name in FIGURES:
        png = (run_dir / "figures" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    report = (run_dir / "report.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert r2_table(metrics) in report  # generated from metrics.json, not retyped
    for name in FIGURES:
        assert f"(figures/{name})" in report
    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert f"| S3b | {audit['representations']['S3b']['logg_r2']:.3f}" in report
    # the CLI rewrites the same report
    (run_dir / "report.md").unlink()
    from snrmoe_dask.cli import main

    assert main(["report", str(run_dir)]) == 0
    body = report.split("## R² per model")[1]  # (the stage table now also lists the report stage)
    assert (run_dir / "report.md").read_text().split("## R² per model")[1] == body


def test_seeds_give_mean_and_std(tmp_path):
    cfg = load_config(_cfg(tmp_path, simulate=small_sim_config(n=1200, n_pixels=64, chunk_size=300).model_dump(),
                           run={"out": str(tmp_path / "run"), "seeds": [0, 1, 2], "audit": False},
                           ceiling={"enabled": False}))
    record = run_pipeline(cfg)
    per = [json.loads((tmp_path / "run" / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1, 2)]
    cats = [xr.open_zarr(tmp_path / "run" / f"seed-{s}" / "catalog.zarr", consolidated=False) for s in (0, 1, 2)]
    assert not np.array_equal(cats[0]["logg"].values, cats[1]["logg"].values)  # a new simulation per seed
    summary = json.loads((tmp_path / "run" / "seeds.json").read_text())
    for name in ("global", "hierarchical", "whitened"):
        vals = np.array([m["models"][name]["r2"] for m in per])
        assert summary["models"][name]["r2"]["mean"] == pytest.approx(vals.mean(), rel=1e-12)
        assert summary["models"][name]["r2"]["std"] == pytest.approx(vals.std(ddof=1), rel=1e-12)
        b = np.array([m["models"][name]["per_snr_bin"]["L"]["r2"] for m in per])
        assert summary["models"][name]["per_snr_bin"]["L"]["mean"] == pytest.approx(b.mean(), rel=1e-12)
    report = (tmp_path / "run" / "report.md").read_text()
    g = summary["models"]["global"]["r2"]
    assert f"| global | {g['mean']:.3f} ± {g['std']:.3f} |" in report
    assert record["seeds"] == [0, 1, 2]


def test_run_config_errors_name_the_key(tmp_path):
    from snrmoe_dask.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seedz: [0, 1]\n")
    with pytest.raises(ConfigError, match="seedz"):
        load_config(bad)
    bad.write_text("run:\n  catalog: a.zarr\n  ingest: b.h5\n")
    with pytest.raises(ConfigError, match="at most one"):
        load_config(bad)


def test_run_ingests_files_and_skips_the_audit_without_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    n, p = 1500, 64
    flux = rng.normal(100, 10, (n, p)).astype(np.float32)
    logg = flux[:, :4].astype(np.float64) @ rng.normal(size=4) / 40
    src = tmp_path / "survey.npz"
    np.savez(src, flux=flux, error=np.full((n, p), 10.0, np.float32), wavelength=np.linspace(8000, 8800, p),
             logg=logg, teff=rng.uniform(3500, 6500, n), mh=rng.uniform(-2.5, 0.75, n), snr=rng.uniform(1, 9, n))
    cfg = load_config(_cfg(tmp_path, run={"out": str(tmp_path / "run"), "ingest": str(src)}))
    record = run_pipeline(cfg)
    assert record["stages"]["catalog"]["ingested_rows"] == n
    assert "no mag" in record["stages"]["audit"]["skipped"]
    assert record["metrics"]["models"]["global"]["r2"] > 0.9
    assert "ceiling" not in record["metrics"]  # not a simulated catalog
    assert (tmp_path / "run" / "report.md").is_file()
