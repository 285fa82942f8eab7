"""Ingest HDF5 / NPZ files (or a folder of them) into a catalog, streaming.

Every file is validated *before* anything is written: a missing or misnamed
dataset, mismatched shapes, NaN labels, a different wavelength grid or a
duplicate id refuses the whole ingest with a message naming the dataset and
the file. Rows are then copied in blocks of ``chunk_size`` spectra, so memory
stays bounded for files larger than RAM (HDF5 datasets are sliced; NPZ
members are read as a byte stream, compressed or not).

Writes are atomic at the catalog level. A new catalog is written beside its
path and renamed into place when complete. An append writes its rows into the
existing arrays, but readers see the catalog through its *consolidated
metadata* (the root ``zarr.json`` holds every array's shape), which the
append rewrites once, at the end: a kill at any point leaves the catalog
opening with its old rows (zarr replaces each chunk file atomically, so the
old rows of a rewritten last chunk are intact). The next append first trims
the arrays back to the committed shapes, and every committed input is
recorded by a fingerprint in the catalog's ``history``, so the same files
appended twice are refused instead of duplicated under new ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from .catalog import OPTIONAL_LABELS, REQUIRED_LABELS, SCHEMA_VERSION, open_catalog
from .config import StorageConfig
from .outputs import output_lock
from .simulate import zarr_encoding
from .zarrstore import consolidate

__all__ = ["IngestError", "ingest", "find_sources", "SourceFile", "commit_catalog", "rollback_append"]

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
            if not near and name in require_labels:  # unlabelled spectra are what predict is for
                hint = (" (spectra without labels: ingest them with --no-labels; the catalog can be predicted, "
                        "not fitted)")
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


# ------------------------------------------------------------- atomicity
def _fingerprint(src: SourceFile, info: dict) -> str:
    """What identifies an input file's content: its shapes, grid, labels and ids, and its first row."""
    h = hashlib.sha256(json.dumps([info["n"], info["p"], info["mask"]]).encode())
    h.update(np.ascontiguousarray(info["wavelength"]).tobytes())
    for name in sorted(info["labels"]):
        h.update(name.encode())
        h.update(np.ascontiguousarray(info["labels"][name]).tobytes())
    if info["ids"] is not None:
        h.update(np.ascontiguousarray(info["ids"]).tobytes())
    for name in ("flux", "error"):  # the first row only: an NPZ member is a stream, its last row at the far end
        h.update(np.ascontiguousarray(src.rows(name, 0, 1)).tobytes())
    return h.hexdigest()[:32]


def commit_catalog(path: str | Path, attrs: dict | None = None) -> None:
    """Make the catalog's current arrays its committed state: set ``attrs`` on the root group, then rewrite the
    consolidated metadata (one atomic write of the root ``zarr.json``, the point after which readers see them)."""
    import zarr

    path = Path(path)
    if attrs:
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        group.attrs.update(attrs)
    consolidate(path)


def rollback_append(path: str | Path) -> int:
    """Trim every array back to the shape the consolidated metadata commits (an append killed part-way);
    returns the rows trimmed from the longest array (0: nothing to undo).

    A catalog without consolidated metadata (written before appends were atomic) is first committed as
    it stands if its arrays agree, and refused if they do not (an interrupted append of an older version,
    which recorded no committed shape).
    """
    import zarr

    path = Path(path)
    loose = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    try:
        committed = zarr.open_group(str(path), mode="r", use_consolidated=True)
        shapes = {name: arr.shape for name, arr in committed.arrays()}
        consolidated = committed.metadata.consolidated_metadata is not None
    except Exception:  # noqa: BLE001 - no consolidated metadata
        consolidated = False
    if not consolidated:
        lengths = {name: arr.shape[0] for name, arr in loose.arrays() if arr.ndim and name != "wavelength"}
        if len(set(lengths.values())) > 1:
            raise IngestError(f"{path}: variables have different lengths along spectrum ({lengths}): an append by "
                              "an older snrmoe was interrupted and left no record of the committed rows; re-ingest "
                              "the catalog from its source files")
        consolidate(path)
        return 0
    trimmed = 0
    for name, arr in loose.arrays():
        want = shapes.get(name)
        if want is not None and arr.shape != want:
            trimmed = max(trimmed, arr.shape[0] - want[0])
            arr.resize(want)
    return trimmed


