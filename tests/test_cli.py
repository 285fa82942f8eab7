from __future__ import annotations

import json

from conftest import clean_arrays, write_raw

from snrmoe_dask.cli import main


def test_simulate_info_run(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    rc = main(["simulate", "--n", "300", "--out", str(out), "--chunk-size", "100", "--n-pixels", "256",
               "--scheduler", "threads"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "true S/N" in text and "spectra/s" in text
    assert main(["info", str(out), "--scheduler", "threads", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_spectra"] == 300 and summary["n_pixels"] == 256
    assert sum(summary["split"][k] for k in ("train", "val", "test")) == 300
    assert summary["pixels"]["bad_flux_pixels"] == 0
    # refuses to clobber without --overwrite
    assert main(["simulate", "--n", "10", "--out", str(out), "--scheduler", "threads"]) == 2


def test_info_exits_nonzero_on_bad_store(tmp_path, capsys):
    flux, error, labels = clean_arrays()
    labels["logg"][3] = float("nan")
    p = write_raw(tmp_path / "bad.zarr", flux, error, **labels)
    assert main(["info", str(p), "--scheduler", "threads"]) == 0  # info needs no labels ...
    assert "1 non-finite" in capsys.readouterr().out              # ... but reports NaN labels
    (tmp_path / "junk").mkdir()
    assert main(["info", str(tmp_path / "junk"), "--scheduler", "threads"]) == 2
    assert "not a readable zarr catalog" in capsys.readouterr().err


def test_run_from_config_and_config_typo(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"simulate: {{n: 300, chunk_size: 128, n_pixels: 256}}\nrun: {{out: {tmp_path / 'run'}}}\n"
                   "cluster: {scheduler: threads}\n")
    assert main(["run", str(cfg)]) == 0
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["summary"]["n_spectra"] == 300
    assert "seconds" in rec["stages"]["catalog"]
    # the last lines say what the run found: the deployed gate against global, the audit, the report
    found = [line for line in capsys.readouterr().out.splitlines() if line.startswith("found")]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    gate = metrics["default_gate"]
    audit = json.loads((tmp_path / "run" / "audit" / "audit.json").read_text())["representations"]
    assert len(found) == 3
    assert f"deployed gate {gate}" in found[0] and f"{metrics['models'][gate]['r2']:.3f}" in found[0]
    assert f"vs {metrics['models']['global']['r2']:.3f}" in found[0]
    assert f"{audit['full']['logg_r2']:.3f}" in found[1] and f"{audit['S3b']['logg_r2']:.3f}" in found[1]
    assert str(tmp_path / "run" / "report.md") in found[2]
    # a second run into the same directory says how to continue it, and --resume reuses the catalog
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "already exists (run directory)" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert main(["run", str(cfg), "--resume"]) == 0
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "skipped" in rec["stages"]["catalog"]
    cfg.write_text("simulate: {nn: 3}\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown key 'simulate.nn'" in capsys.readouterr().err
