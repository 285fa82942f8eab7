from __future__ import annotations

import json

import dask
import numpy as np
import pytest
from conftest import fit_cfg, small_sim_config, train_cells, write_raw, write_sim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Ridge

from snrmoe_dask.baselines import BASELINES
from snrmoe_dask.bins import cell_index, phys_bin, snr_bin
from snrmoe_dask.catalog import bin_edges, good_pixel_mask, open_catalog
from snrmoe_dask.cli import main
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.experts import FAMILIES
from snrmoe_dask.fit import fit_model
from snrmoe_dask.gates import GATE_SPECS
from snrmoe_dask.reduce import one_pass
from snrmoe_dask.split import TRAIN
from snrmoe_dask.stats import SufficientStats, impute_bad_pixels

_cfg = fit_cfg


def test_every_expert_matches_sklearn(fit_catalog, fitted):
    model, cfg, _ = fitted
    ds = open_catalog(fit_catalog, config=cfg.catalog).load()
    flux, err = ds["flux"].values, ds["error"].values
    x = impute_bad_pixels(flux, good_pixel_mask(flux, err)).astype(np.float64)
    y = ds["logg"].values
    e = model.edges
    cells = cell_index(phys_bin(ds["teff"].values, ds["mh"].values, e["teff_edges"], e["mh_edges"]),
                       snr_bin(ds["snr"].values, e["snr_edges"]), 4)
    train = ds["split"].values == TRAIN
    coef, icpt, alpha = (model.experts[v].values for v in ("coef", "intercept", "alpha"))
    checked = 0
    for i, spec in enumerate(model.specs):
        if model.meta["experts"][i]["fallback"]:
            continue
        rows = train & np.isin(cells, spec.cells)
        target = y[rows]
        prior = np.zeros(x.shape[1])
        if spec.shrink:  # toward the parent refitted without this cell's rows (sklearn on those rows)
            j = model.index[spec.parent]
            parent = model.specs[j]
            rest = train & np.isin(cells, parent.cells) & ~np.isin(cells, spec.cells)
            prior = (coef[j] if model.meta["experts"][j]["fallback"] or rest.sum() < 2
                     else Ridge(alpha=alpha[j]).fit(x[rest], y[rest]).coef_)
            target = target - x[rows] @ prior
        ref = Ridge(alpha=alpha[i]).fit(x[rows], target)
        scale = np.abs(ref.coef_ + prior).max()
        np.testing.assert_allclose(coef[i], ref.coef_ + prior, rtol=1e-6, atol=1e-9 * scale, err_msg=spec.name)
        np.testing.assert_allclose(icpt[i], ref.intercept_, rtol=1e-6, atol=1e-9, err_msg=spec.name)
        assert model.experts["n_rows"].values[i] == rows.sum()
        checked += 1
    n_fallback = sum(bool(e["fallback"]) for e in model.meta["experts"])
    assert checked == len(model.specs) - n_fallback
    assert checked >= 60  # of 86; only bright (H) cells of 3000 spectra are too small


def _stats(ds, chunk, chains, precision="float64"):
    ds = ds.chunk({"spectrum": chunk})
    cells = train_cells(ds)
    stats, _, _, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=chains, flush_rows=64,
                        precision=precision)
    with dask.config.set(scheduler="threads"):
        return stats.compute()


def _assert_same(a: SufficientStats, b: SufficientStats, rtol=1e-9, xbar_rtol=1e-12):
    np.testing.assert_array_equal(a.n, b.n)
    for k in np.flatnonzero(a.n):
        ca, cb = a.cells([k]), b.cells([k])
        scale = np.abs(ca.gram).max()
        np.testing.assert_allclose(cb.gram, ca.gram, rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(cb.xty, ca.xty, rtol=rtol, atol=rtol * np.abs(ca.xty).max())
        np.testing.assert_allclose(cb.xbar, ca.xbar, rtol=xbar_rtol)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(97, 3000), chains=st.integers(1, 3))
def test_statistics_are_chunk_invariant(fit_catalog, chunk, chains):
    ds = open_catalog(fit_catalog)
    ref = _stats(ds, 256, 1)
    _assert_same(ref, _stats(ds, chunk, chains))


