"""The Bayes ceiling of logg: the minimum MSE any model of the flux can reach.

For a simulated catalog the forward model is known. The ceiling is the Bayes
minimum mean squared error of logg under the simulator's own prior (uniform
on the label box)::

    MSE_Bayes = E[ Var(logg | flux) ],   R2_max = 1 - MSE_Bayes / Var(logg)

with the likelihood ``flux ~ N(mu(theta), sigma(theta)^2)`` per pixel. Only
the flux is observed: the error vector is the leak the audit looks for.

:func:`posterior_moments` computes ``Var(logg | flux)`` for one spectrum by
defensive importance sampling (a Laplace proposal built from the Fisher
matrix, mixed with the prior box; adaptive rounds while the effective sample
size is low); with ``cell`` it also gives the posterior restricted to the
spectrum's true Teff x [M/H] and S/N cell, the bound for the oracle
families. :func:`posterior_block` is its one-task kernel over simulated
spectra and :func:`ceiling_summary` turns the per-spectrum variances into
both ceilings with standard errors (docs/method.md, "The Bayes ceiling").

The Fisher matrix ``F_ij = sum_pixels d mu/d theta_i d mu/d theta_j /
sigma^2`` (:func:`forward_jacobian`, :func:`fisher_crlb`) only builds the
proposal here. Its flat-prior Cramer-Rao bound ``(F^-1)_00`` is not a
ceiling: it treats every nuisance label as unbounded, and models that use the
bounded box beat it. Derivatives come from central finite differences of the
forward model (:class:`~snrmoe_dask.physics.ForwardModel`); the logg
derivative also has a closed form (:func:`dmu_dlogg`), and the two are checked
against each other in the tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np
import scipy.linalg

from .physics import ForwardModel, Instrument, _build_basis

__all__ = ["PARAMS", "STEPS", "fisher_crlb", "fd_jacobian", "forward_jacobian", "dmu_dlogg",
           "model_from_catalog_attrs", "prior_box", "posterior_moments", "posterior_block", "choose_spectra",
           "ceiling_summary", "bayes_ceiling_tasks", "efficiency", "write_ceiling"]

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


# ------------------------------------------------------------------ the Bayes ceiling
def prior_box(simulate_config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of the simulator's uniform prior, in :data:`PARAMS` order."""
    c = simulate_config
    lo = np.array([c["logg_range"][0], c["teff_range"][0], c["mh_range"][0], c["alpha_m_range"][0], c["mag_min"]])
    hi = np.array([c["logg_range"][1], c["teff_range"][1], c["mh_range"][1], c["alpha_m_range"][1], c["mag_max"]])
    return lo.astype(np.float64), hi.astype(np.float64)


