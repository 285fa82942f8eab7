"""The leakage audit's kernels and accumulator: representations, statistics, solves and scores.

Question: does a representation of ``error`` predict logg (a leak: the
Poisson term of the noise carries the star's own spectrum) while keeping the
S/N information a gate needs? For each representation, a Ridge fitted on the
audit's train rows is scored on the frozen test rows, for logg and for the
true S/N:

* ``full``: the whole error vector (bad pixels imputed by the row median),
  solved from sufficient statistics, like the experts;
* ``S1``:  each error vector divided by its own median (same machinery);
* ``S2``:  template x scale: the scale is the least-squares factor of the
  spectrum on the template, the mean error vector of the pass's first block;
* ``S3b``: the 10 quality statistics of the feature table;
* ``S4``:  the norm of the error vector.

**No read of its own.** The audit rides the fit's one pass
(:func:`~snrmoe_dask.reduce.one_pass` with an :class:`AuditPlan`): each
chain folds its audit rows into an :class:`AuditAccumulator`, per-magnitude-
group statistics of ``full`` and ``S1`` for the three targets (logg, S/N and
logg shuffled) plus the small representations of each row. The audit's
train rows are at most ``audit.max_rows`` train rows, selected by a hash of
the spectrum id (two more Gram matrices per row would otherwise double the
pass's arithmetic). The frozen-test rows are scored afterwards from the row
cache the same pass writes (:mod:`snrmoe_dask.cache`), so every R² comes with
a bootstrap standard error over the test rows.

Small representations use scikit-learn's ``RidgeCV`` (efficient leave-one-out
over an alpha grid) on standardised, log-transformed inputs, and a nonlinear
learner (``HistGradientBoostingRegressor``), for logg, S/N and the routing
labels teff, [M/H] and magnitude: a summary that predicts the routing labels
tells a gate where a star sits without looking at its flux. Checks:

* **shuffle**: logg permuted among the audit's train spectra of the same
  magnitude bin; the ``full`` fit then must lose its logg skill (what remains
  is what the error vector says about magnitude, not about logg);
* **mask only**: Ridge on the bad-pixel counts per reason;
* **group CV by magnitude**: ``full`` fitted with one magnitude bin left out,
  scored on that bin, from the per-bin statistics (no refit pass).

The pixel importance of ``full`` (|w| x pixel std) shows where a leak sits; it
is summed over sky-line pixels and stellar line windows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .bootstrap import bootstrap_counts, r2_draws, se
from .catalog import good_pixel_mask
from .features import FEATURE_NAMES, PIXEL_COUNTS, QUALITY_FEATURES, block_features
from .lines import LINE_INDICES
from .metrics import r2_score
from .split import TRAIN, id_hash
from .stats import CellAccumulator, SufficientStats, impute_bad_pixels, packed_quadratic

__all__ = ["REPRESENTATIONS", "TARGETS", "SMALL_TARGETS", "AuditPlan", "AuditAccumulator", "AuditStats",
           "audit_plan", "audit_shifts", "audit_solutions", "audit_result", "error_representations",
           "representations_block", "ridge_small", "hgb_small", "r2_from_stats", "pixel_importance",
           "importance_by_region"]

REPRESENTATIONS = ("full", "S1", "S2", "S3b", "S4")
TARGETS = ("logg", "snr", "logg_shuffled")
#: labels the small representations are also regressed on (nonlinearly too)
SMALL_TARGETS = ("logg", "snr", "teff", "mh", "mag")
_BIG = ("full", "S1")
_SMALL = ("S2", "S4", "S3b", "counts")
_COUNTS = [FEATURE_NAMES.index(k) for k in PIXEL_COUNTS[:3]]  # n_bad_flux, n_bad_error, n_masked
#: columns of the per-row table an audit chain keeps: group, targets, labels, then the small representations
_ROW_COLUMNS = ("group", *TARGETS, *(f"label_{k}" for k in SMALL_TARGETS), "S2", "S4",
                *(f"S3b_{k}" for k in QUALITY_FEATURES), *(f"counts_{k}" for k in PIXEL_COUNTS[:3]))



def error_representations(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """``full`` (the imputed error vectors, float32) and ``S1`` (each divided by its own median)."""
    good = good_pixel_mask(flux, error, mask)
    e = impute_bad_pixels(np.where(np.isfinite(error), error, np.nan), good)
    med = np.median(e, axis=1)
    return e, e / np.where(med > 0, med, 1.0).astype(e.dtype)[:, None]


def representations_block(error: np.ndarray, flux: np.ndarray, mask: np.ndarray | None,
                          template: np.ndarray | None, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every representation of one block of error vectors (``full`` and ``S1`` float32, the small ones float64).

    ``features`` are the block's feature rows (:func:`~snrmoe_dask.features.block_features`), computed
    here when not given.
    """
    e, s1 = error_representations(flux, error, mask)
    feats = block_features(flux, error, mask) if features is None else features
    out = {"full": e, "S1": s1, "S4": np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float64))[:, None],
           "S3b": feats[:, :len(QUALITY_FEATURES)], "counts": feats[:, _COUNTS]}
    if template is not None:
        t = np.asarray(template, np.float64)
        out["S2"] = ((e.astype(np.float64) @ t) / float(t @ t))[:, None]
    return out


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class AuditPlan:
    """Which rows the audit folds, and their targets (every array has one entry per catalog row).

    ``group`` is the magnitude group of an audit train row and ``-1`` for
    every other row; ``targets`` holds logg, the true S/N and logg shuffled
    within magnitude groups; ``labels`` the :data:`SMALL_TARGETS` (NaN where
    the catalog lacks one).
    """

    group: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    n_groups: int
    mag_edges: list[float]
    train_rows: int
    flush_rows: int
    precision: str

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The audit rows of catalog rows ``lo:hi`` as :meth:`AuditAccumulator.add` takes them: their positions
        in the block, groups, targets and labels (``None`` if there are none). A fit's folds read the same
        from the fold inputs store (:mod:`snrmoe_dask.foldinputs`); this is the embedded form."""
        rows = np.flatnonzero(self.group[lo:hi] >= 0)
        if rows.size == 0:
            return None
        at = lo + rows
        return rows.astype(np.int32), self.group[at], self.targets[at], self.labels[at]

    @property
    def rows(self) -> int:
        return int((self.group >= 0).sum())

    def without_rows(self) -> AuditPlan:
        """The plan without its per-row columns (what scoring needs: bins and counts), small enough to ship."""
        return replace(self, group=self.group[:0], targets=self.targets[:0], labels=self.labels[:0])


def audit_plan(ds, cfg) -> AuditPlan:
    """The audit's rows and targets from the catalog's labels (``logg``, ``snr`` and ``mag`` required)."""
    from .bins import tertile_edges

    n_groups = cfg.audit.n_mag_groups
    train = ds["split"].values == TRAIN
    mag = np.asarray(ds["mag"].values, np.float64)
    edges = tertile_edges(mag[train], n_groups)
    rows = train.copy()
    if int(train.sum()) > cfg.audit.max_rows:  # a hash-selected subset of the train rows
        h = id_hash(ds["spectrum"].values, cfg.catalog.split_salt, stream=5)
        rows &= h <= np.sort(h[train])[cfg.audit.max_rows - 1]
    group = np.where(rows, np.searchsorted(edges, mag, side="left"), -1).astype(np.int64)
    logg = np.asarray(ds["logg"].values, np.float64)
    shuffled = logg.copy()
    rng = np.random.default_rng(cfg.audit.seed)
    for g in range(n_groups):
        idx = np.flatnonzero(group == g)
        shuffled[idx] = logg[rng.permutation(idx)]
    targets = np.column_stack([logg, np.asarray(ds["snr"].values, np.float64), shuffled])
    labels = np.column_stack([np.asarray(ds[k].values, np.float64) if k in ds else np.full(logg.shape, np.nan)
                              for k in SMALL_TARGETS])
    return AuditPlan(group, targets, labels, n_groups, [float(e) for e in edges], int(train.sum()),
                     cfg.audit.flush_rows, cfg.fit.precision)


def audit_shifts(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, group: np.ndarray,
                 n_groups: int) -> dict[str, np.ndarray]:
    """Accumulation shifts of ``full`` and ``S1`` per group (the mean of the group's rows in one block, the
    block's mean for a group without rows there) and the S2 template (the block's mean error vector)."""
    e, s1 = error_representations(flux, error, mask)
    out = {"template": e.mean(axis=0, dtype=np.float64)}
    for name, x in (("full", e), ("S1", s1)):
        shift = np.tile(x.mean(axis=0, dtype=np.float64), (n_groups, 1))
        for k in np.unique(group[group >= 0]):
            shift[k] = x[group == k].mean(axis=0, dtype=np.float64)
        out[name] = shift
    return out


# ---------------------------------------------------------------- accumulation
@dataclass
class AuditStats:
    """The audit's additive statistics: per group, ``full`` and ``S1`` for logg (``big``), the other targets'
    sums sharing those Gram matrices (``extra``), and the per-row table of the small representations."""

    big: dict[str, SufficientStats]
    extra: dict[str, dict[str, np.ndarray]]  # rep -> sy (G, T-1), syy (G, T-1), xty (G, P, T-1)
    rows: np.ndarray  # (m, len(_ROW_COLUMNS))
    template: np.ndarray

    def iadd(self, other: AuditStats) -> AuditStats:
        for r in _BIG:
            d = other.big[r].shift - self.big[r].shift  # x - c_self = (x - c_other) + d
            other.extra[r]["xty"] += d[:, :, None] * other.extra[r]["sy"][:, None, :]
            self.big[r].iadd(other.big[r])
            for k in ("sy", "syy", "xty"):
                self.extra[r][k] += other.extra[r][k]
        self.rows = np.concatenate([self.rows, other.rows])
        return self

    def stats(self, rep: str, target: str) -> SufficientStats:
        """Per-group statistics of one representation and target (shares the Gram arrays)."""
        b = self.big[rep]
        t = TARGETS.index(target)
        if t == 0:
            return b
        ex = self.extra[rep]
        return SufficientStats(b.n, b.sx, ex["sy"][:, t - 1].copy(), ex["syy"][:, t - 1].copy(), b.xtx,
                               np.ascontiguousarray(ex["xty"][:, :, t - 1]), b.shift, dict(b.meta))

    # checkpoints of a chain (beside its cell statistics)
    def to_zarr(self, root: str | Path) -> None:
        import xarray as xr

        root = Path(root)
        for r in _BIG:
            self.big[r].to_zarr(root / f"audit-{r}.zarr")
        data = {f"{r}_{k}": (tuple(f"{r}_{k}_{i}" for i in range(v.ndim)), v)
                for r in _BIG for k, v in self.extra[r].items()}
        data["rows"] = (("row", "column"), self.rows)
        data["template"] = ("feature", self.template)
        xr.Dataset(data).to_zarr(root / "audit-extra.zarr", mode="w", zarr_format=3, consolidated=False)

    @classmethod
    def from_zarr(cls, root: str | Path) -> AuditStats:
        import xarray as xr

        root = Path(root)
        ds = xr.open_zarr(root / "audit-extra.zarr", consolidated=False).load()
        return cls({r: SufficientStats.from_zarr(root / f"audit-{r}.zarr") for r in _BIG},
                   {r: {k: np.asarray(ds[f"{r}_{k}"].values) for k in ("sy", "syy", "xty")} for r in _BIG},
                   np.asarray(ds["rows"].values), np.asarray(ds["template"].values))


def _row_column(rows: np.ndarray, name: str) -> np.ndarray:
    """One column of the audit's per-row table (:data:`_ROW_COLUMNS`)."""
    return rows[:, _ROW_COLUMNS.index(name)]


