"""Generated documentation stays in sync with the code."""

from treeffn_hf.cli.reference import render

from .conftest import REPO_ROOT


def test_cli_reference_is_generated_from_the_parsers():
    assert (REPO_ROOT / "docs" / "cli.md").read_text() == render(), (
        "run `python -m treeffn_hf.cli.reference > docs/cli.md`"
    )


def test_every_doc_page_is_linked_from_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    for page in (REPO_ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
