"""The state of one accumulator chain of the pass: what a fold updates and a checkpoint saves.

A chain owns the per-cell accumulator of the experts and, beside it, the
baselines' and the audit's accumulators, so one fold of a block feeds them
all. The fold adds a block to the cells on its own thread and to the others
on a second one, so a chain has two ``P x P`` scratch matrices: the cells'
and one the others share (they flush one after another).
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
        # the baselines' and the audit's accumulators flush one after another, on the fold's second thread
        # (reduce._fold), beside the cells': they share one scratch matrix, the cells keep their own
        side = None
        if self.audit is not None:
            accs = list(self.audit.acc.values())
            side = accs[0]
            for acc in accs[1:]:
                acc.share_scratch(side)
        if self.baselines is not None and side is not None:
            self.baselines.scratch_of = side
            if self.baselines.white is not None:
                self.baselines.white.share_scratch(side)

    @property
    def rows_seen(self) -> int:
        return self.cells.rows_seen

    def bookkeeping(self) -> dict:
        """The JSON part of a checkpoint."""
        return {"chunks_done": list(self.chunks_done), "excluded_unusable": int(self.excluded_unusable),
                "rows_seen": int(self.rows_seen), "folds": int(self.folds)}
