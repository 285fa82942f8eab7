from __future__ import annotations

import signal
import subprocess
import sys
import time
import tracemalloc

import h5py
import numpy as np
import pytest

from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.config import StorageConfig
from snrmoe_dask.ingest import IngestError, ingest


def _arrays(n=300, p=48, seed=0, wave=None):
    rng = np.random.default_rng(seed)
    d = {
        "flux": rng.normal(100, 10, (n, p)).astype(np.float32),
        "error": rng.uniform(5, 15, (n, p)).astype(np.float32),
        "wavelength": np.linspace(8000, 8800, p) if wave is None else wave,
        "logg": rng.uniform(0, 5, n),
        "teff": rng.uniform(3500, 6500, n),
        "mh": rng.uniform(-2.5, 0.75, n),
        "snr": rng.uniform(1, 9, n),
    }
    d["flux"][3, 4] = np.nan  # pixel-level problems are kept and masked later, not refused
    return d


def _h5(path, d):
    with h5py.File(path, "w") as f:
        for k, v in d.items():
            f[k] = v
    return path


def _npz(path, d, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, **d)
    return path


STORE = StorageConfig(ingest_chunk_size=64)


@pytest.mark.parametrize("fmt", ["h5", "npz", "npz-compressed"])
def test_round_trip_values_identical(tmp_path, fmt):
    d = _arrays()
    d["mask"] = np.zeros(d["flux"].shape, bool)
    d["mask"][7, :3] = True
    src = _h5(tmp_path / "a.h5", d) if fmt == "h5" else _npz(tmp_path / "a.npz", d, fmt.endswith("compressed"))
    rep = ingest(src, tmp_path / "c.zarr", storage=STORE)
    assert rep["rows"] == 300
    ds = open_catalog(tmp_path / "c.zarr").load()
    np.testing.assert_array_equal(ds["flux"].values, d["flux"])
    np.testing.assert_array_equal(ds["error"].values, d["error"])
    np.testing.assert_array_equal(ds["mask"].values, d["mask"])
    np.testing.assert_array_equal(ds["wavelength"].values, d["wavelength"])
    for k in ("logg", "teff", "mh", "snr"):
        np.testing.assert_array_equal(ds[k].values, d[k])
    np.testing.assert_array_equal(ds["spectrum"].values, np.arange(300))
    assert ds["flux"].encoding["chunks"] == (64, 48)


