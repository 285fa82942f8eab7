"""The batch job behind ``snrmoe run``: the stages of the study in order.

Stages: ``catalog`` (simulate, ingest or an existing store), ``audit``,
``fit`` (the one pass -- features and statistics -- then experts, baselines
and gates), ``evaluate`` (with the Bayes ceiling) and ``report``. Each writes
its artefact under the run directory and is recorded in ``run.json`` with its
wall time and a *fingerprint*: a hash of the config sections it reads and of
the fingerprints of the stages it reads from. ``run.json`` is rewritten after
every stage. With ``resume``, a stage whose fingerprint is unchanged and whose
outputs exist is skipped, and an unfinished fit continues its pass from the
checkpoints in ``MODEL_DIR/checkpoints``.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .bins import snr_bin
from .catalog import open_catalog, pixel_quality, quality_totals, summarize_catalog
from .checkpoint import plan_token
from .cluster import compute
from .config import CatalogConfig, Config, SimulateConfig, StorageConfig
from .outputs import claimed
from .simulate import simulate_catalog, write_catalog
from .store import versions
from .zarrstore import consolidate

__all__ = ["run_simulate", "snr_distribution", "catalog_info", "run_study", "run_pipeline", "seed_config",
           "STAGES"]


def snr_distribution(snr: np.ndarray, cfg: CatalogConfig) -> dict[str, Any]:
    """Median, max and per-bin fractions of an S/N array (the simulator's calibration target, docs/method.md)."""
    bins = snr_bin(snr, cfg.snr_edges)
    return {
        "median": float(np.median(snr)),
        "max": float(np.max(snr)),
        "fractions": {name: float((bins == i).mean()) for i, name in enumerate(cfg.snr_bin_names)},
    }


def run_simulate(sim: SimulateConfig, out: str | Path, storage: StorageConfig, *, client=None,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Simulate a catalog to ``out`` on the current cluster; returns its S/N distribution."""
    ds = simulate_catalog(sim)
    job = write_catalog(ds, out, storage, overwrite=overwrite)
    t0 = time.perf_counter()
    compute(job, client=client, label=f"simulate {sim.n} spectra -> {out}", progress=progress)
    consolidate(out)  # xarray.open_zarr(out) then opens it quietly, from one read of metadata
    seconds = time.perf_counter() - t0
    cat = open_catalog(out, require_labels=("snr",))
    dist = snr_distribution(np.asarray(cat["snr"].values), CatalogConfig())
    return {"n": sim.n, "seconds": seconds, "spectra_per_second": sim.n / seconds, "snr": dist}


def catalog_info(path: str | Path, cfg: CatalogConfig, *, client=None, progress: bool = True) -> dict[str, Any]:
    """Open, validate and summarise a catalog (one pass over the cube for pixel counts)."""
    ds = open_catalog(path, require_labels=(), config=cfg, routes_by_snr=True)
    (q,) = compute(pixel_quality(ds, cfg.min_good_fraction), client=client, label="pixel quality",
                   progress=progress)
    return summarize_catalog(ds, quality_totals(q), cfg)


def _simulated_with(path: Path, sim: SimulateConfig) -> bool:
    """True if ``path`` is a valid catalog simulated with exactly ``sim``."""
    try:
        ds = open_catalog(path, require_labels=())
    except Exception:  # noqa: BLE001 - anything unreadable is simply redone
        return False
    return ds.attrs.get("simulate_config") == json.dumps(sim.model_dump(mode="json"), sort_keys=True)


# ----------------------------------------------------------------- stages
#: Stages of a run in order, and the config sections each one depends on
#: (besides the stages before it, through their fingerprints).
STAGES: dict[str, tuple[str, ...]] = {
    "catalog": ("simulate", "storage"),
    "audit": ("catalog", "audit", "fit"),
    "fit": ("catalog", "fit", "gates"),
    "evaluate": ("catalog", "ceiling", "evaluate"),
    "report": (),
}
_UPSTREAM = {"catalog": (), "audit": ("catalog",), "fit": ("catalog",), "evaluate": ("fit",),
             "report": ("audit", "evaluate")}


def _fingerprint(cfg: Config, stage: str, done: dict[str, dict]) -> str:
    sections = {name: getattr(cfg, name).model_dump(mode="json") for name in STAGES[stage]}
    if stage == "catalog":
        sections["source"] = {"catalog": cfg.run.catalog, "ingest": cfg.run.ingest}
    upstream = {u: done.get(u, {}).get("fingerprint") for u in _UPSTREAM[stage]}
    return plan_token(sections=sections, upstream=upstream, package=version("snrmoe"))


def _outputs_exist(out: Path, stage: str, cfg: Config) -> bool:
    want = {"catalog": [], "audit": ["audit/audit.json"], "fit": ["model/model.json"],
            "evaluate": ["metrics.json", "predictions.zarr"], "report": ["report.md"]}[stage]
    return all((out / w).exists() for w in want)


class _Run:
    """Bookkeeping of one study directory: ``run.json`` is rewritten after every stage."""

    def __init__(self, out: Path, cfg: Config, resume: bool):
        self.out, self.cfg, self.resume = out, cfg, resume
        old = {}
        if resume and (out / "run.json").is_file():
            old = json.loads((out / "run.json").read_text()).get("stages", {})
        self.previous = old
        self.record: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "versions": versions(), "stages": {}}

    def skip(self, stage: str) -> bool:
        """True if ``stage`` finished before with the same inputs (``--resume``); records it."""
        fp = _fingerprint(self.cfg, stage, self.record["stages"])
        prev = self.previous.get(stage, {})
        if self.resume and prev.get("fingerprint") == fp and prev.get("done") and _outputs_exist(self.out, stage,
                                                                                               self.cfg):
            self.record["stages"][stage] = {**prev, "skipped": "complete, inputs unchanged"}
            print(f"[{stage}] skipped: complete, inputs unchanged", file=sys.stderr, flush=True)
            return True
        return False

    def done(self, stage: str, t0: float, **info) -> None:
        fp = _fingerprint(self.cfg, stage, self.record["stages"])
        self.record["stages"][stage] = {"seconds": time.perf_counter() - t0, **info, "fingerprint": fp, "done": True}
        self.write()

    def write(self) -> None:
        self.record["total_seconds"] = sum(s.get("seconds", 0.0) for s in self.record["stages"].values()
                                           if "skipped" not in s)
        (self.out / "run.json").write_text(json.dumps(self.record, indent=2))


def _catalog_stage(run: _Run, client, overwrite: bool) -> Path:
    cfg, out = run.cfg, run.out
    if cfg.run.catalog:
        catalog = Path(cfg.run.catalog)
        open_catalog(catalog, require_labels=(), config=cfg.catalog)  # fail early, naming the problem
        run.record["stages"]["catalog"] = {"source": str(catalog), "fingerprint": _fingerprint(cfg, "catalog", {}),
                                           "done": True, "seconds": 0.0}
        return catalog
    catalog = out / "catalog.zarr"
    if run.skip("catalog"):
        return catalog
    t0 = time.perf_counter()
    if cfg.run.ingest:
        from .catalog import REQUIRED_LABELS
        from .ingest import ingest

        rep = ingest(cfg.run.ingest, catalog, storage=cfg.storage, require_labels=REQUIRED_LABELS)
        run.done("catalog", t0, source=str(cfg.run.ingest), ingested_rows=rep["rows"])
    elif not overwrite and _simulated_with(catalog, cfg.simulate):
        run.done("catalog", t0, skipped="catalog with the same simulate config exists")
    else:
        sim = run_simulate(cfg.simulate, catalog, cfg.storage, client=client, overwrite=True)
        run.done("catalog", t0, **sim)
    return catalog


def run_study(cfg: Config, out: Path, *, client=None, overwrite: bool = False, resume: bool = False) -> dict:
    """One study (one seed) into ``out``: catalog, audit, fit, evaluate (+ ceiling), report."""
    with claimed(out, "run directory", "snrmoe run", overwrite=overwrite, resume=resume, what="run.out / --out"):
        return _run_study(cfg, out, client=client, overwrite=overwrite, resume=resume)


def _run_study(cfg: Config, out: Path, *, client, overwrite: bool, resume: bool) -> dict:
    from .audit import audit_catalog, write_audit
    from .evaluate import evaluate_model
    from .fit import fit_model
    from .store import load_model

    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, cfg, resume and not overwrite)
    if not (out / "run.json").is_file():  # marks the directory as a run's from the start (an interrupted one too)
        run.write()
    catalog = _catalog_stage(run, client, overwrite)
    run.record["catalog"] = str(catalog)
    run.write()

    # the audit rides the fit's pass (its statistics come from the same folds); on its own only if the fit is
    # already complete and the audit is not
    missing = [k for k in ("snr", "mag") if k not in open_catalog(catalog, require_labels=()).variables]
    want_audit = cfg.run.audit and not missing and not run.skip("audit")
    if cfg.run.audit and missing:  # real catalogs may lack the true S/N or magnitude the audit regresses on
        print(f"[audit] skipped: the catalog has no {', '.join(missing)} label(s)", file=sys.stderr)
        run.record["stages"]["audit"] = {"skipped": f"no {', '.join(missing)} label(s) in the catalog"}
    if run.skip("fit"):
        model = load_model(out / "model")
        if want_audit:
            t0 = time.perf_counter()
            ds = open_catalog(catalog, require_labels=("logg", "snr", "mag"), config=cfg.catalog)
            doc = write_audit(audit_catalog(ds, cfg, client=client, work_dir=out), out / "audit", ds, cfg)
            run.done("audit", t0, passes={k: v["pass"] for k, v in doc["representations"].items()},
                     own_pass=True)
    else:
        t0 = time.perf_counter()
        # the run directory was claimed above: its own model (and an interrupted fit) may be replaced
        model = fit_model(catalog, out / "model", cfg, client=client, resume=run.resume, overwrite=True,
                          replace_model=True, audit_out=out / "audit" if want_audit else None)
        acc = model.meta["accumulation"]
        run.done("fit", t0, n_experts=len(model.meta["experts"]), train_rows=model.meta["train_rows"],
                 chunks_from_checkpoint=acc["chunks_from_checkpoint"], chunks_folded=acc["chunks_folded"],
                 **model.meta["timings"])
        if want_audit:
            doc = json.loads((out / "audit" / "audit.json").read_text())
            run.done("audit", time.perf_counter(), passes={k: v["pass"] for k, v in doc["representations"].items()},
                     in_fit_pass=True, seconds_after_pass=model.meta["timings"].get("audit_s"))
    # the catalog summary comes from the fit's feature table: the same read of the cube
    features = xr.open_zarr(out / "model" / "features.zarr", consolidated=False).load()
    ds = open_catalog(catalog, require_labels=(), config=cfg.catalog)
    info = summarize_catalog(ds, quality_totals(features), cfg.catalog)
    (out / "catalog_summary.json").write_text(json.dumps(info, indent=2))
    run.record["summary"] = info

    if run.skip("evaluate"):
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        t0 = time.perf_counter()
        metrics = evaluate_model(model, catalog, cfg, client=client, predictions_out=out / "predictions.zarr")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.done("evaluate", t0, ceiling_seconds=metrics.get("ceiling_seconds"))
    run.record["metrics"] = metrics

    if cfg.run.report and not run.skip("report"):
        from .report import write_report

        t0 = time.perf_counter()
        figures = write_report(out)
        run.done("report", t0, figures=figures)
    run.write()
    return run.record


def seed_config(cfg: Config, seed: int) -> Config:
    """The study config of one seed: simulation seed and split salt set to ``seed``."""
    data = cfg.model_dump(mode="json")
    data["simulate"]["seed"] = seed
    data["catalog"]["split_salt"] = seed
    data["run"]["seeds"] = None
    data["run"]["out"] = str(Path(cfg.run.out) / f"seed-{seed}")
    return Config.model_validate(data)


def run_pipeline(cfg: Config, *, client=None, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the study for ``cfg`` (once, or once per ``run.seeds``); returns and writes ``run.json``."""
    out = Path(cfg.run.out)
    with claimed(out, "run directory", "snrmoe run", overwrite=overwrite, resume=resume, what="run.out / --out"):
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.run.seeds:
            return run_study(cfg, out, client=client, overwrite=overwrite, resume=resume)
        return _run_seeds(cfg, out, client=client, overwrite=overwrite, resume=resume)


def _run_seeds(cfg: Config, out: Path, *, client, overwrite: bool, resume: bool) -> dict[str, Any]:
    from .report import seed_summary, write_seeds_report

    records = {}
    for seed in cfg.run.seeds:
        print(f"=== seed {seed} ===", file=sys.stderr, flush=True)
        scfg = seed_config(cfg, seed)
        records[seed] = run_study(scfg, Path(scfg.run.out), client=client, overwrite=overwrite, resume=resume)
    summary = seed_summary({s: r["metrics"] for s, r in records.items()})
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    record = {"config": cfg.model_dump(mode="json"), "versions": versions(), "seeds": list(cfg.run.seeds),
              "studies": {str(s): str(Path(cfg.run.out) / f"seed-{s}") for s in cfg.run.seeds},
              "stage_seconds": {str(s): {k: v.get("seconds") for k, v in r["stages"].items()}
                                for s, r in records.items()},
              "summary": records[cfg.run.seeds[0]]["summary"], "metrics": records[cfg.run.seeds[0]]["metrics"],
              "seed_summary": summary}
    if cfg.run.report:
        write_seeds_report(out, summary, {str(s): Path(cfg.run.out) / f"seed-{s}" for s in cfg.run.seeds})
    (out / "run.json").write_text(json.dumps(record, indent=2))
    return record
