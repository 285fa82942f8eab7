"""The result tables of a run, as Markdown, from its ``metrics.json`` (never retyped).

Usage::

    python benchmarks/metrics_tables.py RUN_DIR [--copy NAME]

Prints the R² table (± paired-bootstrap standard errors, ρ), both Bayes
ceilings per S/N bin with efficiencies, every gate's deployed vs soft R²,
fallback τ and fraction, and the coverage of the calibrated σ. With
``--copy NAME`` the run's ``metrics.json`` is also copied to
``benchmarks/results/metrics_NAME.json`` so that the tables in the docs can be
regenerated from committed output.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from snrmoe_dask.metrics import r2_table
from snrmoe_dask.report import ceiling_table, coverage_table, gate_table


def tables(metrics: dict) -> str:
    out = [f"Frozen test: {metrics['n_test']} spectra.", "", "### R² (± bootstrap standard error)", "",
           r2_table(metrics), ""]
    if "ceiling" in metrics:
        out += ["### Bayes ceilings and efficiency", "", ceiling_table(metrics), ""]
    if any("gate_confusion" in m for m in metrics["models"].values()):
        out += ["### Gates: deployed vs soft mixture", "", gate_table(metrics), "",
                "### Coverage of σ (±1σ / ±2σ; 0.683 / 0.954 expected)", "", coverage_table(metrics), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--copy", help="also copy metrics.json to benchmarks/results/metrics_NAME.json")
    args = ap.parse_args()
    path = args.run_dir / "metrics.json" if args.run_dir.is_dir() else args.run_dir
    metrics = json.loads(path.read_text())
    print(tables(metrics))
    if args.copy:
        dest = Path(__file__).parent / "results" / f"metrics_{args.copy}.json"
        shutil.copyfile(path, dest)
        print(f"\n(copied to {dest})")


if __name__ == "__main__":
    main()