def _row_small(rows: np.ndarray, rep: str) -> np.ndarray:
    """The columns of one small representation in the audit's per-row table."""
    return rows[:, [i for i, c in enumerate(_ROW_COLUMNS) if c == rep or c.startswith(rep + "_")]]


class AuditAccumulator:
    """The audit's share of one pass chain: a :class:`~snrmoe_dask.stats.CellAccumulator` per big
    representation (cells = magnitude groups, target logg), the other targets' sums beside it, and the
    rows of the small representations."""

    def __init__(self, shifts: dict[str, np.ndarray], flush_rows: int, precision: str):
        acc = {r: CellAccumulator(shifts[r].shape[0], shifts[r], flush_rows=flush_rows, precision=precision)
               for r in _BIG}
        t, p = len(TARGETS) - 1, shifts["full"].shape[1]
        extra = {r: {"sy": np.zeros((acc[r].stats.n_cells, t)), "syy": np.zeros((acc[r].stats.n_cells, t)),
                     "xty": np.zeros((acc[r].stats.n_cells, p, t))} for r in _BIG}
        self._attach(acc, AuditStats({r: acc[r].stats for r in _BIG}, extra, np.zeros((0, len(_ROW_COLUMNS))),
                                     np.asarray(shifts["template"], np.float64)))

    def _attach(self, acc: dict[str, CellAccumulator], totals: AuditStats) -> None:
        self.acc, self.totals = acc, totals  # totals.big[r] is acc[r].stats: the accumulators fill it
        self._rows: list[np.ndarray] = []

    @classmethod
    def resume(cls, saved: AuditStats, flush_rows: int, precision: str) -> AuditAccumulator:
        """An accumulator that continues from statistics written by :meth:`flush_all`."""
        acc = cls.__new__(cls)
        acc._attach({r: CellAccumulator.resume(saved.big[r], flush_rows=flush_rows, precision=precision)
                     for r in _BIG}, saved)
        return acc

    def add(self, flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, features: np.ndarray,
            rows: np.ndarray, group: np.ndarray, targets: np.ndarray, labels: np.ndarray) -> None:
        """Fold the block's audit rows: ``rows`` are their positions in the block; ``group``, ``targets``
        and ``labels`` have one entry per audit row (:meth:`AuditPlan.block`)."""
        sel = np.asarray(rows, np.int64)
        if sel.size == 0:
            return
        g, y = np.asarray(group, np.int64), np.asarray(targets, np.float64)
        if not (g.shape[0] == y.shape[0] == len(labels) == sel.size):
            raise ValueError(f"{sel.size} audit rows but {g.shape[0]} groups, {y.shape[0]} targets and "
                             f"{len(labels)} labels")
        reps = representations_block(error[sel], flux[sel], None if mask is None else mask[sel],
                                     self.totals.template, features[sel])
        for r in _BIG:
            x = reps[r]
            self.acc[r].add(x, y[:, 0], g)
            ex, shift, dtype = self.totals.extra[r], self.acc[r].stats.shift, self.acc[r].dtype
            for k in np.unique(g):  # the other targets share the Gram: only their cross sums
                rows = g == k
                xc = x[rows].astype(dtype, copy=False) - shift[k].astype(dtype)  # as the accumulator centres
                yk = y[rows, 1:]
                ex["xty"][k] += xc.T.astype(np.float64) @ yk
                ex["sy"][k] += yk.sum(0)
                ex["syy"][k] += (yk * yk).sum(0)
        self._rows.append(np.column_stack([g, y, labels, reps["S2"], reps["S4"], reps["S3b"], reps["counts"]]))

    def flush_all(self) -> AuditStats:
        """Everything folded so far as :class:`AuditStats` (shares the accumulators' totals)."""
        for r in _BIG:
            self.totals.big[r] = self.acc[r].flush_all()
        if self._rows:
            self.totals.rows = np.concatenate([self.totals.rows, *self._rows])
            self._rows = []
        return self.totals

    def finalize(self) -> AuditStats:
        out = self.flush_all()
        for r in _BIG:
            self.acc[r].finalize()
        return out


