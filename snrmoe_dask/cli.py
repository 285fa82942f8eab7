"""``snrmoe`` command line: parse, load config, call the library, print.

No science lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .catalog import CatalogError
from .config import ConfigError, load_config
from .outputs import claim_output, claimed, output_lock, replace_atomically
from .store import ModelError

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser, *, cluster: bool = True) -> None:
    p.add_argument("--config", help="YAML config (default: the shipped config/default.yaml)")
    if cluster:
        p.add_argument("--scheduler", help="local (default) | tcp://host:port | slurm | pbs | threads | synchronous")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="snrmoe",
        description="S/N-conditioned mixture of Ridge experts for stellar logg, out of core on Dask.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a synthetic PFS-like catalog (zarr)")
    p.add_argument("--n", type=int, help="number of spectra")
    p.add_argument("--out", required=True, help="output catalog store (zarr)")
    p.add_argument("--seed", type=int)
    p.add_argument("--noise-level", type=float)
    p.add_argument("--mag-min", type=float)
    p.add_argument("--mag-max", type=float)
    p.add_argument("--chunk-size", type=int, help="spectra per chunk")
    p.add_argument("--n-pixels", type=int, help="pixels per spectrum (default 4096)")
    p.add_argument("--error-model", choices=("noiseless", "noisy"),
                   help="error vector: sigma of the noiseless flux (default) or estimated from the observed counts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing simulated catalog (an ingested catalog is never replaced)")
    _add_common(p)

    p = sub.add_parser("ingest", help="ingest HDF5/NPZ files or a folder of them into a catalog")
    p.add_argument("src", help="an .h5/.hdf5/.npz file or a folder of them")
    p.add_argument("--out", required=True, help="catalog store (zarr)")
    p.add_argument("--append", action="store_true", help="add rows to an existing catalog")
    p.add_argument("--chunk-size", type=int, help="spectra per chunk")
    p.add_argument("--no-labels", action="store_true", help="accept files without logg/teff/mh (for predict)")
    _add_common(p, cluster=False)

    p = sub.add_parser("info", help="validate a catalog and print its summary (or a model's provenance)")
    p.add_argument("path", help="catalog store (zarr), or a model directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_common(p)

    p = sub.add_parser("fit", help="one pass over the catalog, then every Ridge expert family")
    p.add_argument("catalog", help="catalog store (zarr) with labels")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pass from MODEL_DIR/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start an interrupted fit again (a complete model is never replaced)")
    _add_common(p)

    p = sub.add_parser("update", help="add a new catalog to a model: one read of the new rows, no refit")
    p.add_argument("model_dir", help="model directory written by `snrmoe fit` (or update, merge)")
    p.add_argument("catalog", help="new catalog store (zarr) with labels; its ids must be new to the model")
    p.add_argument("--out", required=True, help="new model directory (MODEL_DIR itself only with --in-place)")
    p.add_argument("--in-place", action="store_true", help="replace MODEL_DIR when the update completes")
    _add_common(p)

    p = sub.add_parser("merge", help="combine two models of disjoint catalogs into the model of both (no read)")
    p.add_argument("model_a", help="model directory")
    p.add_argument("model_b", help="model directory (same grid, bins, alpha grid and split as MODEL_A)")
    p.add_argument("--out", required=True, help="new model directory")
    _add_common(p)

    p = sub.add_parser("evaluate", help="score a model on the catalog's frozen test subset")
    p.add_argument("model_dir", help="model directory written by `snrmoe fit`")
    p.add_argument("catalog", help="catalog store (zarr) with labels")
    p.add_argument("--out", default="metrics.json", help="metrics file (default: metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics file")
    _add_common(p)

    p = sub.add_parser("predict", help="apply a model to any catalog (labels not needed), out of core")
    p.add_argument("model_dir", help="model directory written by `snrmoe fit`")
    p.add_argument("catalog", help="catalog store (zarr)")
    p.add_argument("--out", required=True, help="predictions store to write (zarr)")
    p.add_argument("--gate", help="gate to mix the experts with (default: the model's best on validation)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing predictions store (nothing else is ever replaced)")
    _add_common(p)

    p = sub.add_parser("audit", help="does the error vector leak logg? Ridge on 5 representations + checks")
    p.add_argument("catalog", help="catalog store (zarr) with logg, snr and mag")
    p.add_argument("--out", required=True, help="directory for audit.json, audit.md, pixel_importance.zarr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing audit directory")
    _add_common(p)

    p = sub.add_parser("ceiling", help="Bayes ceiling of logg (flux only; flux + oracle bins), simulated catalogs")
    p.add_argument("catalog", help="simulated catalog store (zarr)")
    p.add_argument("--out", required=True, help="directory for ceiling.json and ceiling.zarr")
    p.add_argument("--rows", choices=("test", "all"), default="test",
                   help="the frozen test subset (default) or every spectrum")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ceiling directory")
    _add_common(p)

    p = sub.add_parser("run", help="run the whole chain from one YAML config (batch job)")
    p.add_argument("run_config", nargs="?", help="YAML config (default: config/small.yaml)")
    p.add_argument("--out", help="run directory (overrides run.out)")
    p.add_argument("--overwrite", action="store_true", help="redo every stage, the simulation included")
    p.add_argument("--resume", action="store_true",
                   help="skip stages that completed with unchanged inputs; continue an interrupted pass from its "
                        "checkpoints")
    p.add_argument("--scheduler", help="local (default) | tcp://host:port | slurm | pbs | threads | synchronous")

    p = sub.add_parser("report", help="write RUN_DIR/report.md and its PNG figures from the run's results")
    p.add_argument("run_dir", help="a run directory (or one seed's directory) written by `snrmoe run`")
    return ap


def _print_info(summary: dict) -> None:
    print(f"spectra      {summary['n_spectra']}")
    print(f"pixels       {summary['n_pixels']}  ({summary['wavelength_range'][0]:.1f}-"
          f"{summary['wavelength_range'][1]:.1f} A)")
    print(f"chunks       {summary['n_chunks']} along spectrum, rows {summary['chunk_rows']}")
    for name, r in summary["labels"].items():
        bad = f"  ({r['n_nonfinite']} non-finite)" if r["n_nonfinite"] else ""
        lo = "n/a" if r["min"] is None else f"{r['min']:.3f}"
        hi = "n/a" if r["max"] is None else f"{r['max']:.3f}"
        print(f"label {name:<8}[{lo}, {hi}]{bad}")
    s = summary["split"]
    print(f"split        train {s['train']}  val {s['val']}  test {s['test']}  (frozen test {s['frozen_test']})")
    if "snr_bins" in summary:
        print("S/N bins     " + "  ".join(f"{k} {v}" for k, v in summary["snr_bins"].items()))
    q = summary["pixels"]
    print(f"bad pixels   flux {q['bad_flux_pixels']}  error {q['bad_error_pixels']}  mask {q['masked_pixels']}"
          f"  (good {q['good_pixels']})")
    print(f"left out     {q['spectra_too_few_good_pixels']} spectra with too few good pixels")


def _print_snr(dist: dict) -> None:
    fr = "  ".join(f"{k} {100 * v:.1f}%" for k, v in dist["fractions"].items())
    print(f"true S/N     median {dist['median']:.2f}  max {dist['max']:.2f}  bins {fr}")


def _cmd_simulate(args) -> int:
    from .cluster import dask_session
    from .pipeline import run_simulate

    cfg = load_config(args.config, {
        "simulate": {"n": args.n, "seed": args.seed, "noise_level": args.noise_level, "mag_min": args.mag_min,
                     "mag_max": args.mag_max, "chunk_size": args.chunk_size, "n_pixels": args.n_pixels,
                     "error_model": args.error_model},
        "cluster": {"scheduler": args.scheduler},
    })
    with claimed(args.out, "simulated catalog", "snrmoe simulate", overwrite=args.overwrite), \
            dask_session(cfg.cluster) as client:  # refused before a cluster starts
        res = run_simulate(cfg.simulate, args.out, cfg.storage, client=client, overwrite=args.overwrite)
    print(f"wrote        {args.out}: {res['n']} spectra in {res['seconds']:.1f} s "
          f"({res['spectra_per_second']:.0f} spectra/s)")
    _print_snr(res["snr"])
    return 0


def _cmd_ingest(args) -> int:
    from .catalog import REQUIRED_LABELS
    from .ingest import ingest

    cfg = load_config(args.config, {"storage": {"ingest_chunk_size": args.chunk_size}})

    tty, shown = sys.stderr.isatty(), [0.0]

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r[ingest] {done}/{total} spectra", end="", file=sys.stderr, flush=True)
        elif done >= total or done / max(total, 1) >= shown[0] + 0.1:  # a batch log: a line per 10 %
            shown[0] = done / max(total, 1)
            print(f"[ingest] {done}/{total} spectra", file=sys.stderr, flush=True)

    with output_lock(args.out, "snrmoe ingest" + (" --append" if args.append else "")):  # one writer per catalog
        rep = ingest(args.src, args.out, append=args.append, storage=cfg.storage,
                     require_labels=() if args.no_labels else REQUIRED_LABELS, progress=progress)
    if tty:
        print("", file=sys.stderr)
    print(f"ingested     {rep['rows']} spectra from {len(rep['files'])} file(s) into {args.out}")
    print(f"ids          {rep['id_range'][0]}..{rep['id_range'][1]}")
    return 0


def _print_model(model_dir: Path, as_json: bool) -> None:
    from .store import load_model

    meta = load_model(model_dir).meta
    if as_json:
        print(json.dumps({k: meta.get(k) for k in ("kind", "target", "n_pixels", "train_rows", "catalogs", "history",
                                                   "bin_edges", "bin_edges_source")}, indent=2))
        return
    print(f"model        {model_dir}: {len(meta['experts'])} experts, {meta.get('train_rows')} train rows, "
          f"target {meta['target']}, {meta['n_pixels']} pixels")
    for i, cat in enumerate(meta.get("catalogs") or []):
        print(f"catalog {i:<4} {cat['path']}  ({cat['rows']} spectra, {cat['train_rows']} train, "
              f"fingerprint {cat['fingerprint']})")
    for step in meta.get("history") or []:
        print(f"{step['op']:<12} {step['at']}  {', '.join(step['catalogs'])}")
    print(f"bin edges    {meta.get('bin_edges_source', 'not recorded')}")


def _model_update_summary(model, out) -> None:
    meta = model.meta
    print(f"model        {len(meta['experts'])} experts from {meta['train_rows']} train rows of "
          f"{len(meta['catalogs'])} catalog(s) in {meta['timings']['total_s']:.1f} s -> {out}")
    print(f"default gate {meta['gates'].get('default')}")


def _cmd_update(args) -> int:
    from .cluster import dask_session
    from .update import update_model

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with dask_session(cfg.cluster) as client:
        model = update_model(args.model_dir, args.catalog, args.out, cfg, client=client, in_place=args.in_place)
    _model_update_summary(model, args.out)
    return 0


def _cmd_merge(args) -> int:
    from .cluster import dask_session
    from .update import merge_models

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with dask_session(cfg.cluster) as client:
        model = merge_models(args.model_a, args.model_b, args.out, cfg, client=client)
    _model_update_summary(model, args.out)
    return 0


def _cmd_info(args) -> int:
    from .cluster import dask_session
    from .pipeline import catalog_info

    if (Path(args.path) / "model.json").is_file():
        _print_model(Path(args.path), args.json)
        return 0
    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with dask_session(cfg.cluster, quiet=args.json) as client:
        summary = catalog_info(args.path, cfg.catalog, client=client, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_info(summary)
    return 0


def _cmd_fit(args) -> int:
    from .cluster import dask_session
    from .fit import fit_model

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with claimed(args.out, "model", "snrmoe fit", overwrite=args.overwrite, resume=args.resume), \
            dask_session(cfg.cluster) as client:  # refused before a cluster starts
        model = fit_model(args.catalog, args.out, cfg, client=client, resume=args.resume, overwrite=args.overwrite)
    meta = model.meta
    print(f"fitted       {len(meta['experts'])} experts from {meta['train_rows']} train rows "
          f"in {meta['timings']['total_s']:.1f} s -> {args.out}")
    print(f"accumulation {meta['accumulation']}")
    if meta["train_rows_excluded_unusable"]:
        print(f"left out     {meta['train_rows_excluded_unusable']} train spectra with too few good pixels")
    if meta["alpha_at_grid_edge"]:
        print(f"note         alpha at the grid edge for {len(meta['alpha_at_grid_edge'])} expert(s); "
              "widen fit.alphas_relative if this includes the large experts")
    return 0


def _cmd_evaluate(args) -> int:
    from .cluster import dask_session
    from .evaluate import evaluate_model
    from .metrics import r2_table
    from .store import load_model

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with claimed(args.out, "metrics file", "snrmoe evaluate", overwrite=args.overwrite):  # before the work
        model = load_model(args.model_dir)
        with dask_session(cfg.cluster) as client:
            metrics = evaluate_model(model, args.catalog, cfg, client=client)
        with replace_atomically(args.out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
    print(f"frozen test  {metrics['n_test']} spectra ({metrics['n_test_excluded_unusable']} left out)")
    print(r2_table(metrics))
    print(f"wrote        {args.out}")
    return 0


def _cmd_predict(args) -> int:
    import numpy as np

    from .cluster import dask_session
    from .mixture import FLAG_BITS
    from .predict import predict_catalog
    from .store import load_model

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    model = load_model(args.model_dir)
    with claimed(args.out, "predictions store", "snrmoe predict", overwrite=args.overwrite), \
            dask_session(cfg.cluster) as client:  # refused before a cluster starts
        pred = predict_catalog(model, args.catalog, args.out, cfg, gate=args.gate, client=client,
                               overwrite=args.overwrite)
    flags = pred["flags"].values
    print(f"predicted    {flags.size} spectra with gate {pred.attrs['gate']} -> {args.out}")
    for name, bit in FLAG_BITS.items():
        print(f"flag {name:<16} {int(np.count_nonzero(flags & bit))}")
    return 0


def _cmd_audit(args) -> int:
    from .audit import audit_catalog, audit_markdown, write_audit
    from .catalog import open_catalog
    from .cluster import dask_session

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    with claimed(args.out, "audit directory", "snrmoe audit", overwrite=args.overwrite):
        ds = open_catalog(args.catalog, require_labels=("logg", "snr", "mag"), config=cfg.catalog)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with dask_session(cfg.cluster) as client:
            result = audit_catalog(ds, cfg, client=client, work_dir=args.out)
        doc = write_audit(result, args.out, ds, cfg)
    print(audit_markdown(doc))
    print(f"wrote        {Path(args.out) / 'audit.json'}")
    return 0


def _cmd_ceiling(args) -> int:
    import numpy as np

    from .catalog import bin_edges, open_catalog
    from .ceiling import write_ceiling
    from .cluster import dask_session
    from .evaluate import ceiling_stage

    cfg = load_config(args.config, {"cluster": {"scheduler": args.scheduler}})
    claim_output(args.out, "ceiling directory", overwrite=args.overwrite)  # before the work
    ds = open_catalog(args.catalog, require_labels=("logg", "teff", "mh", "alpha_m", "mag", "snr"),
                      config=cfg.catalog)
    edges = bin_edges(ds, cfg.catalog)
    rows = np.flatnonzero(ds["frozen_test"].values) if args.rows == "test" else np.arange(ds.sizes["spectrum"])
    sub = ds.isel(spectrum=rows)
    with dask_session(cfg.cluster) as client:
        out = ceiling_stage(sub, edges, cfg, client=client)
    with claimed(args.out, "ceiling directory", "snrmoe ceiling", overwrite=args.overwrite):
        doc = write_ceiling(out["summary"], out["post"], out["spectrum"], args.out,
                            {"catalog": str(args.catalog), "rows": args.rows, "bin_edges": edges})
    for key, label in (("flux", "flux only"), ("flux_oracle_bins", "flux + oracle bins")):
        c = doc[key]
        print(f"ceiling ({label}): R2_max {c['overall']['r2_max']:.3f} +- {c['overall']['r2_max_se']:.3f} "
              f"({c['overall']['n_sampled']} of {len(rows)} {args.rows} spectra sampled)")
        for name, b in c["per_snr_bin"].items():
            if b["r2_max"] is not None:
                print(f"  S/N bin {name}: R2_max {b['r2_max']:.3f} +- {b['r2_max_se']:.3f}  (n={b['n']}, "
                      f"sampled {b['n_sampled']}, median ESS {b['median_ess']:.0f})")
    print(f"wrote        {Path(args.out) / 'ceiling.json'}")
    return 0


def _cmd_run(args) -> int:
    from .cluster import dask_session
    from .config import config_dir
    from .pipeline import run_pipeline

    path = args.run_config or (config_dir() / "small.yaml")
    cfg = load_config(path, {"run": {"out": args.out}, "cluster": {"scheduler": args.scheduler}})
    with claimed(cfg.run.out, "run directory", "snrmoe run", overwrite=args.overwrite, resume=args.resume,
                 what="run.out / --out"), dask_session(cfg.cluster) as client:  # refused before a cluster starts
        record = run_pipeline(cfg, client=client, overwrite=args.overwrite, resume=args.resume)
    print(f"run          {cfg.run.out}  (config {path})")
    if "seed_summary" in record:
        from .report import format_mean_std

        summ = record["seed_summary"]
        print(f"seeds        {', '.join(summ['seeds'])}: R² mean ± std")
        for name, m in summ["models"].items():
            print(f"  {name:<22} {format_mean_std(m['r2'])}")
        print(f"wrote        {Path(cfg.run.out) / 'seeds.json'}, {Path(cfg.run.out) / 'report.md'}")
        return 0
    sim = record["stages"].get("catalog", {})
    if "snr" in sim:
        print(f"simulated    {sim['n']} spectra in {sim['seconds']:.1f} s")
        _print_snr(sim["snr"])
    _print_info(record["summary"])
    if "metrics" in record:
        from .metrics import r2_table

        fit = record["stages"]["fit"]
        print(f"fit          {fit['n_experts']} experts, {fit['train_rows']} train rows, {fit['seconds']:.1f} s")
        print(f"frozen test  {record['metrics']['n_test']} spectra")
        print(r2_table(record["metrics"]))
    audit = record["stages"].get("audit", {}).get("passes")
    if audit:
        print("audit        " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in audit.items()))
    print(f"wrote        {Path(cfg.run.out) / 'run.json'}" + (f", {Path(cfg.run.out) / 'report.md'}"
                                                              if "report" in record["stages"] else ""))
    for line in _findings(record, Path(cfg.run.out)):
        print(line)
    return 0


def _findings(record: dict, out: Path) -> list[str]:
    """What the run found, in three lines: the deployed gate against global, the audit, where the report is."""
    lines = []
    m = record.get("metrics")
    gate = (m or {}).get("default_gate")
    if m and gate in m["models"]:
        g, d = m["models"]["global"], m["models"][gate]
        delta, se = m["delta_r2_vs_global"][gate], m["delta_r2_se_vs_global"][gate]
        verdict = "beats" if delta > se else "does not beat"
        lines.append(f"found        the deployed gate {gate} (chosen on val rows) {verdict} global on the frozen "
                     f"test: R² {d['r2']:.3f} ± {d['r2_se']:.3f} vs {g['r2']:.3f} ± {g['r2_se']:.3f} "
                     f"(ΔR² {delta:+.3f} ± {se:.3f})")
    audit_json = out / "audit" / "audit.json"
    if "audit" in record["stages"] and audit_json.is_file():
        reps = json.loads(audit_json.read_text())["representations"]
        q = reps.get("S3b", {})
        leaks = [k for k, v in reps.items() if not v["pass"]]
        lines.append(f"found        audit: logg R² from the error vector {reps['full']['logg_r2']:.3f} ± "
                     f"{reps['full']['logg_r2_se']:.3f} ({', '.join(leaks) or 'none'} leak); from the 10 quality "
                     f"statistics the gates use {q.get('logg_r2', float('nan')):.3f} ± {q.get('logg_r2_se', 0):.3f}"
                     f" ({'pass' if q.get('pass') else 'FAIL'}); {audit_json.parent / 'audit.md'}")
    if "report" in record["stages"]:
        lines.append(f"found        the report with every table and figure: {out / 'report.md'}")
    return lines


def _cmd_report(args) -> int:
    from .report import write_report

    figures = write_report(args.run_dir)
    print(f"wrote        {Path(args.run_dir) / 'report.md'} with {len(figures)} figures in "
          f"{Path(args.run_dir) / 'figures'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snrmoe`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"snrmoe: warning: {msg}\n"
    handlers = {"simulate": _cmd_simulate, "ingest": _cmd_ingest, "info": _cmd_info, "fit": _cmd_fit,
                "evaluate": _cmd_evaluate, "predict": _cmd_predict, "update": _cmd_update, "merge": _cmd_merge,
                "ceiling": _cmd_ceiling, "audit": _cmd_audit,
                "run": _cmd_run, "report": _cmd_report}
    try:
        return handlers[args.command](args)
    except (ConfigError, CatalogError, ModelError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"snrmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
