"""The seeds' single-model control baselines, from sufficient statistics.

* ``whitened``: Ridge on ``flux / error`` (bad pixels -> 0: a pixel with no
  information has zero inverse-variance weight). Its own Gram matrix is
  accumulated in the same pass as the experts' (one extra ``syrk`` per train
  row, one more (P, P) float64 total).
* ``conditional``: Ridge on ``[flux, z]`` with the Q = 12 S/N-conditioning
  terms ``z = [s, s * li_1, ..., s * li_11]``: ``s`` is the S/N estimate and
  ``li_k`` the physical line indices (flux summaries) of the feature table,
  so the model's line-strength response varies linearly with S/N. An index
  whose windows have no good pixel contributes 0. The flux block of its Gram
  matrix *is* the global expert's (same rows), so the pass only adds the small
  cross terms ``sum (x - c) z^T``, ``sum z z^T``, ``sum z``, ``sum z y``.
  Before solving, each ``z`` column is scaled to the mean flux-pixel variance
  so one alpha penalises both blocks evenly; coefficients are reported in the
  original units.

Both choose alpha by GCV over the experts' relative grid (no extra pass).
Kernels here are NumPy; the pass wiring is in :mod:`snrmoe_dask.reduce`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from .catalog import good_pixel_mask
from .features import FEATURE_NAMES, LINE_NAMES
from .ridge import ridge_alphas, solve_ridge, spectrum
from .stats import CellAccumulator, CenteredStats, SufficientStats, impute_bad_pixels

__all__ = ["BASELINES", "TERM_NAMES", "whiten", "conditional_terms", "CrossStats", "BaselineStats",
           "BaselineAccumulator", "solve_baselines", "baselines_dataset", "baseline_predict_block",
           "baseline_predictions", "add_conditional_terms"]

BASELINES = ("whitened", "conditional")
TERM_NAMES = ("snr_est", *(f"snr_est*{name}" for name in LINE_NAMES))
_SNR = FEATURE_NAMES.index("snr_est")
_LI = [FEATURE_NAMES.index(name) for name in LINE_NAMES]


def whiten(flux: np.ndarray, error: np.ndarray, good: np.ndarray | None) -> np.ndarray:
    """``flux / error`` on good pixels, 0 elsewhere (float32); ``good=None``: every pixel is good."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.asarray(flux, np.float32) / np.asarray(error, np.float32)
    if good is not None and not good.all():
        w[~good] = 0.0
    return w


def conditional_terms(features: np.ndarray) -> np.ndarray:
    """The conditioning terms ``[s, s * li_k]`` from feature rows (n, len(FEATURE_NAMES)), float64."""
    s = features[:, _SNR]
    li = np.nan_to_num(features[:, _LI], nan=0.0)
    return np.column_stack([s, s[:, None] * li])


@dataclass
class CrossStats:
    """Additive cross statistics of the conditioning terms ``z`` with flux ``x`` and target ``y``.

    ``sxz = sum (x - shift) z^T`` (P, Q), ``szz = sum z z^T``, ``sz = sum z``,
    ``szy = sum z y``; ``n`` rows.
    """

    n: float
    sz: np.ndarray
    szz: np.ndarray
    sxz: np.ndarray
    szy: np.ndarray
    shift: np.ndarray

    @classmethod
    def zeros(cls, shift: np.ndarray, q: int) -> CrossStats:
        p = shift.shape[0]
        return cls(0.0, np.zeros(q), np.zeros((q, q)), np.zeros((p, q)), np.zeros(q),
                   np.asarray(shift, np.float64).copy())

    def add_rows(self, xc: np.ndarray, z: np.ndarray, y: np.ndarray) -> None:
        """Add rows: ``xc`` = x - shift (float32 ok), ``z`` (n, Q), ``y`` (n,)."""
        self.n += z.shape[0]
        self.sz += z.sum(axis=0)
        self.szz += z.T @ z
        self.sxz += (xc.T @ z.astype(xc.dtype)).astype(np.float64)
        self.szy += z.T @ y

    def __add__(self, other: CrossStats) -> CrossStats:
        # x - c = (x - c') + (c' - c): moving other's sums to self's shift
        sxz = other.sxz + np.outer(other.shift - self.shift, other.sz)
        return CrossStats(self.n + other.n, self.sz + other.sz, self.szz + other.szz, self.sxz + sxz,
                          self.szy + other.szy, self.shift.copy())


