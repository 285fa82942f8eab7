"""The deployable mixture: gate tables, gate fits, soft predictions, out-of-core predict.

Layers, bottom up:

* :func:`gate_inputs` turns feature columns + PCA projections into the two
  gate input blocks (``quality``, ``physical``);
* :func:`apply_gate` mixes expert predictions with a gate's weights, with the
  fallback to ``global`` when ``max p < tau`` and the mixture's uncertainty;
* :func:`fit_gates` fits every gate of :data:`~snrmoe_dask.gates.GATE_SPECS`
  on the val rows and picks the default on held-out val rows;
* :func:`predict_block` is the one-block kernel of ``snrmoe predict``;
  :func:`predict_dataset` maps it lazily over a catalog.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import xarray as xr

from .blas import blas_threads
from .features import FEATURE_NAMES, LINE_NAMES, QUALITY_FEATURES, block_features
from .gates import GATE_SPECS, Gate, fit_gate, mixture, mixture_sigma
from .metrics import predict_block as project_block
from .metrics import r2_score

if TYPE_CHECKING:  # pragma: no cover
    from .config import GatesConfig
    from .store import Model

__all__ = ["FLAG_BITS", "pca_names", "physical_names", "gate_inputs", "apply_gate", "apply_model_gate", "gate_tau",
           "calibrate_sigma", "calibrated_sigma", "choose_fallback_tau", "fit_gates", "predict_block",
           "predict_dataset"]

#: bits of the ``flags`` output of predict
FLAG_BITS = {"snr_cliff": 1, "fallback": 2, "too_many_masked": 4}


def pca_names(n_pca: int) -> list[str]:
    return [f"pca_{i + 1}" for i in range(n_pca)]


def physical_names(n_pca: int) -> list[str]:
    """Columns of the physical gate input: line indices, then PCA projections."""
    return [*LINE_NAMES, *pca_names(n_pca)]


def gate_inputs(features: np.ndarray, pca: np.ndarray) -> dict[str, np.ndarray]:
    """Gate input blocks from a feature block (columns :data:`FEATURE_NAMES`) and PCA scores."""
    q = [FEATURE_NAMES.index(c) for c in QUALITY_FEATURES]
    li = [FEATURE_NAMES.index(c) for c in LINE_NAMES]
    return {"quality": features[:, q], "physical": np.hstack([features[:, li], pca])}


def apply_gate(gate: Gate, table: Mapping[str, np.ndarray], member_pred: np.ndarray, global_pred: np.ndarray,
               member_var: np.ndarray, global_var: float, tau: float, snr_est: np.ndarray | None = None,
               sigma_scale: Mapping | None = None) -> dict[str, np.ndarray]:
    """Soft mixture of one gate with the fallback rule and the calibrated uncertainty.

    Parameters
    ----------
    gate : Gate
    table : mapping with ``quality`` and ``physical`` arrays
    member_pred : ndarray of shape (n, K)
        Predictions of the gate's experts, in class order.
    global_pred : ndarray of shape (n,)
    member_var, global_var
        Residual variances of the experts (K,) and of ``global``.
    tau : float
        Fallback threshold on ``max p`` (0 = the soft mixture everywhere).
    snr_est, sigma_scale : optional
        The rows' S/N estimates and the gate's calibration
        (:func:`calibrate_sigma`). Without them ``sigma`` is the raw mixture
        spread (uncalibrated).

    Returns
    -------
    dict with ``yhat``, ``sigma``, ``soft`` (the mixture without fallback),
    ``weights`` (n, K) and ``fallback`` (bool).
    """
    w = gate.weights(table)
    fallback = w.max(axis=1) < tau
    soft = mixture(w, member_pred)
    yhat = np.where(fallback, global_pred, soft)
    sigma = np.where(fallback, np.sqrt(global_var), mixture_sigma(w, member_pred, member_var))
    if sigma_scale is not None and snr_est is not None:
        sigma = calibrated_sigma(sigma_scale, yhat, sigma, snr_est)
    return {"yhat": yhat, "sigma": sigma, "soft": soft, "weights": w, "fallback": fallback}


GAUSS_1SIGMA, GAUSS_2SIGMA = 0.682689, 0.954500  # Gaussian coverage of +-1 and +-2 sigma
_GAMMAS = np.linspace(0.0, 8.0, 33)


def _difficulty_design(yhat: np.ndarray, sigma_raw: np.ndarray, snr_est: np.ndarray) -> np.ndarray:
    """Columns of the difficulty model: 1, log sigma_raw, yhat, yhat^2, log S/N estimate."""
    snr = np.log(np.clip(np.nan_to_num(np.asarray(snr_est, np.float64), nan=1.0), 0.05, None))
    return np.column_stack([np.ones_like(yhat), np.log(np.clip(sigma_raw, 1e-6, None)), yhat, yhat**2, snr])


def calibrated_sigma(calibration: Mapping, yhat: np.ndarray, sigma_raw: np.ndarray, snr_est: np.ndarray) -> np.ndarray:
    """sigma of each row from a gate's calibration (:func:`calibrate_sigma`)."""
    u = np.exp(0.5 * (_difficulty_design(yhat, sigma_raw, snr_est) @ np.asarray(calibration["difficulty_coef"])))
    snr = np.asarray(snr_est, np.float64)
    b = np.searchsorted(np.asarray(calibration["snr_edges"], np.float64), np.nan_to_num(snr, nan=0.0), side="left")
    scale = np.where(np.isfinite(snr), np.asarray(calibration["scale"])[b], calibration["overall"]["scale"])
    gamma = np.where(np.isfinite(snr), np.asarray(calibration["gamma"])[b], calibration["overall"]["gamma"])
    return scale * u**gamma


