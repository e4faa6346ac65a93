"""Every ```python block of README.md and examples/README.md runs as written.

Each block is written to a file of its own and run by a fresh interpreter (``_child.py``)
in an empty working directory, with this checkout first on ``PYTHONPATH``; it must exit 0
within ``BLOCK_TIMEOUT``. A block whose first line is ``# excerpt`` is skipped; those must
stay a minority. Test ids are ``file:line`` of the block's opening fence.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._child import output_of, run_python
from tests._imports import import_or_skip

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "examples/README.md")
EXCERPT_MARK = "# excerpt"
BLOCK_TIMEOUT = 120.0  # seconds; the slowest block takes a few

# Integrations the suite tests only where they import (tests/integration/ skips them the
# same way): on the lowest supported langchain-core, Langfuse's LangChain handler pulls in
# a LangGraph built for langchain-core 1.x, which fails on import. A block importing one of
# these is skipped, naming why, when the module cannot be imported here; every other import
# failure fails the block.
OPTIONAL_INTEGRATIONS = ("langfuse", "langgraph", "langchain_classic", "openinference")

# An opening or closing fence: up to 3 spaces, then 3+ backticks or tildes, then the info string.
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # 1-based line number of the opening fence
    language: str
    source: str

    @property
    def test_id(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def optional_imports(self) -> list[str]:
        """Modules of ``OPTIONAL_INTEGRATIONS`` this block imports, in order."""
        names: list[str] = []
        for node in ast.walk(ast.parse(self.source)):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
        return [n for n in names if n.split(".")[0] in OPTIONAL_INTEGRATIONS]

    @property
    def is_excerpt(self) -> bool:
        lines = self.source.splitlines()
        return bool(lines) and lines[0].strip() == EXCERPT_MARK


def fenced_blocks(text: str, document: str = "<text>") -> list[Block]:
    """Every fenced code block of a Markdown text, with its language and line number.

    A block closes at a fence of the same character at least as long as the opening one
    (CommonMark's rule), so a block that shows a fence inside it is read whole. An
    unclosed block is an error: it would hide every block after it.
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = opening["info"].strip().split(" ")[0].lower()
        start = index
        body: list[str] = []
        while True:
            if index >= len(lines):
                raise ValueError(f"{document}:{start}: code block never closed")
            closing = _FENCE.match(lines[index])
            index += 1
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[index - 1]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
        blocks.append(Block(document, start, language, "\n".join(body) + "\n"))
    return blocks


def python_blocks() -> list[Block]:
    found: list[Block] = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text(encoding="utf-8")
        found += [b for b in fenced_blocks(text, document) if b.language == "python"]
    return found


def run_block(block: Block, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run one block as a script in ``directory`` with a fresh interpreter."""
    script = directory / f"block_{Path(block.document).stem}_{block.line}.py"
    script.write_text(block.source, encoding="utf-8")
    paths = [str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        # Nothing in a block may reach a tracing service, whatever the caller's shell says.
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
    }
    try:
        return run_python([str(script)], cwd=directory, env=env, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.test_id}: still running after {BLOCK_TIMEOUT:.0f} s\n{exc.stdout}")


BLOCKS = python_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    if block.is_excerpt:
        pytest.skip(f"{block.test_id} is marked {EXCERPT_MARK!r}")
    for module in block.optional_imports:
        import_or_skip(module)
    done = run_block(block, tmp_path)
    assert done.returncode == 0, f"{block.test_id} exited {done.returncode}:\n{output_of(done)}"


def test_each_document_has_blocks_and_excerpts_are_a_minority() -> None:
    for document in DOCUMENTS:
        assert any(b.document == document for b in BLOCKS), f"no python block in {document}"
    excerpts = [b.test_id for b in BLOCKS if b.is_excerpt]
    assert 2 * len(excerpts) < len(BLOCKS), f"{len(excerpts)} of {len(BLOCKS)}: {excerpts}"


def test_no_python_block_hides_under_another_language_tag() -> None:
    # ```py or ```python3 would be rendered as Python but never run here.
    for document in DOCUMENTS:
        text = (ROOT / document).read_text(encoding="utf-8")
        for block in fenced_blocks(text, document):
            looks_like_python = block.language.startswith("py") or block.language == "pycon"
            assert block.language == "python" or not looks_like_python, block.test_id


def test_the_parser_keeps_line_numbers_languages_and_nested_fences() -> None:
    text = "\n".join(
        [
            "# Title",  # 1
            "```python",  # 2
            "print('a')",  # 3
            "```",  # 4
            "````markdown",  # 5
            "```python",  # 6: shown inside a longer fence, not a block of its own
            "```",  # 7
            "````",  # 8
            "  ```python",  # 9: indented fence, indentation stripped
            "  x = 1",  # 10
            "  ```",  # 11
            "~~~bash",  # 12
            "echo hi",  # 13
            "~~~",  # 14
        ]
    )
    blocks = fenced_blocks(text)
    assert [(b.line, b.language) for b in blocks] == [
        (2, "python"),
        (5, "markdown"),
        (9, "python"),
        (12, "bash"),
    ]
    assert blocks[0].source == "print('a')\n"
    assert blocks[1].source == "```python\n```\n"
    assert blocks[2].source == "x = 1\n"
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```python\nprint(1)\n")


def test_a_broken_block_fails(tmp_path: Path) -> None:
    # The check must be able to fail: a block using a name it never defines exits non-zero.
    (broken,) = fenced_blocks("```python\nimport safecallbacks\nprint(sink)\n```\n", "broken.md")
    done = run_block(broken, tmp_path)
    assert done.returncode != 0
    assert "NameError" in done.stderr


def test_an_excerpt_mark_is_recognised_only_on_the_first_line() -> None:
    excerpt, not_excerpt = fenced_blocks(
        "```python\n# excerpt\nchain.invoke(x)\n```\n```python\nx = 1\n# excerpt\n```\n"
    )
    assert excerpt.is_excerpt
    assert not not_excerpt.is_excerpt
