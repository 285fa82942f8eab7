"""Ingest HDF5 / NPZ files (or a folder of them) into a catalog, streaming.

Every file is validated *before* anything is written: a missing or misnamed
dataset, mismatched shapes, NaN labels, a different wavelength grid or a
duplicate id refuses the whole ingest with a message naming the dataset and
the file. Rows are then copied in blocks of ``chunk_size`` spectra, so memory
stays bounded for files larger than RAM (HDF5 datasets are sliced; NPZ
members are read as a byte stream, compressed or not).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from .catalog import OPTIONAL_LABELS, REQUIRED_LABELS, SCHEMA_VERSION, open_catalog
from .config import StorageConfig
from .simulate import zarr_encoding

__all__ = ["IngestError", "ingest", "find_sources", "SourceFile"]

_SUFFIXES = (".h5", ".hdf5", ".npz")
_ID_NAMES = ("spectrum", "id")


class IngestError(ValueError):
    """An input file cannot be ingested; the message names the file and dataset."""


# ------------------------------------------------------------------ readers
class _NpyStream:
    """Sequential row reader of a 2-D ``.npy`` member inside a zip archive."""

    def __init__(self, zf: zipfile.ZipFile, member: str):
        self._zf, self._member = zf, member
        self._open()

    def _open(self) -> None:
        self._fh = self._zf.open(self._member)
        version = np.lib.format.read_magic(self._fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = reader(self._fh)
        if fortran and len(self.shape) > 1:
            raise IngestError(f"member '{self._member}' is Fortran-ordered; save it C-ordered to stream it")
        self._row = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        if start < self._row:
            self._fh.close()
            self._open()
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if start > self._row:
            self._fh.read((start - self._row) * row_bytes)
        buf = self._fh.read((stop - start) * row_bytes)
        if len(buf) != (stop - start) * row_bytes:
            raise IngestError(f"member '{self._member}' is truncated")
        self._row = stop
        return np.frombuffer(buf, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


@dataclass
class SourceFile:
    """One input file, opened lazily: small arrays in memory, the cube streamed."""

    path: Path
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    small: dict[str, np.ndarray] = field(default_factory=dict)
    _h5: object = None
    _zip: zipfile.ZipFile | None = None
    _streams: dict[str, _NpyStream] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> SourceFile:
        if path.suffix.lower() in (".h5", ".hdf5"):
            import h5py

            try:
                h5 = h5py.File(path, "r")
            except OSError as exc:
                raise IngestError(f"{path}: not a readable HDF5 file ({exc})") from None
            names = [k for k in h5.keys() if isinstance(h5[k], h5py.Dataset)]
            src = cls(path, names, {k: tuple(h5[k].shape) for k in names}, _h5=h5)
        elif path.suffix.lower() == ".npz":
            try:
                zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise IngestError(f"{path}: not a readable NPZ file ({exc})") from None
            names = [m[:-4] for m in zf.namelist() if m.endswith(".npy")]
            src = cls(path, names, {}, _zip=zf)
            for n in names:
                src._streams[n] = _NpyStream(zf, n + ".npy")
                src.shapes[n] = tuple(src._streams[n].shape)
        else:
            raise IngestError(f"{path}: unsupported file type (use {', '.join(_SUFFIXES)})")
        return src

    def load(self, name: str) -> np.ndarray:
        """A whole (small, 1-D) dataset."""
        if name not in self.small:
            if self._h5 is not None:
                self.small[name] = np.asarray(self._h5[name][...])
            else:
                self.small[name] = np.array(self._streams[name].read(0, self.shapes[name][0]))
        return self.small[name]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a 2-D dataset (read sequentially for NPZ)."""
        if self._h5 is not None:
            return np.asarray(self._h5[name][start:stop])
        return self._streams[name].read(start, stop)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        if self._zip is not None:
            self._zip.close()


def find_sources(src: str | Path) -> list[Path]:
    """The input files: ``src`` itself, or the HDF5/NPZ files in folder ``src``, sorted."""
    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in _SUFFIXES)
        if not files:
            raise IngestError(f"{src}: folder holds no {', '.join(_SUFFIXES)} files")
        return files
    if not src.exists():
        raise IngestError(f"{src}: no such file or folder")
    return [src]