def _append_rows(path: Path, block: xr.Dataset, at: int) -> None:
    """Write ``block``'s rows at row ``at`` of every per-spectrum array of the catalog, growing each array (its own
    ``zarr.json``; the root's consolidated metadata, which readers go by, are rewritten only on commit)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    n = block.sizes["spectrum"]
    for name, var in block.variables.items():
        if var.dims[:1] != ("spectrum",):
            continue
        arr = group[name]
        arr.resize((at + n, *arr.shape[1:]))
        arr[at:at + n] = np.asarray(var.values).astype(arr.dtype, copy=False)


def _committed_history(history: list, committed_rows: int) -> list[dict]:
    """The history entries whose rows the catalog holds (an entry records the rows its file added; entries of
    an append that did not commit are dropped). Entries of older versions (a path only) are kept."""
    out, rows = [], 0
    for e in history:
        e = e if isinstance(e, dict) else {"file": str(e)}
        rows += int(e.get("rows", 0))
        if rows > committed_rows:
            break
        out.append(e)
    return out


def _staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.ingest-{os.getpid()}")


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
    out = Path(out).absolute()
    with output_lock(out, "snrmoe ingest" + (" --append" if append else "")):  # one writer per catalog
        for stale in out.parent.glob(f".{out.name}.ingest-*"):  # a killed ingest's half-written new catalog
            shutil.rmtree(stale, ignore_errors=True)
        return _ingest(src, out, append, storage, require_labels, progress)


def _ingest(src, out: Path, append: bool, storage: StorageConfig, require_labels, progress) -> dict:
    files = find_sources(src)
    sources = [SourceFile.open(f) for f in files]
    try:
        infos = [_validate(s, require_labels) for s in sources]
        p = infos[0]["p"]
        wave = infos[0]["wavelength"]
        existing_ids = np.empty(0, dtype=np.int64)
        existing_vars: set[str] | None = None
        has_mask = any(i["mask"] for i in infos)
        prints = [_fingerprint(s, i) for s, i in zip(sources, infos)]
        history: list = []
        if append:
            if not out.exists():
                raise IngestError(f"--append: catalog {out} does not exist")
            trimmed = rollback_append(out)  # an append killed part-way is undone before anything else
            cat = open_catalog(out, require_labels=())
            committed = cat.sizes["spectrum"]
            history = _committed_history(json.loads(cat.attrs.get("history", "[]")), committed)
            seen = {e.get("fingerprint"): e for e in history if isinstance(e, dict)}
            again = [(str(f), seen[fp]) for f, fp in zip(files, prints) if fp in seen]
            if again:
                f, e = again[0]
                raise IngestError(f"{f} is already in catalog {out} (appended as {e.get('file')}, {e.get('rows')} "
                                  f"rows); appending it again would duplicate its spectra")
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
        if append:
            report["rolled_back_rows"] = trimmed
        target = out if append else _staging(out)  # a new catalog appears at its path only when complete
        if not append:
            shutil.rmtree(target, ignore_errors=True)  # our own pid's leftover: a name no one else writes
        history = history + [{"file": str(f), "rows": int(i["n"]), "fingerprint": fp}
                             for f, i, fp in zip(files, infos, prints)]
        for src_file, info in zip(sources, infos):
            for start, stop in _blocks(info["n"], storage.ingest_chunk_size):
                block = _block_dataset(src_file, info, start, stop, wave, label_names, has_mask)
                if first_write:
                    block.attrs.update(schema_version=SCHEMA_VERSION, source="snrmoe ingest")
                    block.to_zarr(target, mode="w-", zarr_format=3, consolidated=False,
                                  encoding=zarr_encoding(block, storage, storage.ingest_chunk_size))
                    first_write = False
                elif not append:
                    block.to_zarr(target, append_dim="spectrum", consolidated=False)
                else:  # zarr directly: xarray's append rewrites the root metadata, the catalog's commit point
                    _append_rows(target, block, committed + done)
                done += stop - start
                if progress is not None:
                    progress(done, total)
            report["files"][str(src_file.path)] = info["n"]
        commit_catalog(target, {"history": json.dumps(history)})
        if not append:
            if out.exists():  # something appeared at out meanwhile (rename would replace an empty folder)
                raise IngestError(f"{out} appeared while ingesting; the new catalog is left at {target}")
            target.rename(out)
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
