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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daskml_ridge, load_rows, r2  # noqa: E402

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

    from sklearn.linear_model import Ridge

    ds = open_catalog(args.catalog)
    train = np.flatnonzero(ds["split"].values == TRAIN)[:args.rows]
    test = np.flatnonzero(ds["frozen_test"].values)
    x, xt = load_rows(ds, train), load_rows(ds, test)
    y, yt = ds["logg"].values[train], ds["logg"].values[test]
    ref = Ridge(alpha=args.alpha).fit(x, y)
    res = daskml_ridge(x, y, xt, yt, args.alpha, args.solver, args.max_iter, ref.coef_)
    print(json.dumps({**res, "sklearn_r2_same_rows": r2(yt, ref.predict(xt))}))


if __name__ == "__main__":
    main()