def r2_from_stats(stats: SufficientStats, groups, coef: np.ndarray, intercept: float) -> float | None:
    """R² of a fixed linear model on the rows summarised by ``groups`` cells, from their statistics alone."""
    idx = np.asarray(list(groups))
    n = float(stats.n[idx].sum())
    if n < 2:
        return None
    # residual r = y - b - w.(x - c) - w.c ; expand sum r^2 with the shifted sums (one shift for the groups)
    if not (stats.shift[idx] == stats.shift[idx[0]]).all():
        stats = stats.reshift(stats.shift[idx[0]])
    b = intercept + float(coef @ stats.shift[idx[0]])
    sx, sy, syy = stats.sx[idx].sum(0), float(stats.sy[idx].sum()), float(stats.syy[idx].sum())
    xtx = stats.xtx[idx[0]] if idx.size == 1 else stats.xtx[idx].sum(0)
    xty = stats.xty[idx].sum(0)
    rss = (syy - 2 * b * sy - 2 * coef @ xty + n * b * b + 2 * b * coef @ sx
           + packed_quadratic(xtx, np.asarray(coef, np.float64)))
    tss = syy - sy * sy / n
    return None if tss <= 0 else float(1 - rss / tss)


_SMALL_ALPHAS = tuple(np.logspace(-6, 6, 25))  # AuditConfig.small_ridge_alphas' default