def test_statistics_of_two_halves_add_up(fit_catalog):
    ds = open_catalog(fit_catalog)
    whole = _stats(ds, 256, 2)
    edges = bin_edges(ds)  # the halves must use the whole catalog's edges

    def half(sl):
        sub = ds.isel(spectrum=sl)
        cells = cell_index(phys_bin(sub["teff"].values, sub["mh"].values, edges["teff_edges"], edges["mh_edges"]),
                           snr_bin(sub["snr"].values, edges["snr_edges"]), 4)
        cells = np.where(sub["split"].values == TRAIN, cells, -1)
        stats, _, _, _ = one_pass(sub, sub["logg"].values, cells, n_cells=36, chains=1, precision="float64")
        with dask.config.set(scheduler="threads"):
            return stats.compute()

    _assert_same(whole, half(slice(0, 1300)) + half(slice(1300, None)))


def test_float32_and_float64_paths_agree(fit_catalog):
    ds = open_catalog(fit_catalog)
    # float32 sums of x - c carry ~1e-7 relative error into the means
    _assert_same(_stats(ds, 256, 1, "float64"), _stats(ds, 256, 1, "float32"), rtol=2e-5, xbar_rtol=1e-6)


def test_exactly_linear_catalog_is_recovered(tmp_path):
    rng = np.random.default_rng(11)
    n, p = 3000, 40
    flux = rng.normal(100, 10, (n, p)).astype(np.float32)
    w = rng.normal(0, 0.01, p)
    logg = flux.astype(np.float64) @ w + 2.0
    bad = rng.choice(n, 60, replace=False)
    flux[bad[:30]] = np.nan  # whole spectra lost ...
    flux[bad[30:], : p // 2 + 1] = np.inf  # ... or with too few good pixels: left out and counted
    path = write_raw(tmp_path / "lin.zarr", flux, np.full((n, p), 10, np.float32), chunk=500, logg=logg,
                     teff=rng.uniform(3500, 6500, n), mh=rng.uniform(-2.5, 0.7, n), snr=rng.uniform(1, 9, n))
    cfg = _cfg()
    with dask.config.set(scheduler="threads"):
        model = fit_model(path, tmp_path / "m", cfg, progress=False)
        metrics = evaluate_model(model, path, cfg, progress=False)
    assert metrics["models"]["global"]["r2"] > 0.999
    assert metrics["models"]["oracle_snr"]["r2"] > 0.99
    ds = open_catalog(path, config=cfg.catalog)
    is_bad = np.zeros(n, bool)
    is_bad[bad] = True
    assert model.meta["train_rows_excluded_unusable"] == int((is_bad & (ds["split"].values == TRAIN)).sum()) > 0
    frozen = ds["frozen_test"].values
    assert metrics["n_test_excluded_unusable"] == int((is_bad & frozen).sum())
    assert metrics["n_test"] == int((~is_bad & frozen).sum())


def test_metrics_contract_and_model_store(fit_catalog, fitted):
    model, cfg, model_dir = fitted
    with dask.config.set(scheduler="threads"):
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
    assert metrics["n_test"] == 250
    assert set(metrics["models"]) == set(FAMILIES) | set(GATE_SPECS) | set(BASELINES)
    assert set(metrics["gate_entropy_by_snr_bin"]) == set(GATE_SPECS)
    for name in GATE_SPECS:
        m = metrics["models"][name]
        assert m["oracle"] in FAMILIES and "rho" in m
        conf = np.array(m["gate_confusion"]["matrix"])
        assert conf.sum() == 250 and conf.shape[0] == len(m["gate_confusion"]["labels"])
        assert set(metrics["gate_entropy_by_snr_bin"][name]) == {"X", "L", "M", "H"}
    assert model.default_gate in GATE_SPECS
    for m in metrics["models"].values():
        assert {"r2", "mae", "rmse", "per_snr_bin", "per_phys_bin"} <= set(m)
        assert set(m["per_snr_bin"]) == {"X", "L", "M", "H"}
        assert len(m["per_phys_bin"]) == 9
        assert sum(v["n"] for v in m["per_snr_bin"].values()) == 250
        assert all(set(v) == {"r2", "n"} for v in m["per_phys_bin"].values())
    json.dumps(metrics)  # JSON-able
    # global R2 recomputed by hand from the stored coefficients
    ds = open_catalog(fit_catalog, config=cfg.catalog).load()
    rows = ds["frozen_test"].values
    g = model.index["global"]
    yhat = ds["flux"].values[rows].astype(np.float64) @ model.experts["coef"].values[g] + \
        model.experts["intercept"].values[g]
    y = ds["logg"].values[rows]
    r2 = 1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2)
    np.testing.assert_allclose(metrics["models"]["global"]["r2"], r2, rtol=1e-10)
    # the stored statistics reload and reproduce the row counts
    stats = SufficientStats.from_zarr(model_dir / "stats.zarr")
    assert stats.n.sum() == model.meta["train_rows"]
    assert (model_dir / "features.zarr").exists()


