"""The val and frozen-test rows, cached beside the model by the fit's one read.

The gates are fitted on the val rows and ``evaluate`` scores the frozen-test
rows; both need every expert's prediction, so both need the rows' flux after
the experts are solved. Those rows are spread over every chunk of the catalog:
reading them back would be a second (and third) read of the whole cube. The
pass therefore writes them as it reads each chunk, into ``MODEL/rows/``:

    rows/test-00000.zarr ...   one zarr group per catalog chunk with frozen-test
                               rows: their flux, error and mask (one zarr chunk
                               each) and ``position`` (the row's index in the
                               catalog)
    rows/part-00000.zarr ...   the same for the chunk's other cached rows (val)
    rows/columns.zarr          the per-spectrum variables and ``position`` of
                               every cached row, by position
    rows/cache.json            what was cached, from which catalog (fingerprint),
                               and the rows of every part

The two roles are stored apart because they are read apart: the audit and
``evaluate`` need only the frozen-test rows (10k of the 1M study's 110k
cached rows), the gate stage only the val rows; a part holding both would be
read whole by each of the three (at 1M, 3 x 2.8 GB instead of 2.8 + 2 x 0.3).

Each part is written to a temporary name and renamed, so a killed pass leaves
only whole parts, and a resumed pass skips the parts it finds.
:func:`open_row_cache` returns the union as one lazy :class:`xarray.Dataset`
that the gate stage and ``evaluate`` use exactly as they would use the
catalog.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec

from .checkpoint import plan_token
from .split import VAL, id_hash

__all__ = ["CachePart", "capped_val", "catalog_fingerprint", "cached_rows", "open_row_cache", "plan_row_cache",
           "remove_row_cache", "write_part", "CACHE_DIR", "ROLES"]

CACHE_DIR = "rows"
COLUMNS = "columns.zarr"
_BLOCKS = ("flux", "error", "mask")
#: the parts' roles, in the order the union lists them: file-name prefix and cache.json's key for their rows
ROLES = {"test": ("test", "test_part_rows"), "val": ("part", "part_rows")}
_VERSION = 3


def _frozen_test(table: xr.Dataset) -> np.ndarray:
    """Which rows of a catalog (or of the cache's columns) are frozen-test rows: the test role."""
    n = table.sizes["spectrum"]
    return np.asarray(table["frozen_test"].values, bool) if "frozen_test" in table else np.zeros(n, bool)


def catalog_fingerprint(ds: xr.Dataset) -> str:
    """A short hash of a catalog's shape, wavelength grid and spectrum ids (what identifies its rows)."""
    return plan_token(shape=[int(ds.sizes["spectrum"]), int(ds.sizes["wavelength"])],
                      wavelength=np.asarray(ds["wavelength"].values, np.float64),
                      ids=np.asarray(ds["spectrum"].values).astype(np.int64))[:16]


def _cache_info(root: Path) -> dict | None:
    """``cache.json`` of a row cache, or ``None`` if ``root`` holds none (or not one this package wrote)."""
    try:
        info = json.loads((root / "cache.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("kind") == "snrmoe.row_cache" else None


def remove_row_cache(root: str | Path) -> None:
    """Delete a row cache this package wrote (a directory without its ``cache.json`` is left alone)."""
    root = Path(root)
    if _cache_info(root) is not None:
        shutil.rmtree(root)


def capped_val(ids: np.ndarray, split: np.ndarray, max_val_rows: int | None, salt: int) -> np.ndarray:
    """Boolean mask of the val rows kept: all of them, or the ``max_val_rows`` with the smallest id hash
    (stream 4), so the same rows are kept whichever catalogs they arrive in."""
    val = np.asarray(split) == VAL
    if max_val_rows is not None and int(val.sum()) > max_val_rows:
        h = id_hash(np.asarray(ids), salt, stream=4)
        val &= h <= np.sort(h[val])[max_val_rows - 1]
    return val


def cached_rows(ds: xr.Dataset, max_val_rows: int | None, salt: int) -> np.ndarray:
    """Boolean mask of the rows to cache: every frozen-test row and the val rows, at most ``max_val_rows``
    of them (a hash-selected subset when there are more)."""
    return capped_val(ds["spectrum"].values, ds["split"].values, max_val_rows, salt) | ds["frozen_test"].values


@dataclass(frozen=True)
class CachePart:
    """The cached rows of one role of one catalog chunk: where they go, their rows in the chunk and their
    positions in the catalog (their per-spectrum variables are in ``columns.zarr``, written once)."""

    path: str
    rows: np.ndarray
    position: np.ndarray


def plan_row_cache(ds: xr.Dataset, keep: np.ndarray, root: str | Path, starts: np.ndarray,
                   meta: dict) -> list[tuple[CachePart, ...]]:
    """The :class:`CachePart` of each chunk (its frozen-test rows, then its other kept rows; an empty tuple
    where no row is kept); writes ``cache.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    columns = {name: np.asarray(v.values) for name, v in ds.data_vars.items() if v.dims == ("spectrum",)}
    ids = np.asarray(ds["spectrum"].values)
    wave = np.asarray(ds["wavelength"].values)
    test = _frozen_test(ds)
    role_rows = {"test": keep & test, "val": keep & ~test}
    parts: list[tuple[CachePart, ...]] = []
    part_rows: dict[str, list[int]] = {role: [] for role in ROLES}
    for i in range(len(starts) - 1):
        lo, hi = int(starts[i]), int(starts[i + 1])
        chunk = []
        for role, (prefix, _) in ROLES.items():
            local = np.flatnonzero(role_rows[role][lo:hi])
            if local.size == 0:
                continue
            chunk.append(CachePart(str(root / f"{prefix}-{i:05d}.zarr"), local, (lo + local).astype(np.int64)))
            part_rows[role].append(int(local.size))
        parts.append(tuple(chunk))
    # every cached row's per-spectrum variables in one small store: opening the cache reads them once, not
    # once per part (490 parts at 1M took 13 s through xarray)
    rows = np.flatnonzero(keep)
    index = xr.Dataset({name: ("spectrum", v[rows]) for name, v in columns.items()},
                       coords={"spectrum": ids[rows], "wavelength": wave}, attrs=dict(ds.attrs))
    index["position"] = ("spectrum", rows.astype(np.int64))
    shutil.rmtree(root / COLUMNS, ignore_errors=True)
    index.to_zarr(root / COLUMNS, mode="w", zarr_format=3, consolidated=False)
    info = {"kind": "snrmoe.row_cache", "version": _VERSION, "catalog_fingerprint": catalog_fingerprint(ds),
            "rows": int(keep.sum()), "parts": sum(len(c) for c in parts),
            **{key: part_rows[role] for role, (_, key) in ROLES.items()}, **meta}
    (root / "cache.json").write_text(json.dumps(info, indent=2))
    return parts


def write_part(part: CachePart, flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None) -> int:
    """Write one part's rows (atomically: a temporary store renamed); returns the rows written.

    A part is a zarr group of ``flux``, ``error`` (``mask``) and ``position``, each one zarr chunk (a
    part is read whole; zarr would split wide arrays), lz4 with byte shuffle as the catalog (a 3.8 MB part
    of flux writes in 6 ms and reads in 3 ms, against 12 and 5 ms with zstd, and is smaller). Written with
    zarr directly: through xarray, with the per-spectrum variables that ``columns.zarr`` already holds, a
    part took 4x as long (75 against 17 ms).
    """
    final = Path(part.path)
    if final.exists():  # a resumed pass: the part was written before the interruption
        return int(part.rows.size)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    codec = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    blocks = {"flux": flux, "error": error} if mask is None else {"flux": flux, "error": error, "mask": mask}
    for name, block in blocks.items():
        rows = np.ascontiguousarray(np.asarray(block)[part.rows])
        group.create_array(name, data=rows, chunks=rows.shape, compressors=codec,
                           dimension_names=("spectrum", "wavelength"))
    group.create_array("position", data=part.position, dimension_names=("spectrum",))
    tmp.rename(final)
    return int(part.rows.size)


def _read_part(path: str, rows: int) -> np.ndarray:
    """One part's flux, error or mask, checked against the rows ``cache.json`` recorded for it."""
    block = zarr.open_array(path, mode="r")[...]
    if block.shape[0] != rows:
        raise ValueError(f"row cache part {path} holds {block.shape[0]} rows, cache.json says {rows}: "
                         "the cache is damaged; remove MODEL/rows to read the catalog instead")
    return block


def _read_parts(paths: list[str], rows: list[int]) -> np.ndarray:
    """Consecutive parts as one block (a task)."""
    blocks = [_read_part(p, r) for p, r in zip(paths, rows)]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)


#: rows per dask block of the cache: a frozen-test part holds ~20 rows at 1M, so one task per part made
#: ``evaluate`` scheduler-bound (~2,500 tasks of a few ms); consecutive parts are read by one task up to this
BLOCK_ROWS = 4096


def _part_paths(root: Path, prefix: str) -> list[Path]:
    """One role's parts, in catalog chunk order (by the index in their names; text order breaks past 99,999)."""
    found = [(re.fullmatch(rf"{prefix}-(\d+)\.zarr", p.name), p) for p in root.glob(f"{prefix}-*.zarr")]
    return [p for m, p in sorted(((m, p) for m, p in found if m), key=lambda mp: int(mp[0].group(1)))]


def _blocks(paths: list[Path], rows: list[int] | None, name: str, first) -> list:
    """Dask blocks of variable ``name``: consecutive parts grouped up to :data:`BLOCK_ROWS` rows a block."""
    if rows is None or len(rows) != len(paths):  # an older cache: each part's shape from its metadata
        return [da.from_zarr(zarr.open_array(str(p / name), mode="r")) for p in paths]
    # shapes from cache.json: no metadata read per part here (1M: 978 of them, 4.4 s per stage)
    shape1, dtype = first[name].shape[1], first[name].dtype
    read = dask.delayed(_read_parts, pure=True)
    groups, current, size = [], [], 0
    for p, r in zip(paths, rows):
        if current and size + int(r) > BLOCK_ROWS:
            groups.append(current)
            current, size = [], 0
        current.append((str(p / name), int(r)))
        size += int(r)
    if current:
        groups.append(current)
    return [da.from_delayed(read([p for p, _ in g], [r for _, r in g],
                                 dask_key_name=f"read-row-cache-{tokenize([p for p, _ in g], name)}"),
                            (sum(r for _, r in g), shape1), dtype=dtype) for g in groups]


def open_row_cache(root: str | Path, ds: xr.Dataset | None = None, role: str | None = None) -> xr.Dataset | None:
    """The cached rows as one lazy catalog-shaped Dataset, or ``None`` if there is no complete cache.

    With ``ds``, the cache is used only if it was written from that catalog
    (same fingerprint), so a model evaluated on another catalog reads that
    catalog instead. ``role`` ``"test"`` (the frozen-test rows) or ``"val"``
    (the other cached rows) opens only that role's parts, which is all a
    stage reads; ``None`` opens every cached row. Rows come in catalog order
    (``position`` increasing).
    """
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)} or None, got {role!r}")
    root = Path(root)
    info = _cache_info(root)
    if info is None:
        return None
    if ds is not None and info.get("catalog_fingerprint") != catalog_fingerprint(ds):
        return None
    version = info.get("version")
    # a version-2 cache (one part per chunk, both roles in it) opens as the union; a role is then selected lazily
    layout = {"val": ("part", "part_rows")} if version == 2 else ROLES
    roles = list(layout) if (role is None or version == 2) else [role]
    found = {r: _part_paths(root, layout[r][0]) for r in layout}
    if version not in (2, _VERSION) or sum(map(len, found.values())) != info.get("parts") \
            or not any(found.values()):
        return None
    try:
        columns = xr.open_zarr(root / COLUMNS, consolidated=False).load()
        if columns.sizes["spectrum"] != info.get("rows"):
            return None
        if version == 2:
            order = np.arange(columns.sizes["spectrum"])
        else:  # the columns are by position; the parts list the test rows first, then the others
            test = _frozen_test(columns)
            order = np.concatenate([np.flatnonzero(test if r == "test" else ~test) for r in roles])
        out = columns.isel(spectrum=order)
        paths = [p for r in roles for p in found[r]]
        if not paths:  # this role has no rows cached
            return None
        first = zarr.open_group(str(paths[0]), mode="r")
        for name in (n for n in _BLOCKS if n in first):
            blocks = []
            for r in roles:
                recorded = info.get(layout[r][1])
                blocks += _blocks(found[r], recorded, name, first) if found[r] else []
            out[name] = (("spectrum", "wavelength"), da.concatenate(blocks, axis=0))
    except (OSError, ValueError, KeyError):  # a damaged cache: the stages read the catalog instead
        return None
    if out.sizes["spectrum"] != order.size:
        return None
    if len(roles) > 1 or version == 2:  # back in catalog order, and the one role asked for
        pos = out["position"].values
        keep = np.argsort(pos, kind="stable")
        if role is not None:
            test = _frozen_test(out)
            keep = keep[(test if role == "test" else ~test)[keep]]
        if not np.array_equal(keep, np.arange(pos.size)):
            out = out.isel(spectrum=keep)
    out.attrs.update({"row_cache": str(root), "catalog_fingerprint": info["catalog_fingerprint"]})
    return out


