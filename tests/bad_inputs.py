"""The bad-input table: what a hostile user gives each command, and what must come back.

Each case builds its input in a fresh folder and returns the command line. ``tests/test_bad_inputs.py`` runs
every case through the CLI and asserts its outcome; ``python tests/bad_inputs.py`` regenerates the README's
reliability section and ``docs/reliability.md`` from this table and from ``FAULTS`` (the fault tests that need
their own processes), and ``tests/test_docs.py`` fails when they are stale. The docs therefore claim exactly
what the suite checks.

Outcomes:

* ``refused``: exit 2, one stderr line naming the problem (``expect`` is a fragment of it), nothing at ``--out``
  and the inputs unchanged;
* ``stopped``: found part-way through the pass: exit 2 and one line as for ``refused``, the inputs unchanged,
  and the output holds no model (only the checkpoints a ``--resume`` continues from);
* ``counted``: exit 0, and ``expect`` is printed (the count of what was masked);
* ``works``: exit 0 and ``expect`` is printed.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conftest import clean_arrays, write_raw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = ["--scheduler", "threads"]


@dataclass
class Ctx:
    """A fresh folder per case, and the session's small catalog and model (copied before any change)."""

    tmp: Path
    fit_catalog: Path
    model_dir: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def catalog(self) -> Path:
        dst = self.tmp / "cat.zarr"
        shutil.copytree(self.fit_catalog, dst)
        return dst

    def model(self) -> Path:
        dst = self.tmp / "model"
        shutil.copytree(self.model_dir, dst)
        return dst

    def raw(self, edit: Callable[[dict], None] | None = None, name: str = "raw.zarr", **kw) -> Path:
        """A 200 x 64 catalog written from arrays, after ``edit`` changed them (keys: flux, error, labels...)."""
        flux, error, labels = clean_arrays()
        arrays = {"flux": flux, "error": error, **labels, **kw}
        if edit:
            edit(arrays)
        return write_raw(self.tmp / name, arrays.pop("flux"), arrays.pop("error"), **arrays)

    def h5(self, edit: Callable[[dict], None] | None = None, name: str = "in.h5") -> Path:
        import h5py

        flux, error, labels = clean_arrays(n=100, p=32)
        d = {"flux": flux, "error": error, "wavelength": np.linspace(8000, 8800, 32), **labels}
        if edit:
            edit(d)
        path = self.tmp / name
        with h5py.File(path, "w") as f:
            for k, v in d.items():
                f[k] = v
        return path

    def config(self, text: str) -> Path:
        path = self.tmp / "c.yaml"
        path.write_text(text)
        return path


@dataclass
class Case:
    group: str
    name: str
    command: str  # the snrmoe subcommand
    build: Callable[[Ctx], list[str]]  # the whole command line, built in the case's folder
    outcome: str  # refused | stopped | counted | works
    expect: str
    issue: str = ""  # the numbered point of the hostile-input issue it answers, if any


def _set(key, value):
    def edit(d):
        d[key] = value(d) if callable(value) else value
    return edit


def _rows(key, rows, value):
    def edit(d):
        d[key] = d[key].copy()
        d[key][rows] = value
    return edit


def _zarr_edit(path: Path, var: str, fn) -> Path:
    import zarr

    arr = zarr.open_array(str(path / var), mode="r+")
    v = np.asarray(arr[:])
    arr[:] = fn(v)
    return path


def _json_edit(path: Path, edit) -> Path:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _warp(w):
    t = (w - w[0]) / (w[-1] - w[0])
    return w[0] + (w[-1] - w[0]) * t**1.2  # same pixel count and endpoints, interior moved by up to ~6 pixels


def _nan_snr(v):
    return np.where(np.arange(len(v)) % 81 == 0, np.nan, v)  # 38 of 3,000 rows


def _dead_row(v):
    return np.where(np.arange(len(v))[:, None] == 5, np.nan, v)


# command lines: each builder gets the case's Ctx and returns the arguments after the subcommand
def fit(cat, *extra):
    return "fit", lambda c: [str(cat(c)), "--out", str(c.out), *extra, *THREADS]