def test_folder_and_append_keep_ids_unique_and_split_stable(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _h5(folder / "a.h5", _arrays(seed=1))
    _npz(folder / "b.npz", _arrays(n=100, seed=2))
    ingest(folder, tmp_path / "c.zarr", storage=STORE)
    before = open_catalog(tmp_path / "c.zarr")
    assert before.sizes["spectrum"] == 400
    split_before = before["split"].values.copy()
    d3 = _arrays(n=150, seed=3)
    ingest(_npz(tmp_path / "c.npz", d3), tmp_path / "c.zarr", append=True, storage=STORE)
    after = open_catalog(tmp_path / "c.zarr").load()
    assert after.sizes["spectrum"] == 550
    np.testing.assert_array_equal(after["spectrum"].values, np.arange(550))
    np.testing.assert_array_equal(after["split"].values[:400], split_before)
    np.testing.assert_array_equal(after["flux"].values[400:], d3["flux"])


def test_given_ids_are_used_and_duplicates_refused(tmp_path):
    d = _arrays(n=50)
    d["spectrum"] = np.arange(1000, 1050)
    ingest(_h5(tmp_path / "a.h5", d), tmp_path / "c.zarr", storage=STORE)
    assert open_catalog(tmp_path / "c.zarr")["spectrum"].values[0] == 1000
    other = _arrays(n=50, seed=9)  # other spectra under the same ids
    other["spectrum"] = d["spectrum"]
    with pytest.raises(IngestError, match="not unique"):
        ingest(_h5(tmp_path / "b.h5", other), tmp_path / "c.zarr", append=True, storage=STORE)
    assert open_catalog(tmp_path / "c.zarr").sizes["spectrum"] == 50  # nothing half-written


def test_mismatched_wavelength_refused_on_append(tmp_path):
    ingest(_h5(tmp_path / "a.h5", _arrays()), tmp_path / "c.zarr", storage=STORE)
    other = _arrays(wave=np.linspace(8001, 8801, 48))
    with pytest.raises(IngestError, match="wavelength grid differs"):
        ingest(_h5(tmp_path / "b.h5", other), tmp_path / "c.zarr", append=True, storage=STORE)
    with pytest.raises(IngestError, match="wavelength grid differs"):
        ingest(_h5(tmp_path / "b2.h5", _arrays(p=40)), tmp_path / "c.zarr", append=True, storage=STORE)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("error"), "missing dataset 'error'"),
        (lambda d: d.__setitem__("Flux", d.pop("flux")), r"missing dataset 'flux' \(did you mean \['Flux'\]"),
        (lambda d: d.pop("logg"), "missing dataset 'logg'"),
        (lambda d: d.__setitem__("error", d["error"][:, :10]), "dataset 'error' has shape"),
        (lambda d: d.__setitem__("teff", d["teff"][:10]), "label dataset 'teff' has shape"),
        (lambda d: d.__setitem__("wavelength", d["wavelength"][:10]), "dataset 'wavelength' has shape"),
        (lambda d: d["mh"].__setitem__(4, np.nan), "label dataset 'mh' has 1 NaN"),
        (lambda d: d.__setitem__("flux", d["flux"][0]), "dataset 'flux' must be 2-D"),
        (lambda d: d.__setitem__("wavelength", d["wavelength"][::-1].copy()), "strictly increasing"),
    ],
)
@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_bad_files_are_refused_by_dataset_name(tmp_path, edit, message, fmt):
    d = _arrays()
    edit(d)
    src = _h5(tmp_path / "a.h5", d) if fmt == "h5" else _npz(tmp_path / "a.npz", d)
    with pytest.raises(IngestError, match=message):
        ingest(src, tmp_path / "c.zarr", storage=STORE)
    assert not (tmp_path / "c.zarr").exists()


def test_unlabelled_ingest_for_prediction(tmp_path):
    d = {k: v for k, v in _arrays().items() if k in ("flux", "error", "wavelength")}
    with pytest.raises(IngestError, match="missing dataset 'logg'"):
        ingest(_h5(tmp_path / "a.h5", d), tmp_path / "c.zarr", storage=STORE)
    ingest(tmp_path / "a.h5", tmp_path / "c.zarr", storage=STORE, require_labels=())
    assert open_catalog(tmp_path / "c.zarr", require_labels=()).sizes["spectrum"] == 300


def test_other_refusals(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        ingest(tmp_path / "none.h5", tmp_path / "c.zarr")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(IngestError, match="unsupported file type"):
        ingest(tmp_path / "x.txt", tmp_path / "c.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no"):
        ingest(tmp_path / "empty", tmp_path / "c.zarr")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(IngestError, match="not a readable HDF5"):
        ingest(tmp_path / "bad.h5", tmp_path / "c.zarr")
    ingest(_h5(tmp_path / "a.h5", _arrays()), tmp_path / "c.zarr", storage=STORE)
    with pytest.raises(IngestError, match="already exists"):
        ingest(tmp_path / "a.h5", tmp_path / "c.zarr", storage=STORE)
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "a.h5", tmp_path / "nope.zarr", append=True, storage=STORE)