def ridge_small(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, alphas=_SMALL_ALPHAS) -> np.ndarray:
    """Test predictions of RidgeCV on standardised inputs (log-transformed where a column is positive)."""
    from sklearn.linear_model import RidgeCV

    from .gates import Standardizer

    sc = Standardizer.fit(x_train)
    model = RidgeCV(alphas=np.asarray(alphas, np.float64)).fit(sc.transform(x_train), y_train)
    return model.predict(sc.transform(x_test))


def hgb_small(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int = 0,
              max_iter: int = 300) -> np.ndarray:
    """Test predictions of scikit-learn's HistGradientBoostingRegressor (early stopping on a train split)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    model = HistGradientBoostingRegressor(max_iter=max_iter, early_stopping=True, random_state=seed)
    return model.fit(x_train, y_train).predict(x_test)


def pixel_importance(coef: np.ndarray, gram_diag: np.ndarray, n: float) -> np.ndarray:
    """|w_p| x std_p: each pixel's share of the prediction's spread."""
    return np.abs(coef) * np.sqrt(np.clip(gram_diag / max(n - 1.0, 1.0), 0.0, None))


def importance_by_region(importance: np.ndarray, wavelength: np.ndarray, sky: np.ndarray | None) -> dict:
    """Share of the total importance in sky-line pixels, stellar line windows and elsewhere."""
    total = float(importance.sum()) or 1.0
    lines = np.zeros(wavelength.shape, bool)
    for windows in LINE_INDICES.values():
        lo, hi = windows[0]
        lines |= (wavelength >= lo) & (wavelength <= hi)
    out = {"stellar_line_windows": float(importance[lines].sum() / total),
           "stellar_line_windows_pixel_fraction": float(lines.mean())}
    if sky is not None:
        skyline = sky > 1.5 * np.median(sky)
        out["sky_line_pixels"] = float(importance[skyline].sum() / total)
        out["sky_line_pixel_fraction"] = float(skyline.mean())
    return out


# ------------------------------------------------------------ solving and scoring
def audit_solutions(st: AuditStats, n_groups: int, fit_cfg, at_once: int = 1, blas: int | None = None) -> dict:
    """Every Ridge of the big representations, solved where the statistics live (small arrays come back).

    Alpha by the fit's rule (``fit.alphas_relative``, ``fit.max_df_fraction``); every target of a
    representation shares one spectrum of its Gram matrix. Also: the group CV by magnitude (scored from
    each left-out group's statistics), the pixel importance of ``full`` for logg, and the rows of the small
    representations. With ``at_once > 1`` that many Gram matrices are solved at a time, each on one BLAS
    thread and in its own buffers (as the experts' solves); else one at a time on ``blas`` BLAS threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .blas import blas_threads
    from .ridge import ridge_alphas, solve_ridge, spectrum
    from .stats import process_scratch

    rel, cap, precision = fit_cfg.alphas_relative, fit_cfg.max_df_fraction, fit_cfg.alpha_search_precision

    def solve_targets(job) -> dict:
        """Every target on one union of groups: one Gram matrix, one reduction, factors shared by alpha."""
        rep, targets, cells = job
        with process_scratch() as scratch:  # one Gram matrix per representation and row set, its targets share it
            first = st.stats(rep, targets[0]).cells(cells, scratch)
            sp, factors, sols = spectrum(first, precision, scratch), {}, {}
            for target in targets:
                cs = first if target == targets[0] else st.stats(rep, target).cells(cells, same_gram=first)
                sol = solve_ridge(cs, ridge_alphas(cs, rel), max_df_fraction=cap, spec=sp, factors=factors,
                                  scratch=scratch)
                sols[target] = (sol, pixel_importance(sol.coef, np.diag(cs.gram), cs.n)
                                if (rep, target) == ("full", "logg") else None)
            return sols

    groups = [g for g in range(n_groups) if st.big["full"].n[g] > 0]
    cv = [g for g in groups if len(groups) > 1]
    jobs = [(r, TARGETS, groups) for r in _BIG] + [("full", ("logg", "snr"), [k for k in groups if k != g])
                                                   for g in cv]
    if at_once > 1 and len(jobs) > 1:
        with blas_threads(1), ThreadPoolExecutor(at_once) as pool:
            solved = list(pool.map(solve_targets, jobs))
    else:
        with blas_threads(blas):
            solved = [solve_targets(job) for job in jobs]
    out: dict = {"solutions": {}, "n_per_group": st.big["full"].n.tolist(), "rows": st.rows,
                 "template": st.template, "group_cv": []}
    for r, sols in zip(_BIG, solved):
        for target, (sol, importance) in sols.items():
            out["solutions"][f"{r}/{target}"] = {"coef": sol.coef, "intercept": float(sol.intercept),
                                                 "alpha": float(sol.alpha)}
            if importance is not None:
                out["importance"] = importance
    by_group = dict(zip(cv, solved[len(_BIG):]))
    for g in groups:
        row = {"group": g, "n": int(st.big["full"].n[g]), "logg_r2": None, "snr_r2": None}
        for target, (sol, _) in by_group.get(g, {}).items():
            row[f"{target}_r2"] = r2_from_stats(st.stats("full", target), [g], sol.coef, sol.intercept)
        out["group_cv"].append(row)
    return out


def _scored(y: np.ndarray, yhat: np.ndarray, counts: np.ndarray) -> tuple[float | None, float | None]:
    """Test R² and its bootstrap standard error (the evaluation's paired draws)."""
    return r2_score(y, yhat), se(r2_draws(y, yhat, counts))


def audit_result(sol: dict, test, plan: AuditPlan, cfg, features: np.ndarray | None = None) -> dict:
    """Score the solutions and the small representations on the frozen-test rows ``test`` (a catalog-shaped
    Dataset: the row cache). Every R² comes with its bootstrap standard error over those rows.

    ``features`` are those rows' feature rows as the pass computed them (the quality statistics and the
    pixel counts are representations too); without them they are computed again from ``test``.
    """
    flux = np.asarray(test["flux"].values)
    error = np.asarray(test["error"].values)
    mask = np.asarray(test["mask"].values) if "mask" in test else None
    reps = representations_block(error, flux, mask, sol["template"], features)
    y_test = {"logg": np.asarray(test["logg"].values, np.float64), "snr": np.asarray(test["snr"].values, np.float64)}
    y_test["logg_shuffled"] = y_test["logg"]  # the shuffle check scores against the true logg
    labels_test = {k: np.asarray(test[k].values, np.float64) if k in test else np.full(flux.shape[0], np.nan)
                   for k in SMALL_TARGETS}
    counts = bootstrap_counts(flux.shape[0], cfg.evaluate.n_bootstrap, cfg.evaluate.seed)
    a = cfg.audit
    small_alphas = a.small_ridge_alphas or _SMALL_ALPHAS
    out: dict[str, dict] = {}
    for r in _BIG:
        out[r] = {}
        x = reps[r].astype(np.float64)
        for target in TARGETS:
            s = sol["solutions"][f"{r}/{target}"]
            r2, r2_se = _scored(y_test[target], x @ s["coef"] + s["intercept"], counts)
            out[r][f"{target}_r2"], out[r][f"{target}_r2_se"], out[r][f"{target}_alpha"] = r2, r2_se, s["alpha"]
    rows = sol["rows"]
    train_labels = {k: _row_column(rows, f"label_{k}") for k in SMALL_TARGETS}
    for r in ("S2", "S3b", "S4"):
        x_tr, x_te = _row_small(rows, r), reps[r]
        by = {}
        for label in SMALL_TARGETS:  # logg and snr are SMALL_TARGETS too: one Ridge fit each
            y_tr, y_te = train_labels[label], labels_test[label]
            if not (np.isfinite(y_tr).all() and np.isfinite(y_te).all()) or y_tr.size < a.min_small_rows:
                continue
            ridge = _scored(y_te, ridge_small(x_tr, y_tr, x_te, small_alphas), counts)
            hgb = _scored(y_te, hgb_small(x_tr, y_tr, x_te, a.seed, a.hgb_max_iter), counts)
            by[label] = {"ridge_r2": ridge[0], "ridge_r2_se": ridge[1], "hgb_r2": hgb[0], "hgb_r2_se": hgb[1]}
        out[r] = {f"{t}_r2": by.get(t, {}).get("ridge_r2") for t in TARGETS[:2]}
        out[r].update({f"{t}_r2_se": by.get(t, {}).get("ridge_r2_se") for t in TARGETS[:2]})
        out[r]["by_label"] = by
    shuffled = {"logg_r2": out["full"].pop("logg_shuffled_r2"), "logg_r2_se": out["full"].pop("logg_shuffled_r2_se")}
    for r in _BIG:
        out[r].pop("logg_shuffled_alpha", None)
    out["S1"].pop("logg_shuffled_r2", None)
    out["S1"].pop("logg_shuffled_r2_se", None)
    mask_only = _scored(y_test["logg"], ridge_small(_row_small(rows, "counts"), train_labels["logg"], reps["counts"],
                                                    small_alphas), counts)
    cv = {"what": "full, fitted without one magnitude bin and scored on it (from per-bin statistics)",
          "mag_edges": plan.mag_edges, "per_group": sol["group_cv"]}
    for target in ("logg", "snr"):
        vals = [g[f"{target}_r2"] for g in cv["per_group"] if g[f"{target}_r2"] is not None]
        cv[f"mean_{target}_r2"] = float(np.mean(vals)) if vals else None
    checks = {
        "shuffle": {"what": "full, logg permuted among the audit's train spectra of the same magnitude bin",
                    **shuffled, "logg_r2_unshuffled": out["full"]["logg_r2"]},
        "mask_only": {"what": "Ridge on the bad-pixel counts per reason (n_bad_flux, n_bad_error, n_masked)",
                      "logg_r2": mask_only[0], "logg_r2_se": mask_only[1]},
        "group_cv_by_magnitude": cv,
    }
    n_train = int(sum(sol["n_per_group"]))
    return {"representations": out, "checks": checks, "pixel_importance": sol["importance"],
            "n_train": n_train, "n_test": int(flux.shape[0]),
            "rows": {"train_used": n_train, "train_available": plan.train_rows, "max_rows": cfg.audit.max_rows,
                     "subset": "all train rows" if n_train >= plan.train_rows else
                     f"hash-selected {n_train} of {plan.train_rows} train rows (audit.max_rows)",
                     "test": int(flux.shape[0]), "se": f"bootstrap over the test rows ({cfg.evaluate.n_bootstrap} "
                                                       "draws)"}}