@dataclass
class BaselineStats:
    """The statistics of both baselines (either may be absent)."""

    whitened: SufficientStats | None = None
    cross: CrossStats | None = None
    meta: dict = field(default_factory=dict)

    def __add__(self, other: BaselineStats) -> BaselineStats:
        def plus(a, b):
            return b if a is None else (a if b is None else a + b)

        return BaselineStats(plus(self.whitened, other.whitened), plus(self.cross, other.cross), dict(self.meta))

    def to_zarr(self, path: str | Path) -> None:
        """``PATH/whitened.zarr`` (a :class:`SufficientStats` store) and ``PATH/cross.zarr``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.whitened is not None:
            self.whitened.to_zarr(path / "whitened.zarr")
        if self.cross is not None:
            c = self.cross
            xr.Dataset({"n": ((), c.n), "sz": ("term", c.sz), "szz": (("term", "term_t"), c.szz),
                        "sxz": (("feature", "term"), c.sxz), "szy": ("term", c.szy), "shift": ("feature", c.shift)},
                       attrs={"kind": "snrmoe.CrossStats", "terms": json.dumps(list(TERM_NAMES))}
                       ).to_zarr(path / "cross.zarr", mode="w", zarr_format=3, consolidated=False)

    @classmethod
    def from_zarr(cls, path: str | Path) -> BaselineStats:
        path = Path(path)
        white = SufficientStats.from_zarr(path / "whitened.zarr") if (path / "whitened.zarr").exists() else None
        cross = None
        if (path / "cross.zarr").exists():
            ds = xr.open_zarr(path / "cross.zarr", consolidated=False).load()
            if ds.attrs.get("kind") != "snrmoe.CrossStats":
                raise ValueError(f"{path}/cross.zarr is not a snrmoe cross-statistics store")
            cross = CrossStats(float(ds["n"]), *(ds[k].values.astype(np.float64)
                                                 for k in ("sz", "szz", "sxz", "szy", "shift")))
        return cls(white, cross)


class BaselineAccumulator:
    """Streams the train rows of one accumulator chain into the baselines' statistics."""

    def __init__(self, names: Sequence[str], shift: np.ndarray, flush_rows: int = 1024, precision: str = "float32"):
        unknown = set(names) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)} (known: {', '.join(BASELINES)})")
        self.names = tuple(names)
        self.flush_rows, self.precision = flush_rows, precision
        self.white: CellAccumulator | None = None  # created at the first rows (its shift is their mean)
        self.scratch_of: CellAccumulator | None = None  # an accumulator whose scratch matrix ``white`` shares
        self._dtype = np.float32 if precision == "float32" else np.float64  # of the products, as the experts'
        self._shift = np.asarray(shift, self._dtype)  # applied in the working precision: record exactly that
        self.cross = (CrossStats.zeros(self._shift.astype(np.float64), len(TERM_NAMES))
                      if "conditional" in self.names else None)

    def resume_cross(self, cross: CrossStats) -> None:
        """Continue from saved cross statistics (new rows are shifted by their shift)."""
        self.cross = cross
        self._shift = np.asarray(cross.shift, self._dtype)

    def add(self, x_imputed: np.ndarray, flux: np.ndarray, error: np.ndarray, good: np.ndarray | None,
            features: np.ndarray, y: np.ndarray, keep: np.ndarray) -> None:
        """Add the rows ``keep`` (the rows the experts train on) of one block (``good=None``: no bad pixel)."""
        if not keep.any():
            return
        y = np.asarray(y, np.float64)
        if "whitened" in self.names:
            # the whole block is whitened and the accumulator gathers the kept rows into its buffer: no
            # copies of the kept rows of flux, error and mask first
            w = whiten(flux, error, good)
            if self.white is None:
                self.white = CellAccumulator(1, w[keep].mean(axis=0, dtype=np.float64), flush_rows=self.flush_rows,
                                             precision=self.precision)
                if self.scratch_of is not None:
                    self.white.share_scratch(self.scratch_of)
            self.white.add(w, y, np.where(keep, 0, -1))
        y = y[keep]
        if self.cross is not None:
            xc = np.subtract(x_imputed[keep], self._shift, dtype=self._dtype)
            self.cross.add_rows(xc, conditional_terms(features[keep]), y)

    def finalize(self) -> BaselineStats:
        return BaselineStats(self.white.finalize() if self.white is not None else None, self.cross)


def _conditional_centered(stats: SufficientStats, cross: CrossStats) -> tuple[CenteredStats, np.ndarray]:
    """Centred statistics of ``[x, z / scale]`` (train rows of every cell), and ``scale``."""
    cs = stats.cells(range(stats.n_cells))
    if not np.isclose(cross.n, cs.n):
        raise ValueError(f"conditional cross statistics hold {cross.n:.0f} rows, the experts {cs.n:.0f}")
    n = cs.n
    mx = cs.xbar - cross.shift  # mean of x - the cross sums' shift
    mz = cross.sz / n
    gzz = cross.szz - n * np.outer(mz, mz)
    gxz = cross.sxz - n * np.outer(mx, mz)
    bz = cross.szy - mz * (n * cs.ybar)
    var_pixel = float(np.trace(cs.gram)) / cs.gram.shape[0]
    dz = np.diag(gzz)
    scale = np.where(dz > 0, np.sqrt(np.maximum(dz, 0) / max(var_pixel, np.finfo(float).tiny)), 1.0)
    gram = np.block([[cs.gram, gxz / scale], [(gxz / scale).T, gzz / np.outer(scale, scale)]])
    out = CenteredStats(n, np.concatenate([cs.xbar, mz / scale]), cs.ybar, gram,
                        np.concatenate([cs.xty, bz / scale]), cs.yy)
    return out, scale


