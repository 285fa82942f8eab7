"""The catalog: a zarr store opened as a lazy, validated xarray Dataset.

Schema::

    flux        (spectrum, wavelength) float32   observed counts
    error       (spectrum, wavelength) float32   1-sigma noise
    mask        (spectrum, wavelength) bool      optional, true = bad pixel
    wavelength  (wavelength)           float64   coordinate, Angstrom
    spectrum    (spectrum)             int64     coordinate, unique id
    logg, teff, mh, alpha_m, mag, snr  (spectrum) float   labels

Layering: :func:`pixel_counts` and :func:`good_pixel_mask` are NumPy kernels;
:func:`pixel_quality` maps them lazily over the cube; :func:`open_catalog`
and :func:`summarize_catalog` are the labelled layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .bins import phys_bin, snr_bin, tertile_edges
from .config import CatalogConfig
from .split import SPLIT_NAMES, TRAIN, assign_split, frozen_test_mask

__all__ = [
    "store_fingerprint",
    "SCHEMA_VERSION",
    "REQUIRED_LABELS",
    "OPTIONAL_LABELS",
    "CatalogError",
    "open_catalog",
    "validate_catalog",
    "good_pixel_mask",
    "pixel_counts",
    "pixel_quality",
    "bin_edges",
    "assign_bins",
    "summarize_catalog",
    "quality_totals",
]

SCHEMA_VERSION = "1.0"
REQUIRED_LABELS: tuple[str, ...] = ("logg", "teff", "mh")
OPTIONAL_LABELS: tuple[str, ...] = ("alpha_m", "mag", "snr")
_CUBE = ("spectrum", "wavelength")
_COUNT_NAMES = ("n_bad_flux", "n_bad_error", "n_masked", "n_good")


class CatalogError(ValueError):
    """A catalog breaks the schema; the message names the variable and the problem."""


# ----------------------------------------------------------------- kernels
def good_pixel_mask(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """True where a pixel is usable: finite flux, finite error > 0, mask unset."""
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    return good


def pixel_counts(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-spectrum pixel counts, shape (n, 4), int32.

    Columns: non-finite flux, bad error (non-finite or <= 0), mask set, good.
    A pixel bad for several reasons counts once under each reason.
    """
    n, p = flux.shape
    if mask is None or not np.any(mask):
        # fast path for clean blocks: nothing non-finite and no error <= 0 means every pixel is good
        with np.errstate(invalid="ignore"):
            clean = bool(np.isfinite(flux).all() and (error > 0).all() and np.isfinite(error).all())
        if clean:
            out = np.zeros((n, 4), np.int32)
            out[:, 3] = p
            return out
    bad_flux = ~np.isfinite(flux)
    bad_err = ~(np.isfinite(error) & (error > 0))
    masked = np.zeros_like(bad_flux) if mask is None else np.asarray(mask, dtype=bool)
    good = ~(bad_flux | bad_err | masked)
    return np.stack([bad_flux.sum(1), bad_err.sum(1), masked.sum(1), good.sum(1)], axis=1).astype(np.int32)


# ------------------------------------------------------------- dask layer
def pixel_quality(ds: xr.Dataset, min_good_fraction: float = 0.5) -> xr.Dataset:
    """Lazy per-spectrum pixel counts and the ``usable`` flag.

    Returns
    -------
    Dataset with ``n_bad_flux``, ``n_bad_error``, ``n_masked``, ``n_good``
    (int32) and ``usable`` (bool: ``n_good >= min_good_fraction * n_pixels``),
    all of dims (spectrum,), backed by dask.
    """
    flux, error = ds["flux"].data, ds["error"].data
    args = [flux, error]
    if "mask" in ds:
        args.append(ds["mask"].data)

    def _kernel(*blocks: np.ndarray) -> np.ndarray:
        return pixel_counts(*blocks)

    counts = da.map_blocks(
        _kernel, *args, dtype=np.int32, chunks=(flux.chunks[0], (len(_COUNT_NAMES),)), name="pixel-counts"
    )
    out = xr.Dataset(
        {name: ("spectrum", counts[:, i]) for i, name in enumerate(_COUNT_NAMES)},
        coords={"spectrum": ds["spectrum"]},
    )
    n_pix = ds.sizes["wavelength"]
    out["usable"] = out["n_good"] >= int(np.ceil(min_good_fraction * n_pix))
    return out


