"""Every row of the bad-input table (tests/bad_inputs.py) through the command line, as a user runs it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from bad_inputs import CASES, Ctx

from snrmoe_dask.cli import main


def _tree(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under the roots with a hash of its bytes (folders too, so an empty one left behind shows).

    Below ``skip`` nothing is walked: a pass stopped by an error may still be finishing a checkpoint there.
    """
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here == skip:
                dirnames.clear()
                filenames = []
            out.update({str(here / d): "dir" for d in dirnames})
            out.update({str(here / f): hashlib.sha1((here / f).read_bytes()).hexdigest() for f in filenames})
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_bad_input(case, fitted, fit_catalog, tmp_path, capsys):
    _, _, model_dir = fitted
    ctx = Ctx(tmp_path / "case", fit_catalog, model_dir)
    ctx.tmp.mkdir()
    argv = case.build(ctx)
    assert argv[0] == case.command
    capsys.readouterr()
    before = _tree(ctx.tmp, fit_catalog, model_dir)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    if case.outcome in ("refused", "stopped"):
        lines = [line for line in err.splitlines() if line.startswith(f"snrmoe {argv[0]}: error:")]
        assert code == 2 and len(lines) == 1, (code, err)
        assert case.expect in lines[0], lines[0]
        after = _tree(ctx.tmp, fit_catalog, model_dir, skip=ctx.out)
        if case.outcome == "stopped":  # the pass began: its checkpoints and row cache are left for --resume
            assert {p.name for p in ctx.out.iterdir()} <= {"checkpoints", "rows"}, list(ctx.out.iterdir())
            del after[str(ctx.out)]
        assert after == before  # nothing else written, nothing changed
    else:
        assert code == 0, err
        assert case.expect in out, out


def test_every_numbered_case_of_the_hostile_input_issue_is_in_the_table_or_a_fault_test():
    from bad_inputs import FAULTS

    covered = {c.issue for c in CASES} | {f.issue for f in FAULTS}
    assert {str(k) for k in range(1, 13)} <= covered
