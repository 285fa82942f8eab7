"""Whole-study scaling benchmark, with scikit-learn and dask-ml as peers on the same data.

For each N: simulate (or reuse) an N x 4096 catalog, then in the same run

* the reduce pass against its floor (``benchmarks/reduce.py``'s measurement:
  zarr read + in-memory BLAS X.T@X of the train rows);
* the whole ``snrmoe run`` study (``config/full-1m.yaml`` settings with
  ``simulate.n = N``): wall time per stage, the peak resident memory of the
  process tree (client + workers), and the bytes read from the catalog per
  stage, counted at zarr's store in the client and every worker
  (:class:`_common.CatalogReads`), against the catalog's size on disk;
* peers at ``min(N, --peer-max-n)`` train rows loaded in memory (float64):
  ``sklearn.linear_model.Ridge`` for the global model and for the four oracle
  S/N experts as separate fits (what the seeds did), and
  ``dask_ml.linear_model.LinearRegression(penalty="l2")`` for the global
  model, each at our GCV alpha, scored on the same frozen test.

Results go to ``benchmarks/results/scale_<N>.json`` (and, once complete, to
``scale_<N>_<date>_<commit>.json``); a summary table prints.

    python benchmarks/scale.py --n 100000 250000 --peer-max-n 100000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from dask.utils import key_split
from distributed import get_task_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CatalogReads,
    PeakRSS,
    daskml_ridge,
    ensure_catalog,
    load_rows,
    machine_probe,
    r2,
    store_bytes,
    tree_cpu_seconds,
)
from reduce import measure  # noqa: E402

from snrmoe_dask.bins import snr_bin  # noqa: E402
from snrmoe_dask.catalog import open_catalog  # noqa: E402
from snrmoe_dask.cluster import dask_session  # noqa: E402
from snrmoe_dask.config import load_config  # noqa: E402
from snrmoe_dask.pipeline import run_study  # noqa: E402
from snrmoe_dask.split import TRAIN  # noqa: E402


def peers(catalog: Path, model_dir: Path, max_train: int, client, save=None, admm_rows: int = 0,
          admm_cap_s: float = 600.0) -> dict:
    """sklearn Ridge (global + 4 oracle S/N fits) and dask-ml, on in-memory train rows."""
    from sklearn.linear_model import Ridge

    meta = json.loads((model_dir / "model.json").read_text())
    cfg = load_config(overrides={"catalog": meta["config"]["catalog"]})
    ds = open_catalog(catalog, config=cfg.catalog)
    import xarray as xr

    experts = xr.open_zarr(model_dir / "experts.zarr", consolidated=False)
    names = [e["name"] for e in meta["experts"]]
    alpha = {n: float(a) for n, a in zip(names, experts["alpha"].values)}
    train = np.flatnonzero(ds["split"].values == TRAIN)[:max_train]
    test = np.flatnonzero(ds["frozen_test"].values)
    t0 = time.perf_counter()
    x, xt = load_rows(ds, train), load_rows(ds, test)
    load_s = time.perf_counter() - t0
    y, yt = ds["logg"].values[train], ds["logg"].values[test]
    sb = snr_bin(ds["snr"].values[train], cfg.catalog.snr_edges)
    sbt = snr_bin(ds["snr"].values[test], cfg.catalog.snr_edges)
    out = {"train_rows": int(train.size), "load_s": load_s, "x_gb": x.nbytes / 1e9}

    t0 = time.perf_counter()
    glob = Ridge(alpha=alpha["global"]).fit(x, y)
    out["sklearn_global"] = {"seconds": time.perf_counter() - t0, "r2": r2(yt, glob.predict(xt))}
    t0 = time.perf_counter()
    yhat = np.empty_like(yt)
    for i, b in enumerate(cfg.catalog.snr_bin_names):
        m = Ridge(alpha=alpha[f"oracle_snr/{b}"]).fit(x[sb == i], y[sb == i])
        yhat[sbt == i] = m.predict(xt[sbt == i])
    out["sklearn_oracle_snr"] = {"seconds": time.perf_counter() - t0, "r2": r2(yt, yhat), "fits": 4}
    if save:
        save(out)

    try:
        out["dask_ml_global"] = daskml_ridge(x, y, xt, yt, alpha["global"], "lbfgs", 500, glob.coef_)
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result to report, not a crash
        out["dask_ml_global"] = {"error": f"{type(exc).__name__}: {exc}"}
    if save:
        save(out)
    if admm_rows:
        out["dask_ml_admm"] = daskml_capped(catalog, admm_rows, alpha["global"], "admm", admm_cap_s)
    return out


def daskml_capped(catalog: Path, rows: int, alpha: float, solver: str, cap_s: float) -> dict:
    """dask-ml's default solver in a subprocess killed after ``cap_s`` seconds (a result either way)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve().parent / "peer_daskml.py"), str(catalog), "--rows",
           str(rows), "--alpha", str(alpha), "--solver", solver]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s, check=True)
    except subprocess.TimeoutExpired:
        return {"solver": solver, "rows": rows, "finished": False, "cap_s": cap_s,
                "note": f"not finished after {cap_s:.0f} s (data loading included)"}
    except subprocess.CalledProcessError as exc:
        return {"solver": solver, "rows": rows, "error": exc.stderr[-500:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "finished": True,
            "wall_s_with_loading": time.perf_counter() - t0}


def task_seconds(records: list[dict]) -> dict:
    """Worker-thread seconds and task counts by task-name prefix (the dashboard's task stream), largest first."""
    out: dict[str, dict] = {}
    for rec in records:
        busy = sum(s["stop"] - s["start"] for s in rec.get("startstops", ()) if s.get("action") == "compute")
        row = out.setdefault(key_split(rec["key"]), {"tasks": 0, "seconds": 0.0})
        row["tasks"] += 1
        row["seconds"] += busy
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


def _save(res: dict, complete: bool) -> None:
    """Write what is measured so far (a killed benchmark leaves its partial figures, marked incomplete); a
    complete run is also written as ``scale_<N>_<date>_<commit>.json``, which nothing overwrites."""
    out = Path("benchmarks/results") / f"scale_{res['n']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**res, "complete": complete}, indent=2)
    out.write_text(text)
    if complete:
        out.with_name(f"scale_{res['n']}_{res['date']}_{_commit()}.json").write_text(text)


def _commit() -> str:
    """The measured commit's short hash (``-dirty`` when the tree has changes outside ``benchmarks/results``,
    which this run writes itself before it is complete; ``unknown`` outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def one_size(n: int, data: Path, runs: Path, peer_max: int, cfg_path: str, keep: bool, admm_rows: int = 0,
             admm_cap_s: float = 600.0, resume: bool = False) -> dict:
    catalog = data / f"sim_{n}.zarr"
    cfg = load_config(cfg_path, {"simulate": {"n": n}, "run": {"out": str(runs / f"scale_{n}"), "report": False,
                                                                "catalog": str(catalog)}})
    res = {"n": n, "date": datetime.date.today().isoformat(), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "memory_gb": round(__import__("psutil").virtual_memory().total / 1e9, 1)}}
    res["probe"] = {"start": machine_probe()}  # the machine's speed before and after: runs compare next to it
    saved = Path("benchmarks/results") / f"scale_{n}.json"
    earlier = json.loads(saved.read_text()) if resume and saved.exists() else {}
    with dask_session(cfg.cluster) as client:
        if "reduce" in earlier:  # --resume: keep the simulate and reduce figures of the interrupted run
            res.update({k: earlier[k] for k in ("date", "simulate_s", "catalog_gb", "reduce")})
        else:
            t0 = time.perf_counter()
            ensure_catalog(catalog, n, client)
            res["simulate_s"] = time.perf_counter() - t0
            res["catalog_gb"] = store_bytes(catalog) / 1e9
            _save(res, False)
            res["reduce"] = measure(catalog, client, cfg.fit)
            _save(res, False)
        reads = CatalogReads(catalog, client)  # every get from the catalog store, in the client and the workers
        with PeakRSS() as peak, get_task_stream(client) as stream:
            t0, t0_unix, cpu0 = time.perf_counter(), time.time(), tree_cpu_seconds()
            record = run_study(cfg, Path(cfg.run.out), client=client, resume=resume, overwrite=not resume)
            res["study_s"] = time.perf_counter() - t0
            # CPU seconds of the client and the workers: the study is CPU-bound when this is near cores x wall
            res["study_cpu_s"] = tree_cpu_seconds() - cpu0
            res["study_cpu_utilisation"] = res["study_cpu_s"] / ((os.cpu_count() or 1) * res["study_s"])
        res["task_seconds"] = task_seconds(stream.data)
        res["probe"]["after_study"] = machine_probe()
        res["catalog_bytes"] = store_bytes(catalog)
        res["resumed_stages"] = [k for k, v in record["stages"].items() if v.get("skipped")]
        res["peak_rss_gb"] = peak.peak / 1e9
        res["stages_s"] = {k: v.get("seconds") for k, v in record["stages"].items()}
        # stages run back to back: their cumulative seconds bound each stage's share of the memory timeline
        res["peak_rss_gb_by_stage"], t = {}, 0.0
        for k, sec in res["stages_s"].items():
            if k in res["resumed_stages"]:  # ran in the interrupted run: not in this timeline
                continue
            res["peak_rss_gb_by_stage"][k] = peak.peak_between(t, t + (sec or 0.0) + 1.0) / 1e9
            t += sec or 0.0
        res["fit_timings"] = json.loads((Path(cfg.run.out) / "model" / "model.json").read_text())["timings"]
        # bytes read from the catalog, per stage (stages run back to back from t0) and for the whole study
        windows, t = {}, t0_unix
        for k, sec in res["stages_s"].items():
            if k in res["resumed_stages"]:
                continue
            windows[k] = (t, t + (sec or 0.0))
            t += sec or 0.0
        windows["study"] = (t0_unix, t0_unix + res["study_s"])
        res["bytes_read"] = reads.summary(windows)
        res["bytes_read"]["study_vs_catalog_size"] = res["bytes_read"]["study"]["bytes"] / res["catalog_bytes"]
        res["study_vs_pass"] = res["study_s"] / res["fit_timings"]["pass_s"]
        m = record["metrics"]["models"]
        res["ours"] = {k: {"r2": m[k]["r2"]} for k in ("global", "oracle_snr", "hierarchical",
                                                         record["metrics"].get("default_gate") or "global")}
        n_experts = len(json.loads((Path(cfg.run.out) / "model" / "model.json").read_text())["experts"])
        res["ours"]["fit_s"] = res["stages_s"]["fit"]
        res["ours"]["experts"] = n_experts
        res["ours"]["seconds_per_expert"] = res["stages_s"]["fit"] / n_experts
        _save(res, False)
    # the peers run after the cluster is closed: dask-ml on the threads scheduler must not find a client
    res["peers"] = peers(catalog, Path(cfg.run.out) / "model", peer_max, None,
                         lambda p: _save({**res, "peers": p}, False), admm_rows, admm_cap_s)
    res["ratios"] = _ratios(res)
    if not keep:
        shutil.rmtree(catalog, ignore_errors=True)
    return res


def _ratios(res: dict) -> dict:
    p = res["peers"]
    return {
        "reduce_vs_floor": res["reduce"]["ratio_vs_floor"],
        "sklearn_s_per_fit_vs_ours_per_expert": (p["sklearn_global"]["seconds"] / res["ours"]["seconds_per_expert"]),
        "dask_ml_s_vs_ours_fit_s": (p["dask_ml_global"].get("seconds", float("nan")) / res["ours"]["fit_s"]),
        "dask_ml_s_per_fit_vs_ours_per_expert": (p["dask_ml_global"].get("seconds", float("nan"))
                                                 / res["ours"]["seconds_per_expert"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 250_000, 500_000, 1_000_000])
    ap.add_argument("--peer-max-n", type=int, default=100_000, help="train rows the in-memory peers get")
    ap.add_argument("--config", default="config/full-1m.yaml")
    ap.add_argument("--data", default="benchmarks/data")
    ap.add_argument("--runs", default="benchmarks/runs")
    ap.add_argument("--keep", action="store_true", help="keep the simulated catalogs")
    ap.add_argument("--admm-rows", type=int, default=0,
                    help="also fit dask-ml's default solver (admm) on this many train rows (0: skip)")
    ap.add_argument("--admm-cap", type=float, default=600.0, help="seconds before the admm fit is stopped")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted size: reuse its reduce figures and the study's finished stages")
    ap.add_argument("--peers-only", action="store_true",
                    help="rerun only the peers against an existing study in RUNS/scale_N (merged into the results)")
    args = ap.parse_args()
    if args.peers_only:
        for n in args.n:
            path = Path("benchmarks/results") / f"scale_{n}.json"
            res = json.loads(path.read_text())
            res.pop("complete", None)

            def save(partial, res=res):
                _save({**res, "peers": partial}, False)

            res["peers"] = peers(Path(args.data) / f"sim_{n}.zarr", Path(args.runs) / f"scale_{n}" / "model",
                                 args.peer_max_n, None, save, args.admm_rows, args.admm_cap)
            res["ratios"] = _ratios(res)
            _save(res, True)
            print(json.dumps({"peers": res["peers"], "ratios": res["ratios"]}, indent=1))
        return
    for n in args.n:
        res = one_size(n, Path(args.data), Path(args.runs), args.peer_max_n, args.config, args.keep,
                       args.admm_rows, args.admm_cap, args.resume)
        _save(res, True)
        p = res["peers"]
        stages = {k: round(v or 0) for k, v in res["stages_s"].items()}
        print(f"N={n}: study {res['study_s']:.0f} s, stages {json.dumps(stages)}; the fit's pass "
              f"{res['fit_timings']['pass_s']:.0f} s (study / pass = {res['study_vs_pass']:.2f})")
        b = res["bytes_read"]
        print(f"  bytes read from the catalog: study {b['study']['bytes'] / 1e9:.2f} GB = "
              f"{b['study_vs_catalog_size']:.3f} x its {res['catalog_bytes'] / 1e9:.2f} GB on disk; "
              f"{b['cube_chunk_reads']} reads of {b['cube_chunks_read']} cube chunks; by stage "
              f"{json.dumps({k: round(v['bytes'] / 1e9, 3) for k, v in b.items() if isinstance(v, dict)})} GB")
        top = list(res["task_seconds"].items())[:12]
        print("  worker seconds by task: " + ", ".join(f"{k} {v['seconds']:.0f} s/{v['tasks']}" for k, v in top))
        print(f"  reduce {res['reduce']['ours_s']:.1f} s vs floor {res['reduce']['floor_s']:.1f} s = "
              f"{res['reduce']['ratio_vs_floor']:.2f} x; peak RSS {res['peak_rss_gb']:.2f} GB "
              f"(by stage: {json.dumps({k: round(v, 1) for k, v in res['peak_rss_gb_by_stage'].items()})})")
        print(f"  CPU: {res['study_cpu_s']:.0f} core-s of the process tree in the study's {res['study_s']:.0f} s "
              f"= {res['study_cpu_utilisation']:.0%} of {os.cpu_count()} cores")
        print(f"  machine probe (one thread; start / after the study): syrk "
              f"{res['probe']['start']['syrk_s']:.3f} / {res['probe']['after_study']['syrk_s']:.3f} s, sytrd "
              f"{res['probe']['start']['sytrd_s']:.2f} / {res['probe']['after_study']['sytrd_s']:.2f} s")
        print(f"  ours: global R2 {res['ours']['global']['r2']:.3f}, fit {res['ours']['fit_s']:.0f} s for "
              f"{res['ours']['experts']} experts = {res['ours']['seconds_per_expert']:.1f} s/expert")
        print(f"  sklearn Ridge ({p['train_rows']} rows in memory): global {p['sklearn_global']['seconds']:.1f} s "
              f"R2 {p['sklearn_global']['r2']:.3f}; 4 oracle S/N fits {p['sklearn_oracle_snr']['seconds']:.1f} s "
              f"R2 {p['sklearn_oracle_snr']['r2']:.3f}")
        print(f"  dask-ml: {json.dumps(p['dask_ml_global'])}")
        if "dask_ml_admm" in p:
            print(f"  dask-ml admm: {json.dumps(p['dask_ml_admm'])}")


if __name__ == "__main__":
    main()