# -------------------------------------------------------- labelled layer
def _fail(msg: str) -> None:
    raise CatalogError(msg)


def validate_catalog(ds: xr.Dataset, require_labels: Sequence[str] = REQUIRED_LABELS) -> None:
    """Raise :class:`CatalogError` if ``ds`` breaks the schema.

    Checks names, dims, dtypes, chunking (whole spectra per chunk), the
    wavelength grid, unique ids, and that every label in ``require_labels``
    exists and is finite. Pixel-level problems (NaN flux, error <= 0, mask)
    are *not* schema errors: they are masked and counted by
    :func:`pixel_quality`.
    """
    for name in ("flux", "error"):
        if name not in ds.variables:
            _fail(f"missing variable '{name}' (found: {sorted(map(str, ds.variables))})")
        var = ds[name]
        if var.dims != _CUBE:
            _fail(f"variable '{name}' has dims {var.dims}, expected {_CUBE}")
        if not np.issubdtype(var.dtype, np.floating):
            _fail(f"variable '{name}' has dtype {var.dtype}, expected float32")
    if "mask" in ds.variables:
        m = ds["mask"]
        if m.dims != _CUBE:
            _fail(f"variable 'mask' has dims {m.dims}, expected {_CUBE}")
        if not (m.dtype == bool or np.issubdtype(m.dtype, np.integer)):
            _fail(f"variable 'mask' has dtype {m.dtype}, expected bool or uint8")
    if "wavelength" not in ds.coords:
        _fail("missing coordinate 'wavelength'")
    wave = np.asarray(ds["wavelength"].values)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        _fail(f"coordinate 'wavelength' must be 1-D float, got dims {ds['wavelength'].dims} dtype {wave.dtype}")
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        _fail("coordinate 'wavelength' must be finite and strictly increasing")
    if "spectrum" not in ds.coords:
        _fail("missing coordinate 'spectrum' (unique integer id per spectrum)")
    ids = np.asarray(ds["spectrum"].values)
    if not np.issubdtype(ids.dtype, np.integer):
        _fail(f"coordinate 'spectrum' has dtype {ids.dtype}, expected int64 ids")
    if ids.size == 0:
        _fail("catalog has no spectra (dimension 'spectrum' is empty)")
    if np.unique(ids).size != ids.size:
        _fail(f"coordinate 'spectrum' has {ids.size - np.unique(ids).size} duplicate ids")
    for name in ("flux", "error", "mask"):
        if name in ds.variables and ds[name].chunks is not None:
            wchunks = ds[name].chunks[1]
            if len(wchunks) != 1:
                _fail(
                    f"variable '{name}' is chunked along 'wavelength' ({len(wchunks)} chunks); every chunk "
                    "must hold whole spectra -- re-write it with `snrmoe ingest` or rechunk along 'spectrum' only"
                )
    for name in (*REQUIRED_LABELS, *OPTIONAL_LABELS):
        if name in ds.variables and ds[name].dims != ("spectrum",):
            _fail(f"label '{name}' has dims {ds[name].dims}, expected ('spectrum',)")
        if name in ds.variables and ds[name].dtype.kind not in "biuf":
            _fail(f"label '{name}' holds {ds[name].dtype} values (text?); labels must be numbers")
    for name in require_labels:
        if name not in ds.variables:
            _fail(f"missing label '{name}', needed for this command")
        values = np.asarray(ds[name].values, dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            first = int(ids[np.argmax(bad)])
            hint = ("; the true S/N routes rows to their S/N bin: fill it, or drop the 'snr' variable to route "
                    "every row by its S/N estimate") if name == "snr" else ""
            _fail(f"label '{name}' has {int(bad.sum())} NaN/inf values (first at spectrum id {first}){hint}")


class _CheckedArray:
    """Array-like over one stored zarr array whose failed reads name the chunk.

    A truncated or corrupt chunk makes the codec raise deep inside zarr; this
    wrapper turns that into a :class:`CatalogError` naming the variable, the
    chunk and its rows. A chunk file that is missing (zarr would silently
    return the fill value, NaN) is reported the same way for stores on a
    local filesystem.
    """

    def __init__(self, path: str, name: str):
        import zarr

        self.path, self.name = str(path), name
        self._z = zarr.open_array(Path(path) / name, mode="r")
        self.shape, self.dtype, self.ndim = self._z.shape, self._z.dtype, self._z.ndim
        self._rows = int(self._z.chunks[0])

    def __reduce__(self):
        return type(self), (self.path, self.name)

    def _where(self, key) -> tuple[int, int, int, int]:
        rows = key[0] if isinstance(key, tuple) else key
        lo = int(rows.start or 0) if isinstance(rows, slice) else 0
        hi = int(rows.stop if isinstance(rows, slice) and rows.stop is not None else self.shape[0])
        return lo, hi, lo // self._rows, max(lo, hi - 1) // self._rows

    def _missing_chunks(self, first: int, last: int) -> list[int]:
        root = Path(self.path) / self.name
        if not root.is_dir():  # not a local directory store: cannot tell
            return []
        nd = self.ndim
        return [i for i in range(first, last + 1)
                if not (root / "c" / str(i) / "/".join(["0"] * (nd - 1))).exists()
                and not (root / ".".join([str(i)] + ["0"] * (nd - 1))).exists()]

    def __getitem__(self, key):
        try:
            out = self._z[key]
        except Exception as exc:  # noqa: BLE001 - any codec/IO failure means the same to the user
            lo, hi, first, last = self._where(key)
            raise CatalogError(
                f"{self.path}: '{self.name}' chunk {first}{'' if last == first else f'..{last}'} along spectrum "
                f"(rows {lo}-{hi}) is unreadable -- the store is truncated or corrupt "
                f"({type(exc).__name__}: {exc})") from None
        if out.dtype.kind == "f" and out.size and np.isnan(out).all():
            lo, hi, first, last = self._where(key)
            missing = self._missing_chunks(first, last)
            if missing:
                raise CatalogError(f"{self.path}: '{self.name}' chunk file(s) {missing} along spectrum (rows "
                                   f"{lo}-{hi}) are missing from the store -- it is incomplete")
        return out


def _checked_cube(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Swap the cube variables' dask arrays for reads through :class:`_CheckedArray`."""
    from dask.base import tokenize

    for name in ("flux", "error", "mask"):
        if name in ds and ds[name].chunks is not None:
            try:
                arr = _CheckedArray(str(path), name)
            except Exception:  # noqa: BLE001 - not a plain zarr array (e.g. a v2 group layout): keep xarray's
                continue
            if arr.shape != ds[name].shape or arr.dtype != ds[name].dtype:
                continue  # encoded on disk (scale/offset): keep xarray's decoding
            data = da.from_array(arr, chunks=ds[name].data.chunks, lock=False, asarray=True,
                                 name=f"{name}-{tokenize(str(path.resolve()), name, arr.shape, str(arr.dtype))}",
                                 meta=np.empty((0,) * arr.ndim, arr.dtype))
            ds[name] = ds[name].copy(data=data)
    return ds


_FINGERPRINT_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata", "flux/zarr.json", "flux/.zarray",
                      "error/zarr.json", "error/.zarray", "spectrum/zarr.json", "spectrum/.zarray")
_FIRST_CHUNKS = ("flux/c/0/0", "flux/0.0", "spectrum/c/0", "spectrum/0")


def store_fingerprint(path: str | Path) -> str:
    """What tells two copies of a catalog apart, cheaply: its metadata documents and the first 64 kB and size of
    its first flux and id chunks. Run where the store is opened (a worker) and compared with the client's.

    Raises
    ------
    CatalogError
        If there is no store at ``path`` here.
    """
    import hashlib

    path = Path(path)
    if not path.is_dir():
        raise CatalogError(f"no catalog at {path}")
    h = hashlib.sha256()
    for name in (*_FINGERPRINT_FILES, *_FIRST_CHUNKS):
        f = path / name
        h.update(name.encode())
        if f.is_file():
            with f.open("rb") as fh:
                h.update(str(f.stat().st_size).encode())
                h.update(fh.read(65536))
    return h.hexdigest()[:24]


def _has_consolidated(path: Path) -> bool:
    """Whether the store at ``path`` holds consolidated metadata (zarr v3: in its root ``zarr.json``; v2:
    ``.zmetadata``)."""
    if (path / ".zmetadata").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError, AttributeError):
        return False


