"""The state of one accumulator chain of the pass: what a fold updates and a checkpoint saves.

A chain owns the per-cell accumulator of the experts and, beside it, the
baselines' and the audit's accumulators, so one fold of a block feeds them
all. They flush one after another, so the chain gives them one ``P x P``
scratch matrix between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .baselines import BaselineAccumulator
from .leakage import AuditAccumulator
from .stats import CellAccumulator

__all__ = ["ChainState"]


@dataclass
class ChainState:
    """One chain's accumulators and bookkeeping.

    Attributes
    ----------
    cells : CellAccumulator
        The experts' per-cell statistics.
    baselines, audit : optional
        The baselines' (:class:`~snrmoe_dask.baselines.BaselineAccumulator`) and the audit's
        (:class:`~snrmoe_dask.leakage.AuditAccumulator`) accumulators, when the pass feeds them.
    chunks_done : list of int
        Chunks folded into this state (a retried fold of one of them is a no-op).
    excluded_unusable : int
        Train rows left out for too few good pixels.
    folds : int
        Folds since the chain started (checkpoints are written every ``Checkpoint.every`` folds).
    resumed_chunks : int
        Chunks that came from a checkpoint.
    """

    cells: CellAccumulator
    baselines: BaselineAccumulator | None = None
    audit: AuditAccumulator | None = None
    chunks_done: list[int] = field(default_factory=list)
    excluded_unusable: int = 0
    folds: int = 0
    resumed_chunks: int = 0

    def __post_init__(self) -> None:
        if self.baselines is not None:
            self.baselines.scratch_of = self.cells
            if self.baselines.white is not None:
                self.baselines.white.share_scratch(self.cells)
        if self.audit is not None:
            for acc in self.audit.acc.values():
                acc.share_scratch(self.cells)

    def use_blas_pieces(self, pieces: int) -> None:
        """Run every accumulator's Gram updates as ``pieces`` BLAS calls at once (a runtime setting of the
        fold, not part of the saved state)."""
        for acc in (self.cells, getattr(self.baselines, "white", None),
                    *(self.audit.acc.values() if self.audit is not None else ())):
            if acc is not None:
                acc.blas_pieces = int(pieces)

    @property
    def rows_seen(self) -> int:
        return self.cells.rows_seen

    def bookkeeping(self) -> dict:
        """The JSON part of a checkpoint."""
        return {"chunks_done": list(self.chunks_done), "excluded_unusable": int(self.excluded_unusable),
                "rows_seen": int(self.rows_seen), "folds": int(self.folds)}
