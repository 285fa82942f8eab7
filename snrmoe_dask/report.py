"""``report.md`` and its PNG figures, generated from a run directory's files.

Every table is rendered from ``metrics.json`` / ``audit/audit.json`` /
``seeds.json`` (never retyped), and every figure from those files plus
``predictions.zarr`` (the frozen-test predictions that ``evaluate`` wrote).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .experts import ORACLE_FAMILIES

__all__ = ["write_report", "seed_summary", "write_seeds_report", "coverage_table", "ceiling_table", "gate_table",
           "FIGURES"]

#: file name -> caption, in report order
FIGURES = {
    "r2_per_model.png": "R² of every model on the frozen test subset",
    "r2_per_snr_bin.png": "R² per S/N bin: global, the best oracle, the deployed gate and the baselines",
    "pred_vs_true.png": "Predicted vs true logg (deployed gate), coloured by S/N",
    "delta_r2_heatmap.png": "ΔR² against global over Teff×[M/H] bins × S/N bins",
    "gate_confusion.png": "Gate confusion matrices (rows: true bin, normalised)",
    "gate_entropy.png": "Mean gate entropy per S/N bin",
    "ceiling_efficiency.png": "Bayes ceilings R²_max (flux only; flux + oracle bins) and efficiency per S/N bin",
    "audit.png": "Leakage audit: Ridge R² of logg and of S/N from each error representation",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _r2(v) -> float:
    return np.nan if v is None else float(v)


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _kind(name: str, m: dict) -> str:
    if m.get("baseline"):
        return "baseline"
    if "gate" in m:
        return "deployed gate"
    return "global" if name == "global" else "oracle"


def _best_oracle(models: dict) -> str:
    return max((f for f in ORACLE_FAMILIES if f in models), key=lambda f: _r2(models[f]["r2"]))


def _deployed(metrics: dict) -> str | None:
    return metrics.get("default_gate")


# ----------------------------------------------------------------- figures
def _fig_r2_models(metrics: dict, path: Path) -> None:
    plt = _plt()
    models = metrics["models"]
    names = list(models)
    colors = {"global": "0.4", "oracle": "tab:blue", "deployed gate": "tab:orange", "baseline": "tab:green"}
    fig, ax = plt.subplots(figsize=(8.5, 0.28 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    vals = [_r2(models[n]["r2"]) for n in names]
    ax.barh(y, vals, color=[colors[_kind(n, models[n])] for n in names])
    for yi, v in zip(y, vals):
        ax.text(v + 0.005, yi, _fmt(v), va="center", fontsize=7)
    ax.set_yticks(y, [n + (" (default)" if n == _deployed(metrics) else "") for n in names])
    if "ceiling" in metrics:
        ax.axvline(metrics["ceiling"]["flux"]["overall"]["r2_max"], color="k", ls="--", lw=1,
                   label="Bayes ceiling (flux)")
        ax.axvline(metrics["ceiling"]["flux_oracle_bins"]["overall"]["r2_max"], color="k", ls=":", lw=1,
                   label="Bayes ceiling (flux + oracle bins)")
    for k, c in colors.items():
        ax.barh([np.nan], [np.nan], color=c, label=k)
    ax.set_xlabel("R² (frozen test)")
    ax.set_xlim(min(0.0, np.nanmin(vals)), max(1.0 if not np.isfinite(np.nanmax(vals)) else np.nanmax(vals) + 0.12,
                                              _top_ceiling(metrics) + 0.05))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.set_title(f"R² per model (n_test = {metrics['n_test']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _top_ceiling(metrics: dict) -> float:
    c = metrics.get("ceiling")
    return max(_r2(v["overall"]["r2_max"]) for v in c.values() if isinstance(v, dict)) if c else 0.0


def _snr_series(metrics: dict) -> list[str]:
    models = metrics["models"]
    out = ["global", _best_oracle(models)]
    if _deployed(metrics):
        out.append(_deployed(metrics))
    out += [n for n, m in models.items() if m.get("baseline")]
    return out


def _fig_r2_snr(metrics: dict, path: Path) -> None:
    plt = _plt()
    models = metrics["models"]
    bins = list(models["global"]["per_snr_bin"])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = np.arange(len(bins))
    for name in _snr_series(metrics):
        ax.plot(x, [_r2(models[name]["per_snr_bin"][b]["r2"]) for b in bins], marker="o", label=name)
    if "ceiling" in metrics:
        ax.plot(x, [_r2(metrics["ceiling"]["flux"]["per_snr_bin"][b]["r2_max"]) for b in bins], "k--", marker="s",
                label="Bayes ceiling (flux)")
    ns = [models["global"]["per_snr_bin"][b]["n"] for b in bins]
    ax.set_xticks(x, [f"{b}\n(n={n})" for b, n in zip(bins, ns)])
    ax.set_xlabel("S/N bin (X: ≤ 2 … H: highest)")
    ax.set_ylabel("R²")
    ax.set_title("R² per S/N bin")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_pred_true(pred, metrics: dict, path: Path) -> None:
    plt = _plt()
    names = json.loads(pred.attrs["model"])
    name = _deployed(metrics) or "global"
    yhat = pred["yhat"].values[:, names.index(name)]
    y = pred["logg"].values
    snr = pred["snr"].values if "snr" in pred else pred["snr_est"].values
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    order = np.argsort(snr)
    sc = ax.scatter(y[order], yhat[order], c=np.clip(snr[order], 0, np.nanpercentile(snr, 99)), s=5, cmap="viridis",
                    alpha=0.7, lw=0)
    lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    fig.colorbar(sc, ax=ax, label="S/N" + ("" if "snr" in pred else " (estimate)"))
    ax.set_xlabel("true logg")
    ax.set_ylabel(f"predicted logg ({name})")
    ax.set_title(f"{name}: R² = {_fmt(metrics['models'][name]['r2'])}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell_r2(y, yhat, pb, sb, n_phys, n_snr, min_n=10) -> np.ndarray:
    out = np.full((n_phys, n_snr), np.nan)
    for p in range(n_phys):
        for s in range(n_snr):
            sel = (pb == p) & (sb == s)
            if sel.sum() >= min_n and np.var(y[sel]) > 0:
                out[p, s] = 1 - np.sum((y[sel] - yhat[sel]) ** 2) / np.sum((y[sel] - y[sel].mean()) ** 2)
    return out


def _fig_delta_heatmap(pred, metrics: dict, path: Path) -> None:
    plt = _plt()
    names = json.loads(pred.attrs["model"])
    snr_names, phys_names = json.loads(pred.attrs["snr_bin_names"]), json.loads(pred.attrs["phys_bin_names"])
    y, pb, sb = pred["logg"].values, pred["phys_bin"].values, pred["snr_bin"].values
    shape = (len(phys_names), len(snr_names))
    base = _cell_r2(y, pred["yhat"].values[:, names.index("global")], pb, sb, *shape)
    panels = [_best_oracle(metrics["models"])] + ([_deployed(metrics)] if _deployed(metrics) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.6, 4.6), squeeze=False, sharey=True)
    lim = 0.0
    deltas = []
    for name in panels:
        d = _cell_r2(y, pred["yhat"].values[:, names.index(name)], pb, sb, *shape) - base
        deltas.append(d)
        lim = max(lim, np.nanmax(np.abs(d)) if np.isfinite(d).any() else 0.0)
    lim = lim or 0.1
    for ax, name, d in zip(axes[0], panels, deltas):
        im = ax.imshow(d, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(d):
            ax.text(j, i, "–" if not np.isfinite(v) else f"{v:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(snr_names)), snr_names)
        ax.set_yticks(range(len(phys_names)), phys_names)
        ax.tick_params(axis="y", labelleft=ax is axes[0][0])
        ax.set_xlabel("S/N bin")
        ax.set_title(f"{name} − global", fontsize=9)
        ax.grid(False)
    axes[0][0].set_ylabel("Teff × [M/H] bin (T: Teff, M: [M/H] tertile)")
    fig.colorbar(im, ax=axes[0].tolist(), label="ΔR² (cells with ≥ 10 test spectra)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _gate_panels(metrics: dict) -> list[str]:
    gates = [n for n, m in metrics["models"].items() if "gate_confusion" in m]
    out = [g for g in ("deploy_snr_logreg",) if g in gates]
    if _deployed(metrics) and _deployed(metrics) not in out:
        out.append(_deployed(metrics))
    return out or gates[:1]


def _fig_confusion(metrics: dict, path: Path) -> None:
    plt = _plt()
    panels = _gate_panels(metrics)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        conf = metrics["models"][name]["gate_confusion"]
        m = np.asarray(conf["matrix"], float)
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        labels = conf["labels"]
        if len(labels) <= 12:
            for (i, j), v in np.ndenumerate(norm):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "black")
        step = 1 if len(labels) <= 12 else 4
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=6)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
        ax.set_xlabel("gate argmax")
        ax.set_ylabel("true bin")
        ax.set_title(f"{name}: accuracy {conf['accuracy']:.1%}", fontsize=9)
        ax.grid(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_entropy(metrics: dict, path: Path) -> None:
    plt = _plt()
    ent = metrics.get("gate_entropy_by_snr_bin", {})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = list(metrics["models"]["global"]["per_snr_bin"])
    x = np.arange(len(bins))
    for name, by_bin in ent.items():
        ax.plot(x, [_r2(by_bin.get(b)) for b in bins], marker="o", label=name,
                lw=2.5 if name == _deployed(metrics) else 1)
    ax.set_xticks(x, bins)
    ax.set_xlabel("S/N bin")
    ax.set_ylabel("mean entropy of the gate weights (nats)")
    ax.set_title("Gate entropy vs S/N")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_ceiling(metrics: dict, path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    bins = list(metrics["models"]["global"]["per_snr_bin"])
    x = np.arange(len(bins))
    if "ceiling" not in metrics:
        for ax in (a1, a2):
            ax.text(0.5, 0.5, "no ceiling (not a simulated catalog)", ha="center", transform=ax.transAxes)
    else:
        for key, ls in (("flux", "k--"), ("flux_oracle_bins", "k:")):
            c = metrics["ceiling"][key]["per_snr_bin"]
            a1.errorbar(x, [_r2(c[b]["r2_max"]) for b in bins], yerr=[_r2(c[b]["r2_max_se"]) for b in bins],
                        fmt=ls, marker="s", capsize=2, label=f"R²_max ({key.replace('_', ' ')})")
        for name in _snr_series(metrics):
            m = metrics["models"][name]
            a1.plot(x, [_r2(m["per_snr_bin"][b]["r2"]) for b in bins], marker="o", label=name)
            eff = m.get("efficiency", {}).get("per_snr_bin", {})
            a2.plot(x, [_r2(eff.get(b)) for b in bins], marker="o", label=name)
        a2.axhline(1.0, color="k", lw=0.8)
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
    for ax, lab in ((a1, "R²"), (a2, "efficiency R² / R²_max")):
        ax.set_xticks(x, bins)
        ax.set_xlabel("S/N bin")
        ax.set_ylabel(lab)
    a1.set_title("Ceiling and R² per S/N bin")
    a2.set_title("Efficiency per S/N bin")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_audit(audit: dict | None, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if audit is None:
        ax.text(0.5, 0.5, "no audit in this run", ha="center", transform=ax.transAxes)
    else:
        reps = audit["representations"]
        names = list(reps)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [_r2(reps[n]["logg_r2"]) for n in names], 0.4, label="logg R²", color="tab:red")
        ax.bar(x + 0.2, [_r2(reps[n]["snr_r2"]) for n in names], 0.4, label="S/N R²", color="tab:blue")
        th = audit["thresholds"]
        ax.axhline(th["logg_r2_max"], color="tab:red", ls="--", lw=1, label=f"logg leak limit {th['logg_r2_max']}")
        ax.axhline(th["snr_r2_min"], color="tab:blue", ls=":", lw=1, label=f"S/N floor {th['snr_r2_min']}")
        ax.set_xticks(x, [f"{n}\n{'pass' if reps[n]['pass'] else 'FAIL'}" for n in names])
        ax.set_ylim(min(0, *[_r2(reps[n]["logg_r2"]) for n in names]) - 0.02, 1.05)
        ax.legend(fontsize=7, loc="center right")
    ax.set_ylabel("Ridge R² on the frozen test")
    ax.set_title("Does the error vector leak logg?")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ tables
def _pm(v, e, nd: int = 3) -> str:
    return _fmt(v, nd) if e is None or v is None else f"{v:.{nd}f} ± {e:.{nd}f}"


def gate_table(metrics: dict) -> str:
    """Every gate: ρ, deployed vs soft R², fallback τ and fraction, accuracy, coverage."""
    lines = ["| gate | oracle | ρ | deployed R² | soft R² | fallback τ | fallback fraction | accuracy | "
             "±1σ coverage | ±2σ coverage |", "|---" * 10 + "|"]
    for name, m in metrics["models"].items():
        if "gate_confusion" in m:
            rho = _pm(m.get("rho"), m.get("rho_se"), 2) if m.get("rho") is not None else "null"
            cov = m.get("coverage", {})
            lines.append(f"| {name}{' (default)' if name == _deployed(metrics) else ''} | {m['oracle']} | {rho} | "
                         f"{_pm(m['r2'], m.get('r2_se'))} | {_pm(m.get('soft_r2'), m.get('soft_r2_se'))} | "
                         f"{_fmt(m.get('fallback_tau'), 2)} | {_fmt(m.get('fallback_fraction'))} | "
                         f"{m['gate_confusion']['accuracy']:.1%} | {_fmt(cov.get('1sigma'))} | "
                         f"{_fmt(cov.get('2sigma'))} |")
    return "\n".join(lines)


def coverage_table(metrics: dict) -> str:
    """±1σ / ±2σ coverage of every gate per S/N bin (68.3 % / 95.4 % expected), with the standard error a
    calibrated σ would show on that many rows."""
    gates = [n for n, m in metrics["models"].items() if "coverage" in m]
    if not gates:
        return ""
    first = metrics["models"][gates[0]]["coverage"]
    bins = list(first["per_snr_bin"])

    def head(c: dict, name: str) -> str:
        se = c.get("se_if_calibrated") or {}
        tail = f"; se {_fmt(se.get('1sigma'))} / {_fmt(se.get('2sigma'))}" if se.get("1sigma") is not None else ""
        return f"{name} (n={c['n']}{tail})"

    lines = ["| gate | " + " | ".join([head(first, "all")] + [head(first["per_snr_bin"][b], b) for b in bins]) + " |",
             "|---" * (len(bins) + 2) + "|"]
    for n in gates:
        c = metrics["models"][n]["coverage"]
        cell = [f"{_fmt(c['1sigma'])} / {_fmt(c['2sigma'])}"]
        cell += [f"{_fmt(c['per_snr_bin'][b]['1sigma'])} / {_fmt(c['per_snr_bin'][b]['2sigma'])}" for b in bins]
        lines.append(f"| {n} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def ceiling_table(metrics: dict) -> str:
    """Both Bayes ceilings per S/N bin with standard errors, and efficiencies against the matching one."""
    c = metrics["ceiling"]
    bins = list(c["flux"]["per_snr_bin"])
    lines = ["| | all | " + " | ".join(bins) + " |", "|---" * (len(bins) + 2) + "|"]
    for key, label in (("flux", "R²_max, flux only"), ("flux_oracle_bins", "R²_max, flux + oracle bins")):
        lines.append(f"| {label} | {_pm(c[key]['overall']['r2_max'], c[key]['overall']['r2_max_se'])} | "
                     + " | ".join(_pm(c[key]["per_snr_bin"][b]["r2_max"], c[key]["per_snr_bin"][b]["r2_max_se"])
                                  for b in bins) + " |")
    for name in _snr_series(metrics):
        m = metrics["models"][name]
        eff = m.get("efficiency")
        if eff:
            lines.append(f"| efficiency of {name} (vs {m.get('ceiling', 'flux').replace('_', ' ')}) | "
                         f"{_fmt(eff.get('overall'))} | " + " | ".join(_fmt(eff["per_snr_bin"].get(b)) for b in bins)
                         + " |")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> list[str]:
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/figures/*.png``; returns the figure names.

    Needs ``metrics.json`` and ``predictions.zarr`` (from ``evaluate``);
    ``audit/audit.json`` is used if present.
    """
    import xarray as xr

    from .audit import audit_markdown
    from .metrics import r2_table

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (run `snrmoe run` or `snrmoe evaluate` first)")
    if not (run_dir / "predictions.zarr").exists():
        raise FileNotFoundError(f"{run_dir}: no predictions.zarr (written by the run's evaluate stage)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    audit_path = run_dir / "audit" / "audit.json"
    audit = json.loads(audit_path.read_text()) if audit_path.is_file() else None
    pred = xr.open_zarr(run_dir / "predictions.zarr", consolidated=False).load()
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    _fig_r2_models(metrics, figdir / "r2_per_model.png")
    _fig_r2_snr(metrics, figdir / "r2_per_snr_bin.png")
    _fig_pred_true(pred, metrics, figdir / "pred_vs_true.png")
    _fig_delta_heatmap(pred, metrics, figdir / "delta_r2_heatmap.png")
    has_gates = any("gate_confusion" in m for m in metrics["models"].values())
    if has_gates:
        _fig_confusion(metrics, figdir / "gate_confusion.png")
        _fig_entropy(metrics, figdir / "gate_entropy.png")
    _fig_ceiling(metrics, figdir / "ceiling_efficiency.png")
    _fig_audit(audit, figdir / "audit.png")
    figures = [f for f in FIGURES if (figdir / f).exists()]

    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    md = [f"# snrmoe report: {run_dir.name}", "",
          f"Frozen test: {metrics['n_test']} spectra ({metrics.get('n_test_excluded_unusable', 0)} left out as "
          f"unusable); catalog `{metrics.get('catalog')}`; S/N routing from {metrics.get('snr_routing_source')}. "
          "Tables are generated from `metrics.json` and `audit/audit.json`.", ""]
    if run.get("stages"):
        md += ["## Stages", "", "| stage | seconds | note |", "|---|---|---|"]
        for stage, info in run["stages"].items():
            md.append(f"| {stage} | {_fmt(info.get('seconds'), 1)} | {info.get('skipped', '')} |")
        md.append("")
    md += ["## R² per model", "", r2_table(metrics), "", f"![{FIGURES['r2_per_model.png']}](figures/r2_per_model.png)",
           "", f"![{FIGURES['r2_per_snr_bin.png']}](figures/r2_per_snr_bin.png)", "",
           f"![{FIGURES['pred_vs_true.png']}](figures/pred_vs_true.png)", "",
           f"![{FIGURES['delta_r2_heatmap.png']}](figures/delta_r2_heatmap.png)", ""]
    if has_gates:
        md += ["## Gates", "", f"Default gate (chosen on held-out val rows): `{metrics.get('default_gate')}`. "
               "Each gate is deployed as it was trained: the MSE-trained gates as their soft mixture, the classifier "
               "gates with a fallback to global only where it lowered the error on the selection rows (fallback τ).",
               "", gate_table(metrics), "", "### Coverage of the calibrated σ (±1σ / ±2σ; expected 0.683 / 0.954)",
               "", coverage_table(metrics), "", f"![{FIGURES['gate_confusion.png']}](figures/gate_confusion.png)", "",
               f"![{FIGURES['gate_entropy.png']}](figures/gate_entropy.png)", ""]
    if "ceiling" in metrics:
        md += ["## Bayes ceiling and efficiency", "", metrics["ceiling"].get("method", ""), "", ceiling_table(metrics),
               "",
               f"![{FIGURES['ceiling_efficiency.png']}](figures/ceiling_efficiency.png)", ""]
    if audit is not None:
        body = audit_markdown(audit).split("\n", 1)[1].lstrip("\n")  # drop its H1: it is a section here
        md += ["## Leakage audit", "", body, "", f"![{FIGURES['audit.png']}](figures/audit.png)", ""]
    (run_dir / "report.md").write_text("\n".join(md))
    return figures


# ------------------------------------------------------------------- seeds
def seed_summary(metrics_by_seed: dict) -> dict:
    """Mean ± std (ddof=1) over seeds of R² per model, overall and per S/N bin."""
    seeds = list(metrics_by_seed)
    first = metrics_by_seed[seeds[0]]
    out = {"seeds": [str(s) for s in seeds], "n_test": {str(s): m["n_test"] for s, m in metrics_by_seed.items()},
           "models": {}}

    def stat(vals):
        v = np.array([np.nan if x is None else x for x in vals], float)
        ok = v[np.isfinite(v)]
        return {"mean": float(ok.mean()) if ok.size else None,
                "std": float(ok.std(ddof=1)) if ok.size > 1 else None, "values": [None if not np.isfinite(x)
                                                                                  else float(x) for x in v]}

    for name in first["models"]:
        if not all(name in m["models"] for m in metrics_by_seed.values()):
            continue
        per = [metrics_by_seed[s]["models"][name] for s in seeds]
        out["models"][name] = {"r2": stat([p["r2"] for p in per]),
                               "per_snr_bin": {b: stat([p["per_snr_bin"][b]["r2"] for p in per])
                                               for b in per[0]["per_snr_bin"]}}
    return out


def format_mean_std(s: dict) -> str:
    """``mean ± std`` of a :func:`seed_summary` entry."""
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else f"{s['mean']:.3f}"


def write_seeds_report(run_dir: str | Path, summary: dict, studies: dict[str, Path]) -> None:
    """``RUN_DIR/report.md``: mean ± std over seeds (from ``seeds.json``), links to each seed's report."""
    plt = _plt()
    run_dir = Path(run_dir)
    (run_dir / "figures").mkdir(exist_ok=True)
    models = summary["models"]
    names = list(models)
    bins = list(next(iter(models.values()))["per_snr_bin"])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    means = [np.nan if models[n]["r2"]["mean"] is None else models[n]["r2"]["mean"] for n in names]
    stds = [0 if models[n]["r2"]["std"] is None else models[n]["r2"]["std"] for n in names]
    ax.barh(y, means, xerr=stds, color="tab:blue", capsize=2)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"R² (mean ± std over {len(summary['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(run_dir / "figures" / "r2_per_model_seeds.png")
    plt.close(fig)
    md = [f"# snrmoe report: {run_dir.name} ({len(summary['seeds'])} seeds)", "",
          "Mean ± standard deviation over seeds (simulation seed and split salt), generated from `seeds.json`.", "",
          "| model | R² | " + " | ".join(f"R² {b}" for b in bins) + " |", "|---" * (len(bins) + 2) + "|"]
    for n in names:
        md.append(f"| {n} | {format_mean_std(models[n]['r2'])} | "
                  + " | ".join(format_mean_std(models[n]["per_snr_bin"][b]) for b in bins) + " |")
    md += ["", "![R² per model over seeds](figures/r2_per_model_seeds.png)", "", "## Each seed", ""]
    for seed, path in studies.items():
        rel = Path(path).relative_to(run_dir) if Path(path).is_relative_to(run_dir) else Path(path)
        md.append(f"- seed {seed}: [{rel}/report.md]({rel}/report.md)")
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
