"""Checkpoints of the one pass, so an interrupted reduction redoes only unfinished chunks.

Layout (``DIR/``, on a filesystem the client and the workers share)::

    plan.json              what the checkpoints belong to (a hash of the catalog
                           layout, targets, cells and accumulation settings)
    chain-<c>/             the latest state of accumulator chain c
        state.json         chunks folded, rows excluded, the chain's fold count
        stats.zarr         its float64 totals (a SufficientStats store)
        whitened.zarr, cross.zarr   the baselines' statistics, if any
        audit-*.zarr       the audit's statistics and rows, if the audit rides the pass
    features/<i>.zarr      the feature block of chunk i

Every write goes to a temporary name and is renamed into place, so a kill at
any moment leaves either the previous complete state or the new one. A chain
writes its state after every ``every`` folds; both an uninterrupted run and a
resumed one flush at the same folds, so their statistics are bit-identical.
A plan that does not match (other catalog, chunks, cells, settings) is
discarded with a message, never silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ["Checkpoint", "plan_token"]


def plan_token(**parts) -> str:
    """A stable hash of JSON-able values and NumPy arrays (same in every process)."""
    h = hashlib.sha256()
    for key in sorted(parts):
        v = parts[key]
        h.update(key.encode())
        if isinstance(v, np.ndarray):
            h.update(str(v.dtype).encode() + str(v.shape).encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; the old copy survives as ``final.old`` until the new one is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory for one planned pass (a small value; safe to send to workers)."""

    path: str
    every: int
    token: str

    # ----------------------------------------------------------- client side
    def open(self, resume: bool) -> Checkpoint:
        """Prepare the directory: keep matching state if ``resume``, otherwise start clean."""
        root = Path(self.path)
        plan = root / "plan.json"
        if root.exists():
            same = plan.is_file() and json.loads(plan.read_text()).get("token") == self.token
            if not resume or not same:
                if resume:
                    print(f"checkpoint {root}: from another plan (catalog, cells or settings changed); starting "
                          "the pass from scratch", file=sys.stderr)
                shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "features").mkdir(exist_ok=True)
        plan.write_text(json.dumps({"token": self.token, "every": self.every}))
        return self

    def _chain_dir(self, c: int) -> Path | None:
        root = Path(self.path)
        for cand in (root / f"chain-{c}", root / f"chain-{c}.old"):
            if (cand / "state.json").is_file():
                return cand
        return None

    def chain_state(self, c: int) -> dict | None:
        d = self._chain_dir(c)
        return None if d is None else json.loads((d / "state.json").read_text())

    def features_done(self) -> set[int]:
        root = Path(self.path) / "features"
        return {int(p.name.split(".")[0]) for p in root.glob("*.zarr")} if root.exists() else set()

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # ----------------------------------------------------------- worker side
    def save_features(self, index: int, block: np.ndarray) -> None:
        final = Path(self.path) / "features" / f"{index}.zarr"
        tmp = final.with_name(f"{index}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        xr.Dataset({"features": (("row", "feature"), block)}).to_zarr(tmp, mode="w", zarr_format=3,
                                                                      consolidated=False)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def load_features(self, index: int) -> np.ndarray:
        path = Path(self.path) / "features" / f"{index}.zarr"
        return np.asarray(xr.open_zarr(path, consolidated=False)["features"].values)

    def save_chain(self, c: int, state) -> None:
        """Flush chain ``c``'s accumulators (a :class:`~snrmoe_dask.chain.ChainState`) and write them."""
        root = Path(self.path)
        tmp = root / f"chain-{c}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state.cells.flush_all().to_zarr(tmp / "stats.zarr")
        b = state.baselines
        if b is not None:
            if b.white is not None:
                b.white.flush_all().to_zarr(tmp / "whitened.zarr")
            if b.cross is not None:
                from .baselines import BaselineStats

                BaselineStats(cross=b.cross).to_zarr(tmp)
        if state.audit is not None:
            state.audit.flush_all().to_zarr(tmp)
        (tmp / "state.json").write_text(json.dumps(state.bookkeeping()))
        _replace_dir(tmp, root / f"chain-{c}")

    def load_chain(self, c: int, flush_rows: int, precision: str, baselines: tuple[str, ...],
                   audit: tuple[int, str] | None = None):
        """The :class:`~snrmoe_dask.chain.ChainState` of chain ``c`` as last saved, or ``None``; ``audit`` =
        (flush_rows, precision) of the audit's accumulator when it rides the pass."""
        from .baselines import BaselineAccumulator, BaselineStats
        from .chain import ChainState
        from .leakage import AuditAccumulator, AuditStats
        from .stats import CellAccumulator, SufficientStats

        d = self._chain_dir(c)
        if d is None:
            return None
        saved = json.loads((d / "state.json").read_text())
        cells = CellAccumulator.resume(SufficientStats.from_zarr(d / "stats.zarr"), flush_rows=flush_rows,
                                       precision=precision)
        cells.rows_seen = saved["rows_seen"]
        base = None
        if baselines:
            base = BaselineAccumulator(baselines, cells.stats.shift[0], flush_rows, precision)
            stored = BaselineStats.from_zarr(d)
            if stored.whitened is not None:
                base.white = CellAccumulator.resume(stored.whitened, flush_rows=flush_rows, precision=precision)
            if stored.cross is not None:
                base.resume_cross(stored.cross)
        aud = AuditAccumulator.resume(AuditStats.from_zarr(d), *audit) if audit is not None else None
        return ChainState(cells, base, aud, chunks_done=list(saved["chunks_done"]),
                          excluded_unusable=saved["excluded_unusable"], folds=saved["folds"],
                          resumed_chunks=len(saved["chunks_done"]))