def _weighted_moments(w: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Self-normalised mean, variance and effective sample size of ``x`` under weights ``w``."""
    if not float(w.sum()) > 0:
        return np.nan, np.nan, 0.0
    # rescaled to a largest weight of 1: weights far below the round's best (a cell the posterior barely
    # reaches) underflow when squared, and the effective sample size divided by zero
    w = w / w.max()
    total = float(w.sum())
    mean = float(w @ x) / total
    var = float(w @ (x - mean) ** 2) / total
    return mean, var, total**2 / float(w @ w)


def posterior_moments(y: np.ndarray, theta0: np.ndarray, forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      lo: np.ndarray, hi: np.ndarray, steps: np.ndarray, rng: np.random.Generator, *,
                      index: int = 0, n_samples: int = 768, prior_fraction: float = 0.2, scale: float = 1.5,
                      cell: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
                      cell0: int | None = None, batch: int = 256, refine: int = 2, min_ess: float = 50.0,
                      jacobian_forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Posterior mean and variance of ``theta[index]`` given one observed spectrum, by importance sampling.

    The prior is uniform on the box ``[lo, hi]``; the likelihood is the
    simulator's, ``y ~ N(mu(theta), sigma(theta)^2)`` per pixel. The proposal
    is a defensive mixture: ``1 - prior_fraction`` of the samples from the
    Laplace approximation (one Gauss-Newton step from ``theta0``, covariance
    ``scale^2 (F + J_box)^-1`` with ``F`` the Fisher matrix at ``theta0`` and
    ``J_box`` the precision of the box), the rest uniform on the box, so no
    part of the posterior is out of reach. Weights are ``likelihood x prior /
    mixture density`` (self-normalised). ``theta0`` only places the proposal;
    the weights do not depend on it.

    Parameters
    ----------
    y : ndarray of shape (P,)
        Observed flux.
    theta0 : ndarray of shape (M,)
        Where the proposal is built (the true labels for a simulated spectrum).
    forward : callable
        ``theta (S, M) -> (mu (S, P), sigma (S, P))``.
    lo, hi : ndarray of shape (M,)
        The prior box.
    steps : ndarray of shape (M,)
        Central-difference half steps for the Jacobian at ``theta0``.
    rng : numpy Generator
    index, n_samples, prior_fraction, scale, batch
        Parameter of interest; samples; share from the prior; proposal width; forward calls per batch.
    refine, min_ess
        While the effective sample size is below ``min_ess``, up to
        ``refine`` more rounds draw from a Gaussian fitted to the weighted
        samples so far (adaptive importance sampling); the round with the
        largest effective sample size is kept.
    cell, cell0 : optional
        ``cell(theta, mu, sigma) -> (S,) int`` and the true cell: also report
        the posterior given that ``theta`` lies in cell ``cell0`` (the prior
        restricted to the cell).
    jacobian_forward : callable, optional
        The forward model for the Jacobian at ``theta0`` (default ``forward``):
        a float64 one when ``forward`` is float32, since central differences
        divide rounding errors by the step.

    Returns
    -------
    dict with ``mean``, ``var``, ``ess`` and, with ``cell``, ``mean_cell``, ``var_cell``, ``ess_cell``.
    """
    y = np.asarray(y, np.float64)
    theta0 = np.asarray(theta0, np.float64)
    m_dim = theta0.size
    pts = np.concatenate([theta0 + np.diag(steps), theta0 - np.diag(steps), theta0[None, :]])
    mu_pts, sig_pts = (jacobian_forward or forward)(pts)
    jac = ((mu_pts[:m_dim] - mu_pts[m_dim:2 * m_dim]) / (2.0 * steps[:, None])).T  # (P, M)
    mu0, sig0 = mu_pts[-1], sig_pts[-1]
    wj = jac / sig0[:, None]
    fisher = wj.T @ wj
    width = hi - lo
    h = fisher + np.diag(12.0 / width**2)  # the box's precision keeps unidentified directions inside the box
    centre = np.clip(theta0 + np.linalg.solve(h, wj.T @ ((y - mu0) / sig0)), lo, hi)
    cov_laplace = np.linalg.inv(h)
    cov = cov_laplace * scale**2
    best = None
    for _ in range(1 + refine):
        theta, w, cells = _importance_round(y, forward, lo, hi, centre, np.linalg.cholesky(cov), rng, n_samples,
                                            prior_fraction, cell, batch)
        ess = float(w.sum() ** 2 / (w @ w)) if w.sum() > 0 else 0.0
        if best is None or ess > best[3]:
            best = (theta, w, cells, ess)
        if ess >= min_ess:
            break
        # adapt: the next proposal is the weighted posterior so far (plus the Laplace width, so it cannot collapse)
        total = w.sum()
        if total > 0:
            centre = (w @ theta) / total
            d = theta - centre
            cov = (d.T * w) @ d / total * scale**2 + cov_laplace
    theta, w, cells, _ = best
    x = theta[:, index]
    mean, var, ess = _weighted_moments(w, x)
    out = {"mean": mean, "var": var, "ess": ess}
    if cell is not None:
        wc = np.where(cells == cell0, w, 0.0)
        out["mean_cell"], out["var_cell"], out["ess_cell"] = _weighted_moments(wc, x)
    return out


def _importance_round(y, forward, lo, hi, centre, chol, rng, n_samples, prior_fraction, cell, batch):
    """One round of defensive importance sampling: samples, unnormalised weights, cells."""
    m_dim = centre.size
    width = hi - lo
    n_prior = max(1, int(round(prior_fraction * n_samples)))
    n_gauss = n_samples - n_prior
    theta = np.concatenate([centre + rng.standard_normal((n_gauss, m_dim)) @ chol.T,
                            lo + rng.random((n_prior, m_dim)) * width])
    zt = scipy.linalg.solve_triangular(chol, (theta - centre).T, lower=True)
    log_gauss = -0.5 * np.sum(zt**2, axis=0) - np.sum(np.log(np.diag(chol))) - 0.5 * m_dim * np.log(2 * np.pi)
    log_q = np.logaddexp(np.log(n_gauss / n_samples) + log_gauss,
                         np.log(n_prior / n_samples) - np.sum(np.log(width)))
    inside = np.all((theta >= lo) & (theta <= hi), axis=1)
    loglik = np.full(n_samples, -np.inf)
    cells = np.full(n_samples, -1, np.int64)
    idx = np.flatnonzero(inside)
    y_work = None
    for a in range(0, idx.size, batch):
        part = idx[a:a + batch]
        mu, sig = forward(theta[part])
        if cell is not None:
            cells[part] = cell(theta[part], mu, sig)
        if y_work is None:  # the observed flux in the forward model's precision
            y_work = y.astype(mu.dtype)
        resid = y_work - mu  # one buffer for the whole residual; forward's own arrays are not written
        resid /= sig
        np.square(resid, out=resid)
        # per-pixel terms in the forward model's precision, their sums over pixels in float64
        loglik[part] = -0.5 * np.sum(resid, axis=1, dtype=np.float64) - np.sum(np.log(sig, out=resid), axis=1,
                                                                                 dtype=np.float64)
    logw = np.where(inside, loglik - log_q, -np.inf)
    w = np.exp(logw - np.max(logw)) if np.isfinite(logw).any() else np.zeros(n_samples)
    return theta, w, cells


def _simulator_forward(model: ForwardModel) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def forward(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = {name: theta[:, i] for i, name in enumerate(PARAMS)}
        return model(cols["teff"], cols["logg"], cols["mh"], cols["alpha_m"], cols["mag"])
    return forward


def posterior_block(model: ForwardModel, simulate_config: dict, flux: np.ndarray, labels: np.ndarray,
                    cell0: np.ndarray, edges: dict, n_snr: int, *, n_samples: int, prior_fraction: float,
                    scale: float, seed: int, first: int, precision: str = "float64") -> np.ndarray:
    """:func:`posterior_moments` of logg for a block of simulated spectra (one dask task).

    ``labels`` is (n, 5) in :data:`PARAMS` order, ``cell0`` each row's true
    cell ``phys * n_snr + snr`` under ``edges`` (teff/mh edges of the model,
    S/N edges of the catalog config). Row ``i`` draws from the seed
    ``[seed, first + i]``, so the result does not depend on the blocking.
    ``precision`` is the arithmetic of the importance samples' forward model
    (the Jacobian that places the proposal is float64 either way).

    Returns
    -------
    ndarray of shape (n, 4): posterior variance and ESS of logg given the
    flux, then given the flux and the true cell.
    """
    from .bins import median_snr_bin, phys_bin

    lo, hi = prior_box(simulate_config)
    steps = np.array([STEPS[k] for k in PARAMS])
    exact = _simulator_forward(dataclasses.replace(model, precision="float64"))
    forward = exact if precision == "float64" else _simulator_forward(dataclasses.replace(model, precision=precision))

    def cell(theta, mu, sigma):
        p = phys_bin(theta[:, 1], theta[:, 2], edges["teff_edges"], edges["mh_edges"]).astype(np.int64)
        return p * n_snr + median_snr_bin(mu / sigma, edges["snr_edges"])

    out = np.empty((flux.shape[0], 4))
    for i in range(flux.shape[0]):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 11, first + i]))
        r = posterior_moments(flux[i], labels[i], forward, lo, hi, steps, rng, n_samples=n_samples,
                              prior_fraction=prior_fraction, scale=scale, cell=cell, cell0=int(cell0[i]),
                              jacobian_forward=exact)
        out[i] = (r["var"], r["ess"], r["var_cell"], r["ess_cell"])
    return out


