"""Gates, line indices and PCA against direct NumPy / scikit-learn computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime
from scipy.special import softmax
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from snrmoe_dask.gates import (
    GATE_SPECS,
    Gate,
    GateSpec,
    Standardizer,
    entropy,
    fit_gate,
    mixture,
    mixture_sigma,
    mse_loss_grad,
)
from snrmoe_dask.lines import LINE_INDICES, LINE_NAMES, line_indices
from snrmoe_dask.metrics import route_oracle
from snrmoe_dask.mixture import apply_gate
from snrmoe_dask.pca import pca_from_stats
from snrmoe_dask.stats import CellAccumulator


# ------------------------------------------------------------ line indices
def test_line_index_of_a_box_line_is_its_depth():
    wave = np.linspace(7100, 8850, 4096)
    flux = np.full((3, wave.size), 50.0)
    band, blue, red = LINE_INDICES["li_NaI_8190"]
    in_band = (wave >= band[0]) & (wave <= band[1])
    flux[0, in_band] *= 1 - 0.3
    flux[1, in_band] *= 1 - 0.1
    good = np.ones(flux.shape, bool)
    good[1, in_band & (wave < 8185)] = False  # bad pixels leave the mean of a flat line unchanged
    idx = line_indices(flux, good, wave)
    k = LINE_NAMES.index("li_NaI_8190")
    np.testing.assert_allclose(idx[:, k], [0.3, 0.1, 0.0], atol=1e-12)
    # a continuum sloping linearly is matched by the mean of two symmetric side bands only approximately,
    # so check the general formula against a direct computation instead
    rng = np.random.default_rng(0)
    flux = rng.normal(100, 5, (4, wave.size))
    some_bad = rng.random(flux.shape) > 0.1
    flux[~some_bad] = np.nan  # a bad pixel's value never reaches a window's sum
    for good in (some_bad, np.ones(flux.shape, bool)):  # the masked path and the all-good one
        f = flux if good is some_bad else np.where(good, flux, 100.0)
        idx = line_indices(f, good, wave)
        for j, (b, lo, hi) in enumerate(LINE_INDICES.values()):
            for i in range(4):
                def mean(win, i=i, good=good, f=f):
                    sel = (wave >= win[0]) & (wave <= win[1]) & good[i]
                    return f[i, sel].mean()
                np.testing.assert_allclose(idx[i, j], 1 - mean(b) / (0.5 * (mean(lo) + mean(hi))), rtol=1e-10,
                                           atol=1e-12)


def test_line_index_off_the_grid_is_nan():
    wave = np.linspace(4000, 5000, 300)  # blue arm: none of the red-arm windows
    idx = line_indices(np.ones((2, 300)), np.ones((2, 300), bool), wave)
    assert np.isnan(idx).all()


# --------------------------------------------------------------------- PCA
def test_pca_from_statistics_matches_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 100.0
    acc = CellAccumulator(3, x[:50].mean(0), flush_rows=64, precision="float64")
    acc.add(x, np.zeros(500), rng.integers(0, 3, 500))
    out = pca_from_stats(acc.finalize(), 4)
    ref = PCA(4).fit(x)
    np.testing.assert_allclose(out["explained_variance"], ref.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(out["mean"], ref.mean_, rtol=1e-12)
    signs = np.sign(np.sum(out["components"] * ref.components_, axis=1))
    np.testing.assert_allclose(out["components"], ref.components_ * signs[:, None], atol=1e-9)


# ------------------------------------------------------------ mixture maths
def test_mixture_sigma_and_entropy_against_loops():
    rng = np.random.default_rng(2)
    w = softmax(rng.normal(size=(20, 4)), axis=1)
    pred = rng.normal(size=(20, 4))
    var = rng.uniform(0.1, 1, 4)
    mean = np.array([sum(w[i, k] * pred[i, k] for k in range(4)) for i in range(20)])
    sig = np.array([np.sqrt(sum(w[i, k] * (var[k] + (pred[i, k] - mean[i]) ** 2) for k in range(4)))
                    for i in range(20)])
    np.testing.assert_allclose(mixture(w, pred), mean)
    np.testing.assert_allclose(mixture_sigma(w, pred, var), sig)
    np.testing.assert_allclose(entropy(w), [-sum(p * np.log(p) for p in row) for row in w])
    assert entropy(np.eye(4)).max() == 0.0


# ------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", ["linear", "mlp", "temp"])
def test_mse_gradient_matches_finite_differences(kind):
    rng = np.random.default_rng(3)
    n, dp, dq, k = 40, 3, 2, 4
    xp, xq = rng.normal(size=(n, dp)), rng.normal(size=(n, dq))
    xa = np.hstack([xp, xq])
    pred, y = rng.normal(size=(n, k)), rng.normal(size=n)
    if kind == "linear":
        params = {"W": rng.normal(size=(k, dp + dq)), "b": rng.normal(size=k)}
    elif kind == "mlp":
        params = {"W0": rng.normal(size=(5, dp + dq)), "b0": rng.normal(size=5), "W1": rng.normal(size=(3, 5)),
                  "b1": rng.normal(size=3), "W2": rng.normal(size=(k, 3)), "b2": rng.normal(size=k)}
    else:
        params = {"W": rng.normal(size=(k, dp)), "b": rng.normal(size=k), "c": rng.normal(size=dq),
                  "d": np.array([0.3])}
    names = list(params)
    sizes = [params[p].size for p in names]

    def unpack(theta):
        out, i = {}, 0
        for p, s in zip(names, sizes):
            out[p] = theta[i:i + s].reshape(params[p].shape)
            i += s
        return out

    theta = np.concatenate([params[p].ravel() for p in names])
    loss = lambda t: mse_loss_grad(kind, unpack(t), names, xp, xa, xq, pred, y, 0.01)[0]  # noqa: E731
    _, grads = mse_loss_grad(kind, params, names, xp, xa, xq, pred, y, 0.01)
    analytic = np.concatenate([grads[p].ravel() for p in names])
    numeric = approx_fprime(theta, loss, 1e-6)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------- the gates
def _table(n=900, seed=4):
    """Quality and physical features that carry the class; experts good on their own class."""
    rng = np.random.default_rng(seed)
    snr_b = rng.integers(0, 4, n)
    phys_b = rng.integers(0, 9, n)
    quality = np.exp(rng.normal(size=(n, 10)) * 0.3 + snr_b[:, None] * 0.5)  # positive, like error statistics
    physical = np.column_stack([phys_b // 3 + 0.3 * rng.normal(size=n), phys_b % 3 + 0.3 * rng.normal(size=n),
                                rng.normal(size=(n, 3))])
    y = rng.normal(size=n)
    return {"quality": quality, "physical": physical}, snr_b, phys_b, y, rng


def _manual_weights(gate: Gate, table) -> np.ndarray:
    """Gate weights from first principles: log -> impute -> standardise -> kernel -> softmax."""
    z = {}
    for name in gate.spec.inputs:
        sc = gate.scalers[name]
        x = table[name].astype(np.float64).copy()
        for j in range(x.shape[1]):
            if sc.log[j]:
                x[:, j] = np.log(x[:, j])
            x[~np.isfinite(x[:, j]), j] = sc.median[j]
        z[name] = (x - sc.mean) / sc.scale
    xa = np.hstack([z[name] for name in gate.spec.inputs])
    p = gate.params
    if gate.kind == "linear":
        logits = xa @ p["W"].T + p["b"]
    elif gate.kind == "mlp":
        h = np.tanh(xa @ p["W0"].T + p["b0"])
        h = np.tanh(h @ p["W1"].T + p["b1"])
        logits = h @ p["W2"].T + p["b2"]
    else:
        tau = 1 + np.log1p(np.exp(z["quality"] @ p["c"] + p["d"][0]))
        logits = (z["physical"] @ p["W"].T + p["b"]) / tau[:, None]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", list(GATE_SPECS))
def test_every_gate_against_a_direct_numpy_mixture(name):
    spec = GATE_SPECS[name]
    table, snr_b, phys_b, y, rng = _table()
    k = {"oracle_snr": 4, "oracle_phys": 9, "hierarchical": 36}[spec.family]
    labels = {"oracle_snr": snr_b, "oracle_phys": phys_b, "hierarchical": phys_b * 4 + snr_b}[spec.family]
    pred = rng.normal(size=(y.size, k)) * 0.5
    pred[np.arange(y.size), labels] = y + 0.05 * rng.normal(size=y.size)  # the right expert is nearly exact
    gate = fit_gate(spec, table, labels, pred, y, n_classes=k, max_iter=100)
    w_manual = _manual_weights(gate, table)
    np.testing.assert_allclose(gate.weights(table), w_manual, rtol=1e-9, atol=1e-12)
    glob = rng.normal(size=y.size)
    out = apply_gate(gate, table, pred, glob, np.full(k, 0.1), 0.2, tau=0.3)
    manual = np.where(w_manual.max(1) < 0.3, glob, np.sum(w_manual * pred, axis=1))
    np.testing.assert_allclose(out["yhat"], manual, rtol=1e-9, atol=1e-12)
    # a useful gate: it beats the equal-weight mixture on these rows
    mse_gate = np.mean((mixture(w_manual, pred) - y) ** 2)
    assert mse_gate < np.mean((pred.mean(axis=1) - y) ** 2)


def test_logreg_gate_is_sklearn_logistic_regression():
    table, snr_b, _, y, rng = _table()
    pred = rng.normal(size=(y.size, 4))
    gate = fit_gate(GATE_SPECS["deploy_snr_logreg"], table, snr_b, pred, y, n_classes=4)
    z = Standardizer.fit(table["quality"]).transform(table["quality"])
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(z, snr_b).predict_proba(z)
    np.testing.assert_allclose(gate.weights(table), ref, atol=1e-5)


def test_perfect_routing_reproduces_the_oracle():
    rng = np.random.default_rng(5)
    pred = rng.normal(size=(200, 4))
    labels = rng.integers(0, 4, 200)
    np.testing.assert_array_equal(mixture(np.eye(4)[labels], pred), route_oracle(pred, labels))
    # a gate whose input *is* the true bin learns (almost) one-hot weights
    table = {"quality": np.eye(4)[labels] * 10 + 1.0}
    spec = GateSpec("perfect", "oracle_snr", ("quality",), "logreg")
    gate = fit_gate(spec, table, labels, pred, rng.normal(size=200), n_classes=4, logreg_c=1e4)
    out = apply_gate(gate, table, pred, np.zeros(200), np.ones(4), 1.0, tau=0.5)
    np.testing.assert_allclose(out["yhat"], route_oracle(pred, labels), atol=1e-3)
    assert not out["fallback"].any()


def test_fallback_below_tau_uses_global_and_its_variance():
    table, snr_b, _, y, rng = _table(300)
    pred = rng.normal(size=(300, 4))
    gate = fit_gate(GATE_SPECS["deploy_snr_logreg"], table, snr_b, pred, y, n_classes=4)
    glob = rng.normal(size=300)
    out = apply_gate(gate, table, pred, glob, np.ones(4), 0.25, tau=1.01)  # max p < 1.01 always
    assert out["fallback"].all()
    np.testing.assert_array_equal(out["yhat"], glob)
    np.testing.assert_allclose(out["sigma"], 0.5)


def test_mse_gate_does_not_lose_to_its_warm_start():
    table, snr_b, _, y, rng = _table()
    pred = rng.normal(size=(y.size, 4))
    pred[np.arange(y.size), snr_b] = y
    pred[:, 0] = 0.5 * y + 0.5 * pred[:, 0]  # an expert that is half right everywhere: soft weights pay
    cls = fit_gate(GATE_SPECS["deploy_snr_logreg"], table, snr_b, pred, y, n_classes=4)
    reg = fit_gate(GATE_SPECS["deploy_snr_regress"], table, snr_b, pred, y, n_classes=4, l2=0.0)
    mse = [np.mean((mixture(g.weights(table), pred) - y) ** 2) for g in (cls, reg)]
    assert mse[1] <= mse[0] + 1e-12
    assert reg.info["optimizer"]["iterations"] > 0


def test_gate_with_one_class_present_is_constant():
    table, _, _, y, rng = _table(100)
    labels = np.full(100, 2)
    gate = fit_gate(GATE_SPECS["deploy_snr_logreg"], table, labels, rng.normal(size=(100, 4)), y, n_classes=4)
    np.testing.assert_allclose(gate.weights(table)[:, 2], 1.0, atol=1e-12)


def test_gate_arrays_round_trip():
    table, snr_b, phys_b, y, rng = _table(300)
    for name in ("deploy_dual_concat", "deploy_dual_temp"):
        spec = GATE_SPECS[name]
        gate = fit_gate(spec, table, phys_b, rng.normal(size=(300, 9)), y, n_classes=9, max_iter=20)
        back = Gate.from_arrays(spec, gate.kind, 9, gate.to_arrays())
        np.testing.assert_array_equal(back.weights(table), gate.weights(table))


def test_gates_fitted_in_parallel_equal_the_serial_fits(fitted):
    """fit_gates fits the gates concurrently (gates.n_jobs); the gates and their selection scores do not depend
    on how many at once, and equal the ones the fit stored."""
    import xarray as xr

    from snrmoe_dask.mixture import fit_gates

    model, cfg, model_dir = fitted
    t = xr.open_zarr(model_dir / "gate_table.zarr", consolidated=False).load()
    use = t["gate_fit"].values | t["select"].values
    args = ({"quality": t["quality"].values[use], "physical": t["physical"].values[use]},
            t["expert_pred"].values[use], t["y"].values[use], t["snr_bin"].values[use], t["phys_bin"].values[use],
            t["select"].values[use])
    runs = [fit_gates(model, *args, cfg.gates.model_copy(update={"n_jobs": k})) for k in (1, 3)]
    (g1, s1, d1), (g3, s3, d3) = runs
    assert list(g1) == list(g3) == list(GATE_SPECS) and d1 == d3 == model.default_gate
    for name in GATE_SPECS:
        assert s1[name] == s3[name]
        assert s1[name]["r2"] == pytest.approx(model.meta["gates"]["selection"][name]["r2"], abs=1e-12)
        for k, v in g1[name].params.items():
            np.testing.assert_array_equal(v, g3[name].params[k], err_msg=f"{name}.{k}")