def test_empty_cells_fall_back_to_parent(tmp_path):
    path = write_sim(tmp_path / "faint.zarr", small_sim_config(n=1500, n_pixels=64, mag_min=22.2, mag_max=22.5))
    cfg = _cfg()
    with dask.config.set(scheduler="threads"), pytest.warns(UserWarning, match="fall back to their parent") as seen:
        model = fit_model(path, tmp_path / "m", cfg, progress=False)
    assert len([w for w in seen if "fall back" in str(w.message)]) == 1  # one line for all of them
    fb = {e["name"]: e["fallback"] for e in model.meta["experts"]}
    assert set(model.meta["fallbacks"]) == {name for name, parent in fb.items() if parent}
    assert model.meta["fallbacks"]["oracle_snr/H"] == {"train_rows": 0, "parent": "global"}
    assert fb["oracle_snr/H"] == "global"  # no bright star at mag > 22.2
    g, h = model.index["global"], model.index["oracle_snr/H"]
    np.testing.assert_array_equal(model.experts["coef"].values[h], model.experts["coef"].values[g])
    assert fb["oracle_joint/T0_M0|H"] == "oracle_phys/T0_M0"


def test_cli_fit_evaluate_and_bad_model(fit_catalog, tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("catalog: {test_size: 200}\nfit: {min_cell_rows: 10}\n")
    assert main(["fit", str(fit_catalog), "--out", str(tmp_path / "m"), "--config", str(cfgfile),
                 "--scheduler", "threads"]) == 0
    assert main(["evaluate", str(tmp_path / "m"), str(fit_catalog), "--out", str(tmp_path / "metrics.json"),
                 "--config", str(cfgfile), "--scheduler", "threads"]) == 0
    out = capsys.readouterr().out
    assert "| oracle_snr |" in out and "| hierarchical |" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test"] == 200
    (tmp_path / "m" / "model.json").write_text("{")
    assert main(["evaluate", str(tmp_path / "m"), str(fit_catalog), "--scheduler", "threads"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope"), str(fit_catalog), "--scheduler", "threads"]) == 2


def test_gates_fit_on_at_most_max_fit_rows_and_select_on_every_selection_row(fit_catalog, tmp_path):
    """gates.max_fit_rows caps the rows a gate fits on (hash-selected by id, so a refit picks the same rows);
    the selection rows are all kept, and the gate table records which rows fitted."""
    import dask
    import xarray as xr
    from conftest import fit_cfg

    from snrmoe_dask.fit import fit_model

    cfg = fit_cfg(precision="float64")
    cfg.gates.max_fit_rows = 60
    with dask.config.set(scheduler="threads"):
        model = fit_model(fit_catalog, tmp_path / "m", cfg, progress=False)
    table = xr.open_zarr(tmp_path / "m" / "gate_table.zarr", consolidated=False)
    fit_rows, select = table["gate_fit"].values, table["select"].values
    assert fit_rows.sum() == 60 == model.meta["gates"]["val_rows"]["fit"]
    assert not (fit_rows & select).any()
    assert model.meta["gates"]["val_rows"]["select"] == select.sum()
    assert model.meta["gates"]["val_rows"]["not_used_above_max_fit_rows"] == (~fit_rows & ~select).sum() > 0
    from snrmoe_dask.split import id_hash

    h = id_hash(table["spectrum"].values, cfg.catalog.split_salt, stream=6)
    assert h[fit_rows].max() < h[~fit_rows & ~select].min()  # the lowest hashes: the same rows every refit


def _layout(n_rows: int, chunk: int, p: int):
    import dask.array as da
    import xarray as xr

    shape, chunks = (n_rows, p), (chunk, p)
    return xr.Dataset({"flux": (("spectrum", "wavelength"), da.zeros(shape, dtype=np.float32, chunks=chunks)),
                       "error": (("spectrum", "wavelength"), da.zeros(shape, dtype=np.float32, chunks=chunks)),
                       "mask": (("spectrum", "wavelength"), da.zeros(shape, dtype=np.uint8, chunks=chunks))})


def test_auto_checkpoint_cadence_never_writes_more_than_it_saves_reading():
    from snrmoe_dask.fit import auto_checkpoint_every

    tri8 = 4096 * 4097 // 2 * 8
    chunk_bytes = 2048 * 4096 * 9  # float32 flux and error, uint8 mask
    # the default job: 10 chunks, 36 cells + whitened + 2 x 5 audit groups: a checkpoint (47 triangles) would
    # write more than the whole pass reads, so the chain never checkpoints before its last fold
    small = auto_checkpoint_every(_layout(20_000, 2048, 4096), 1, 47, 2.0)
    assert small == -(-2 * 47 * tri8 // chunk_bytes) and small >= 10
    # 1M rows on one chain (489 chunks): "about 4 per chain" (123 folds) is rarer than the read-ratio bound (84)
    big = auto_checkpoint_every(_layout(1_000_000, 2048, 4096), 1, 47, 2.0)
    assert big == max(-(-489 // 4), -(-2 * 47 * tri8 // chunk_bytes))
    # with the ratio off, about four checkpoints per chain (two chains: 245 chunks each)
    assert auto_checkpoint_every(_layout(1_000_000, 2048, 4096), 2, 47, 0.0) == -(-245 // 4)
    # a narrow cube with one cell: the ratio bound is a single chunk
    assert auto_checkpoint_every(_layout(100_000, 1000, 64), 1, 1, 2.0) == 25


def test_solves_at_once_in_chains_equal_solves_one_after_another():
    """``fit_experts(at_once=2)``: every solve waits for the one two places before it (a worker runs two at a
    time) and the fits equal the one-at-a-time fits (the same alpha, coefficients to rounding), on cells with
    more and with fewer rows than pixels (reductions and sketches; two-stage where LAPACK has it)."""
    from dask.core import get_dependencies

    from snrmoe_dask.experts import expert_specs, fit_experts
    from snrmoe_dask.stats import CellAccumulator

    rng = np.random.default_rng(8)
    p, snr_names, phys_names = 160, ["L", "H"], ["T0_M0", "T0_M1"]
    rows = np.array([400, 60, 300, 250])  # per cell: a full-rank reduction, a sketch, two reductions
    cells = np.repeat(np.arange(4), rows)
    x = rng.normal(size=(cells.size, p)) @ rng.normal(size=(p, p)) * 0.1 + rng.normal(size=p)
    y = x[:, :8].sum(1) + rng.normal(size=cells.size)
    acc = CellAccumulator(4, x.mean(0), precision="float64")
    acc.add(x, y, cells)
    stats = acc.finalize()
    specs = expert_specs(snr_names, phys_names)
    alphas = np.logspace(-3, 3, 13).tolist()
    one = fit_experts(stats, specs, alphas, 10, 0.5, "float64", blas_threads=1, at_once=1)
    two = fit_experts(stats, specs, alphas, 10, 0.5, "float64", blas_threads=1, at_once=2)
    graph: dict = {}
    for d in two.values():
        graph.update(dict(d.__dask_graph__()))
    solves = [k for k in graph if str(k).startswith("solve expert")]
    order = {k: i for i, k in enumerate(sorted(solves, key=lambda k: [s.name for s in specs].index(
        str(k).split(" ", 2)[2].rsplit("-", 1)[0])))}
    for k, i in order.items():
        waits = {d for d in get_dependencies(graph, k) if d in order}
        assert {d for d, j in order.items() if j == i - 2} <= waits, (k, waits)
    (a,), (b,) = dask.compute(one, scheduler="sync"), dask.compute(two, scheduler="threads", num_workers=2)
    for name in a:
        assert a[name]["alpha"] == b[name]["alpha"], name
        scale = np.abs(a[name]["coef"]).max()
        np.testing.assert_allclose(b[name]["coef"], a[name]["coef"], rtol=1e-9, atol=1e-12 * scale)


def test_solves_at_once_defaults_to_one_per_thread_only_with_the_two_stage_reduction(monkeypatch):
    """Two ``?sytrd`` at once are slower than one at a time (memory-bound): without the two-stage routines the
    default is one solve at a time; a configured value is kept, up to the worker's threads."""
    from snrmoe_dask import twostage
    from snrmoe_dask.config import load_config
    from snrmoe_dask.fit import _solves_at_once

    cfg = load_config()
    monkeypatch.setattr(twostage, "AVAILABLE", True)
    assert _solves_at_once(cfg, 4) == 4 and _solves_at_once(cfg, 1) == 1
    monkeypatch.setattr(twostage, "AVAILABLE", False)
    assert _solves_at_once(cfg, 4) == 1
    cfg = load_config(overrides={"fit": {"solves_at_once": 3}})
    assert _solves_at_once(cfg, 4) == 3 and _solves_at_once(cfg, 2) == 2
