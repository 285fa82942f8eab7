"""The evaluate stage: every model on the frozen test, with standard errors, ceilings and coverage.

The frozen-test rows come from the model's row cache when the fit's pass
wrote it from this catalog (no read of the catalog's cube), else from the
catalog. Scoring kernels are in :mod:`snrmoe_dask.metrics`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .baselines import (
    add_conditional_terms,
    baseline_predictions,
)
from .bins import phys_bin, snr_bin
from .catalog import CatalogError, open_catalog
from .ceiling import efficiency
from .cluster import check_workers_see, compute
from .config import Config
from .experts import (
    FAMILIES,
    ORACLE_FAMILIES,
)
from .features import FEATURE_NAMES, feature_table
from .gates import ORACLE_OF, Gate, entropy, mixture
from .metrics import expert_predictions, r2_score, regression_metrics, route_oracle
from .mixture import (
    GAUSS_1SIGMA,
    GAUSS_2SIGMA,
    apply_model_gate,
    gate_inputs,
    gate_tau,
)
from .store import (
    Model,
    check_grid,
    model_catalog_config,
    routing_bins,
    rows_source,
)
from .zarrstore import consolidate

__all__ = ["evaluate_model", "ceiling_stage", "coverage"]


def evaluate_model(model: Model, catalog: str | Path, cfg: Config, *, client=None, progress: bool = True,
                   predictions_out: str | Path | None = None) -> dict:
    """Score every family on the frozen test subset; returns the metrics dict.

    With ``predictions_out``, the usable test rows' labels, bins and every
    model's prediction are written there (zarr; the report's scatter and
    heatmap figures read it).
    """
    target = model.meta["target"]
    # the model's split and bins, never the command line's (a conflicting key is refused)
    cfg = cfg.model_copy(update={"catalog": model_catalog_config(model, cfg.catalog)})
    ds = open_catalog(catalog, require_labels=(target, "teff", "mh"), config=cfg.catalog, routes_by_snr=True)
    check_grid(model, ds, catalog, cfg.catalog.grid_tolerance_pixels)
    check_workers_see(client, catalog, cfg.cluster.connect_timeout)
    rows = np.flatnonzero(ds["frozen_test"].values)
    if rows.size == 0:
        raise CatalogError(f"{catalog}: the frozen test subset is empty")
    src, rows, rows_from = rows_source(model.path, ds, rows)
    coef, icpt = model.projection()
    pred_d = expert_predictions(src, coef, icpt, rows)
    sub = src.isel(spectrum=rows)
    feats_d = feature_table(sub, cfg.catalog.min_good_fraction)
    lazy = {"proj": pred_d, "feats": feats_d}
    if model.baselines is not None:
        lazy["base"] = baseline_predictions(src, model.baselines, rows)
    with_ceiling = cfg.ceiling.enabled and str(ds.attrs.get("simulated", "")).lower() == "true"
    # the ceiling's spectra are drawn from the labels, so their flux comes from this same read of the test rows
    ceiling_rows = ceiling_spectra(sub, model.edges, cfg) if with_ceiling else np.empty(0, np.int64)
    if ceiling_rows.size:
        lazy["ceiling_flux"] = sub["flux"].data[ceiling_rows]
    done = dict(zip(lazy, compute(*lazy.values(), client=client, label=f"predict {rows.size} test rows",
                                  progress=progress)))
    proj, feats, base_pred = done["proj"], done["feats"], done.get("base")
    ceiling_flux = done.get("ceiling_flux", np.empty((0, ds.sizes["wavelength"])))
    usable = feats["usable"].values
    y = np.asarray(sub[target].values, np.float64)
    snr_values = np.asarray(sub["snr"].values if "snr" in sub else feats["snr_est"].values, np.float64)
    s_b, p_b = routing_bins(sub, model.edges, np.nan_to_num(snr_values, nan=0.0))
    n_exp = len(model.specs)
    feat_rows = np.column_stack([feats[c].values for c in FEATURE_NAMES])[usable]
    table = gate_inputs(feat_rows, proj[usable, n_exp:])
    pred, y, s_b, p_b = proj[usable, :n_exp], y[usable], s_b[usable], p_b[usable]
    base_names = json.loads(model.baselines.attrs["baseline"]) if model.baselines is not None else []
    if base_names:  # the conditional model's S/N terms come from the features computed above (no second kernel)
        base_pred = add_conditional_terms(base_pred[usable], feat_rows, model.baselines).T
    metrics: dict[str, Any] = {
        "n_test": int(usable.sum()),
        "n_test_excluded_unusable": int((~usable).sum()),
        "target": target,
        "catalog": str(catalog),
        "test_rows_source": rows_from,
        "snr_routing_source": "snr (true S/N label)" if "snr" in sub else "snr_est",
        "models": {},
    }
    yhats: dict[str, np.ndarray] = {}
    for family in FAMILIES:
        yhats[family] = route_oracle(pred, model.family_index(family, s_b, p_b))
        metrics["models"][family] = regression_metrics(y, yhats[family], s_b, p_b, model.snr_names,
                                                       model.phys_names)
    for j, name in enumerate(base_names):
        yhats[name] = base_pred[j]
        metrics["models"][name] = regression_metrics(y, yhats[name], s_b, p_b, model.snr_names, model.phys_names)
        metrics["models"][name]["baseline"] = True
    softs: dict[str, np.ndarray] = {}
    if model.gates:
        metrics["default_gate"] = model.default_gate
        metrics["gate_entropy_by_snr_bin"] = {}
        for name, gate in model.gates.items():
            m, entropy_by_bin, yhats[name], softs[name] = gate_metrics(model, gate, table, pred, y, s_b, p_b,
                                                                       feat_rows[:, FEATURE_NAMES.index("snr_est")])
            metrics["models"][name] = m
            metrics["gate_entropy_by_snr_bin"][name] = entropy_by_bin
    g = metrics["models"]["global"]["r2"]
    metrics["delta_r2_vs_global"] = {f: (m["r2"] - g if m["r2"] is not None and g is not None else None)
                                     for f, m in metrics["models"].items()}
    add_standard_errors(metrics, y, yhats, softs, s_b, model.snr_names, cfg.evaluate)
    if with_ceiling:
        t0 = time.perf_counter()
        keep = usable[ceiling_rows]
        ceiling = ceiling_stage(sub, model.edges, cfg, client=client, progress=progress, usable=usable,
                                rows=ceiling_rows[keep], flux=np.asarray(ceiling_flux)[keep])
        metrics["ceiling_seconds"] = time.perf_counter() - t0
        metrics["ceiling"] = ceiling["summary"]
        for name, m in metrics["models"].items():
            m["ceiling"] = "flux_oracle_bins" if name in ORACLE_FAMILIES else "flux"
            m["efficiency"] = efficiency(m, ceiling["summary"][m["ceiling"]])
    if predictions_out is not None:
        keep = np.flatnonzero(usable)
        names = list(yhats)
        out = xr.Dataset(
            {"logg": ("spectrum", y), "yhat": (("spectrum", "model"), np.column_stack([yhats[k] for k in names])),
             "snr_bin": ("spectrum", s_b), "phys_bin": ("spectrum", p_b),
             "snr_est": ("spectrum", feats["snr_est"].values[keep]),
             **({"snr": ("spectrum", np.asarray(sub["snr"].values)[keep])} if "snr" in sub else {})},
            coords={"spectrum": sub["spectrum"].values[keep]},
            attrs={"model": json.dumps(names), "snr_bin_names": json.dumps(model.snr_names),
                   "phys_bin_names": json.dumps(model.phys_names)})
        out.to_zarr(predictions_out, mode="w", zarr_format=3, consolidated=False)
        consolidate(predictions_out)
    return metrics


def ceiling_spectra(ds: xr.Dataset, edges: dict, cfg: Config) -> np.ndarray:
    """Positions in ``ds`` of the spectra the Bayes ceiling samples: up to ``spectra_per_snr_bin`` per true S/N bin."""
    from .ceiling import choose_spectra

    snr_b = snr_bin(np.asarray(ds["snr"].values, np.float64), edges["snr_edges"])
    return choose_spectra(snr_b, len(cfg.catalog.snr_bin_names), cfg.ceiling.spectra_per_snr_bin, cfg.ceiling.seed)


def ceiling_stage(ds: xr.Dataset, edges: dict, cfg: Config, *, client=None, progress: bool = True,
                  usable: np.ndarray | None = None, rows: np.ndarray | None = None,
                  flux: np.ndarray | None = None) -> dict:
    """Both Bayes ceilings of logg for the rows of ``ds`` (a simulated catalog's test rows).

    The spectra of :func:`ceiling_spectra` (or ``rows``, with their already
    read ``flux``) have their posteriors importance-sampled
    (:func:`~snrmoe_dask.ceiling.posterior_block`). Without ``flux`` the
    drawn rows' flux is read here, each chunk that holds one once. ``usable``
    restricts the rows whose logg variance R²_max is measured against.

    Returns ``{"summary": ceiling_summary(...), "post": (m, 4) array, "spectrum": ids of the m drawn rows}``.
    """
    from .ceiling import bayes_ceiling_tasks, ceiling_summary

    snr_names = list(cfg.catalog.snr_bin_names)
    n_snr = len(snr_names)
    snr_b = snr_bin(np.asarray(ds["snr"].values, np.float64), edges["snr_edges"])
    p_b = phys_bin(ds["teff"].values, ds["mh"].values, edges["teff_edges"], edges["mh_edges"]).astype(np.int64)
    if rows is None:
        rows = ceiling_spectra(ds, edges, cfg)
    if flux is None:
        (flux,) = compute(ds["flux"].data[rows], client=client, label=f"Bayes ceiling: flux of {rows.size} spectra",
                          progress=False)
    cell0 = p_b[rows] * n_snr + snr_b[rows]
    parts = bayes_ceiling_tasks(ds, rows, np.asarray(flux, np.float64), cell0, edges, n_snr, cfg.ceiling,
                                scatter=getattr(client, "scatter", None))
    (parts,) = compute(parts, client=client, label=f"Bayes ceiling: posteriors of {rows.size} spectra",
                       progress=progress)
    post = np.concatenate(parts) if parts else np.empty((0, 4))
    keep = np.ones(snr_b.shape, bool) if usable is None else np.asarray(usable, bool)
    summary = ceiling_summary(post, snr_b[rows], np.asarray(ds["logg"].values, np.float64)[keep], snr_b[keep],
                              snr_names)
    summary["method"] = (f"Bayes minimum MSE of logg under the simulator's uniform prior box, by importance sampling "
                         f"({cfg.ceiling.samples} samples per spectrum) of {rows.size} test spectra, up to "
                         f"{cfg.ceiling.spectra_per_snr_bin} per S/N bin")
    return {"summary": summary, "post": post, "spectrum": np.asarray(ds["spectrum"].values)[rows]}


def add_standard_errors(metrics: dict, y: np.ndarray, yhats: dict, softs: dict, s_b: np.ndarray,
                        snr_names, cfg) -> None:
    """Paired-bootstrap standard errors of every R², ΔR² and ρ in ``metrics`` (in place)."""
    from .bootstrap import bootstrap_counts, r2_draws, rho_with_se, se

    counts = bootstrap_counts(y.size, cfg.n_bootstrap, cfg.seed)
    bins = {b: s_b == i for i, b in enumerate(snr_names)}
    sub = {b: (counts[:, sel], y[sel]) for b, sel in bins.items()}

    def draws(yhat):
        return r2_draws(y, yhat, counts), {b: (r2_draws(yb, yhat[bins[b]], cb)) for b, (cb, yb) in sub.items()}

    d = {name: draws(v) for name, v in yhats.items()}
    models = metrics["models"]
    g_all, g_bin = d["global"]
    metrics["delta_r2_se_vs_global"] = {}
    for name, m in models.items():
        all_, per = d[name]
        m["r2_se"] = se(all_)
        for b, v in per.items():
            m["per_snr_bin"][b]["r2_se"] = se(v)
        metrics["delta_r2_se_vs_global"][name] = se(all_ - g_all) if all_ is not None and g_all is not None else None
        if name in softs:
            m["soft_r2_se"] = se(r2_draws(y, softs[name], counts))
        if "oracle" in m:
            o_all, o_bin = d[m["oracle"]]
            m.update(rho_with_se(all_, g_all, o_all, (m["r2"], models["global"]["r2"], models[m["oracle"]]["r2"])))
            m["rho_per_snr_bin"], m["rho_se_per_snr_bin"] = {}, {}
            for b in snr_names:
                r = rho_with_se(per[b], g_bin[b], o_bin[b], (m["per_snr_bin"][b]["r2"],
                                                             models["global"]["per_snr_bin"][b]["r2"],
                                                             models[m["oracle"]]["per_snr_bin"][b]["r2"]))
                m["rho_per_snr_bin"][b], m["rho_se_per_snr_bin"][b] = r["rho"], r["rho_se"]
    metrics["bootstrap"] = {"draws": cfg.n_bootstrap, "seed": cfg.seed, "paired": True, "over": "frozen-test rows"}


def coverage(y: np.ndarray, yhat: np.ndarray, sigma: np.ndarray, s_b: np.ndarray, snr_names) -> dict:
    """Share of rows within ±1σ and ±2σ, overall and per (true) S/N bin.

    ``se_if_calibrated`` is the binomial standard error a perfectly calibrated
    σ would show on that many test rows, ``sqrt(p (1 - p) / n)`` at the
    Gaussian ``p``: the yardstick for whether a miss is more than sampling.
    """
    z = np.abs(y - yhat) / sigma

    def frac(sel):
        n = int(sel.sum())
        return {"1sigma": float(np.mean(z[sel] <= 1.0)) if n else None,
                "2sigma": float(np.mean(z[sel] <= 2.0)) if n else None, "n": n,
                "se_if_calibrated": {k: (float(np.sqrt(p * (1 - p) / n)) if n else None)
                                     for k, p in (("1sigma", GAUSS_1SIGMA), ("2sigma", GAUSS_2SIGMA))}}

    out = frac(np.ones(z.shape, bool))
    out["per_snr_bin"] = {b: frac(s_b == i) for i, b in enumerate(snr_names)}
    return out


def gate_metrics(model: Model, gate: Gate, table: dict, pred: np.ndarray, y: np.ndarray, s_b: np.ndarray,
                 p_b: np.ndarray, snr_est: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """The ``metrics.json`` block of one gate, its mean entropy per S/N bin, its deployed and soft predictions."""
    out = apply_model_gate(model, gate, table, pred, snr_est=snr_est)
    m = regression_metrics(y, out["yhat"], s_b, p_b, model.snr_names, model.phys_names)
    m["oracle"] = ORACLE_OF[gate.spec.family]
    m["soft_r2"] = r2_score(y, out["soft"])
    m["fallback_tau"] = gate_tau(model, gate)
    m["coverage"] = coverage(y, out["yhat"], out["sigma"], s_b, model.snr_names)
    # ablations: the soft mixture with one input block held at its training mean (what the gate really uses)
    members = model.members(gate.spec.family)
    m["ablation"] = {"what": "soft-mixture R² with the other input block held at its training mean",
                     **{f"{keep}_only": r2_score(y, mixture(gate.weights(table, ablate=drop), pred[:, members]))
                        for keep, drop in (("quality", "physical"), ("physical", "quality"))}}
    m["sigma_calibrated"] = "sigma_calibration" in gate.info
    labels = model.class_labels(gate.spec.family, s_b, p_b)
    guess = out["weights"].argmax(axis=1)
    k = gate.n_classes
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (labels, guess), 1)
    names = [model.specs[i].member for i in model.members(gate.spec.family)]
    m["gate_confusion"] = {"labels": names, "rows": "true bin", "columns": "argmax of the gate weights",
                           "matrix": conf.tolist(), "accuracy": float(np.trace(conf) / max(1, conf.sum()))}
    m["classifying"] = gate.spec.training == "logreg"
    m["fallback_fraction"] = float(out["fallback"].mean()) if out["fallback"].size else None
    m["gate"] = {"family": gate.spec.family, "inputs": list(gate.spec.inputs), "training": gate.spec.training}
    ent = entropy(out["weights"])
    by_bin = {b: (float(ent[s_b == i].mean()) if (s_b == i).any() else None) for i, b in enumerate(model.snr_names)}
    return m, by_bin, out["yhat"], out["soft"]