def open_catalog(
    path: str | Path,
    *,
    require_labels: Sequence[str] = REQUIRED_LABELS,
    config: CatalogConfig | None = None,
    chunk_size: int | None = None,
    routes_by_snr: bool = False,
) -> xr.Dataset:
    """Open a catalog store lazily, validate it and attach its split.

    Parameters
    ----------
    path : path-like
        A zarr (v3 or v2) store written by ``snrmoe simulate`` or ``snrmoe ingest``.
    require_labels : sequence of str
        Labels that must be present and finite (empty for ``predict``).
    routes_by_snr : bool
        The command bins rows by the true S/N when the catalog has ``snr``
        (``fit``, ``evaluate``, ``info``): then ``snr`` must be finite too. A
        NaN there is refused with the count, never routed to a bin; without
        the variable every row is routed by its S/N estimate.
    config : CatalogConfig, optional
        Split fractions, salt and ``test_size``; defaults if omitted.
    chunk_size : int, optional
        Rechunk along ``spectrum`` to this many rows (default: the stored chunks).

    Returns
    -------
    xarray.Dataset
        The cube as dask arrays, plus ``split`` (int8: 0 train, 1 val, 2 test)
        and ``frozen_test`` (bool), both in memory (one value per spectrum).

    Raises
    ------
    CatalogError
        If the store is missing, unreadable or breaks the schema.
    """
    cfg = config or CatalogConfig()
    path = Path(path).absolute()  # tasks run on workers whose working directory is not ours
    if not path.exists():
        raise CatalogError(f"catalog not found: {path}")
    # a catalog's consolidated metadata, when it has them, are its committed state (an append killed
    # part-way has grown some arrays past it: snrmoe_dask.ingest)
    consolidated = _has_consolidated(path)
    try:
        ds = xr.open_zarr(path, consolidated=consolidated, chunks={})
    except Exception as exc:  # zarr raises several types for a non-store
        raise CatalogError(f"{path} is not a readable zarr catalog: {type(exc).__name__}: {exc}") from None
    # the per-spectrum variables (labels, snr, mag) are small: read them once, here, instead of through the
    # scheduler each time a stage asks for their values (1M rows: 8 such reads of 489 tasks per label)
    per_spectrum = [name for name, v in ds.data_vars.items() if v.dims == ("spectrum",)]
    if per_spectrum:
        try:  # xarray's own lazy backend arrays (no dask graph): decoded exactly as above, half the time
            plain = xr.open_zarr(path, consolidated=consolidated, chunks=None)
            ds = ds.assign({name: ("spectrum", plain[name].values, ds[name].attrs) for name in per_spectrum})
        except Exception as exc:  # a damaged label chunk
            raise CatalogError(f"{path}: cannot read the per-spectrum variables {per_spectrum}: "
                               f"{type(exc).__name__}: {exc}") from None
    if routes_by_snr and "snr" in ds.variables and "snr" not in require_labels:
        require_labels = (*require_labels, "snr")
    for var in ds.variables.values():  # the stored layout stays; the codecs (a v2 store's numcodecs) do not travel
        var.encoding = {k: v for k, v in var.encoding.items() if k in ("chunks", "preferred_chunks")}
    try:
        validate_catalog(ds, require_labels)
    except CatalogError as exc:  # the schema checks do not know the path; the user needs it
        raise CatalogError(f"{path}: {exc}") from None
    ds = _checked_cube(ds, path)
    if chunk_size is not None:
        ds = ds.chunk({"spectrum": chunk_size})
    ids = ds["spectrum"].values
    split = assign_split(ids, cfg.split_fractions, cfg.split_salt)
    ds["split"] = ("spectrum", split)
    ds["split"].attrs["flag_values"] = "0 1 2"
    ds["split"].attrs["flag_meanings"] = " ".join(SPLIT_NAMES)
    ds["frozen_test"] = ("spectrum", frozen_test_mask(ids, split, cfg.test_size, cfg.split_salt))
    return ds