def _two_quantile_fit(r: np.ndarray, u: np.ndarray) -> dict:
    """``sigma = s u^gamma`` with ``+-1 sigma`` covering 68.27 % of ``r`` and ``+-2 sigma`` as close to 95.45 % as the
    grid of gamma allows (ties: gamma nearest 1)."""
    best = None
    for g in _GAMMAS:
        ug = u**g
        s = float(np.quantile(r / ug, GAUSS_1SIGMA))
        c2 = float(np.mean(r <= 2.0 * s * ug))
        key = (round(abs(c2 - GAUSS_2SIGMA), 3), abs(g - 1.0))
        if best is None or key < best[0]:
            best = (key, {"scale": s, "gamma": float(g), "coverage_2sigma": c2})
    return best[1]


def calibrate_sigma(resid: np.ndarray, sigma_raw: np.ndarray, yhat: np.ndarray, snr_est: np.ndarray, snr_edges,
                    min_rows: int, calibrate: np.ndarray | None = None) -> dict:
    """Calibrate a gate's sigma on val rows: a difficulty model, then two quantiles per S/N-estimate bin.

    1. **Difficulty.** ``u = exp(f . beta / 2)`` with ``f`` = (1, log
       sigma_raw, yhat, yhat^2, log S/N estimate) and ``beta`` the least
       squares fit of ``log(resid^2 + c)`` on the rows not in ``calibrate``:
       which rows are harder than others, from what is known at predict time.
    2. **Coverage.** On the ``calibrate`` rows (held out of the gate's fit),
       per S/N-estimate bin, ``sigma = s u^gamma``: ``s`` makes ``+-1 sigma``
       cover 68.27 %, ``gamma`` (0 ... 8) brings ``+-2 sigma`` to 95.45 %.
       Residuals of a bounded label are lighter-tailed than a Gaussian where
       the flux says little; a spread of sigma across rows (gamma > 1) restores
       the Gaussian ratio of the two intervals. A bin with fewer than
       ``min_rows`` held-out rows uses all its val rows (in-sample for the
       gate); with fewer than that, the fit of all calibration rows.

    Parameters
    ----------
    resid, sigma_raw, yhat, snr_est : ndarray of shape (n,)
    snr_edges : sequence of float
    min_rows : int
    calibrate : boolean ndarray of shape (n,), optional
        The held-out rows; default all rows for both steps.
    """
    r = np.abs(np.asarray(resid, np.float64))
    cal = np.ones(r.shape, bool) if calibrate is None else np.asarray(calibrate, bool)
    fit_rows = ~cal if (~cal).sum() >= 10 else np.ones(r.shape, bool)
    if (np.isfinite(r) & np.isfinite(sigma_raw)).sum() < 10:  # nothing to calibrate on: sigma = sigma_raw
        return {"method": "none (fewer than 10 rows)", "snr_edges": [float(e) for e in snr_edges],
                "difficulty_coef": [0.0, 2.0, 0.0, 0.0, 0.0], "scale": [1.0] * (len(snr_edges) + 1),
                "gamma": [1.0] * (len(snr_edges) + 1), "n": [0] * (len(snr_edges) + 1),
                "overall": {"scale": 1.0, "gamma": 1.0}, "n_calibration_rows": 0}
    f = _difficulty_design(yhat, sigma_raw, snr_est)
    c = 1e-3 * float(np.mean(r[fit_rows] ** 2)) + 1e-12
    beta = np.linalg.lstsq(f[fit_rows], np.log(r[fit_rows] ** 2 + c), rcond=None)[0]
    u = np.exp(0.5 * (f @ beta))
    ok = cal & np.isfinite(r) & np.isfinite(u)
    overall = _two_quantile_fit(r[ok], u[ok])
    bins = np.searchsorted(np.asarray(snr_edges, np.float64), np.nan_to_num(snr_est, nan=0.0), side="left")
    per_bin, n = [], []
    finite = np.isfinite(r) & np.isfinite(u) & np.isfinite(snr_est)
    for b in range(len(snr_edges) + 1):
        sel = ok & (bins == b) & np.isfinite(snr_est)
        if sel.sum() < min_rows:  # a rare bin: all its val rows (in-sample for the gate) before the overall fit
            sel = finite & (bins == b)
        n.append(int(sel.sum()))
        per_bin.append(_two_quantile_fit(r[sel], u[sel]) if sel.sum() >= min_rows else overall)
    return {"method": "difficulty model (log residual^2 on log sigma_raw, yhat, yhat^2, log S/N estimate), then "
                      "sigma = s u^gamma per S/N-estimate bin with +-1 sigma covering 68.27 % and +-2 sigma 95.45 % "
                      "of the held-out val rows",
            "snr_edges": [float(e) for e in snr_edges], "difficulty_coef": [float(v) for v in beta],
            "scale": [p["scale"] for p in per_bin], "gamma": [p["gamma"] for p in per_bin], "n": n,
            "overall": {"scale": overall["scale"], "gamma": overall["gamma"]}, "n_calibration_rows": int(ok.sum())}


