"""The leakage audit: finds a planted leak, passes a clean error vector, statistics-based CV is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_raw
from sklearn.linear_model import Ridge

from snrmoe_dask.audit import audit_catalog, write_audit
from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.cli import main
from snrmoe_dask.config import load_config
from snrmoe_dask.leakage import (
    AuditAccumulator,
    AuditPlan,
    AuditStats,
    audit_shifts,
    r2_from_stats,
    representations_block,
)
from snrmoe_dask.metrics import r2_score


def _catalog(path, leak: bool, n=2400, p=64, seed=0):
    rng = np.random.default_rng(seed)
    logg = rng.uniform(0, 5, n)
    mag = rng.uniform(20.5, 22.5, n)
    level = 10 ** (0.2 * (mag - 20.5))  # fainter -> larger errors: S/N information
    error = level[:, None] * rng.uniform(0.9, 1.1, (n, p))
    if leak:
        error[:, [5, 17, 40]] *= (1 + 0.15 * logg)[:, None]  # the planted leak: 3 pixels encode logg
    flux = 100 + rng.normal(size=(n, p)) * error
    snr = np.median(100 / error, axis=1)
    return write_raw(path, flux, error, chunk=500, logg=logg, mag=mag, snr=snr,
                     teff=rng.uniform(4000, 6000, n), mh=rng.uniform(-1, 0, n))


@pytest.fixture(scope="module")
def cfg():
    # float64 products: the statistics-based fits are then comparable with scikit-learn to 1e-6
    return load_config(overrides={"catalog": {"test_size": 400}, "cluster": {"scheduler": "threads"},
                                  "fit": {"precision": "float64"}})


@pytest.mark.parametrize("leak", [True, False])
def test_audit_finds_a_planted_leak_and_passes_a_clean_vector(tmp_path, cfg, leak):
    ds = open_catalog(_catalog(tmp_path / "c.zarr", leak), config=cfg.catalog)
    doc = write_audit(audit_catalog(ds, cfg, progress=False), tmp_path / "audit", ds, cfg)
    full = doc["representations"]["full"]
    assert full["snr_r2"] > 0.9
    if leak:
        assert full["logg_r2"] > 0.3 and not full["pass"]
        top = {round(t["wavelength"], 3) for t in doc["top_pixels"][:3]}
        wave = ds["wavelength"].values
        assert top == {round(float(wave[i]), 3) for i in (5, 17, 40)}  # the importance points at the leak
        assert doc["checks"]["shuffle"]["logg_r2"] < 0.05  # permuting logg within magnitude bins kills it
    else:
        assert full["logg_r2"] < 0.05 and full["pass"]
    s3b = doc["representations"]["S3b"]
    assert s3b["snr_r2"] > 0.9
    assert set(doc["representations"]) == {"full", "S1", "S2", "S3b", "S4"}
    assert all(set(r) >= {"logg_r2", "snr_r2", "pass"} for r in doc["representations"].values())
    assert json.loads((tmp_path / "audit" / "audit.json").read_text()) == doc
    assert "| full |" in (tmp_path / "audit" / "audit.md").read_text()


def test_full_representation_matches_sklearn_ridge(tmp_path, cfg):
    """The statistics-based `full` fit equals sklearn's Ridge at the same alpha on the same rows."""
    ds = open_catalog(_catalog(tmp_path / "c.zarr", True), config=cfg.catalog)
    res = audit_catalog(ds, cfg, progress=False)
    mem = ds.load()
    train = mem["split"].values == 0
    test = mem["frozen_test"].values
    x = representations_block(mem["error"].values, mem["flux"].values, None, None)["full"]
    alpha = res["representations"]["full"]["logg_alpha"]
    ref = Ridge(alpha=alpha).fit(x[train], mem["logg"].values[train])
    r2 = r2_score(mem["logg"].values[test], ref.predict(x[test]))
    np.testing.assert_allclose(res["representations"]["full"]["logg_r2"], r2, rtol=1e-6)