def info(cat, *extra):
    return "info", lambda c: [str(cat(c)), *extra, *THREADS]


def predict(model=None, cat=None, *extra):
    return "predict", lambda c: [str(model(c) if model else c.model_dir), str(cat(c) if cat else c.fit_catalog),
                                 "--out", str(c.out), *extra, *THREADS]


def evaluate(cat=None, config=None):
    return "evaluate", lambda c: [str(c.model_dir), str(cat(c) if cat else c.fit_catalog), "--out", str(c.out),
                                  *(["--config", str(c.config(config))] if config else []), *THREADS]


def ingest(src, *extra):
    return "ingest", lambda c: [str(src(c)), "--out", str(c.out), *extra]


def config(command_line, text):
    """A command run with a YAML config holding ``text``."""
    command, rest = command_line
    return command, lambda c: [*rest(c), "--config", str(c.config(text))]


def case(group, name, command_line, outcome, expect, issue=""):
    command, rest = command_line
    return Case(group, name, command, lambda c: [command, *rest(c)], outcome, expect, issue)


def _catalog(c):
    return c.fit_catalog


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _drop(c: Ctx, var: str) -> Path:
    import xarray as xr

    good = c.raw(name="good.zarr")
    ds = xr.open_zarr(good, consolidated=False).load().drop_vars(var)
    ds.to_zarr(c.tmp / "bad.zarr", mode="w-", zarr_format=3, consolidated=False)
    return c.tmp / "bad.zarr"


def _unlabelled(c: Ctx) -> Path:
    import xarray as xr

    ds = xr.open_zarr(c.fit_catalog, consolidated=False).drop_vars(["logg", "teff", "mh", "snr"])
    for var in ds.variables.values():
        var.encoding.clear()
    ds.to_zarr(c.tmp / "unlabelled.zarr", mode="w-", zarr_format=3, consolidated=False)
    return c.tmp / "unlabelled.zarr"


def _transposed_error(c: Ctx) -> Path:
    import xarray as xr

    good = c.raw(name="good.zarr")
    ds = xr.open_zarr(good, consolidated=False).load()
    ds.assign(error=ds.error.T).to_zarr(c.tmp / "bad.zarr", mode="w-", zarr_format=3, consolidated=False)
    return c.tmp / "bad.zarr"


def _two_d_label(c: Ctx) -> Path:
    import xarray as xr

    good = c.raw(name="good.zarr")
    ds = xr.open_zarr(good, consolidated=False).load()
    ds.assign(logg=(("spectrum", "x"), ds.logg.values[:, None])).to_zarr(c.tmp / "bad.zarr", mode="w-",
                                                                         zarr_format=3, consolidated=False)
    return c.tmp / "bad.zarr"


def _text_label(c: Ctx) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: fixed-length text has no v3 specification yet
        return c.raw(_set("logg", np.array(["abc"] * 200)))


def _chunked_wave(c: Ctx) -> Path:
    import xarray as xr

    good = c.raw(name="good.zarr")
    ds = xr.open_zarr(good, consolidated=False).load()
    for var in ds.variables.values():
        var.encoding.clear()
    ds.chunk({"spectrum": 50, "wavelength": 16}).to_zarr(c.tmp / "bad.zarr", mode="w-", zarr_format=3,
                                                         consolidated=False)
    return c.tmp / "bad.zarr"


def _empty_catalog(c: Ctx) -> Path:
    flux, error, labels = clean_arrays(n=0)
    return write_raw(c.tmp / "empty.zarr", flux, error, **labels)


def _garbage_chunk(c: Ctx) -> Path:
    cat = c.catalog()
    _truncate(cat / "flux" / "c" / "3" / "0", 100)
    return cat


def _deleted_chunk(c: Ctx) -> Path:
    cat = c.catalog()
    (cat / "error" / "c" / "5" / "0").unlink()
    return cat


def _v2(c: Ctx) -> Path:
    import xarray as xr

    ds = xr.open_zarr(c.fit_catalog, consolidated=False)
    for var in ds.variables.values():
        var.encoding.clear()
    ds.to_zarr(c.tmp / "v2.zarr", zarr_format=2, mode="w-", consolidated=True)
    return c.tmp / "v2.zarr"