# --------------------------------------------------------------- validation
def _validate(src: SourceFile, require_labels: tuple[str, ...]) -> dict:
    where = str(src.path)
    have = set(src.names)
    for name in ("flux", "error", "wavelength", *require_labels):
        if name not in have:
            near = [h for h in have if h.lower() == name.lower() or h.lower().startswith(name.lower()[:3])]
            hint = f" (did you mean {near}?)" if near else ""
            raise IngestError(f"{where}: missing dataset '{name}'{hint}; found {sorted(have)}")
    fshape = src.shapes["flux"]
    if len(fshape) != 2:
        raise IngestError(f"{where}: dataset 'flux' must be 2-D (N, P), got shape {fshape}")
    n, p = fshape
    if n == 0:
        raise IngestError(f"{where}: dataset 'flux' has no rows")
    for name in ("error", "mask"):
        if name in have and src.shapes[name] != fshape:
            raise IngestError(f"{where}: dataset '{name}' has shape {src.shapes[name]}, 'flux' has {fshape}")
    if src.shapes["wavelength"] != (p,):
        raise IngestError(f"{where}: dataset 'wavelength' has shape {src.shapes['wavelength']}, expected ({p},)")
    wave = np.asarray(src.load("wavelength"), dtype=np.float64)
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise IngestError(f"{where}: dataset 'wavelength' must be finite and strictly increasing")
    labels = {}
    for name in (*REQUIRED_LABELS, *OPTIONAL_LABELS):
        if name not in have:
            continue
        if src.shapes[name] != (n,):
            raise IngestError(f"{where}: label dataset '{name}' has shape {src.shapes[name]}, expected ({n},)")
        raw = np.asarray(src.load(name))
        if raw.dtype.kind not in "biuf":
            raise IngestError(f"{where}: label dataset '{name}' holds {raw.dtype} values (text?); labels must be "
                              f"numbers")
        v = raw.astype(np.float64)
        if name in require_labels and not np.all(np.isfinite(v)):
            raise IngestError(f"{where}: label dataset '{name}' has {int((~np.isfinite(v)).sum())} NaN/inf values")
        labels[name] = v
    ids = None
    for name in _ID_NAMES:
        if name in have:
            if src.shapes[name] != (n,):
                raise IngestError(f"{where}: id dataset '{name}' has shape {src.shapes[name]}, expected ({n},)")
            ids = np.asarray(src.load(name))
            if not np.issubdtype(ids.dtype, np.integer):
                raise IngestError(f"{where}: id dataset '{name}' must be integer, got {ids.dtype}")
            ids = ids.astype(np.int64)
            break
    return {"n": n, "p": p, "wavelength": wave, "labels": labels, "ids": ids, "mask": "mask" in have}


