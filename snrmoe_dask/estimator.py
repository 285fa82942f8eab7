"""A scikit-learn estimator for the mixture, on in-memory NumPy arrays.

:class:`SNRMoERegressor` runs the same kernels as the out-of-core pipeline
(the cell accumulator, the Ridge experts from sufficient statistics, the
gates, the predict kernel) on arrays that fit in memory, so a fitted
mixture can be used wherever scikit-learn estimators are (pipelines,
``cross_val_score``). :meth:`SNRMoERegressor.from_model` wraps a model store
written by ``snrmoe fit`` for in-memory prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dask
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from .bins import cell_index, phys_bin, phys_bin_names, snr_bin, tertile_edges
from .catalog import good_pixel_mask
from .config import FitConfig, GatesConfig
from .experts import expert_specs, fit_experts
from .features import FEATURE_NAMES, block_features, snr_estimate
from .gates import GATE_SPECS, fit_gate
from .mixture import apply_model_gate, calibrate_sigma, gate_inputs, gate_tau, physical_names, predict_block
from .pca import pca_from_stats
from .split import id_hash
from .stats import CellAccumulator, impute_bad_pixels

__all__ = ["SNRMoERegressor"]

_SNR_NAMES = ("X", "L", "M", "H")


class SNRMoERegressor(RegressorMixin, BaseEstimator):
    """S/N-conditioned soft mixture of Ridge experts for in-memory spectra.

    Parameters
    ----------
    gate : str, default="deploy_snr_logreg"
        One of :data:`~snrmoe_dask.gates.GATE_SPECS`.
    snr_edges : tuple of float, default=(2.0, 4.0, 7.0)
        Inner edges of the 4 S/N bins X, L, M, H.
    alphas_relative : sequence of float or None
        Ridge grid relative to trace(XtX)/P; ``None`` = the shipped default.
    min_cell_rows : int, default=50
        Experts with fewer rows fall back to their parent.
    gate_fraction : float, default=0.2
        Share of the rows held out of the experts to fit the gate on.
    fallback_tau : float, default=0.3
        Classifier gates (``deploy_snr_logreg``, ``deploy_phys``, ``deploy_joint``,
        ``deploy_dual_poe``) predict with ``global`` where their largest weight
        is below this; MSE-trained gates are deployed as trained, softly
        everywhere. A model from :meth:`from_model` keeps each gate's own.
    n_pca : int, default=4
        PCA projections among the physical gate inputs.
    min_good_fraction : float, default=0.5
        Spectra with fewer good pixels are not trained on and predict NaN.
    random_state : int, default=0
        Seeds the expert/gate row split and the MLP gate.

    Attributes
    ----------
    coef_ : ndarray of shape (n_experts, n_features_in_)
    intercept_ : ndarray of shape (n_experts,)
    alpha_ : ndarray of shape (n_experts,)
    expert_names_ : list of str
    gate_ : Gate
        The fitted gate (:class:`~snrmoe_dask.gates.Gate`).
    model_ : Model
        The experts and gate as a :class:`~snrmoe_dask.store.Model`.
    n_features_in_ : int
    wavelength_ : ndarray of shape (n_features_in_,) or None
        The grid the line indices were measured on (used when predict gets none).

    Notes
    -----
    ``fit(X, y, error=..., snr=..., teff=..., mh=..., wavelength=...)``:
    ``X`` is flux and ``error`` its 1-sigma errors (default: ones). Training
    cells use the true ``snr`` when given (as the oracle training of the
    pipeline does), else the S/N estimate; the physical bins need ``teff``
    and ``mh`` (without them there is one physical bin). Line indices need
    ``wavelength`` (without it they are missing and the physical gates see
    only the PCA projections).
    """

    def __init__(self, *, gate: str = "deploy_snr_logreg", snr_edges: Sequence[float] = (2.0, 4.0, 7.0),
                 alphas_relative: Sequence[float] | None = None, min_cell_rows: int = 50,
                 gate_fraction: float = 0.2, fallback_tau: float = 0.3, n_pca: int = 4,
                 min_good_fraction: float = 0.5, random_state: int = 0):
        self.gate = gate
        self.snr_edges = snr_edges
        self.alphas_relative = alphas_relative
        self.min_cell_rows = min_cell_rows
        self.gate_fraction = gate_fraction
        self.fallback_tau = fallback_tau
        self.n_pca = n_pca
        self.min_good_fraction = min_good_fraction
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # a NaN flux is a bad pixel: imputed, counted, never an error
        return tags

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _error(x: np.ndarray, error) -> np.ndarray:
        if error is None:
            return np.ones_like(x, dtype=np.float64)
        error = np.asarray(error, np.float64)
        if error.shape != x.shape:
            raise ValueError(f"error must have the shape of X {x.shape}, got {error.shape}")
        return error

    def _wavelength(self, p: int, wavelength) -> np.ndarray | None:
        if wavelength is None:
            return None
        wavelength = np.asarray(wavelength, np.float64)
        if wavelength.shape != (p,):
            raise ValueError(f"wavelength must have shape ({p},), got {wavelength.shape}")
        return wavelength

    # ---------------------------------------------------------------- fit
    def fit(self, X, y, *, error=None, wavelength=None, snr=None, teff=None, mh=None):
        """Fit the experts from sufficient statistics, then the gate on held-out rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Flux.
        y : array-like of shape (n_samples,)
        error : array-like of shape (n_samples, n_features), optional
        wavelength : array-like of shape (n_features,), optional
        snr, teff, mh : array-like of shape (n_samples,), optional
            True labels that define the training cells.

        Returns
        -------
        self
        """
        from .fit import assemble_model

        if self.gate not in GATE_SPECS:
            raise ValueError(f"unknown gate '{self.gate}' (known: {', '.join(GATE_SPECS)})")
        x, y = validate_data(self, X, y, y_numeric=True, ensure_all_finite="allow-nan", dtype=np.float64)
        n, p = x.shape
        if n < 4:
            raise ValueError(f"SNRMoERegressor needs at least 4 samples, got n_samples = {n}")
        error = self._error(x, error)
        wave = self._wavelength(p, wavelength)
        good = good_pixel_mask(x, error)
        usable = good.sum(axis=1) >= int(np.ceil(self.min_good_fraction * p))
        snr_vals = snr_estimate(x, error, good) if snr is None else np.asarray(snr, np.float64)
        s_b = snr_bin(np.nan_to_num(snr_vals, nan=0.0), list(self.snr_edges))
        if teff is not None and mh is not None:
            teff_e = tertile_edges(np.asarray(teff)[usable])
            mh_e = tertile_edges(np.asarray(mh)[usable])
            p_b = phys_bin(np.asarray(teff), np.asarray(mh), teff_e, mh_e).astype(np.int64)
        else:
            teff_e, mh_e, p_b = [], [], np.zeros(n, np.int64)
        snr_names = list(_SNR_NAMES[:len(self.snr_edges) + 1]) if len(self.snr_edges) == 3 else \
            [f"S{i}" for i in range(len(self.snr_edges) + 1)]
        phys_names = phys_bin_names(teff_e, mh_e)
        n_snr = len(snr_names)

        held = id_hash(np.arange(n), self.random_state, stream=3) < self.gate_fraction
        if (~held & usable).sum() < 2 or (held & usable).sum() < 2:
            held = np.zeros(n, bool)  # too few rows to hold any out: the gate sees the expert rows
        cells = np.where(~held & usable, cell_index(p_b, s_b, n_snr), -1).astype(np.int64)
        if (cells >= 0).sum() < 2:
            raise ValueError(f"only {int((cells >= 0).sum())} usable rows to fit experts on")
        xi = impute_bad_pixels(x, good).astype(np.float64)
        acc = CellAccumulator(len(phys_names) * n_snr, xi[cells >= 0].mean(axis=0), flush_rows=256,
                              precision="float64")
        acc.add(xi, y, cells)
        stats = acc.finalize()
        specs = expert_specs(snr_names, phys_names)
        alphas = list(self.alphas_relative) if self.alphas_relative is not None else FitConfig().alphas_relative
        (fits,) = dask.compute(fit_experts(stats, specs, alphas, self.min_cell_rows, FitConfig().max_df_fraction,
                                           "float64"),
                               scheduler="sync")
        pca = pca_from_stats(stats, self.n_pca) if self.n_pca else None
        n_pca = 0 if pca is None else pca["components"].shape[0]
        gcfg = GatesConfig(fallback_tau=self.fallback_tau, n_pca=self.n_pca, seed=self.random_state)
        model = assemble_model(  # the same assembly as ``snrmoe fit``
            specs, fits, np.arange(p, dtype=np.float64) if wave is None else wave, pca=pca,
            edges={"snr_edges": list(self.snr_edges), "teff_edges": teff_e, "mh_edges": mh_e},
            snr_names=snr_names, phys_names=phys_names, target="y", min_good_fraction=self.min_good_fraction,
            gates={"fallback_tau": self.fallback_tau, "snr_cliff": gcfg.snr_cliff,
                   "inputs": {"quality": list(FEATURE_NAMES[:10]), "physical": physical_names(n_pca)},
                   "default": self.gate})

        rows = (held if held.any() else ~held) & usable
        coef, icpt = model.projection()
        proj = xi[rows] @ coef.T + icpt
        feats = block_features(x[rows], error[rows], None, wave)
        table = gate_inputs(feats, proj[:, len(specs):])
        spec = GATE_SPECS[self.gate]
        members = model.members(spec.family)
        gate = fit_gate(spec, table, model.class_labels(spec.family, s_b[rows], p_b[rows]),
                        proj[:, members], y[rows], n_classes=len(members), l2=gcfg.l2, logreg_c=gcfg.logreg_c,
                        max_iter=gcfg.max_iter, seed=self.random_state)
        # deployed as trained: an MSE-trained gate mixes softly everywhere, a classifier falls back below tau
        gate.info["fallback_tau"] = self.fallback_tau if spec.training in ("logreg", "poe") else 0.0
        model.gates = {self.gate: gate}
        # sigma calibrated on the gate rows (held out of the experts; the pipeline also holds them out of the gate)
        out = apply_model_gate(model, gate, table, proj[:, :len(specs)])
        gate.info["sigma_calibration"] = calibrate_sigma(
            y[rows] - out["yhat"], out["sigma"], out["yhat"], feats[:, FEATURE_NAMES.index("snr_est")],
            list(self.snr_edges), gcfg.calibration_min_rows)
        self._set_fitted(model)
        self.wavelength_ = wave
        return self

    def _set_fitted(self, model) -> None:
        self.model_ = model
        self.gate_ = model.gates[self.gate]
        self.coef_ = model.experts["coef"].values
        self.intercept_ = model.experts["intercept"].values
        self.alpha_ = model.experts["alpha"].values
        self.expert_names_ = [s.name for s in model.specs]
        self.n_features_in_ = int(self.coef_.shape[1])

    @classmethod
    def from_model(cls, model_dir: str | Path, gate: str | None = None) -> SNRMoERegressor:
        """A fitted estimator from a model store written by ``snrmoe fit``."""
        from .store import load_model

        model = load_model(model_dir)
        est = cls(gate=gate or model.default_gate, snr_edges=tuple(model.edges["snr_edges"]),
                  fallback_tau=model.meta["gates"]["fallback_tau"],
                  min_good_fraction=model.meta["min_good_fraction"])
        if est.gate not in model.gates:
            raise ValueError(f"unknown gate '{est.gate}' (this model has: {', '.join(model.gates)})")
        est._set_fitted(model)
        est.wavelength_ = model.experts["wavelength"].values
        return est

    # ------------------------------------------------------------ predict
    def _predict_all(self, X, error=None, wavelength=None) -> np.ndarray:
        check_is_fitted(self)
        x = validate_data(self, X, reset=False, ensure_all_finite="allow-nan", dtype=np.float64)
        error = self._error(x, error)
        wave = self._wavelength(x.shape[1], wavelength)
        if wave is None:
            wave = self.wavelength_
        coef, icpt = self.model_.projection()
        model = self.model_
        return predict_block(x, error, None, wavelength=wave, proj_coef=coef, proj_intercept=icpt,
                             n_experts=len(model.specs), gate=self.gate_,
                             members=model.members(self.gate_.spec.family), global_index=model.index["global"],
                             resid_var=model.experts["resid_var"].values, tau=gate_tau(model, self.gate_),
                             sigma_scale=self.gate_.info.get("sigma_calibration"),
                             min_good=int(np.ceil(self.min_good_fraction * x.shape[1])),
                             snr_cliff=model.meta["gates"]["snr_cliff"])

    def predict(self, X, *, error=None, wavelength=None) -> np.ndarray:
        """Mixture prediction, shape (n_samples,); NaN for spectra with too few good pixels."""
        return self._predict_all(X, error, wavelength)[:, 0]

    def predict_dist(self, X, *, error=None, wavelength=None) -> dict[str, np.ndarray]:
        """Prediction, 1-sigma uncertainty, gate weights and flags (as ``snrmoe predict`` writes them)."""
        out = self._predict_all(X, error, wavelength)
        return {"logg_pred": out[:, 0], "logg_sigma": out[:, 1], "snr_est": out[:, 2],
                "flags": out[:, 3].astype(np.uint8), "gate_weights": out[:, 4:]}
