"""A write never destroys something it did not create: every command's --out against what may sit there."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import clean_arrays, write_raw

from snrmoe_dask.cli import main
from snrmoe_dask.outputs import OutputError, claim_output, describe, replace_atomically
from snrmoe_dask.store import load_model


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) with a hash of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def places(fitted, fit_catalog, tmp_path):
    """Copies of a catalog (simulated and ingested-like), a model, a folder and a file the user owns."""
    _, _, model_dir = fitted
    sim = tmp_path / "sim.zarr"
    shutil.copytree(fit_catalog, sim)
    flux, error, labels = clean_arrays(n=50, p=16)
    real = write_raw(tmp_path / "real.zarr", flux, error, **labels)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1\n")
    afile = tmp_path / "table.json"
    afile.write_text('{"mine": 1}')
    return {"simulated catalog": sim, "catalog": real, "model": model, "directory": folder, "file": afile}


def test_describe_names_what_is_there(places, tmp_path):
    for kind, path in places.items():
        assert describe(path) == kind
    assert describe(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert describe(tmp_path / "empty") == "empty directory"


# (command line without --out, the kind it writes)
COMMANDS = {
    "predict": (lambda m, c: ["predict", str(m), str(c)]),
    "evaluate": (lambda m, c: ["evaluate", str(m), str(c)]),
    "fit": (lambda m, c: ["fit", str(c)]),
    "simulate": (lambda m, c: ["simulate", "--n", "50", "--n-pixels", "32"]),
    "audit": (lambda m, c: ["audit", str(c)]),
    "ceiling": (lambda m, c: ["ceiling", str(c)]),
}
# what each command may replace with --overwrite (everything else in `places` is refused)
REPLACES = {"simulate": {"simulated catalog"}}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_no_command_replaces_what_it_did_not_create(places, command, overwrite, capsys):
    model, catalog = places["model"], places["simulated catalog"]
    for kind, target in places.items():
        if overwrite and kind in REPLACES.get(command, set()):
            continue
        before = tree(target)
        argv = COMMANDS[command](model, catalog) + ["--out", str(target), "--scheduler", "threads"]
        rc = main(argv + (["--overwrite"] if overwrite else []))
        err = capsys.readouterr().err.strip()
        assert rc == 2, (command, kind)
        assert len(err.splitlines()) == 1 and str(target) in err, err
        assert kind.split()[-1] in err or "exists" in err, err
        assert tree(target) == before, f"{command} --out {kind} changed it"
    load_model(model)  # still a model


def test_nothing_is_written_inside_a_catalog_or_a_model(places, capsys):
    model, catalog = places["model"], places["simulated catalog"]
    for parent in (catalog, model):
        before = tree(parent)
        rc = main(["predict", str(model), str(catalog), "--out", str(parent / "pred.zarr"), "--scheduler", "threads"])
        assert rc == 2 and "does not write into one" in capsys.readouterr().err
        assert tree(parent) == before


def test_predict_replaces_its_own_store_only_with_overwrite(places, tmp_path, capsys):
    model, catalog = places["model"], places["simulated catalog"]
    out = tmp_path / "pred.zarr"
    argv = ["predict", str(model), str(catalog), "--out", str(out), "--scheduler", "threads"]
    assert main(argv) == 0
    assert describe(out) == "predictions store"
    first = tree(out)
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert tree(out) == first
    assert main(argv + ["--gate", "deploy_snr_logreg", "--overwrite"]) == 0
    assert describe(out) == "predictions store" and tree(out) != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_evaluate_replaces_its_own_metrics_file_only_with_overwrite(places, tmp_path, capsys):
    model, catalog = places["model"], places["simulated catalog"]
    out = tmp_path / "m.json"
    argv = ["evaluate", str(model), str(catalog), "--out", str(out), "--scheduler", "threads"]
    assert main(argv) == 0 and describe(out) == "metrics file"
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_fit_continues_or_restarts_an_interrupted_fit_but_never_replaces_a_model(places, tmp_path, capsys):
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    assert describe(partial) == "interrupted fit"
    with pytest.raises(OutputError, match="--resume to continue it or --overwrite"):
        claim_output(partial, "model")
    assert claim_output(partial, "model", resume=True) == "interrupted fit"
    assert claim_output(partial, "model", overwrite=True) == "interrupted fit"
    with pytest.raises(OutputError, match="complete model"):
        claim_output(places["model"], "model", overwrite=True)
    with pytest.raises(OutputError, match="complete model"):
        claim_output(places["model"], "model", resume=True)
    assert claim_output(places["model"], "model", replace_model=True) == "model"  # `run` redoing its own study


def test_an_interrupted_replacement_leaves_the_old_output(tmp_path):
    out = tmp_path / "pred.zarr"
    out.mkdir()
    (out / "zarr.json").write_text("{}")
    with pytest.raises(RuntimeError), replace_atomically(out) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr"]
    assert (out / "zarr.json").read_text() == "{}"
    with replace_atomically(out) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text('{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr"]
    assert (out / "zarr.json").read_text() == '{"new": 1}'


def _lock_file_for(pid: int, started_unix: float, host: str | None = None) -> str:
    import json
    import socket

    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00",
                       "started_unix": started_unix, "command": "snrmoe fit"})


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken(places, tmp_path, capsys):
    import subprocess
    import sys
    import time

    import psutil

    from snrmoe_dask.outputs import lock_path

    model, catalog = places["model"], places["simulated catalog"]
    out = tmp_path / "pred.zarr"
    argv = ["predict", str(model), str(catalog), "--out", str(out), "--scheduler", "threads"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = lock_path(out)
        lock.write_text(_lock_file_for(holder.pid, psutil.Process(holder.pid).create_time()))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"being written by pid {holder.pid}" in err and "snrmoe fit" in err
        assert not out.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert main(argv) == 0  # the holder is gone: its lock is stale and taken over
    assert describe(out) == "predictions store" and not lock.exists()
    # a pid that now belongs to a newer process (the lock's start time is earlier) is stale too
    lock.write_text(_lock_file_for(__import__("os").getpid(), 0.0))
    assert main(argv + ["--overwrite"]) == 0 and not lock.exists()


def test_two_fits_into_one_directory_one_is_refused_and_the_first_model_is_intact(fit_catalog, tmp_path):
    """Two real processes: the second `snrmoe fit` into the same --out fails naming the first; the first completes."""
    import os
    import subprocess
    import sys
    import time

    from snrmoe_dask.outputs import lock_path

    out = tmp_path / "model"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("catalog: {test_size: 250}\nfit: {min_cell_rows: 10}\n")
    cmd = [sys.executable, "-m", "snrmoe_dask.cli", "fit", str(fit_catalog), "--out", str(out), "--config", str(cfg),
           "--scheduler", "threads"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not lock_path(out).exists() and first.poll() is None and time.time() - t0 < 60:
            time.sleep(0.02)
        assert lock_path(out).exists(), "the first fit never took its lock"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        err = [line for line in second.stderr.strip().splitlines() if "error" in line]
        assert len(err) == 1 and f"being written by pid {first.pid}" in err[0], second.stderr
        _, ferr = first.communicate(timeout=300)
        assert first.returncode == 0, ferr
    finally:
        first.kill()
    model = load_model(out)
    assert len(model.specs) > 0 and not lock_path(out).exists()


def test_every_store_a_user_opens_opens_quietly_with_plain_xarray(fitted, fit_catalog, tmp_path):
    """Consolidated metadata: ``xr.open_zarr(path)`` needs no keyword and warns about nothing."""
    import warnings

    import xarray as xr

    _, _, model_dir = fitted
    assert main(["predict", str(model_dir), str(fit_catalog), "--out", str(tmp_path / "p.zarr"),
                 "--scheduler", "threads"]) == 0
    assert main(["simulate", "--n", "60", "--n-pixels", "32", "--out", str(tmp_path / "s.zarr"),
                 "--scheduler", "threads"]) == 0
    stores = [tmp_path / "p.zarr", tmp_path / "s.zarr", *(model_dir / name for name in (
        "experts.zarr", "features.zarr", "gate_table.zarr", "baselines.zarr", "stats.zarr"))]
    for path in stores:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = xr.open_zarr(path)
        assert ds.sizes, path
    gates = json.loads((model_dir / "model.json").read_text())["gates"]["fitted"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in gates:  # one group per gate
            assert xr.open_zarr(model_dir / "gates.zarr", group=name).data_vars
