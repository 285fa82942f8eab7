"""The documents say what the code and the suite do: generated sections are current, relative links resolve."""

from __future__ import annotations

import re

import pytest
from bad_inputs import BEGIN, END, ROOT, render_doc, render_readme

# the project's own pages: not those tools leave in hidden folders (pytest's .pytest_cache/README.md exists only
# after a first run, which made a fresh clone collect one test fewer than a working copy)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted(p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith("."))]


def test_the_reliability_section_and_page_are_generated_from_the_current_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(BEGIN):readme.index(END) + len(END)]
    assert section == render_readme(), "README is stale: run `python tests/bad_inputs.py`"
    assert (ROOT / "docs" / "reliability.md").read_text() == render_doc(), \
        "docs/reliability.md is stale: run `python tests/bad_inputs.py`"


def test_the_readme_results_are_generated_from_the_committed_benchmark_output():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_results

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(readme_results.BEGIN):readme.index(readme_results.END) + len(readme_results.END)]
    assert section == readme_results.render(), "README is stale: run `python benchmarks/readme_results.py`"


def test_the_readme_is_a_front_door_and_the_repository_stands_alone():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    assert readme.index("```bash") < readme.index("## ")  # the two commands come first
    for doc in [*DOCS, *sorted((ROOT / "snrmoe_dask").glob("*.py"))]:
        text = doc.read_text()
        assert "../shared" not in text and "SPEC section" not in text and "SPEC §" not in text, doc


def test_every_fault_test_named_in_the_docs_exists():
    from bad_inputs import FAULTS

    for fault in FAULTS:
        file, name = fault.test.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), fault.test


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves_inside_the_repository(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue  # a web address or an anchor on the same page
        target = (doc.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"{doc.relative_to(ROOT)} links to {link}, which does not exist"
        assert target.is_relative_to(ROOT), f"{doc.relative_to(ROOT)} links outside the repository: {link}"
