"""Leakage audit of the error vector (SPEC section 5).

Question: does a representation of ``error`` predict logg (a leak: the
Poisson term of the noise carries the star's own spectrum) while keeping the
S/N information a gate needs? For each representation, a Ridge fitted on the
train rows is scored on the frozen test rows, for logg and for the true S/N:

* ``full``: the whole error vector (bad pixels imputed by the row median),
  solved from sufficient statistics accumulated in one pass, like the experts;
* ``S1``:  each error vector divided by its own median (same machinery);
* ``S2``:  template x scale: the scale is the least-squares factor of the
  spectrum on the median error vector of (up to 2000) train rows;
* ``S3b``: the 10 quality statistics of the feature table;
* ``S4``:  the norm of the error vector.

Small representations use scikit-learn's ``RidgeCV`` (efficient leave-one-out
over an alpha grid) on standardised, log-transformed inputs, and a nonlinear
learner (``HistGradientBoostingRegressor``), for logg, S/N and the routing
labels teff, [M/H] and magnitude: a summary that predicts the routing labels
tells a gate where a star sits without looking at its flux. Checks:

* **shuffle**: logg permuted among train spectra of the same magnitude bin;
  the ``full`` fit then must lose its logg skill (what remains is what the
  error vector says about magnitude, not about logg);
* **mask only**: Ridge on the bad-pixel counts per reason;
* **group CV by magnitude**: ``full`` fitted with one magnitude bin left out,
  scored on that bin, from the per-bin statistics (no refit pass).

The pixel importance of ``full`` (|w| x pixel std) shows where a leak sits; it
is summed over sky-line pixels and stellar line windows.
"""

from __future__ import annotations

import numpy as np

from .blas import syrk_update
from .catalog import good_pixel_mask
from .evaluate import r2_score
from .features import QUALITY_FEATURES, block_features
from .lines import LINE_INDICES
from .pacing import PacedReads
from .stats import SufficientStats, impute_bad_pixels, pack_lower, unpack_symmetric

__all__ = ["REPRESENTATIONS", "TARGETS", "SMALL_TARGETS", "AuditAccumulator", "representations_block",
           "ridge_small", "hgb_small", "r2_from_stats", "pixel_importance"]

REPRESENTATIONS = ("full", "S1", "S2", "S3b", "S4")
TARGETS = ("logg", "snr", "logg_shuffled")
#: labels the small representations are also regressed on (nonlinearly too)
SMALL_TARGETS = ("logg", "snr", "teff", "mh", "mag")
_BIG = ("full", "S1")


def representations_block(error: np.ndarray, flux: np.ndarray, mask: np.ndarray | None,
                          template: np.ndarray | None) -> dict[str, np.ndarray]:
    """The representations of one block of error vectors (float64)."""
    good = good_pixel_mask(flux, error, mask)
    e = impute_bad_pixels(np.where(np.isfinite(error), error, np.nan), good).astype(np.float64)
    med = np.median(e, axis=1)
    out = {"full": e, "S1": e / np.where(med > 0, med, 1.0)[:, None], "S4": np.linalg.norm(e, axis=1)[:, None]}
    if template is not None:
        out["S2"] = ((e @ template) / float(template @ template))[:, None]
    feats = block_features(flux, error, mask)
    out["S3b"] = feats[:, :len(QUALITY_FEATURES)]
    out["counts"] = feats[:, -4:-1]  # n_bad_flux, n_bad_error, n_masked
    return out


class AuditAccumulator:
    """Per-group float64 sufficient statistics of ``full`` and ``S1`` for several targets."""

    def __init__(self, n_groups: int, p: int, shift_full: np.ndarray, shift_s1: np.ndarray):
        self.n_groups, self.p = n_groups, p
        self.shift = {"full": np.asarray(shift_full, np.float64), "S1": np.asarray(shift_s1, np.float64)}
        t = len(TARGETS)
        self.n = np.zeros(n_groups)
        self.sy = np.zeros((n_groups, t))
        self.syy = np.zeros((n_groups, t))
        self.sx = {r: np.zeros((n_groups, p)) for r in _BIG}
        self.xtx = {r: np.zeros((n_groups, p, p)) for r in _BIG}  # lower triangle filled by syrk, C order
        self.xty = {r: np.zeros((n_groups, p, t)) for r in _BIG}
        self.small: dict[str, list[np.ndarray]] = {}
        self.chunks_done: list[int] = []
        self._packed: dict[str, np.ndarray] = {}

    def add(self, reps: dict[str, np.ndarray], targets: np.ndarray, group: np.ndarray) -> None:
        for k in np.unique(group[group >= 0]):
            sel = group == k
            y = targets[sel]
            self.n[k] += sel.sum()
            self.sy[k] += y.sum(0)
            self.syy[k] += (y * y).sum(0)
            for r in _BIG:
                xc = reps[r][sel] - self.shift[r]
                self.sx[r][k] += xc.sum(0)
                self.xty[r][k] += xc.T @ y
                c = self.xtx[r][k].T  # F-ordered view: syrk updates it in place (upper of F = lower of C)
                syrk_update(c, np.ascontiguousarray(xc))
        self._packed = {}

    def stats(self, rep: str, target: str) -> SufficientStats:
        """Per-group statistics of one representation and target (shares the Gram arrays)."""
        t = TARGETS.index(target)
        if rep not in self._packed:  # syrk filled the lower triangles: pack them once, after the pass
            self._packed[rep] = np.stack([pack_lower(m) for m in self.xtx[rep]])
        xtx = self._packed[rep]
        return SufficientStats(self.n.copy(), self.sx[rep], self.sy[:, t].copy(), self.syy[:, t].copy(), xtx,
                               self.xty[rep][:, :, t], self.shift[rep])


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
    xtx = unpack_symmetric(stats.xtx[idx].sum(0))
    xty = stats.xty[idx].sum(0)
    rss = syy - 2 * b * sy - 2 * coef @ xty + n * b * b + 2 * b * coef @ sx + coef @ xtx @ coef
    tss = syy - sy * sy / n
    return None if tss <= 0 else float(1 - rss / tss)