def _appended_twice(c: Ctx) -> list[str]:
    from snrmoe_dask.ingest import ingest as ingest_files

    src = c.h5()
    ingest_files(src, c.tmp / "cat.zarr")
    return [str(src), "--out", str(c.tmp / "cat.zarr"), "--append"]


def _rm(model: Path, rel: str) -> Path:
    shutil.rmtree(model / rel)
    return model


def _meta(c: Ctx, edit) -> Path:
    model = c.model()
    _json_edit(model / "model.json", edit)
    return model


def _regridded_model(c: Ctx) -> Path:

    model = c.model()
    _zarr_edit(model / "experts.zarr", "wavelength", lambda w: w + 0.5 * np.median(np.diff(w)))
    return model


def _user_folder(c: Ctx) -> Path:
    folder = c.tmp / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("chapter 1\n")
    return folder


CASES: list[Case] = [
    # pixel values: masked and counted, never refused (a survey has bad pixels)
    case("pixels", "NaN flux", info(lambda c: c.raw(_rows("flux", slice(0, 10), np.nan))),
         "counted", "bad pixels   flux 640  error 0  mask 0"),
    case("pixels", "inf flux", info(lambda c: c.raw(_rows("flux", slice(0, 3), np.inf))),
         "counted", "bad pixels   flux 192  error 0  mask 0"),
    case("pixels", "zero error", info(lambda c: c.raw(_rows("error", slice(0, 5), 0.0))),
         "counted", "bad pixels   flux 0  error 320  mask 0"),
    case("pixels", "negative error", info(lambda c: c.raw(_rows("error", slice(0, 2), -1.0))),
         "counted", "bad pixels   flux 0  error 128  mask 0"),
    case("pixels", "NaN error", info(lambda c: c.raw(_rows("error", slice(0, 1), np.nan))),
         "counted", "bad pixels   flux 0  error 64  mask 0"),
    case("pixels", "a spectrum with every pixel bad", predict(cat=lambda c: _zarr_edit(c.catalog(), "flux", _dead_row)),
         "counted", "too_many_masked  1"),
    # catalog stores
    case("catalog", "path does not exist", fit(lambda c: c.tmp / "nope.zarr"), "refused", "not found"),
    case("catalog", "an empty folder", fit(lambda c: _mkdir(c.tmp / "empty.zarr")),
         "refused", "is not a readable zarr catalog"),
    case("catalog", "a file that is not a store", fit(lambda c: c.config("not: a store\n")),
         "refused", "is not a readable zarr catalog"),
    case("catalog", "missing variable 'error'", fit(lambda c: _drop(c, "error")), "refused",
         "missing variable 'error'"),
    case("catalog", "missing label 'teff'", fit(lambda c: _drop(c, "teff")), "refused", "missing label 'teff'"),
    case("catalog", "no labels at all (prediction)", predict(cat=_unlabelled), "works", "predicted    3000 spectra"),
    case("catalog", "integer flux", fit(lambda c: c.raw(_set("flux", lambda d: d["flux"].astype(np.int32)))),
         "refused", "'flux' has dtype int32"),
    case("catalog", "error with other dims than flux", fit(_transposed_error), "refused", "'error' has dims"),
    case("catalog", "a 2-D label", fit(_two_d_label), "refused", "label 'logg' has dims"),
    case("catalog", "a NaN label", fit(lambda c: c.raw(_rows("logg", 5, np.nan))),
         "refused", "label 'logg' has 1 NaN/inf values (first at spectrum id 5)"),
    case("catalog", "a text label", fit(_text_label), "refused", "label 'logg' holds <U3 values", issue="12"),
    case("catalog", "NaN in the optional true S/N", fit(lambda c: _zarr_edit(c.catalog(), "snr", _nan_snr)),
         "refused", "label 'snr' has 38 NaN/inf values", issue="6"),
    case("catalog", "NaN in the optional true S/N", evaluate(lambda c: _zarr_edit(c.catalog(), "snr", _nan_snr)),
         "refused", "label 'snr' has 38 NaN/inf values", issue="6"),
    case("catalog", "duplicate spectrum ids", fit(lambda c: c.raw(ids=np.r_[0, np.arange(199)])),
         "refused", "1 duplicate ids"),
    case("catalog", "a decreasing wavelength grid", fit(lambda c: c.raw(wavelength=np.linspace(8800, 8000, 64))),
         "refused", "strictly increasing"),
    case("catalog", "chunked along wavelength", fit(_chunked_wave), "refused", "chunked along 'wavelength'"),
    case("catalog", "no spectra", fit(_empty_catalog), "refused", "has no spectra"),
    case("catalog", "a garbage chunk", fit(_garbage_chunk), "stopped",
         "'flux' chunk 3 along spectrum (rows 768-1024) is unreadable"),
    case("catalog", "a deleted chunk file", fit(_deleted_chunk), "stopped", "'error' chunk file(s) [5]"),
    case("catalog", "a zarr v2 store", info(_v2), "works", "spectra", issue="9"),
    case("catalog", "a warped wavelength grid, same endpoints",
         predict(cat=lambda c: _zarr_edit(c.catalog(), "wavelength", _warp)),
         "refused", "wavelength grid differs from the model's", issue="7"),
    case("catalog", "a warped wavelength grid, same endpoints",
         evaluate(lambda c: _zarr_edit(c.catalog(), "wavelength", _warp)),
         "refused", "wavelength grid differs from the model's", issue="7"),
    case("catalog", "another pixel count than the model", predict(cat=lambda c: c.raw()), "refused",
         "wavelength grid"),
    # files given to ingest
    case("ingest", "an empty file", ingest(lambda c: _write(c.tmp / "e.h5", b"")), "refused",
         "not a readable HDF5 file"),
    case("ingest", "a truncated HDF5 file", ingest(lambda c: _truncate(c.h5(), 2000)), "refused",
         "not a readable HDF5 file"),
    case("ingest", "a garbage NPZ file", ingest(lambda c: _write(c.tmp / "g.npz", b"PK\x03\x04garbage")), "refused",
         "not a readable NPZ file"),
    case("ingest", "an unsupported file type", ingest(lambda c: c.config("a: 1\n")), "refused",
         "unsupported file type"),
    case("ingest", "a folder without spectra", ingest(lambda c: _mkdir(c.tmp / "d")), "refused", "folder holds no"),
    case("ingest", "missing dataset 'logg'", ingest(lambda c: c.h5(lambda d: d.pop("logg"))), "refused",
         "missing dataset 'logg' (spectra without labels: ingest them with --no-labels"),
    case("ingest", "error of another shape than flux",
         ingest(lambda c: c.h5(_set("error", lambda d: d["error"][:, :31]))),
         "refused", "dataset 'error' has shape (100, 31), 'flux' has (100, 32)"),
    case("ingest", "1-D flux", ingest(lambda c: c.h5(_set("flux", lambda d: d["flux"][0]))), "refused",
         "dataset 'flux' must be 2-D"),
    case("ingest", "a wavelength of the wrong length", ingest(lambda c: c.h5(_set("wavelength", np.arange(31.0)))),
         "refused", "dataset 'wavelength' has shape (31,), expected (32,)"),
    case("ingest", "a text label", ingest(lambda c: c.h5(_set("logg", np.array([b"abc"] * 100)))), "refused",
         "label dataset 'logg' holds |S3 values", issue="12"),
    case("ingest", "a NaN label", ingest(lambda c: c.h5(_rows("teff", [3, 4], np.nan))), "refused",
         "label dataset 'teff' has 2 NaN/inf values"),
    case("ingest", "float ids", ingest(lambda c: c.h5(_set("spectrum", np.arange(100.0)))), "refused",
         "id dataset 'spectrum' must be integer"),
    case("ingest", "the same file appended twice", ("ingest", _appended_twice), "refused", "is already in catalog",
         issue="1"),
    # configuration
    case("config", "an unknown key", config(fit(_catalog), "fit: {alpah: 1}\n"), "refused",
         "unknown key 'fit.alpah'"),
    case("config", "a value of the wrong type", config(("simulate", lambda c: ["--out", str(c.out)]),
                                                       "simulate: {n: many}\n"), "refused", "simulate.n"),
    case("config", "not a mapping", config(info(_catalog), "- a\n"), "refused", "mapping"),
    case("config", "config file not found", info(_catalog, "--config", "/nonexistent/c.yaml"), "refused",
         "not found"),
    case("config", "a NaN S/N bin edge", config(fit(_catalog), "catalog: {snr_edges: [.nan, 4, 7]}\n"),
         "refused", "strictly increasing list of finite numbers", issue="8"),
    case("config", "a split salt other than the model's", evaluate(config="catalog: {split_salt: 1}\n"),
         "refused", "catalog.split_salt is 1 in this config, but the model was fitted with 0", issue="5"),
    case("config", "an unreachable scheduler",
         ("info", lambda c: [str(c.fit_catalog), "--config", str(c.config("cluster: {connect_timeout: 1}\n")),
                             "--scheduler", "tcp://127.0.0.1:1"]),
         "refused", "cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 1 s", issue="10"),
    # model stores
    case("model", "not a model directory", predict(model=lambda c: _mkdir(c.tmp / "m")), "refused", "no model.json"),
    case("model", "'coef' deleted from experts.zarr", predict(model=lambda c: _rm(c.model(), "experts.zarr/coef")),
         "refused", "variable 'coef' is missing", issue="11"),
    case("model", "'pca_components' deleted", predict(model=lambda c: _rm(c.model(), "experts.zarr/pca_components")),
         "refused", "variable 'pca_components' is missing", issue="11"),
    case("model", "'snr_bin_names' shortened",
         predict(model=lambda c: _meta(c, lambda m: m.update(snr_bin_names=m["snr_bin_names"][:-1]))),
         "refused", "'snr_bin_names' has 3 names for 4 S/N bins", issue="11"),
    case("model", "a text 'fallback_tau'", predict(model=lambda c: _meta(c, lambda m: m["gates"].update(
        fallback_tau="0.3"))), "refused", "'gates.fallback_tau' is '0.3'; it must be a number", issue="11"),
    case("model", "a model.json field of the wrong type",
         predict(model=lambda c: _meta(c, lambda m: m.update(n_pixels="many"))), "refused", "'n_pixels'"),
    case("model", "a truncated model.json", predict(model=lambda c: _truncate(c.model() / "model.json", 50).parent),
         "refused", "model.json"),
    case("model", "an unknown gate", predict(None, None, "--gate", "nope"), "refused", "unknown gate 'nope'"),
    # update and merge
    case("update", "a catalog whose ids the model has seen",
         ("update", lambda c: [str(c.model_dir), str(c.fit_catalog), "--out", str(c.out), *THREADS]),
         "refused", "3000 spectrum ids are already in model"),
    case("update", "another wavelength grid", ("update", lambda c: [str(c.model_dir), str(c.raw()), "--out",
                                                                    str(c.out), *THREADS]),
         "refused", "wavelength grid"),
    case("update", "a catalog without labels", ("update", lambda c: [str(c.model_dir), str(_unlabelled(c)),
                                                                     "--out", str(c.out), *THREADS]),
         "refused", "missing label"),
    case("update", "a model store without statistics",
         ("update", lambda c: [str(_rm(c.model(), "stats.zarr")), str(c.fit_catalog), "--out", str(c.out), *THREADS]),
         "refused", "model store has no stats.zarr"),
    case("update", "a config that changes the cells",
         config(("update", lambda c: [str(c.model_dir), str(c.fit_catalog), "--out", str(c.out), *THREADS]),
                "catalog: {snr_edges: [3, 5, 8]}\n"),
         "refused", "catalog.snr_edges is [3.0, 5.0, 8.0] in this config, but model"),
    case("update", "`--out` is the model, without --in-place",
         ("update", lambda c: [str(c.model_dir), str(c.fit_catalog), "--out", str(c.model_dir), *THREADS]),
         "refused", "--out is the model being updated"),
    case("update", "models with different wavelength grids",
         ("merge", lambda c: [str(c.model_dir), str(_regridded_model(c)), "--out", str(c.out), *THREADS]),
         "refused", "differ in their wavelength grid"),
    case("update", "models with different bin edges",
         ("merge", lambda c: [str(c.model_dir), str(_meta(c, lambda m: m["bin_edges"].update(snr_edges=[2, 4, 8]))),
                              "--out", str(c.out), *THREADS]),
         "refused", "differ in their bin edges"),
    case("update", "models with different alpha grids",
         ("merge", lambda c: [str(c.model_dir), str(_meta(c, lambda m: m["config"]["fit"].update(
             alphas_relative=[1e-3, 1e-2]))), "--out", str(c.out), *THREADS]),
         "refused", "differ in their alpha grid"),
    case("update", "models with different split salts",
         ("merge", lambda c: [str(c.model_dir), str(_meta(c, lambda m: m["config"]["catalog"].update(split_salt=7))),
                              "--out", str(c.out), *THREADS]),
         "refused", "differ in their split"),
    case("update", "models of overlapping catalogs",
         ("merge", lambda c: [str(c.model_dir), str(c.model()), "--out", str(c.out), *THREADS]),
         "refused", "share 3000 spectrum ids"),
    # outputs
    case("outputs", "`--out` on the input catalog, with --overwrite",
         ("predict", lambda c: [str(c.model_dir), str(c.catalog()), "--out", str(c.tmp / "cat.zarr"), "--overwrite",
                                *THREADS]), "refused", "is a simulated catalog", issue="2"),
    case("outputs", "`--out` on a user's folder, with --overwrite",
         ("fit", lambda c: [str(c.fit_catalog), "--out", str(_user_folder(c)), "--overwrite", *THREADS]),
         "refused", "is a directory", issue="2"),
]


