"""The audit stage: write ``audit.json``, ``audit.md`` and the pixel importance; the audit on its own.

The audit's arithmetic is in :mod:`snrmoe_dask.leakage`. In ``snrmoe run``
it rides the fit's pass (:func:`snrmoe_dask.fit.fit_model` with
``audit_out``); :func:`audit_catalog` is ``snrmoe audit CATALOG``: the same
pass with only the audit's rows, one read of the catalog.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .leakage import REPRESENTATIONS, audit_plan, audit_result, audit_solutions, importance_by_region
from .zarrstore import consolidate

__all__ = ["audit_catalog", "write_audit", "audit_markdown"]


def audit_catalog(ds, cfg, *, client=None, progress: bool = True, work_dir: str | Path | None = None) -> dict:
    """The audit of a catalog on its own: one read of the cube (``snrmoe audit``).

    ``snrmoe run`` does not call this: there the audit rides the fit's pass.
    Here the pass folds only the audit's rows and caches the frozen-test rows
    in ``work_dir/rows`` (removed afterwards) to score them.
    """
    import tempfile

    import dask

    from .cache import open_row_cache, plan_row_cache
    from .cluster import compute
    from .foldinputs import FOLD_INPUTS
    from .reduce import one_pass

    plan = audit_plan(ds, cfg)
    n = ds.sizes["spectrum"]
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="snrmoe-audit-") as tmp:
        root = Path(tmp) / "rows"
        starts = np.r_[0, np.cumsum(ds["flux"].chunks[0])]
        parts = plan_row_cache(ds, np.asarray(ds["frozen_test"].values, bool), root, starts,
                               {"purpose": "the audit's frozen-test rows"})
        graph = one_pass(ds, np.zeros(n), np.full(n, -1), n_cells=1, chains=1, precision=cfg.fit.precision,
                         min_good_fraction=cfg.catalog.min_good_fraction, audit=plan, row_cache=parts,
                         inputs_store=Path(tmp) / FOLD_INPUTS)
        sol_d = dask.delayed(audit_solutions)(graph.audit, plan.n_groups, cfg.fit)
        blocks, sol = compute(graph.features, sol_d, client=client, progress=progress,
                              label=f"audit pass ({plan.rows} train rows, {int(ds['frozen_test'].values.sum())} test)")
        test = open_row_cache(root, ds, role="test")
        if test is None:
            raise RuntimeError(f"{root}: the audit's test rows were not cached")
        test_features = np.concatenate(blocks)[test["position"].values]  # as the pass computed them
        return audit_result(sol, test.load(), plan, cfg, test_features)


def write_audit(result: dict, out_dir, ds, cfg) -> dict:
    """Add the pass verdicts, write ``audit.json``, ``audit.md`` and ``pixel_importance.zarr``."""
    import json
    from pathlib import Path

    import xarray as xr

    from .ceiling import model_from_catalog_attrs
    from .physics import _build_basis

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    a = cfg.audit
    reps = {}
    for name in REPRESENTATIONS:
        r = result["representations"][name]
        ok = r["logg_r2"] is not None and r["snr_r2"] is not None and r["logg_r2"] < a.logg_r2_max \
            and r["snr_r2"] >= a.snr_r2_min
        reps[name] = {"logg_r2": r["logg_r2"], "snr_r2": r["snr_r2"], "pass": bool(ok),
                      **{k: v for k, v in r.items() if k not in ("logg_r2", "snr_r2")}}
        by = r.get("by_label", {})
        if "logg" in by and "snr" in by:  # the same rule with the nonlinear learner
            hgb_l, hgb_s = by["logg"]["hgb_r2"], by["snr"]["hgb_r2"]
            reps[name]["pass_nonlinear"] = bool(hgb_l is not None and hgb_s is not None and hgb_l < a.logg_r2_max
                                                and hgb_s >= a.snr_r2_min)
    wave = np.asarray(ds["wavelength"].values, np.float64)
    try:
        sky = _build_basis(model_from_catalog_attrs(ds.attrs).instrument)[2]
    except ValueError:
        sky = None  # real data: no sky model to label sky-line pixels
    imp = result["pixel_importance"]
    top = np.argsort(imp)[::-1][:20]
    doc = {
        "representations": reps,
        "checks": result["checks"],
        "thresholds": {"logg_r2_max": a.logg_r2_max, "snr_r2_min": a.snr_r2_min},
        "importance_by_region": importance_by_region(imp, wave, sky),
        "top_pixels": [{"wavelength": float(wave[i]), "importance": float(imp[i] / imp.sum())} for i in top],
        "n_train": result["n_train"], "n_test": result["n_test"],
        "rows": result.get("rows", {}),
    }
    (out_dir / "audit.json").write_text(json.dumps(doc, indent=2))
    xr.Dataset({"importance": ("wavelength", imp)}, coords={"wavelength": wave}).to_zarr(
        out_dir / "pixel_importance.zarr", mode="w", zarr_format=3, consolidated=False)
    consolidate(out_dir / "pixel_importance.zarr")
    (out_dir / "audit.md").write_text(audit_markdown(doc))
    return doc


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def audit_markdown(doc: dict) -> str:
    """The audit as Markdown tables (generated from ``audit.json``)."""
    th = doc["thresholds"]
    lines = ["# Leakage audit of the error vector", "",
             f"Ridge, train {doc['n_train']} spectra, scored on {doc['n_test']} frozen-test spectra. "
             f"Pass: logg R² < {th['logg_r2_max']} and S/N R² ≥ {th['snr_r2_min']}.", "",
             "| representation | logg R² | S/N R² | pass | pass with gradient boosting |", "|---|---|---|---|---|"]
    for name, r in doc["representations"].items():
        nl = "" if "pass_nonlinear" not in r else ("yes" if r["pass_nonlinear"] else "no")
        lines.append(f"| {name} | {_f(r['logg_r2'])} | {_f(r['snr_r2'])} | {'yes' if r['pass'] else 'no'} | {nl} |")
    c = doc["checks"]
    small = [(n, r["by_label"]) for n, r in doc["representations"].items() if r.get("by_label")]
    if small:
        labels = list(small[0][1])
        lines += ["", "What the small representations say about each label (test R², Ridge / gradient boosting):", "",
                  "| representation | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for name, by in small:
            lines.append(f"| {name} | " + " | ".join(f"{_f(by[k]['ridge_r2'])} / {_f(by[k]['hgb_r2'])}"
                                                     if k in by else "n/a" for k in labels) + " |")
    lines += ["", "| check | figure |", "|---|---|",
              f"| shuffle (logg permuted within magnitude bins), full logg R² | {_f(c['shuffle']['logg_r2'])} |",
              f"| mask only (bad-pixel counts), logg R² | {_f(c['mask_only']['logg_r2'])} |",
              f"| group CV by magnitude, full, mean logg R² | {_f(c['group_cv_by_magnitude']['mean_logg_r2'])} |",
              f"| group CV by magnitude, full, mean S/N R² | {_f(c['group_cv_by_magnitude']['mean_snr_r2'])} |",
              "", "Where the `full` representation's logg information sits (share of |w|·std):", ""]
    for k, v in doc["importance_by_region"].items():
        lines.append(f"- {k}: {v:.3f}")
    lines += ["", "Top pixels: " + ", ".join(f"{p['wavelength']:.1f} Å ({p['importance']:.3f})"
                                             for p in doc["top_pixels"][:10]), ""]
    return "\n".join(lines)