def test_r2_from_statistics_equals_direct_r2():
    rng = np.random.default_rng(1)
    p = 6
    x = rng.uniform(1, 9, (300, p))  # error vectors: positive, every pixel good
    y = x @ rng.normal(size=p) + rng.normal(size=300)
    group = rng.integers(0, 3, 300)
    flux = np.full_like(x, 100.0)
    shifts = audit_shifts(flux, x, None, group, 3)
    acc = AuditAccumulator(shifts, flush_rows=64, precision="float64")
    feats = np.zeros((300, 40))
    acc.add(flux, x, None, feats, np.arange(300), group, np.column_stack([y, 2 * y, -y]), np.zeros((300, 5)))
    st = acc.finalize()
    w, b = rng.normal(size=p), 0.7
    sel = group == 2
    for target, scale in (("logg", 1.0), ("snr", 2.0), ("logg_shuffled", -1.0)):
        xe = x[sel].astype(np.float32).astype(np.float64)  # the representation is float32
        direct = r2_score(scale * y[sel], xe @ w + b)
        np.testing.assert_allclose(r2_from_stats(st.stats("full", target), [2], w, b), direct, rtol=1e-10)


def test_a_block_carries_only_its_audit_rows():
    """What a fold task receives (and the pass's graph carries) is the audit rows of its block alone."""
    group = np.array([-1, 0, -1, 2, 1, -1, -1, -1])
    targets = np.arange(24.0).reshape(8, 3)
    labels = np.arange(40.0).reshape(8, 5)
    plan = AuditPlan(group, targets, labels, 3, [0.0, 1.0], 8, 64, "float32")
    rows, g, t, lab = plan.block(2, 6)
    np.testing.assert_array_equal(rows, [1, 2])  # catalog rows 3 and 4
    np.testing.assert_array_equal(g, [2, 1])
    np.testing.assert_array_equal(t, targets[[3, 4]])
    np.testing.assert_array_equal(lab, labels[[3, 4]])
    assert plan.block(5, 8) is None


def test_audit_statistics_of_two_chains_add_to_those_of_one(tmp_path):
    """Chains that saw different first blocks (other shifts) merge exactly, and survive a checkpoint."""
    rng = np.random.default_rng(2)
    p = 5
    e = rng.uniform(1, 3, (400, p))
    flux = np.full_like(e, 50.0)
    group = rng.integers(0, 2, 400)
    y = np.column_stack([rng.normal(size=400), rng.normal(size=400), rng.normal(size=400)])
    feats, labels = np.zeros((400, 40)), np.zeros((400, 5))

    def run(blocks):
        out = None
        for lo, hi in blocks:
            acc = AuditAccumulator(audit_shifts(flux[lo:hi], e[lo:hi], None, group[lo:hi], 2), 32, "float64")
            acc.add(flux[lo:hi], e[lo:hi], None, feats[lo:hi], np.arange(hi - lo), group[lo:hi], y[lo:hi],
                    labels[lo:hi])
            st = acc.finalize()
            out = st if out is None else out.iadd(st)
        return out

    one, two = run([(0, 400)]), run([(0, 150), (150, 400)])
    two.to_zarr(tmp_path)
    two = AuditStats.from_zarr(tmp_path)
    for target in ("logg", "snr", "logg_shuffled"):
        a, b = one.stats("S1", target).reshift(two.big["S1"].shift), two.stats("S1", target)
        for name in ("n", "sx", "sy", "syy", "xtx", "xty"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.sort(two.rows[:, 1]), np.sort(one.rows[:, 1]))


def test_audit_cli(tmp_path, capsys):
    path = _catalog(tmp_path / "c.zarr", True, n=1200)
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("catalog: {test_size: 200}\n")
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--config", str(cfgf),
                 "--scheduler", "threads"]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and (tmp_path / "a" / "pixel_importance.zarr").exists()


