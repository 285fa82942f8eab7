"""Update against refit: a model of N spectra updated with M new ones, and a fit on all N + M, in the same run.

The N + M catalog is simulated once (or reused); its first N rows (catalog A)
and its last M rows (catalog B) are written beside it as catalogs of their
own whose chunk files are hard links to the big catalog's (no copy, and each
store is counted separately: bytes are counted at zarr's store by path, in the
client and every worker, :class:`_common.CatalogReads`). Then, on one local
cluster:

1. ``fit`` A (tertile bin edges of A's training labels);
2. ``update`` the model of A with B: wall time, bytes read from B and from A
   (which must be none);
3. ``fit`` A + B with A's bin edges (what the update must equal): wall time;
4. the largest relative difference of the experts' coefficients, and the R² of
   every model on the frozen test of A + B, from both models.

Results go to ``benchmarks/results/update_<N>_<M>.json``.

    python benchmarks/update.py --n 1000000 --new 100928 --data /scratch/bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CatalogReads, PeakRSS, ensure_catalog, store_bytes  # noqa: E402

from snrmoe_dask.cluster import dask_session  # noqa: E402
from snrmoe_dask.config import load_config  # noqa: E402
from snrmoe_dask.evaluate import evaluate_model  # noqa: E402
from snrmoe_dask.fit import fit_model  # noqa: E402
from snrmoe_dask.update import update_model  # noqa: E402


def slice_catalog(src: Path, lo: int, hi: int, dst: Path) -> Path:
    """Rows ``lo:hi`` of catalog ``src`` as a catalog at ``dst``: every array chunked along the spectra at a
    multiple of ``lo`` gets hard links to ``src``'s chunk files (renumbered); the others are rewritten."""
    import zarr

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copy2(src / "zarr.json", dst / "zarr.json")
    for meta_path in sorted(src.glob("*/zarr.json")):
        name = meta_path.parent.name
        meta = json.loads(meta_path.read_text())
        dims = meta.get("dimension_names") or []
        if not dims or dims[0] != "spectrum":
            shutil.copytree(src / name, dst / name, copy_function=os.link)
            continue
        rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        if lo % rows == 0 and (hi % rows == 0 or hi == meta["shape"][0]):
            (dst / name).mkdir()
            meta["shape"][0] = hi - lo
            (dst / name / "zarr.json").write_text(json.dumps(meta, indent=2))
            for i in range(lo // rows, -(-hi // rows)):
                chunk, out = src / name / "c" / str(i), dst / name / "c" / str(i - lo // rows)
                out.parent.mkdir(parents=True, exist_ok=True)
                if chunk.is_dir():  # a 2-D array's chunk: c/i/0
                    shutil.copytree(chunk, out, copy_function=os.link)
                elif chunk.is_file():  # a 1-D array's chunk: c/i (absent: all fill value)
                    os.link(chunk, out)
        else:  # a small array chunked otherwise (the spectrum coordinate): written again
            arr = zarr.open_array(str(src / name), mode="r")
            values = arr[lo:hi]
            new = zarr.create_array(str(dst / name), shape=values.shape, chunks=(min(len(values), rows),),
                                    dtype=arr.dtype, compressors=arr.compressors, fill_value=arr.fill_value,
                                    dimension_names=tuple(dims), attributes=dict(arr.attrs))
            new[:] = values
    return dst


def _r2s(metrics: dict) -> dict:
    return {k: v["r2"] for k, v in metrics["models"].items()}


def run(n: int, new: int, data: Path, out_dir: Path, chunk_size: int) -> dict:
    if (n - new) % chunk_size:
        raise SystemExit(f"--n minus --new ({n - new}) must be a multiple of the chunk size {chunk_size}")
    cfg = load_config(Path("config/full-1m.yaml"), {"ceiling": {"enabled": False}})
    full = data / f"sim_{n}.zarr"
    a_path, b_path = data / f"update_a_{n - new}.zarr", data / f"update_b_{new}.zarr"
    res = {"n": n - new, "new": new, "date": datetime.date.today().isoformat(), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "memory_gb": round(__import__("psutil").virtual_memory().total / 1e9, 1)}}
    models = {k: out_dir / k for k in ("fit_a", "update", "refit")}
    for path in models.values():
        shutil.rmtree(path, ignore_errors=True)
    with dask_session(cfg.cluster) as client:
        ensure_catalog(full, n, client, chunk_size=chunk_size)
        slice_catalog(full, 0, n - new, a_path)
        slice_catalog(full, n - new, n, b_path)
        res["catalog_gb"] = {"a": store_bytes(a_path) / 1e9, "b": store_bytes(b_path) / 1e9}
        reads = {k: CatalogReads(p, client) for k, p in (("a", a_path), ("b", b_path), ("full", full))}
        windows = {}
        with PeakRSS() as peak:
            for step in ("fit_a", "update", "refit"):
                t0, t0_unix = time.perf_counter(), time.time()
                if step == "fit_a":
                    model_a = fit_model(a_path, models[step], cfg, client=client)
                    edges = model_a.meta["bin_edges"]
                elif step == "update":
                    update_model(models["fit_a"], b_path, models[step], cfg, client=client)
                else:
                    fixed = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(
                        update={"teff_edges": edges["teff_edges"], "mh_edges": edges["mh_edges"]})})
                    fit_model(full, models[step], fixed, client=client)
                res[f"{step}_s"] = time.perf_counter() - t0
                windows[step] = (t0_unix, time.time())
                print(f"{step}: {res[f'{step}_s']:.1f} s", flush=True)
        res["peak_rss_gb"] = peak.peak / 1e9
        res["bytes_read"] = {k: r.summary(windows) for k, r in reads.items()}
        res["update_bytes_vs_new_catalog"] = res["bytes_read"]["b"]["update"]["bytes"] / store_bytes(b_path)
        res["update_bytes_from_a"] = res["bytes_read"]["a"]["update"]["bytes"]
        res["update_vs_refit"] = res["update_s"] / res["refit_s"]
        from snrmoe_dask.store import load_model

        up, ref = load_model(models["update"]), load_model(models["refit"])
        res["update_timings"] = up.meta["timings"]
        res["refit_timings"] = ref.meta["timings"]
        coef_up, coef_ref = up.experts["coef"].values, ref.experts["coef"].values
        res["max_rel_coef_diff"] = float(np.max(np.abs(coef_up - coef_ref)) / np.max(np.abs(coef_ref)))
        res["r2"] = {"update": _r2s(evaluate_model(up, full, cfg, client=client)),
                     "refit": _r2s(evaluate_model(ref, full, cfg, client=client))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="spectra of A + B")
    ap.add_argument("--new", type=int, default=100_928, help="spectra of B (N - NEW must be a multiple of the "
                                                               "chunk size)")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--data", type=Path, default=Path("runs/bench-data"), help="where the catalogs live")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-update"), help="where the models go")
    ap.add_argument("--keep", action="store_true", help="keep the models")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.n, args.new, args.data, args.out, args.chunk_size)
    path = Path("benchmarks/results") / f"update_{res['n']}_{res['new']}.json"
    path.write_text(json.dumps(res, indent=2))
    up, ref = res["r2"]["update"], res["r2"]["refit"]
    print(f"fit A ({res['n']} spectra)     {res['fit_a_s']:8.1f} s")
    print(f"update with B ({res['new']})  {res['update_s']:8.1f} s   = {res['update_vs_refit']:.3f} x the refit")
    print(f"refit A + B                {res['refit_s']:8.1f} s")
    print(f"bytes read by the update: {res['bytes_read']['b']['update']['bytes'] / 1e9:.2f} GB of B = "
          f"{res['update_bytes_vs_new_catalog']:.3f} x B's size; {res['update_bytes_from_a']} bytes of A")
    print(f"max |coef diff| / max |coef| = {res['max_rel_coef_diff']:.2e}; peak RSS {res['peak_rss_gb']:.2f} GB")
    for k in sorted(ref):
        print(f"  R2 {k:<22} update {up[k]:.4f}  refit {ref[k]:.4f}")
    if not args.keep:
        for k in ("fit_a", "update", "refit"):
            shutil.rmtree(args.out / k, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
