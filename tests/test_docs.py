"""Every ```python block of the documentation site (docs/*.md) runs as written.

The blocks are found, run and judged exactly as the README's are (``tests/test_readme.py``):
each in a fresh interpreter, in an empty directory, with the same ``# excerpt`` rule. The
site itself must build with ``mkdocs build --strict``; CI builds it on its own, so that test
skips, naming why, when the docs extra (``pip install -e ".[docs]"``) is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._child import output_of
from tests._imports import import_or_skip
from tests.test_readme import EXCERPT_MARK, ROOT, Block, fenced_blocks, run_block

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BUILD_TIMEOUT = 300.0  # seconds; a build takes well under a minute

# A page made only of an include of a file kept elsewhere: its blocks are run there.
_INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')


def docs_python_blocks() -> list[Block]:
    found: list[Block] = []
    for page in PAGES:
        document = page.relative_to(ROOT).as_posix()
        text = page.read_text(encoding="utf-8")
        found += [b for b in fenced_blocks(text, document) if b.language == "python"]
    return found


BLOCKS = docs_python_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    if block.is_excerpt:
        pytest.skip(f"{block.test_id} is marked {EXCERPT_MARK!r}")
    for module in block.optional_imports:
        import_or_skip(module)
    done = run_block(block, tmp_path)
    assert done.returncode == 0, f"{block.test_id} exited {done.returncode}:\n{output_of(done)}"


def test_the_pages_have_blocks_and_excerpts_are_a_minority() -> None:
    assert len(BLOCKS) >= 10, [b.test_id for b in BLOCKS]
    excerpts = [b.test_id for b in BLOCKS if b.is_excerpt]
    assert 2 * len(excerpts) < len(BLOCKS), f"{len(excerpts)} of {len(BLOCKS)}: {excerpts}"


def test_no_python_block_hides_under_another_language_tag() -> None:
    for page in PAGES:
        document = page.relative_to(ROOT).as_posix()
        for block in fenced_blocks(page.read_text(encoding="utf-8"), document):
            looks_like_python = block.language.startswith("py") or block.language == "pycon"
            assert block.language == "python" or not looks_like_python, block.test_id


def test_every_page_is_in_the_nav_and_every_include_exists() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert re.search(rf":\s+{re.escape(page.name)}\s*$", config, re.M), page.name
        for line in page.read_text(encoding="utf-8").splitlines():
            included = _INCLUDE.match(line.strip())
            if included:
                assert (ROOT / included["path"]).is_file(), f"{page.name}: {line}"


def test_the_readme_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", readme))
    assert linked, "the README links to no docs page"
    for target in sorted(linked):
        assert (ROOT / target).is_file(), target


def test_the_site_builds_strict(tmp_path: Path) -> None:
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if importlib.util.find_spec(name.split(".")[0]) is None
    ]
    if missing:
        pytest.skip(
            f"the docs extra is not installed ({', '.join(missing)} missing); "
            'CI builds the site itself after `pip install -e ".[docs]"`'
        )
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert done.returncode == 0, output_of(done, tail=8000)
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