def test_small_representations_are_regressed_on_the_routing_labels_linearly_and_not(fit_catalog, cfg, tmp_path):
    """The noiseless error model's quality statistics reveal the routing labels, and nonlinearly more so."""
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    reps = audit_catalog(ds, cfg, progress=False)["representations"]
    for name in ("S2", "S3b", "S4"):
        assert set(reps[name]["by_label"]) == {"logg", "snr", "teff", "mh", "mag"}
    s3b = reps["S3b"]["by_label"]
    assert s3b["mag"]["hgb_r2"] > 0.5  # the error vector's level is the star's brightness
    assert s3b["teff"]["hgb_r2"] > 0.3  # its shape follows the continuum of the star's temperature
    noisy = reps["S4"]["by_label"]["teff"]  # one number (the norm) cannot say much about the temperature
    assert noisy["hgb_r2"] < s3b["teff"]["hgb_r2"]
    assert s3b["logg"]["ridge_r2"] == pytest.approx(reps["S3b"]["logg_r2"])  # the same fit, one source
    doc = write_audit({"representations": reps, "checks": {"shuffle": {"logg_r2": 0.0}, "mask_only": {"logg_r2": 0.0},
                                                           "group_cv_by_magnitude": {"mean_logg_r2": 0.0,
                                                                                     "mean_snr_r2": 1.0}},
                       "pixel_importance": np.ones(ds.sizes["wavelength"]), "n_train": 1, "n_test": 1},
                      tmp_path / "a", ds, cfg)
    s3b_doc = doc["representations"]["S3b"]
    assert s3b_doc["pass_nonlinear"] == (s3b["logg"]["hgb_r2"] < 0.05 and s3b["snr"]["hgb_r2"] >= 0.5)
    assert "pass with gradient boosting" in (tmp_path / "a" / "audit.md").read_text()


def test_the_audit_riding_three_chains_equals_one_chain(tmp_path, cfg):
    """Chains merge pairwise (a tree); the audit's statistics and rows do not depend on how many there are."""
    import dask

    from snrmoe_dask.leakage import audit_plan
    from snrmoe_dask.reduce import one_pass

    ds = open_catalog(_catalog(tmp_path / "c.zarr", True, n=1500), config=cfg.catalog)
    n = ds.sizes["spectrum"]
    plan = audit_plan(ds, cfg)
    out = {}
    for chains in (1, 3):
        g = one_pass(ds, np.zeros(n), np.full(n, -1), n_cells=1, chains=chains, precision="float64", audit=plan)
        with dask.config.set(scheduler="threads"):
            (out[chains],) = dask.compute(g.audit)
    one, three = out[1], out[3]
    for target in ("logg", "snr", "logg_shuffled"):
        a, b = one.stats("full", target), three.stats("full", target)
        for name in ("n", "sx", "sy", "syy", "xtx", "xty"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-6)
    order = np.lexsort(one.rows.T[::-1])
    np.testing.assert_allclose(three.rows[np.lexsort(three.rows.T[::-1])], one.rows[order])


def test_the_audits_solves_two_at_a_time_equal_its_solves_in_turn(tmp_path, cfg):
    """``audit_solutions(at_once=2)`` solves the representations' and the group CV's Gram matrices on two
    threads, each in its own buffers: the same alphas, coefficients, importance and group CV as in turn."""
    import dask

    from snrmoe_dask.leakage import audit_plan, audit_solutions
    from snrmoe_dask.reduce import one_pass

    ds = open_catalog(_catalog(tmp_path / "c.zarr", True, n=1500), config=cfg.catalog)
    n = ds.sizes["spectrum"]
    plan = audit_plan(ds, cfg)
    g = one_pass(ds, np.zeros(n), np.full(n, -1), n_cells=1, chains=1, precision="float64", audit=plan)
    with dask.config.set(scheduler="threads"):
        (st,) = dask.compute(g.audit)
    one, two = audit_solutions(st, plan.n_groups, cfg.fit), audit_solutions(st, plan.n_groups, cfg.fit, at_once=2)
    assert one["solutions"].keys() == two["solutions"].keys() and len(one["solutions"]) == 6
    for key, a in one["solutions"].items():
        b = two["solutions"][key]
        assert a["alpha"] == b["alpha"], key
        np.testing.assert_allclose(b["coef"], a["coef"], rtol=1e-9, atol=1e-12 * np.abs(a["coef"]).max())
    np.testing.assert_allclose(two["importance"], one["importance"], rtol=1e-9)
    assert len(one["group_cv"]) == len(two["group_cv"]) > 1
    for a, b in zip(one["group_cv"], two["group_cv"]):
        assert a["group"] == b["group"] and a["n"] == b["n"]
        np.testing.assert_allclose([b["logg_r2"], b["snr_r2"]], [a["logg_r2"], a["snr_r2"]], rtol=1e-9)