def ridge_small(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float | None:
    """Test R² of RidgeCV on log-transformed (positive columns), standardised inputs."""
    from sklearn.linear_model import RidgeCV

    from .gates import Standardizer

    sc = Standardizer.fit(x_train)
    model = RidgeCV(alphas=np.logspace(-6, 6, 25)).fit(sc.transform(x_train), y_train)
    return r2_score(y_test, model.predict(sc.transform(x_test)))


def hgb_small(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              seed: int = 0) -> float | None:
    """Test R² of scikit-learn's HistGradientBoostingRegressor (early stopping on a train split)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    model = HistGradientBoostingRegressor(max_iter=300, early_stopping=True, random_state=seed)
    return r2_score(y_test, model.fit(x_train, y_train).predict(x_test))


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


# ------------------------------------------------------------ dask layer
def _fold(acc: AuditAccumulator, index: int, flux, error, mask, targets, group, is_test, template, labels):
    if index in acc.chunks_done:  # a retried task must not count a chunk twice
        return acc
    acc.chunks_done.append(index)
    reps = representations_block(error, flux, mask, template)
    train = group >= 0
    acc.add(reps, targets, group)
    for name in ("S2", "S3b", "S4", "counts"):
        acc.small.setdefault(f"{name}/train", []).append(reps[name][train])
        acc.small.setdefault(f"{name}/test", []).append(reps[name][is_test])
    for name in _BIG:
        acc.small.setdefault(f"{name}/test", []).append(reps[name][is_test].astype(np.float32))
    acc.small.setdefault("targets/train", []).append(targets[train])
    acc.small.setdefault("targets/test", []).append(targets[is_test])
    acc.small.setdefault("labels/train", []).append(labels[train])
    acc.small.setdefault("labels/test", []).append(labels[is_test])
    return acc


def audit_catalog(ds, cfg, *, client=None, progress: bool = True, n_groups: int = 5, seed: int = 0,
                  read_ahead: int = 4) -> dict:
    """Run the audit on a catalog (one pass over the train and frozen-test rows).

    Returns
    -------
    dict with ``representations``, ``checks``, ``pixel_importance`` (array),
    ``importance_by_region`` and ``thresholds``.
    """
    import dask
    from dask.base import tokenize

    from .bins import tertile_edges
    from .cluster import compute
    from .ridge import ridge_alphas, solve_ridge, spectrum
    from .split import TRAIN

    p = ds.sizes["wavelength"]
    train = ds["split"].values == TRAIN
    is_test = ds["frozen_test"].values.astype(bool)
    mag = np.asarray(ds["mag"].values, np.float64)
    edges = tertile_edges(mag[train], n_groups)
    mag_group = np.searchsorted(edges, mag, side="left")
    group = np.where(train, mag_group, -1)
    logg = np.asarray(ds["logg"].values, np.float64)
    shuffled = logg.copy()
    rng = np.random.default_rng(seed)
    for g in range(n_groups):
        idx = np.flatnonzero(group == g)
        shuffled[idx] = logg[rng.permutation(idx)]
    targets = np.column_stack([logg, np.asarray(ds["snr"].values, np.float64), shuffled])
    # every SMALL_TARGETS column; teff / mh are NaN where the catalog lacks them
    labels = np.column_stack([np.asarray(ds[k].values, np.float64) if k in ds else np.full(logg.shape, np.nan)
                              for k in SMALL_TARGETS])

    # template and shifts from up to 2000 train rows (a few chunks)
    first = np.flatnonzero(train)[:2000]
    sub = ds.isel(spectrum=first)
    (e0, f0) = compute(sub["error"].data, sub["flux"].data, client=client, label="audit template",
                       progress=False)
    m0 = sub["mask"].values if "mask" in sub else None
    reps0 = representations_block(e0, f0, m0, None)
    template = np.median(reps0["full"], axis=0)
    acc = dask.delayed(AuditAccumulator, pure=True)(n_groups, p, reps0["full"].mean(0), reps0["S1"].mean(0))
    fold = dask.delayed(_fold, pure=True)
    # the chain is the bottleneck: reads wait for it instead of piling up in memory
    reads = PacedReads(ds, ("flux", "error", "mask"), read_ahead,
                       tokenize(ds["flux"].data.name, ds["error"].data.name, targets, group, is_test))
    starts = reads.starts
    for i in range(len(starts) - 1):
        lo, hi = int(starts[i]), int(starts[i + 1])
        if (group[lo:hi] >= 0).any() or is_test[lo:hi].any():
            acc = fold(acc, i, *reads.read(i), targets[lo:hi], group[lo:hi], is_test[lo:hi], template,
                       labels[lo:hi])
            reads.folded(acc, i)
    (acc,) = compute(acc, client=client, label=f"audit pass ({int(train.sum())} train, {int(is_test.sum())} test)",
                     progress=progress)
    cat = {k: np.concatenate(v) for k, v in acc.small.items()}
    y_tr, y_te = cat["targets/train"], cat["targets/test"]

    # the user's fit settings; every target of a representation shares its Gram matrix, so one reduction
    rel, cap, precision = cfg.fit.alphas_relative, cfg.fit.max_df_fraction, cfg.fit.alpha_search_precision
    reps: dict[str, dict] = {}
    solutions = {}
    for r in _BIG:
        reps[r] = {}
        sp = None
        for t, target in enumerate(TARGETS):
            st = acc.stats(r, target)
            cs = st.cells(range(n_groups))
            sp = spectrum(cs, precision) if sp is None else sp
            sol = solve_ridge(cs, ridge_alphas(cs, rel), max_df_fraction=cap, spec=sp)
            solutions[(r, target)] = (sol, st)
            yhat = cat[f"{r}/test"].astype(np.float64) @ sol.coef + sol.intercept
            reps[r][f"{target}_r2"] = r2_score(y_te[:, t], yhat)
            reps[r][f"{target}_alpha"] = float(sol.alpha)
    l_tr, l_te = cat["labels/train"], cat["labels/test"]
    for r in ("S2", "S3b", "S4"):
        by = {}
        for j, label in enumerate(SMALL_TARGETS):  # logg and snr are SMALL_TARGETS too: one Ridge fit each
            if not (np.isfinite(l_tr[:, j]).all() and np.isfinite(l_te[:, j]).all()):
                continue
            by[label] = {"ridge_r2": ridge_small(cat[f"{r}/train"], l_tr[:, j], cat[f"{r}/test"], l_te[:, j]),
                         "hgb_r2": hgb_small(cat[f"{r}/train"], l_tr[:, j], cat[f"{r}/test"], l_te[:, j], seed)}
        reps[r] = {f"{target}_r2": by[target]["ridge_r2"] for target in TARGETS[:2]}
        reps[r]["by_label"] = by
    # checks
    checks = {
        "shuffle": {"what": "full, logg permuted among train spectra of the same magnitude bin",
                    "logg_r2": reps["full"].pop("logg_shuffled_r2"),
                    "logg_r2_unshuffled": reps["full"]["logg_r2"]},
        "mask_only": {"what": "Ridge on the bad-pixel counts per reason (n_bad_flux, n_bad_error, n_masked)",
                      "logg_r2": ridge_small(cat["counts/train"], y_tr[:, 0], cat["counts/test"], y_te[:, 0])},
    }
    reps["S1"].pop("logg_shuffled_r2", None)
    for r in _BIG:
        reps[r].pop("logg_shuffled_alpha", None)
    cv = {"what": "full, fitted without one magnitude bin and scored on it (from per-bin statistics)",
          "mag_edges": [float(e) for e in edges], "per_group": []}
    for g in range(n_groups):
        row = {"group": g, "n": int(acc.n[g])}
        others = [k for k in range(n_groups) if k != g]
        sp = None
        for target in ("logg", "snr"):
            st = solutions[("full", target)][1]
            cs = st.cells(others)
            sp = spectrum(cs, precision) if sp is None else sp
            sol = solve_ridge(cs, ridge_alphas(cs, rel), max_df_fraction=cap, spec=sp)
            row[f"{target}_r2"] = r2_from_stats(st, [g], sol.coef, sol.intercept)
        cv["per_group"].append(row)
    for target in ("logg", "snr"):
        vals = [r[f"{target}_r2"] for r in cv["per_group"] if r[f"{target}_r2"] is not None]
        cv[f"mean_{target}_r2"] = float(np.mean(vals)) if vals else None
    checks["group_cv_by_magnitude"] = cv
    sol, st = solutions[("full", "logg")]
    cs = st.cells(range(n_groups))
    importance = pixel_importance(sol.coef, np.diag(cs.gram), cs.n)
    return {"representations": reps, "checks": checks, "pixel_importance": importance,
            "n_train": int(train.sum()), "n_test": int(is_test.sum())}


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
    }
    (out_dir / "audit.json").write_text(json.dumps(doc, indent=2))
    xr.Dataset({"importance": ("wavelength", imp)}, coords={"wavelength": wave}).to_zarr(
        out_dir / "pixel_importance.zarr", mode="w", zarr_format=3, consolidated=False)
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