def choose_fallback_tau(gate: Gate, candidate: float, y: np.ndarray, out_soft: dict, global_pred: np.ndarray) -> float:
    """The fallback threshold a gate is deployed with.

    A gate trained on the MSE of the soft mixture is deployed as trained: no
    fallback (0). A classifier gate keeps ``candidate`` only if the fallback
    lowers the squared error on the given (held-out selection) rows.
    """
    if gate.spec.training not in ("logreg", "poe") or candidate <= 0:
        return 0.0
    fb = out_soft["weights"].max(axis=1) < candidate
    if not fb.any():
        return 0.0
    gain = np.sum((out_soft["soft"][fb] - y[fb]) ** 2) - np.sum((global_pred[fb] - y[fb]) ** 2)
    return float(candidate) if gain > 0 else 0.0


def gate_tau(model: Model, gate: Gate) -> float:
    """The fallback threshold ``gate`` was deployed with at fit time (older stores: the model-wide one)."""
    if "fallback_tau" in gate.info:
        return float(gate.info["fallback_tau"])
    return float(model.meta["gates"]["fallback_tau"])


def apply_model_gate(model: Model, gate: Gate, table, pred: np.ndarray, tau: float | None = None,
                     snr_est: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`apply_gate` with the experts of ``model``; ``pred`` holds every expert (n, E).

    ``tau`` defaults to the gate's own (:func:`gate_tau`); with ``snr_est``
    the gate's sigma calibration is applied.
    """
    members = model.members(gate.spec.family)
    g = model.index["global"]
    rv = model.experts["resid_var"].values
    return apply_gate(gate, table, pred[:, members], pred[:, g], rv[members], float(rv[g]),
                      gate_tau(model, gate) if tau is None else tau, snr_est, gate.info.get("sigma_calibration"))


def fit_gates(model: Model, table: Mapping[str, np.ndarray], pred: np.ndarray, y: np.ndarray, snr_b: np.ndarray,
              phys_b: np.ndarray, select: np.ndarray, cfg: GatesConfig) -> tuple[dict[str, Gate], dict, str]:
    """Fit every gate on the val rows not in ``select``; score all on ``select``.

    Each gate's fallback threshold is chosen by :func:`choose_fallback_tau`
    on the selection rows and kept in ``gate.info["fallback_tau"]``.

    Returns
    -------
    gates : dict name -> Gate
    selection : dict name -> {"r2": deployed R² on the selection rows, "soft_r2", "n": rows}
    default : str
        ``cfg.default``, or the gate with the best selection R² when "auto".
    """
    fit_rows = ~select
    if fit_rows.sum() < 2 or select.sum() < 2:
        raise ValueError(f"gates need val rows to fit and to select on; got {int(fit_rows.sum())} and "
                         f"{int(select.sum())} (catalog too small for the split fractions?)")
    sub = {k: v[fit_rows] for k, v in table.items()}
    sel_table = {k: v[select] for k, v in table.items()}
    global_sel = pred[select][:, model.index["global"]]

    def fit_one(spec):
        members = model.members(spec.family)
        labels = model.class_labels(spec.family, snr_b, phys_b)
        gate = fit_gate(spec, sub, labels[fit_rows], pred[fit_rows][:, members], y[fit_rows],
                        n_classes=len(members), l2=cfg.l2, logreg_c=cfg.logreg_c, max_iter=cfg.max_iter,
                        seed=cfg.seed)
        out = apply_model_gate(model, gate, sel_table, pred[select], 0.0)
        tau = choose_fallback_tau(gate, cfg.fallback_tau, y[select], out, global_sel)
        gate.info["fallback_tau"] = tau
        if tau > 0:
            out = apply_model_gate(model, gate, sel_table, pred[select], tau)
        return gate, {"r2": r2_score(y[select], out["yhat"]), "soft_r2": r2_score(y[select], out["soft"]),
                      "fallback_tau": tau, "n": int(select.sum())}

    # the gates are independent fits of small dense problems: one per thread with one BLAS thread each keeps
    # both cores busy (NumPy and the optimisers release the GIL in their array work); with one BLAS thread always,
    # the fits do not depend on n_jobs
    n_jobs = max(1, min(cfg.n_jobs or os.cpu_count() or 1, len(GATE_SPECS)))
    # filters set once around the pool: warnings.catch_warnings is not thread-safe
    with warnings.catch_warnings(), blas_threads(1):
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        # the MLP gate is the longest fit (18 s of the 1M study's 25 s of fits, one thread): it starts first,
        # so the others fill the other threads meanwhile instead of leaving it to run alone at the end
        order = sorted(GATE_SPECS, key=lambda name: not GATE_SPECS[name].hidden)
        with ThreadPoolExecutor(n_jobs, thread_name_prefix="gate") as pool:
            fitted = dict(zip(order, pool.map(fit_one, [GATE_SPECS[name] for name in order])))
        done = {name: fitted[name] for name in GATE_SPECS}
    gates = {name: g for name, (g, _) in done.items()}
    selection = {name: sel for name, (_, sel) in done.items()}
    if cfg.default != "auto":
        default = cfg.default
    else:
        default = max(selection, key=lambda k: -np.inf if selection[k]["r2"] is None else selection[k]["r2"])
    return gates, selection, default


# --------------------------------------------------------------- predict
def predict_block(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, *, wavelength: np.ndarray,
                  proj_coef: np.ndarray, proj_intercept: np.ndarray, n_experts: int, gate: Gate,
                  members: np.ndarray, global_index: int, resid_var: np.ndarray, tau: float,
                  min_good: int, snr_cliff: float, sigma_scale: Mapping | None = None) -> np.ndarray:
    """Everything ``predict`` writes for one block, packed as float64 columns.

    Columns: ``logg_pred``, ``logg_sigma``, ``snr_est``, ``flags``, then the
    K gate weights. Rows with fewer than ``min_good`` good pixels get NaN
    predictions and the ``too_many_masked`` flag.
    """
    feats = block_features(flux, error, mask, wavelength)
    proj = project_block(flux, error, mask, proj_coef, proj_intercept)
    pred, pca = proj[:, :n_experts], proj[:, n_experts:]
    snr_est = feats[:, FEATURE_NAMES.index("snr_est")]
    out = apply_gate(gate, gate_inputs(feats, pca), pred[:, members], pred[:, global_index], resid_var[members],
                     float(resid_var[global_index]), tau, snr_est, sigma_scale)
    unusable = feats[:, FEATURE_NAMES.index("n_good")] < min_good
    flags = (np.where(~(snr_est > snr_cliff), FLAG_BITS["snr_cliff"], 0)
             | np.where(out["fallback"], FLAG_BITS["fallback"], 0)
             | np.where(unusable, FLAG_BITS["too_many_masked"], 0))
    yhat = np.where(unusable, np.nan, out["yhat"])
    sigma = np.where(unusable, np.nan, out["sigma"])
    return np.column_stack([yhat, sigma, snr_est, flags.astype(np.float64), out["weights"]])


def predict_dataset(model: Model, ds: xr.Dataset, gate_name: str | None = None) -> xr.Dataset:
    """Lazy predictions for every spectrum of a catalog (one task per chunk).

    Returns
    -------
    xarray.Dataset with ``logg_pred``, ``logg_sigma``, ``snr_est``, ``flags``
    (uint8, bits :data:`FLAG_BITS`) and ``gate_weights`` (spectrum, expert),
    indexed by the catalog's ``spectrum`` ids. Nothing is computed.
    """
    gate_name = gate_name or model.default_gate
    if gate_name not in model.gates:
        raise ValueError(f"unknown gate '{gate_name}' (this model has: {', '.join(model.gates)})")
    gate = model.gates[gate_name]
    members = model.members(gate.spec.family)
    proj_coef, proj_icpt = model.projection()
    kw = dict(wavelength=np.asarray(ds["wavelength"].values, np.float64), proj_coef=proj_coef,
              proj_intercept=proj_icpt, n_experts=len(model.specs), gate=gate, members=members,
              global_index=model.index["global"], resid_var=model.experts["resid_var"].values,
              tau=gate_tau(model, gate), sigma_scale=gate.info.get("sigma_calibration"),
              min_good=int(np.ceil(model.meta["min_good_fraction"] * ds.sizes["wavelength"])),
              snr_cliff=model.meta["gates"]["snr_cliff"])
    flux, error = ds["flux"].data, ds["error"].data
    args = [flux, error] + ([ds["mask"].data] if "mask" in ds else [])
    k = len(members)

    def _kernel(f, e, *m):
        return predict_block(f, e, m[0] if m else None, **kw)

    packed = da.map_blocks(_kernel, *args, dtype=np.float64, chunks=(flux.chunks[0], (4 + k,)), name="predict")
    names = [model.specs[i].name for i in members]
    out = xr.Dataset(
        {
            "logg_pred": ("spectrum", packed[:, 0]),
            "logg_sigma": ("spectrum", packed[:, 1]),
            "snr_est": ("spectrum", packed[:, 2]),
            "flags": ("spectrum", packed[:, 3].astype(np.uint8)),
            "gate_weights": (("spectrum", "expert"), packed[:, 4:]),
        },
        coords={"spectrum": ds["spectrum"].values},
        attrs={"gate": gate_name, "experts": json.dumps(names), "flag_bits": json.dumps(FLAG_BITS),
               "model_target": model.meta["target"]},
    )
    out["logg_sigma"].attrs["long_name"] = ("1 sigma: gate-weighted mixture of expert residual variances, scaled per "
                                            "S/N-estimate bin to cover 68 % of the val rows")
    out["flags"].attrs["flag_bits"] = ", ".join(f"{v}={k}" for k, v in FLAG_BITS.items())
    return out