def bin_edges(ds: xr.Dataset, config: CatalogConfig | None = None) -> dict[str, list[float]]:
    """Bin edges from config; null Teff/[M/H] edges become training-label tertiles."""
    cfg = config or CatalogConfig()
    edges: dict[str, list[float]] = {"snr_edges": list(cfg.snr_edges)}
    train = ds["split"].values == TRAIN if "split" in ds else slice(None)
    for label, key in (("teff", "teff_edges"), ("mh", "mh_edges")):
        given = getattr(cfg, key)
        if given is not None:
            edges[key] = list(given)
        else:
            if label not in ds:
                raise CatalogError(f"label '{label}' is needed to place the default tertile edges '{key}'")
            edges[key] = tertile_edges(np.asarray(ds[label].values)[train])
    return edges


def assign_bins(ds: xr.Dataset, edges: dict[str, list[float]], snr: xr.DataArray | None = None) -> xr.Dataset:
    """Per-spectrum ``snr_bin`` and ``phys_bin`` from labels (oracle routing).

    ``snr`` defaults to the catalog's true S/N label.
    """
    snr = ds["snr"] if snr is None else snr
    out = xr.Dataset(coords={"spectrum": ds["spectrum"]})
    out["snr_bin"] = ("spectrum", snr_bin(np.asarray(snr.values), edges["snr_edges"]))
    out["phys_bin"] = (
        "spectrum",
        phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]),
    )
    return out