def cache_dir_name(k: int) -> str:
    """The row cache of a model's ``k``-th catalog: ``rows`` for the catalog it was fitted on, ``rows-1``,
    ``rows-2``, ... for the catalogs ``snrmoe update`` and ``snrmoe merge`` added, in order."""
    return CACHE_DIR if k == 0 else f"{CACHE_DIR}-{k}"


def open_model_rows(model_dir: str | Path, catalogs: list[dict], role: str | None = None,
                    max_val_rows: int | None = None, salt: int = 0) -> xr.Dataset | None:
    """The cached rows of every catalog a model's statistics came from, as one Dataset in catalog order.

    ``catalogs`` is ``model.json``'s list (each with ``rows`` and ``fingerprint``): the ``k``-th cache must be
    written from the ``k``-th catalog, and its ``position`` is offset by the rows of the catalogs before it, so
    positions index the concatenated feature table. The val rows are capped at ``max_val_rows`` by
    :func:`capped_val`, as :func:`cached_rows` caps them, so the union holds exactly the rows one fit on the
    catalogs joined would cache.
    ``None`` if a cache is missing, damaged or from another catalog.
    """
    parts, offset = [], 0
    for k, cat in enumerate(catalogs):
        rows = open_row_cache(Path(model_dir) / cache_dir_name(k), role=role)
        if rows is None or rows.attrs.get("catalog_fingerprint") != cat.get("fingerprint"):
            return None
        parts.append(rows.assign(position=rows["position"] + offset))
        offset += int(cat["rows"])
    if len(parts) == 1:
        out = parts[0]
    else:
        out = xr.concat(parts, dim="spectrum", data_vars="minimal", coords="minimal", compat="override",
                        join="override", combine_attrs="drop_conflicts")
    if max_val_rows is not None and role != "test":
        split = np.asarray(out["split"].values)
        drop = (split == VAL) & ~capped_val(out["spectrum"].values, split, max_val_rows, salt)
        if drop.any():
            out = out.isel(spectrum=np.flatnonzero(~drop))
    return out