def choose_spectra(snr_b: np.ndarray, n_bins: int, per_bin: int, seed: int) -> np.ndarray:
    """Sorted row positions: up to ``per_bin`` rows drawn at random from each S/N bin."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    picks = []
    for b in range(n_bins):
        rows = np.flatnonzero(snr_b == b)
        picks.append(rows if rows.size <= per_bin else rng.choice(rows, per_bin, replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)


def bayes_ceiling_tasks(ds, rows: np.ndarray, flux: np.ndarray, cell0: np.ndarray, edges: dict, n_snr: int, cfg, *,
                        block: int = 8, scatter=None) -> list:
    """Lazy :func:`posterior_block` tasks for catalog rows ``rows`` whose flux (rows, P) is already read.

    ``scatter`` (a distributed client's ``scatter``) sends the flux blocks to the workers as data instead of
    embedding them in the graph (16 MB for the default job's 510 spectra).
    """
    import dask

    model = model_from_catalog_attrs(ds.attrs)
    sim = json.loads(ds.attrs["simulate_config"])
    rows = np.asarray(rows)
    labels = np.column_stack([np.asarray(ds[k].values, np.float64)[rows] for k in PARAMS])
    task = dask.delayed(posterior_block, pure=True)
    starts = list(range(0, rows.size, block))
    blocks = [flux[a:a + block] for a in starts]
    if scatter is not None and blocks:
        blocks = scatter(blocks)
    out = []
    for a, fl in zip(starts, blocks):
        out.append(task(model, sim, fl, labels[a:a + block], cell0[a:a + block], edges, n_snr,
                        n_samples=cfg.samples, prior_fraction=cfg.prior_fraction, scale=cfg.proposal_scale,
                        seed=cfg.seed, first=int(rows[a]), precision=cfg.forward_precision,
                        dask_key_name=f"ceiling-posterior-{rows[a]}"))
    return out


def _group(var_post: np.ndarray, ess: np.ndarray, var_logg: float, n_rows: int) -> dict:
    """R²_max of one group from the posterior variances of its sampled spectra."""
    ok = np.isfinite(var_post)
    m = int(ok.sum())
    if m < 2 or not var_logg > 0:
        return {"r2_max": None, "r2_max_se": None, "mse_bayes": None, "n": n_rows, "n_sampled": m}
    mse, mse_se = float(var_post[ok].mean()), float(var_post[ok].std(ddof=1) / np.sqrt(m))
    return {"r2_max": 1.0 - mse / var_logg, "r2_max_se": mse_se / var_logg, "mse_bayes": mse, "mse_bayes_se": mse_se,
            "var_logg": var_logg, "n": n_rows, "n_sampled": m, "median_ess": float(np.median(ess[ok]))}


def ceiling_summary(post: np.ndarray, sampled_bins: np.ndarray, logg: np.ndarray, snr_b: np.ndarray,
                    snr_names: Sequence[str]) -> dict:
    """Both ceilings overall and per S/N bin.

    ``post`` is :func:`posterior_block`'s output for the sampled spectra,
    ``sampled_bins`` their S/N bins; ``logg`` and ``snr_b`` cover every
    test row (the variances R² is measured against, as the models' R² is).
    The overall Bayes MSE weights each bin's mean posterior variance by the
    bin's share of the test rows (the spectra are drawn per bin), and its
    standard error combines the bins' (Monte-Carlo and test sampling both
    show in the spread of the per-spectrum variances).
    """
    out = {}
    for key, col in (("flux", 0), ("flux_oracle_bins", 2)):
        per_bin, mse, mse_var = {}, 0.0, 0.0
        for i, name in enumerate(snr_names):
            sel, rows = sampled_bins == i, snr_b == i
            g = _group(post[sel, col], post[sel, col + 1], float(np.var(logg[rows])) if rows.sum() > 1 else 0.0,
                       int(rows.sum()))
            per_bin[name] = g
            if rows.any():
                share = rows.mean()
                if g["mse_bayes"] is None:  # a bin with too few sampled spectra: bound by its prior variance
                    mse += share * float(np.var(logg[rows])) if rows.sum() > 1 else 0.0
                else:
                    mse += share * g["mse_bayes"]
                    mse_var += (share * g["mse_bayes_se"]) ** 2
        var = float(np.var(logg))
        overall = {"r2_max": 1.0 - mse / var, "r2_max_se": float(np.sqrt(mse_var)) / var, "mse_bayes": mse,
                   "var_logg": var, "n": int(logg.size), "n_sampled": int(np.isfinite(post[:, col]).sum()),
                   "median_ess": (float(np.median(post[np.isfinite(post[:, col]), col + 1]))
                                  if np.isfinite(post[:, col]).any() else None)}
        out[key] = {"overall": overall, "per_snr_bin": per_bin}
    return out


def efficiency(model_metrics: dict, ceiling: dict) -> dict:
    """R² / R²_max overall and per S/N bin against one ceiling (``{"overall", "per_snr_bin"}``)."""
    def ratio(r2, top):
        return None if r2 is None or not top else r2 / top

    return {"overall": ratio(model_metrics["r2"], ceiling["overall"]["r2_max"]),
            "per_snr_bin": {b: ratio(m["r2"], ceiling["per_snr_bin"][b]["r2_max"])
                            for b, m in model_metrics["per_snr_bin"].items()}}


def write_ceiling(summary: dict, post: np.ndarray, spectrum_ids: np.ndarray, out_dir, provenance: dict) -> dict:
    """Write ``ceiling.zarr`` (posterior variances of the sampled spectra) and ``ceiling.json``; returns the JSON."""
    from pathlib import Path

    import xarray as xr

    from .zarrstore import consolidate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xr.Dataset({"post_var_logg": ("spectrum", post[:, 0]), "ess": ("spectrum", post[:, 1]),
                "post_var_logg_oracle_bins": ("spectrum", post[:, 2]), "ess_oracle_bins": ("spectrum", post[:, 3])},
               coords={"spectrum": np.asarray(spectrum_ids)}).to_zarr(out_dir / "ceiling.zarr", mode="w",
                                                                      zarr_format=3, consolidated=False)
    consolidate(out_dir / "ceiling.zarr")
    doc = {**provenance, **summary}
    (out_dir / "ceiling.json").write_text(json.dumps(doc, indent=2))
    return doc
