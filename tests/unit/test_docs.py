"""The README is the front door and the docs stay true: size, links, and the examples they show."""

import json
import re

import pytest

from conftest import REPO_ROOT

PAGES = [
    REPO_ROOT / "README.md",
    *sorted((REPO_ROOT / "docs").glob("*.md")),
    *sorted((REPO_ROOT / "benchmarks").glob("*.md")),
]


def test_readme_is_a_front_door():
    assert len((REPO_ROOT / "README.md").read_bytes()) <= 14 * 1024
    assert 'pytest -m "not slow"' in (REPO_ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
    text = page.read_text()
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in target]
    missing = [target for target in links if not (page.parent / target.split("#")[0]).exists()]
    assert missing == [], f"{page.name} links to missing files: {missing}"
    anchors = [target for target in links if target.startswith("#")]
    assert anchors == [], f"{page.name} links to anchors of its own: {anchors}"  # sections move between pages


def test_readme_example_row_is_a_row_of_the_example_data():
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```json\n(.*?)\n```", text, re.DOTALL)
    assert block, "no example row in the README"
    rows = [
        json.loads(line) for line in (REPO_ROOT / "examples" / "messages" / "train.jsonl").read_text().splitlines()
    ]
    assert json.loads(block.group(1)) in rows


def test_pyproject_declares_the_tested_requirements():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | {r for extra in project["optional-dependencies"].values() for r in extra}
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    required = {line.strip() for line in lines if line.strip() and not line.startswith(("#", "-e"))}
    assert required == declared