def _fit(cs: CenteredStats, relative_alphas, max_df_fraction, search_precision, alpha_scale_gram=None) -> dict:
    alphas = ridge_alphas(cs if alpha_scale_gram is None else alpha_scale_gram, relative_alphas)
    sol = solve_ridge(cs, alphas, max_df_fraction=max_df_fraction, spec=spectrum(cs, search_precision))
    return {"coef": sol.coef, "intercept": sol.intercept, "alpha": sol.alpha, "gcv": sol.gcv, "df": sol.df,
            "n": sol.n, "at_grid_edge": sol.at_grid_edge}


def solve_baselines(stats: SufficientStats, bstats: BaselineStats, relative_alphas: Sequence[float],
                    max_df_fraction: float = 0.5, search_precision: str = "float32") -> dict:
    """Fit every baseline present in ``bstats``: ``{name: {coef, intercept, alpha, gcv, df, n, ...}}``.

    ``conditional`` also has ``term_coef`` (Q,) for :data:`TERM_NAMES`;
    ``coef`` always multiplies the baseline's own pixel input (whitened flux
    for ``whitened``, flux for ``conditional``).
    """
    out = {}
    if bstats.whitened is not None:
        out["whitened"] = _fit(bstats.whitened.cells([0]), relative_alphas, max_df_fraction, search_precision)
    if bstats.cross is not None:
        cs, scale = _conditional_centered(stats, bstats.cross)
        p = stats.n_features
        fit = _fit(cs, relative_alphas, max_df_fraction, search_precision)
        w = fit["coef"]
        fit["coef"], fit["term_coef"] = w[:p], w[p:] / scale
        out["conditional"] = fit
    return out


def baselines_dataset(fits: dict, wavelength: np.ndarray) -> xr.Dataset:
    """The ``baselines.zarr`` Dataset: dims (baseline, wavelength) and (term,)."""
    names = [b for b in BASELINES if b in fits]
    ds = xr.Dataset(
        {"coef": (("baseline", "wavelength"), np.stack([np.asarray(fits[b]["coef"], np.float64) for b in names])),
         **{k: ("baseline", np.array([fits[b][k] for b in names], np.float64))
            for k in ("intercept", "alpha", "gcv", "df", "n")},
         "term_coef": ("term", np.asarray(fits["conditional"]["term_coef"], np.float64)
                       if "conditional" in fits else np.zeros(len(TERM_NAMES)))},
        coords={"wavelength": np.asarray(wavelength, np.float64)},
        attrs={"baseline": json.dumps(names), "term": json.dumps(list(TERM_NAMES)),
               "inputs": json.dumps({"whitened": "flux / error (bad pixels 0)",
                                     "conditional": "imputed flux, then terms (term_coef)"})},
    )
    return ds


def baseline_predict_block(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, *,
                           coef: np.ndarray, intercept: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The pixel part of each baseline in ``names`` for one block, shape (n, len(names)).

    ``conditional`` still needs its S/N terms added (:func:`add_conditional_terms`),
    from the feature table that the caller computes anyway.
    """
    good = good_pixel_mask(flux, error, mask)
    out = np.empty((flux.shape[0], len(names)))
    for j, name in enumerate(names):
        x = whiten(flux, error, good) if name == "whitened" else impute_bad_pixels(flux, good)
        out[:, j] = x.astype(np.float64) @ coef[j] + intercept[j]
    return out


def add_conditional_terms(pred: np.ndarray, features: np.ndarray, baselines: xr.Dataset) -> np.ndarray:
    """Complete :func:`baseline_predict_block` output with the conditional model's S/N terms (in place)."""
    names = json.loads(baselines.attrs["baseline"])
    if "conditional" in names:
        pred[:, names.index("conditional")] += conditional_terms(features) @ baselines["term_coef"].values
    return pred


def baseline_predictions(ds: xr.Dataset, baselines: xr.Dataset, rows: np.ndarray | None = None):
    """Lazy pixel parts of every stored baseline for ``rows``: dask array (len(rows), B).

    Add the conditional terms with :func:`add_conditional_terms` once the
    rows' features are known.
    """
    import dask.array as da

    sub = ds if rows is None else ds.isel(spectrum=np.asarray(rows))
    names = json.loads(baselines.attrs["baseline"])
    params = {"coef": np.asarray(baselines["coef"].values, np.float64),
              "intercept": np.asarray(baselines["intercept"].values, np.float64), "names": names}
    flux = sub["flux"].data
    args = [flux, sub["error"].data] + ([sub["mask"].data] if "mask" in sub else [])

    def _kernel(f, e, *m):
        return baseline_predict_block(f, e, m[0] if m else None, **params)

    return da.map_blocks(_kernel, *args, dtype=np.float64, chunks=(flux.chunks[0], (len(names),)),
                         name="baselines-predict")
