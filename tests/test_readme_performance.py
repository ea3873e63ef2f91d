"""The README's headline table, docs/performance.md and the attribution table must be exactly what
benchmarks/report.py makes of the result files: no figure in them is typed by hand."""

import pytest

from .conftest import REPO_ROOT, load_benchmark

report = load_benchmark("report")


@pytest.mark.parametrize("page, start, end, renderer", report.BLOCKS, ids=[block[0] for block in report.BLOCKS])
def test_generated_blocks_are_made_from_the_results(page, start, end, renderer):
    text = (REPO_ROOT / page).read_text()
    assert renderer() in text, "run `python benchmarks/report.py` after re-running a benchmark"


def test_the_readme_stays_short():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 300