# ------------------------------------------------------------------- ingest
def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def ingest(src: str | Path, out: str | Path, *, append: bool = False, storage: StorageConfig | None = None,
           require_labels: tuple[str, ...] = REQUIRED_LABELS, progress=None) -> dict:
    """Ingest ``src`` (a file or a folder) into the catalog at ``out``.

    Parameters
    ----------
    src : path-like
        An ``.h5``/``.hdf5``/``.npz`` file or a folder of them.
    out : path-like
        The catalog store. Must not exist unless ``append`` is true.
    append : bool
        Add rows to an existing catalog (same wavelength grid, new unique ids).
    storage : StorageConfig
        Chunk size and compressor.
    require_labels : tuple of str
        Labels every file must hold, finite (``()`` for unlabelled data).
    progress : callable, optional
        ``progress(rows_done, rows_total)`` after each block.

    Returns
    -------
    dict
        Rows written per file, total rows and the id range.
    """
    storage = storage or StorageConfig()
    out = Path(out)
    files = find_sources(src)
    sources = [SourceFile.open(f) for f in files]
    try:
        infos = [_validate(s, require_labels) for s in sources]
        p = infos[0]["p"]
        wave = infos[0]["wavelength"]
        existing_ids = np.empty(0, dtype=np.int64)
        existing_vars: set[str] | None = None
        has_mask = any(i["mask"] for i in infos)
        if append:
            if not out.exists():
                raise IngestError(f"--append: catalog {out} does not exist")
            cat = open_catalog(out, require_labels=())
            if cat.sizes["wavelength"] != p or not np.allclose(cat["wavelength"].values, wave, rtol=0, atol=1e-6):
                raise IngestError(
                    f"{files[0]}: wavelength grid differs from catalog {out} "
                    f"({p} px {wave[0]:.3f}-{wave[-1]:.3f} A vs {cat.sizes['wavelength']} px "
                    f"{float(cat.wavelength[0]):.3f}-{float(cat.wavelength[-1]):.3f} A)"
                )
            existing_ids = cat["spectrum"].values
            existing_vars = {v for v in cat.data_vars if v not in ("split", "frozen_test")}
            if has_mask and "mask" not in existing_vars:
                raise IngestError(f"{out} has no 'mask' variable but the new files provide one; re-ingest all files")
            has_mask = "mask" in existing_vars
        elif out.exists():
            raise IngestError(f"{out} already exists; use --append to add rows or choose a new --out")
        for f, info in zip(files[1:], infos[1:]):
            if info["p"] != p or not np.allclose(info["wavelength"], wave, rtol=0, atol=1e-6):
                raise IngestError(f"{f}: wavelength grid differs from {files[0]}")
        label_names = sorted(set().union(*(i["labels"] for i in infos)))
        if existing_vars is not None:
            cat_labels = existing_vars & set(REQUIRED_LABELS + OPTIONAL_LABELS)
            extra = set(label_names) - cat_labels
            if extra:
                raise IngestError(f"new files carry labels {sorted(extra)} that catalog {out} does not have")
            label_names = sorted(cat_labels)
        # ids: given ones must be unique; generated ones continue after the max.
        next_id = int(existing_ids.max()) + 1 if existing_ids.size else 0
        all_ids = [existing_ids]
        for info in infos:
            if info["ids"] is None:
                info["ids"] = np.arange(next_id, next_id + info["n"], dtype=np.int64)
            next_id = max(next_id, int(info["ids"].max()) + 1)
            all_ids.append(info["ids"])
        cat_ids = np.concatenate(all_ids)
        uniq, counts = np.unique(cat_ids, return_counts=True)
        if uniq.size != cat_ids.size:
            dup = uniq[counts > 1][:5].tolist()
            raise IngestError(f"spectrum ids are not unique across catalog and inputs (e.g. {dup})")

        total = sum(i["n"] for i in infos)
        done = 0
        first_write = not append
        report = {"files": {}, "rows": total}
        for src_file, info in zip(sources, infos):
            for start, stop in _blocks(info["n"], storage.ingest_chunk_size):
                block = _block_dataset(src_file, info, start, stop, wave, label_names, has_mask)
                if first_write:
                    block.attrs.update(
                        schema_version=SCHEMA_VERSION,
                        source="snrmoe ingest",
                        history=json.dumps([str(f) for f in files]),
                    )
                    block.to_zarr(out, mode="w-", zarr_format=3, consolidated=False,
                                  encoding=zarr_encoding(block, storage, storage.ingest_chunk_size))
                    first_write = False
                else:
                    block.to_zarr(out, append_dim="spectrum", consolidated=False)
                done += stop - start
                if progress is not None:
                    progress(done, total)
            report["files"][str(src_file.path)] = info["n"]
        report["id_range"] = [int(cat_ids.min()), int(cat_ids.max())]
        return report
    finally:
        for s in sources:
            s.close()


def _block_dataset(src: SourceFile, info: dict, start: int, stop: int, wave: np.ndarray,
                   label_names: list[str], has_mask: bool) -> xr.Dataset:
    cube = ("spectrum", "wavelength")
    data = {
        "flux": (cube, src.rows("flux", start, stop).astype(np.float32)),
        "error": (cube, src.rows("error", start, stop).astype(np.float32)),
    }
    if has_mask:
        mask = src.rows("mask", start, stop).astype(bool) if info["mask"] else np.zeros((stop - start, len(wave)), bool)
        data["mask"] = (cube, mask)
    for name in label_names:
        v = info["labels"].get(name)
        data[name] = ("spectrum", v[start:stop] if v is not None else np.full(stop - start, np.nan))
    ds = xr.Dataset(data, coords={"spectrum": info["ids"][start:stop], "wavelength": wave})
    ds["wavelength"].attrs["units"] = "Angstrom"
    return ds