@dataclass
class Fault:
    """A fault that needs its own processes or a long run, tested by ``test`` (``file::function``)."""

    issue: str
    what: str
    outcome: str
    test: str


FAULTS: list[Fault] = [
    Fault("1", "`ingest --append` SIGKILLed after 1, 5, 12 and 19 of its 20 chunks",
          "the catalog opens with exactly its old rows; rerunning completes the append (each new spectrum once); "
          "a third run is refused",
          "tests/test_ingest.py::test_a_killed_append_leaves_the_old_catalog_and_rerunning_completes_it"),
    Fault("1", "a new `ingest` SIGKILLed part-way", "nothing is left at its path; the rerun succeeds",
          "tests/test_ingest.py::test_a_killed_new_ingest_leaves_nothing_at_the_path"),
    Fault("2", "every command's `--out` (with and without `--overwrite`) on a catalog, a model, a folder, a file",
          "refused in one line; what was there is byte-identical",
          "tests/test_outputs.py::test_no_command_replaces_what_it_did_not_create"),
    Fault("3", "two `snrmoe fit` processes into one `--out`",
          "the second exits 2 naming the first (pid, host, start time); the first model completes",
          "tests/test_outputs.py::test_two_fits_into_one_directory_one_is_refused_and_the_first_model_is_intact"),
    Fault("3", "a lock left by a dead process", "detected as stale and taken",
          "tests/test_outputs.py::test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken"),
    Fault("4", "an external `dask scheduler` and two `dask worker`s started in another folder that holds another "
               "catalog at the same relative path",
          "`fit` and `evaluate` with relative paths give the local run's coefficients and R²",
          "tests/test_external_cluster.py::"
          "test_fit_and_evaluate_with_relative_paths_on_an_external_cluster_equal_the_local_run"),
    Fault("4", "a worker that cannot see the catalog (its folder empty, or another catalog mounted there)",
          "`fit` stops in one line naming the worker (exit 2), no hang",
          "tests/test_external_cluster.py::test_a_worker_that_cannot_see_the_catalog_stops_the_fit_in_one_line"),
    Fault("", "one of two external workers SIGKILLed mid-pass", "the coefficients of an undisturbed local fit",
          "tests/test_external_cluster.py::"
          "test_a_worker_killed_mid_pass_on_an_external_cluster_leaves_the_model_unchanged"),
    Fault("", "a LocalCluster worker killed mid-reduction", "bit-identical statistics",
          "tests/test_reliability.py::test_killing_a_worker_mid_reduction_gives_identical_statistics"),
    Fault("", "`snrmoe run` SIGKILLed mid-pass, then `--resume`",
          "identical statistics, features and metrics; only the missing chunks are read",
          "tests/test_run.py::test_killed_reduction_resumes_to_identical_statistics"),
    Fault("", "NaN/inf flux, zero/negative error and masked rows in a fit", "counted per reason; the model equals "
          "a fit on the catalog without those rows", "tests/test_reliability.py::"
          "test_bad_values_are_counted_and_the_fit_matches_a_clean_run"),
    Fault("9", "a zarr v2 catalog", "every command works; the fit equals its v3 copy's",
          "tests/test_hostile.py::test_a_zarr_v2_catalog_works_for_every_command_and_fits_as_its_v3_copy"),
    Fault("11", "a model store with any of `coef`, `intercept`, `resid_var`, `pca_mean`, `pca_components` deleted, "
                "bin names shortened or a gate setting of the wrong type",
          "refused at load in one line naming the file", "tests/test_hostile.py::"
          "test_a_tampered_model_store_is_refused_naming_the_file"),
]

