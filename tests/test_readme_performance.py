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


def test_files_without_a_clean_commit_are_set_apart(tmp_path, monkeypatch):
    """A results file that records no commit, or a modified tree, is rendered under "Before
    provenance was recorded", never among the current figures."""
    import json

    dynamics = json.loads((report.RESULTS / "tree_dynamics.json").read_text())
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for commit, current in ((None, False), ("abc1234-dirty", False), ("abc1234", True)):
        dynamics["machine"]["commit"] = commit
        (tmp_path / "tree_dynamics.json").write_text(json.dumps(dynamics))
        page = report.render()
        assert "tree_dynamics.json" in page
        historic_at = page.find("## Before provenance was recorded")
        assert (historic_at == -1) == current
        if not current:
            assert page.index("tree_dynamics.json") > historic_at
