"""One dask-ml peer fit, in its own process so the caller can cap its wall time.

    python benchmarks/peer_daskml.py CATALOG --rows 20000 --alpha A --solver admm [--max-iter 100]

Loads the first ``--rows`` train rows (bad pixels imputed, float64, centred),
fits ``dask_ml.linear_model.LinearRegression(penalty="l2")`` at the Ridge
problem of ``alpha`` (dask-glm minimises sum((y - X b)^2) + ||b||^2 / (2 C) on
centred data, so C = 1 / (2 alpha)), with scikit-learn's Ridge at the same
alpha and rows as the reference, and prints one JSON line: seconds, R² on the
frozen test rows, and the coefficients' distance from scikit-learn's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import _load, _r2  # noqa: E402

from snrmoe_dask.catalog import open_catalog  # noqa: E402
from snrmoe_dask.split import TRAIN  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("catalog")
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--solver", default="admm", help="dask-ml's default is admm")
    ap.add_argument("--max-iter", type=int, default=100, help="dask-ml's default is 100")
    args = ap.parse_args()

    import dask
    import dask.array as da
    from dask_ml.linear_model import LinearRegression
    from sklearn.linear_model import Ridge

    ds = open_catalog(args.catalog)
    train = np.flatnonzero(ds["split"].values == TRAIN)[:args.rows]
    test = np.flatnonzero(ds["frozen_test"].values)
    x, xt = _load(ds, train), _load(ds, test)
    y, yt = ds["logg"].values[train], ds["logg"].values[test]
    ref = Ridge(alpha=args.alpha).fit(x, y)
    xm, ym = x.mean(axis=0), y.mean()
    x -= xm
    lr = LinearRegression(penalty="l2", C=0.5 / args.alpha, solver=args.solver, max_iter=args.max_iter,
                          fit_intercept=False)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        lr.fit(da.from_array(x, chunks=(8192, x.shape[1])), da.from_array(y - ym, chunks=8192))
    seconds = time.perf_counter() - t0
    coef = np.asarray(lr.coef_)
    print(json.dumps({"solver": args.solver, "max_iter": args.max_iter, "rows": int(train.size), "seconds": seconds,
                      "r2": _r2(yt, (xt - xm) @ coef + ym),
                      "sklearn_r2_same_rows": _r2(yt, ref.predict(xt)),
                      "coef_rel_err_vs_sklearn": float(np.abs(coef - ref.coef_).max() / np.abs(ref.coef_).max())}))


if __name__ == "__main__":
    main()