def summarize_catalog(ds: xr.Dataset, quality: dict[str, Any],
                      config: CatalogConfig | None = None) -> dict[str, Any]:
    """A JSON-able summary: sizes, chunking, label ranges, splits, masked counts.

    ``quality`` is :func:`quality_totals` of computed per-spectrum pixel counts
    (from :func:`pixel_quality` or the feature table), so this function never
    reads the cube itself.
    """
    cfg = config or CatalogConfig()
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    summary: dict[str, Any] = {
        "n_spectra": int(n),
        "n_pixels": int(p),
        "wavelength_range": [float(ds["wavelength"][0]), float(ds["wavelength"][-1])],
        "chunk_rows": [int(c) for c in ds["flux"].chunks[0]][:3] + (["..."] if len(ds["flux"].chunks[0]) > 3 else []),
        "n_chunks": len(ds["flux"].chunks[0]),
        "schema_version": ds.attrs.get("schema_version"),
        "source": ds.attrs.get("source"),
    }
    labels = {}
    for name in (*REQUIRED_LABELS, *OPTIONAL_LABELS):
        if name in ds:
            v = np.asarray(ds[name].values, dtype=np.float64)
            fin = v[np.isfinite(v)]
            labels[name] = {
                "min": float(fin.min()) if fin.size else None,
                "max": float(fin.max()) if fin.size else None,
                "n_nonfinite": int(v.size - fin.size),
            }
    summary["labels"] = labels
    split = ds["split"].values
    summary["split"] = {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
    summary["split"]["frozen_test"] = int(ds["frozen_test"].values.sum())
    if "snr" in ds:
        bins = snr_bin(np.asarray(ds["snr"].values), cfg.snr_edges)
        summary["snr_bins"] = {name: int((bins == i).sum()) for i, name in enumerate(cfg.snr_bin_names)}
    summary["pixels"] = quality
    return summary


def quality_totals(q: xr.Dataset) -> dict[str, int]:
    """Reduce computed :func:`pixel_quality` output to catalog totals."""
    return {
        "bad_flux_pixels": int(q["n_bad_flux"].sum()),
        "bad_error_pixels": int(q["n_bad_error"].sum()),
        "masked_pixels": int(q["n_masked"].sum()),
        "good_pixels": int(q["n_good"].sum()),
        "spectra_too_few_good_pixels": int((~q["usable"]).sum()),
    }
