"""Capacity check of the α choice: logg an exact linear function of the flux.

Usage::

    python benchmarks/exact_linear.py [--n 6000] [--out DIR]

Simulates ``n`` spectra (4096 pixels), replaces logg by an exact linear
function of the observed flux (rescaled to [0, 5]), fits the model and
prints every family's frozen-test R² with the α chosen for ``global``. With
more train rows than pixels GCV should pick a small α and ``global`` should
reach R² ≥ 0.999; a cap on the degrees of freedom for every expert stopped it
near 0.98.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from snrmoe_dask.cluster import compute, dask_session
from snrmoe_dask.config import load_config
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.fit import fit_model
from snrmoe_dask.simulate import simulate_catalog, write_catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--out", type=Path, default=None, help="keep the catalog and model here (default: a temp dir)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="exact-linear-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides={"simulate": {"n": args.n}, "catalog": {"test_size": 1000},
                                 "fit": {"baselines": []}, "ceiling": {"enabled": False}})
    t0 = time.perf_counter()
    with dask_session(cfg.cluster) as client:
        sim = root / "sim.zarr"
        compute(write_catalog(simulate_catalog(cfg.simulate), sim, cfg.storage, overwrite=True), client=client,
                label="simulate", progress=False)
        ds = xr.open_zarr(sim, consolidated=False).load()
        w = np.random.default_rng(0).normal(size=ds.sizes["wavelength"])
        target = ds["flux"].values.astype(np.float64) @ w
        ds["logg"] = ("spectrum", 5.0 * (target - target.min()) / (target.max() - target.min()))
        cat = root / "exact.zarr"
        ds.attrs["simulated"] = "false"  # the labels are no longer the simulator's
        with dask.config.set(scheduler="threads"):
            ds.chunk({"spectrum": cfg.simulate.chunk_size}).to_zarr(cat, mode="w", zarr_format=3, consolidated=False)
        model = fit_model(cat, root / "model", cfg, client=client, progress=False, overwrite=True,
                          replace_model=True)  # this benchmark's own directory
        metrics = evaluate_model(model, cat, cfg, client=client, progress=False)
    g = model.index["global"]
    out = {"n": args.n, "train_rows": model.meta["train_rows"], "n_pixels": model.meta["n_pixels"],
           "global_alpha": float(model.experts["alpha"].values[g]), "global_df": float(model.experts["df"].values[g]),
           "r2": {f: metrics["models"][f]["r2"] for f in metrics["models"]}, "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=2))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
