"""The Fisher information ceiling for logg (Cramér-Rao lower bound).

For a spectrum with mean flux ``mu(theta)`` and independent Gaussian noise
``sigma`` per pixel, the Fisher matrix of the labels is::

    F_ij = sum_pixels d mu/d theta_i * d mu/d theta_j / sigma^2

and the CRLB of logg with every other label a nuisance is
``(F^-1)_logg,logg``. Only the *flux* information counts (the information in
``sigma(theta)`` is the label leak that deployable models must not use).

The CRLB bounds *unbiased* estimators, but Ridge shrinks toward the mean of a
bounded population and can beat it at low S/N. The ceiling therefore adds the
population as a prior (the Bayesian, van Trees bound with a Gaussian prior of
the population variance ``V``): ``MSE >= 1 / (1/CRLB + 1/V)``, so per spectrum
``R2_max = V / (CRLB + V)`` and per group ``1 - mean(CRLB V / (CRLB + V)) / V``,
with ``V`` the variance of logg within the group (as the per-bin R² of the
models uses). For a Gaussian population and a locally linear model this is
attained by the best linear estimator; for the uniform logg of the simulator it
is close, not exact.

Derivatives come from central finite differences of the simulator's forward
model (:class:`~snrmoe_dask.physics.ForwardModel`); the logg derivative also
has a closed form (:func:`dmu_dlogg`), and the two are checked against each
other in the tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from .physics import ForwardModel, Instrument, _build_basis

__all__ = ["PARAMS", "STEPS", "fisher_crlb", "fd_jacobian", "forward_jacobian", "crlb_for_labels", "dmu_dlogg",
           "model_from_catalog_attrs", "bayes_mse", "r2_max", "ceiling_summary", "write_ceiling"]

#: labels the forward model depends on, in Jacobian column order; logg first
PARAMS = ("logg", "teff", "mh", "alpha_m", "mag")
#: central-difference half steps
STEPS = {"logg": 1e-3, "teff": 0.5, "mh": 1e-3, "alpha_m": 1e-3, "mag": 1e-3}


def fisher_crlb(jacobian: np.ndarray, sigma: np.ndarray, index: int = 0) -> np.ndarray:
    """CRLB of parameter ``index`` with the others as nuisances.

    Parameters
    ----------
    jacobian : ndarray of shape (n, P, M)
        d mu / d theta for each spectrum, pixel and parameter.
    sigma : ndarray of shape (n, P)
        Noise 1-sigma per pixel.
    index : int

    Returns
    -------
    ndarray of shape (n,): ``(F^-1)[index, index]``; inf where F is singular.
    """
    w = jacobian / sigma[:, :, None]
    fisher = np.einsum("npi,npj->nij", w, w)
    out = np.empty(fisher.shape[0])
    for i, f in enumerate(fisher):
        # scale to unit diagonal for a well-conditioned inverse
        d = np.sqrt(np.diag(f))
        if np.any(d == 0):
            out[i] = np.inf
            continue
        try:
            inv = np.linalg.inv(f / np.outer(d, d))
        except np.linalg.LinAlgError:
            out[i] = np.inf
            continue
        out[i] = inv[index, index] / d[index] ** 2
    return out


def fd_jacobian(fn: Callable[..., np.ndarray], params: dict[str, np.ndarray], names: Sequence[str],
                steps: dict[str, float]) -> np.ndarray:
    """Central finite differences of ``fn(**params)`` (n, P) w.r.t. ``names``: shape (n, P, len(names))."""
    cols = []
    for name in names:
        h = steps[name]
        up, down = dict(params), dict(params)
        up[name] = params[name] + h
        down[name] = params[name] - h
        cols.append((fn(**up) - fn(**down)) / (2 * h))
    return np.stack(cols, axis=2)


def forward_jacobian(model: ForwardModel, labels: dict[str, np.ndarray],
                     params: Sequence[str] = PARAMS) -> tuple[np.ndarray, np.ndarray]:
    """Finite-difference Jacobian of the simulator's noiseless flux, and its noise sigma.

    Returns
    -------
    jacobian : ndarray of shape (n, P, len(params))
    sigma : ndarray of shape (n, P)
    """
    args = {k: np.asarray(labels[k], np.float64) for k in ("teff", "logg", "mh", "alpha_m", "mag")}
    _, sigma = model(**args)
    return fd_jacobian(lambda **kw: model(**kw)[0], args, params, STEPS), sigma


def dmu_dlogg(model: ForwardModel, labels: dict[str, np.ndarray]) -> np.ndarray:
    """Closed-form d mu / d logg, shape (n, P).

    ``mu = C (1 - D (1 - exp(-tau)))``, ``tau = eta @ B``,
    ``log10 eta_k = ... + gamma_k (logg - logg_ref)``, so
    ``d mu / d logg = -C D exp(-tau) ((ln 10 gamma eta) @ B)``.
    """
    groups, basis, _, _ = _build_basis(model.instrument)
    gamma = np.array([g.gamma for g in groups])
    eta = 10.0 ** model.log_strengths(labels["teff"], labels["logg"], labels["mh"], labels["alpha_m"])
    tau = eta @ basis
    cont = model.continuum(labels["teff"], labels["mag"])
    return -cont * model.instrument.max_depth * np.exp(-tau) * ((np.log(10.0) * gamma * eta) @ basis)


def model_from_catalog_attrs(attrs: dict) -> ForwardModel:
    """The forward model that simulated a catalog (from its ``simulate_config`` attribute)."""
    if str(attrs.get("simulated", "")).lower() != "true" or "simulate_config" not in attrs:
        raise ValueError("the Fisher ceiling needs a simulated catalog (its forward model); this catalog has "
                         "no 'simulate_config' attribute")
    cfg = json.loads(attrs["simulate_config"])
    ins = Instrument(wave_min=cfg["wave_min"], wave_max=cfg["wave_max"], n_pixels=cfg["n_pixels"])
    return ForwardModel(ins, cfg["noise_level"])


def bayes_mse(crlb: np.ndarray, var_logg: float) -> np.ndarray:
    """Lower bound of the mean squared error with the population as prior: CRLB V / (CRLB + V)."""
    crlb = np.asarray(crlb, np.float64)
    return np.where(np.isinf(crlb), var_logg, crlb * var_logg / (crlb + var_logg))


def r2_max(crlb: np.ndarray, var_logg: float) -> np.ndarray:
    """Per-spectrum R²_max = V / (CRLB + V) (0 where the Fisher matrix is singular)."""
    return 1.0 - bayes_mse(crlb, var_logg) / var_logg


def ceiling_summary(crlb: np.ndarray, logg: np.ndarray, snr_b: np.ndarray, mag: np.ndarray,
                    snr_names: Sequence[str], mag_edges: Sequence[float]) -> dict:
    """R²_max overall, per S/N bin and per magnitude bin, and the median per spectrum.

    Each group's R²_max uses the variance of logg within the group, as the
    per-bin R² of the models does.
    """
    def agg(sel):
        n = int(sel.sum())
        if n < 2:
            return {"r2_max": None, "median_r2_max": None, "median_sigma_logg": None, "n": n}
        var = float(np.var(logg[sel]))
        return {"r2_max": float(1 - bayes_mse(crlb[sel], var).mean() / var),
                "median_r2_max": float(np.median(r2_max(crlb[sel], var))),
                "median_sigma_logg": float(np.median(np.sqrt(crlb[sel]))), "n": n}

    out = {"overall": agg(np.ones(crlb.shape, bool)), "per_snr_bin": {}, "per_mag_bin": []}
    for i, name in enumerate(snr_names):
        out["per_snr_bin"][name] = agg(snr_b == i)
    for lo, hi in zip(mag_edges[:-1], mag_edges[1:]):
        out["per_mag_bin"].append({"mag_lo": float(lo), "mag_hi": float(hi), **agg((mag >= lo) & (mag < hi))})
    return out


def crlb_for_labels(model: ForwardModel, labels: dict[str, np.ndarray], block: int = 256,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """CRLB of logg for each row of ``labels`` (blocks of ``block`` rows bound memory)."""
    n = len(labels["logg"])
    out = np.empty(n)
    for lo in range(0, n, block):
        sub = {k: np.asarray(v[lo:lo + block], np.float64) for k, v in labels.items()}
        jac, sigma = forward_jacobian(model, sub)
        out[lo:lo + block] = fisher_crlb(jac, sigma, PARAMS.index("logg"))
        if progress:
            progress(min(n, lo + block))
    return out


def ceiling_for_rows(ds, rows: np.ndarray, *, block: int = 1024):
    """Lazy CRLB of logg for catalog rows ``rows``: one delayed task per ``block`` rows.

    Returns
    -------
    list of dask.delayed.Delayed, each an ndarray of CRLBs, in row order.
    """
    import dask

    model = model_from_catalog_attrs(ds.attrs)
    rows = np.asarray(rows)
    labels = {k: np.asarray(ds[k].values, np.float64)[rows] for k in ("teff", "logg", "mh", "alpha_m", "mag")}
    task = dask.delayed(crlb_for_labels, pure=True)
    return [task(model, {k: v[lo:lo + block] for k, v in labels.items()}) for lo in range(0, rows.size, block)]


def efficiency(model_metrics: dict, ceiling: dict) -> dict:
    """R² / R²_max overall and per S/N bin for one model's metrics block."""
    def ratio(r2, top):
        return None if r2 is None or not top else r2 / top

    return {"overall": ratio(model_metrics["r2"], ceiling["overall"]["r2_max"]),
            "per_snr_bin": {b: ratio(m["r2"], ceiling["per_snr_bin"][b]["r2_max"])
                            for b, m in model_metrics["per_snr_bin"].items()}}


def write_ceiling(result: dict, ds, out_dir, provenance: dict) -> dict:
    """Write ``ceiling.zarr`` (per spectrum) and ``ceiling.json`` (summary); returns the summary.

    ``result`` is ``{"crlb", "summary"}`` for the rows of ``ds``.
    """
    from pathlib import Path

    import xarray as xr

    var = float(np.var(ds["logg"].values))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xr.Dataset({"crlb_logg": ("spectrum", result["crlb"]), "r2_max": ("spectrum", r2_max(result["crlb"], var)),
                "snr": ("spectrum", ds["snr"].values), "mag": ("spectrum", ds["mag"].values)},
               coords={"spectrum": ds["spectrum"].values}).to_zarr(out_dir / "ceiling.zarr", mode="w",
                                                                     zarr_format=3, consolidated=False)
    summary = {**provenance, **result["summary"]}
    (out_dir / "ceiling.json").write_text(json.dumps(summary, indent=2))
    return summary
