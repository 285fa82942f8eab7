"""Update and merge models from their statistics (``snrmoe update``, ``snrmoe merge``).

``update(fit(A), B)`` reads B once (its features, the statistics of its train
rows, its val and frozen-test rows for the cache), adds the statistics to
A's, solves every expert and baseline again and refits the gates on the val
rows of A and B; A is never read. ``merge(fit(A), fit(B))`` reads no catalog
at all. Both give the model a fit on A and B joined gives (with the bin edges
of the first model passed in config), to the rounding of float64 sums; the
tests check it to 1e-8.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import dask
import xarray as xr

from .config import Config, ConfigError, load_config
from .experts import expert_specs
from .fit import finish_model, fit_model, solve_statistics
from .outputs import claimed, output_lock
from .prior import Prior, PriorError, link_caches
from .store import Model, load_model

__all__ = ["update_model", "merge_models", "model_config_for"]

#: sections of the config that define the cells, the split, the solves and the gates: they come from the model
MODEL_SECTIONS = ("catalog", "fit", "gates")
#: keys of those sections that only say how this run computes (memory, threads, checkpoints): the caller's
EXECUTION_KEYS = {"fit": {"chains", "memory_budget", "read_ahead", "checkpoint_every", "checkpoint_min_read_ratio",
                          "blas_pieces", "flush_rows"},
                  "gates": {"n_jobs"}}


def model_config_for(prior: Prior, given: Config) -> Config:
    """The model's config, with ``given``'s cluster section and execution keys (:data:`EXECUTION_KEYS`); another
    key of :data:`MODEL_SECTIONS` that ``given`` sets to something other than both the shipped default and the
    model's value is refused, naming the key."""
    mine = prior.config(cluster=given.cluster.model_dump(mode="json"))
    shipped = load_config()
    updates = {}
    for section in MODEL_SECTIONS:
        ours = getattr(given, section).model_dump(mode="json")
        theirs_all = getattr(mine, section).model_dump(mode="json")
        default_all = getattr(shipped, section).model_dump(mode="json")
        run_keys = EXECUTION_KEYS.get(section, set())
        for key, value in ours.items():
            theirs, default = theirs_all[key], default_all[key]
            if key in run_keys or value == theirs or value == default:
                continue
            raise ConfigError(f"{section}.{key} is {value} in this config, but model {prior.model_dir} has "
                              f"{theirs}; an update keeps the model's cells, split and solves: drop the key "
                              "or fit a new model")
        if run_keys:
            updates[section] = getattr(mine, section).model_copy(update={k: getattr(getattr(given, section), k)
                                                                         for k in run_keys})
    return mine.model_copy(update=updates)


def update_model(model_dir: str | Path, catalog: str | Path, out: str | Path, cfg: Config | None = None, *,
                 client=None, progress: bool = True, in_place: bool = False) -> Model:
    """The model of ``model_dir``'s catalogs and ``catalog``, from one read of ``catalog``.

    ``out`` must be a new path (as for ``fit``), or ``model_dir`` itself with ``in_place``: the new model is
    written beside it and takes its place at the end, so an interrupted update leaves the old model.
    """
    model_dir, out = Path(model_dir).absolute(), Path(out).absolute()
    if out == model_dir and not in_place:
        raise PriorError(f"--out is the model being updated ({model_dir}); pass --in-place to replace it when the "
                         "update completes, or choose a new --out")
    prior = Prior.load(model_dir)
    cfg = model_config_for(prior, cfg or load_config())
    if out != model_dir:
        return fit_model(catalog, out, cfg, client=client, progress=progress, prior=prior, command="snrmoe update")
    with output_lock(model_dir, "snrmoe update --in-place"):
        staging = model_dir.parent / f".{model_dir.name}.update-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            fit_model(catalog, staging, cfg, client=client, progress=progress, prior=prior,
                      command="snrmoe update --in-place")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = model_dir.parent / f".{model_dir.name}.replaced-{os.getpid()}"
        model_dir.rename(old)
        staging.rename(model_dir)
        shutil.rmtree(old, ignore_errors=True)
    return load_model(model_dir)


def merge_models(model_a: str | Path, model_b: str | Path, out: str | Path, cfg: Config | None = None, *,
                 client=None, progress: bool = True) -> Model:
    """The model of two models' catalogs (disjoint, same grid, bins, α grid and split): no catalog is read."""
    t_start = time.perf_counter()
    a, b = Prior.load(model_a), Prior.load(model_b)
    a.check_mergeable(b)
    cfg = model_config_for(a, cfg or load_config())
    out = Path(out).absolute()
    with claimed(out, "model", "snrmoe merge"):
        out.mkdir(parents=True, exist_ok=True)
        link_caches([a, b], out)
        stats_d = dask.delayed(_sum_stats, pure=True)(a, b, dask_key_name=f"merge stats-{dask.base.tokenize(a, b)}")
        bstats_d = None
        if a.meta.get("baselines", {}).get("fitted"):
            bstats_d = dask.delayed(_sum_baseline_stats, pure=True)(a, b)
        edges = a.edges
        specs = expert_specs(list(a.meta["snr_bin_names"]), list(a.meta["phys_bin_names"]))
        solved = solve_statistics(stats_d, bstats_d, specs, cfg, out, client, progress, label="merged statistics")
        features = a.features_with(b.features())
        wavelength = xr.open_zarr(a.model_dir / "experts.zarr", consolidated=False)["wavelength"].values
        return finish_model(solved, features, a.provenance.then("merge", *b.catalogs), wavelength=wavelength,
                       edges=edges, cfg=cfg, model_dir=out, client=client, progress=progress,
                       snr_source=a.meta["snr_routing_source"], t_start=t_start,
                       accumulation={"merged": [str(a.model_dir), str(b.model_dir)]},
                       train_rows_excluded_unusable=int(solved.saved["meta"].get("train_rows_excluded_unusable", 0)))


def _sum_stats(a: Prior, b: Prior):
    from .stats import SufficientStats

    return a.add_stats(SufficientStats.from_zarr(b.model_dir / "stats.zarr"))


def _sum_baseline_stats(a: Prior, b: Prior):
    from .baselines import BaselineStats

    return a.add_baseline_stats(BaselineStats.from_zarr(b.model_dir / "baseline_stats"))