@pytest.mark.parametrize("fmt", ["h5", "npz-compressed"])
def test_ingest_streams_with_bounded_memory(tmp_path, fmt):
    n, p = 4000, 1024  # 2 x 16 MB cube
    rng = np.random.default_rng(5)
    d = {"flux": rng.normal(size=(n, p)).astype(np.float32), "error": np.ones((n, p), np.float32),
         "wavelength": np.linspace(7100, 8850, p), "logg": rng.uniform(0, 5, n),
         "teff": rng.uniform(3500, 6500, n), "mh": rng.uniform(-2, 0.5, n)}
    src = _h5(tmp_path / "big.h5", d) if fmt == "h5" else _npz(tmp_path / "big.npz", d, compressed=True)
    del d
    tracemalloc.start()
    ingest(src, tmp_path / "c.zarr", storage=StorageConfig(ingest_chunk_size=200))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # one block is 200 x 1024 x 4 B = 0.8 MB per array; the whole cube is 32 MB
    assert peak < 12e6, f"peak {peak / 1e6:.1f} MB"


# ------------------------------------------------------------ killed appends
_CLI = [sys.executable, "-c", "import sys; from snrmoe_dask.cli import main; sys.exit(main())"]


def _chunks_written(cat) -> int:
    root = cat / "flux" / "c"
    return sum(1 for _ in root.iterdir()) if root.is_dir() else 0


def _kill_when(cmd: list[str], ready) -> None:
    """Run ``cmd``, SIGKILL it as soon as ``ready()`` holds, and check that it was killed part-way."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, "the ingest wrote nothing in 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the ingest ended before it could be killed part-way"


@pytest.mark.parametrize("kill_after_chunks", [1, 5, 12, 19])
def test_a_killed_append_leaves_the_old_catalog_and_rerunning_completes_it(tmp_path, kill_after_chunks):
    """SIGKILL an ``ingest --append`` once it has written k of its 20 chunks: the catalog opens with exactly its
    old rows; the same append run again completes it (no duplicate ids, the new spectra once); a third run
    is refused, because the file is already in the catalog."""
    old, new = _arrays(n=1030, seed=1), _arrays(n=2000, seed=2)  # 1030: the old last chunk is partial
    # no ids in the files: ingest generates them, the case that duplicated spectra
    cat = tmp_path / "c.zarr"
    ingest(_npz(tmp_path / "old.npz", old), cat, storage=StorageConfig(ingest_chunk_size=100))
    before = _chunks_written(cat)
    cmd = [*_CLI, "ingest", str(_npz(tmp_path / "new.npz", new)), "--out", str(cat), "--append", "--chunk-size",
           "100"]
    _kill_when(cmd, lambda: _chunks_written(cat) >= before + kill_after_chunks)
    ds = open_catalog(cat)
    n = ds.sizes["spectrum"]
    assert n == 1030, f"an append killed before it committed left {n} rows"
    np.testing.assert_array_equal(ds["flux"].values[:1030], old["flux"])
    np.testing.assert_array_equal(ds["logg"].values[:1030], old["logg"])

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # completes what was killed
    assert rerun.returncode == 0, rerun.stderr
    ds = open_catalog(cat)
    assert ds.sizes["spectrum"] == 3030
    np.testing.assert_array_equal(ds["spectrum"].values, np.arange(3030))
    np.testing.assert_array_equal(ds["flux"].values[:1030], old["flux"])
    np.testing.assert_array_equal(ds["flux"].values[1030:], new["flux"])
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 2 and "already in catalog" in third.stderr.strip().splitlines()[-1]
    assert open_catalog(cat).sizes["spectrum"] == 3030


def test_a_killed_new_ingest_leaves_nothing_at_the_path(tmp_path):
    """A new catalog is written beside its path and renamed in when complete: a kill leaves no catalog (the
    rerun succeeds, and removes the killed run's half-written store)."""
    d = _arrays(n=3000, seed=4)
    cat = tmp_path / "c.zarr"
    cmd = [*_CLI, "ingest", str(_npz(tmp_path / "a.npz", d)), "--out", str(cat), "--chunk-size", "100"]
    _kill_when(cmd, lambda: any(_chunks_written(s) >= 5 for s in tmp_path.glob(".c.zarr.ingest-*")))
    assert not cat.exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    np.testing.assert_array_equal(open_catalog(cat)["flux"].values, d["flux"])
    assert not list(tmp_path.glob(".c.zarr.ingest-*"))
