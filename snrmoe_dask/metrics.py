"""Scoring on the frozen test subset.

:func:`expert_predictions` projects selected rows onto every expert in one
lazy pass over those rows only. :func:`route_oracle` picks, for each row, the
expert its true labels route it to. :func:`regression_metrics` is the
``metrics.json`` block of one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr

from .catalog import good_pixel_mask
from .stats import impute_bad_pixels

__all__ = ["expert_predictions", "predict_block", "route_oracle", "r2_score", "regression_metrics", "r2_table"]


def predict_block(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, coef: np.ndarray,
                  intercept: np.ndarray) -> np.ndarray:
    """Every expert's prediction for a block: ``impute(flux) @ coef.T + intercept``, shape (n, E)."""
    good = good_pixel_mask(flux, error, mask)
    x = impute_bad_pixels(flux, good).astype(np.float64)
    return x @ coef.T + intercept[None, :]


def expert_predictions(ds: xr.Dataset, coef: np.ndarray, intercept: np.ndarray,
                       rows: np.ndarray | None = None) -> da.Array:
    """Lazy predictions of every expert for ``rows`` (sorted integer positions).

    Returns
    -------
    dask.array.Array of shape (len(rows), E), float64
    """
    sub = ds if rows is None else ds.isel(spectrum=np.asarray(rows))
    flux, error = sub["flux"].data, sub["error"].data
    mask = sub["mask"].data if "mask" in sub else None
    coef = np.asarray(coef, np.float64)
    intercept = np.asarray(intercept, np.float64)
    n_exp = coef.shape[0]

    def _kernel(f, e, *m):
        return predict_block(f, e, m[0] if m else None, coef, intercept)

    args = [flux, error] + ([mask] if mask is not None else [])
    return da.map_blocks(_kernel, *args, dtype=np.float64, chunks=(flux.chunks[0], (n_exp,)), name="experts-predict")


def route_oracle(pred: np.ndarray, expert_index: np.ndarray) -> np.ndarray:
    """Pick ``pred[i, expert_index[i]]`` for each row."""
    return pred[np.arange(pred.shape[0]), expert_index]


def r2_score(y: np.ndarray, yhat: np.ndarray) -> float | None:
    """Coefficient of determination; ``None`` for fewer than 2 rows or constant y."""
    y, yhat = np.asarray(y, np.float64), np.asarray(yhat, np.float64)
    if y.size < 2:
        return None
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0:
        return None
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot


def regression_metrics(y: np.ndarray, yhat: np.ndarray, snr_bin: np.ndarray, phys_bin: np.ndarray,
                       snr_names: Sequence[str], phys_names: Sequence[str]) -> dict:
    """The ``M`` block of ``metrics.json`` (r2, mae, rmse, per S/N bin, per physical bin)."""
    err = np.asarray(yhat) - np.asarray(y)
    out = {
        "r2": r2_score(y, yhat),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "per_snr_bin": {},
        "per_phys_bin": {},
    }
    for key, bins, names in (("per_snr_bin", snr_bin, snr_names), ("per_phys_bin", phys_bin, phys_names)):
        for i, name in enumerate(names):
            sel = bins == i
            out[key][name] = {"r2": r2_score(y[sel], yhat[sel]), "n": int(sel.sum())}
    return out


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:6.3f}"


def _pm(v: float | None, e: float | None) -> str:
    return _fmt(v).strip() if v is None or e is None else f"{v:.3f} ± {e:.3f}"


def r2_table(metrics: dict) -> str:
    """Markdown table of R² (± bootstrap standard error) overall and per S/N bin, one row per model.

    Gates also show ρ against their oracle (``null`` where the oracle does
    not measurably beat global).
    """
    models = metrics["models"]
    bins = list(next(iter(models.values()))["per_snr_bin"])
    head = "| model | R² | MAE | RMSE | " + " | ".join(f"R² {b} (n={models['global']['per_snr_bin'][b]['n']})"
                                                      for b in bins) + " | ρ (vs oracle) |"
    lines = [head, "|" + "---|" * (5 + len(bins))]
    for name, m in models.items():
        cells = " | ".join(_pm(m["per_snr_bin"][b]["r2"], m["per_snr_bin"][b].get("r2_se")) for b in bins)
        rho = ""
        if "oracle" in m:
            rho = f"{_pm(m.get('rho'), m.get('rho_se')) if m.get('rho') is not None else 'null'} ({m['oracle']})"
        lines.append(f"| {name} | {_pm(m['r2'], m.get('r2_se'))} | {m['mae']:.3f} | {m['rmse']:.3f} | {cells} | "
                     f"{rho} |")
    return "\n".join(lines)