GROUPS = {"pixels": "Pixel values", "catalog": "Catalogs", "ingest": "Files given to `ingest`",
          "config": "Configuration", "model": "Model stores", "update": "`update` and `merge`", "outputs": "Outputs"}
OUTCOME = {"refused": "refused", "stopped": "stops, no model", "counted": "counted", "works": "works"}
BEGIN, END = "<!-- reliability: generated by tests/bad_inputs.py -->", "<!-- reliability: end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_doc() -> str:
    """docs/reliability.md: the whole table and the fault tests."""
    lines = ["# Reliability: what the test suite checks", "",
             "Generated by `python tests/bad_inputs.py` from the table the suite runs (`tests/test_bad_inputs.py` "
             "runs every row through the command line; `tests/test_docs.py` fails when this page is stale). "
             "*Refused*: exit 2, one stderr line containing the text shown, nothing written and the inputs "
             "unchanged. *Stops, no model*: found part-way through the pass; the same one line, and the output "
             "holds only what `--resume` continues from. *Counted*: the run goes on and reports the count shown.",
             ""]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| input | command | outcome | message or output |", "|---|---|---|---|"]
        for c in (c for c in CASES if c.group == group):
            lines.append(f"| {_cell(c.name)} | `snrmoe {c.command}` | {OUTCOME[c.outcome]} | `{_cell(c.expect)}` |")
        lines.append("")
    lines += ["## Faults", "", "These need their own processes or a longer run; each is one test.", "",
              "| fault | outcome | test |", "|---|---|---|"]
    lines += [f"| {_cell(f.what)} | {_cell(f.outcome)} | `{f.test}` |" for f in FAULTS]
    return "\n".join(lines) + "\n"


def render_readme() -> str:
    """The README's short reliability section."""
    counts = {o: sum(c.outcome == o for c in CASES) for o in OUTCOME}
    return "\n".join([
        BEGIN,
        f"The suite runs {len(CASES)} bad inputs through the command line ({counts['refused']} refused with one "
        f"line and exit 2, nothing written; {counts['stopped']} found mid-pass, which stop and leave no model; "
        f"{counts['counted'] + counts['works']} accepted, with bad pixels masked and counted) and {len(FAULTS)} "
        "faults in their own processes, among them:",
        "",
        *[f"* {f.what}: {f.outcome}." for f in FAULTS if f.issue in ("1", "3", "4")],
        "",
        "The full table, generated from the suite: [docs/reliability.md](docs/reliability.md).",
        END])


def write_docs(root: Path = ROOT) -> None:
    (root / "docs" / "reliability.md").write_text(render_doc())
    readme = (root / "README.md").read_text()
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    (root / "README.md").write_text(readme[:start] + render_readme() + readme[stop:])


if __name__ == "__main__":
    write_docs()
