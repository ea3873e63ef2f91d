"""The README's performance section must be exactly what benchmarks/report.py makes of the result
files: no figure in it is typed by hand."""

from .conftest import REPO_ROOT, load_benchmark


def test_readme_performance_section_is_generated_from_results():
    report = load_benchmark("report")
    readme = (REPO_ROOT / "README.md").read_text()
    assert report.render() in readme, "run `python benchmarks/report.py` after re-running a benchmark"


def test_attribution_table_in_the_docs_is_generated_from_results():
    report = load_benchmark("report")
    page = (REPO_ROOT / "docs" / "attribution.md").read_text()
    assert report.render_attribution() in page, "run `python benchmarks/report.py` after re-running a benchmark"
