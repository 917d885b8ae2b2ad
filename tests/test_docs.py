"""The docs site: the config reference is the schema's, every page is in the navigation, and the site
builds strictly (a broken link or a missing page fails)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlfuse.config import reference, reference_markdown
from vlfuse.schema import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_config_reference_page_is_the_schema():
    page = (DOCS / "config-reference.md").read_text()
    assert page == reference_markdown(), (
        "docs/config-reference.md is stale: regenerate it with\n"
        "python -c \"from vlfuse.config import reference_markdown; print(reference_markdown(), end='')\" "
        "> docs/config-reference.md"
    )
    for key, _, doc in reference(Config()):
        assert f"| `{key}` |" in page
        assert doc, f"{key} has no documentation in vlfuse/schema/ (a comment above the field)"


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    return [p for value in node.values() for p in _nav_pages(value)]


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "config-reference" / "index.html").is_file()


def test_the_readme_stays_a_front_door():
    """At most 250 lines: the switch, set-up and the commands, the study in a screen, one example per
    task, loading safely, links; measurements and details live in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines (at most 250)"
    for must in ("vlfuse train grounding", "vlfuse study", "accelerate launch -m vlfuse", "pip install"):
        assert must in readme, must
    for link in [part.split(")")[0] for part in readme.split("](")[1:]]:
        if not link.startswith("http"):
            assert (ROOT / link.split("#")[0]).exists(), f"README links to a missing file: {link}"
