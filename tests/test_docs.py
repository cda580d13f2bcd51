"""The course in docs/ cannot rot: every ```python block runs, and the generated traces are current.

Each docs/*.md file's python blocks run in order in one namespace (a chapter builds on its earlier
blocks), in a fresh temporary directory. Blocks fenced as ```text or ```console are output, not run;
a block fenced as ```text output is what the python block before it prints, and is checked against it;
a block fenced as ```python quote=PATH quotes that file and must appear in it, line for line (not run).
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
CHAPTERS = sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def python_blocks(path: Path) -> list[str]:
    return [body for info, body in blocks(path) if info == "python"]


def quotes(path: Path) -> list[tuple[str, str]]:
    """(quoted file, body) of every ```python quote=PATH block."""
    return [(info.split("quote=", 1)[1].strip(), body) for info, body in blocks(path) if "quote=" in info]


def blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block, in order."""
    return [(info.strip(), body) for info, body in FENCE.findall(path.read_text(encoding="utf-8"))]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def test_the_course_has_its_chapters() -> None:
    names = {p.name for p in CHAPTERS}
    for want in ("01-tensors-and-graphs.md", "02-one-training-step.md", "03-lora.md", "04-dora.md",
                 "05-qlora-nf4.md", "06-adapters.md", "08-reading-bench.md"):
        assert want in names


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_every_python_block_runs(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    seq = blocks(path)
    printed, n_python = None, sum(1 for info, _ in seq if info == "python")
    i = 0
    for info, code in seq:
        if info == "text output":
            assert printed is not None, f"{path.name}: a ```text output block with no python block before it"
            assert _lines(printed) == _lines(code), (
                f"{path.name}: the output shown after python block {i} is not what it prints:\n{printed}")
            continue
        if info != "python":
            continue
        i += 1
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{path.name} (python block {i})", "exec"), namespace)
        except Exception as e:  # name the block: the traceback alone points at a string
            raise AssertionError(f"{path.name}, python block {i} of {n_python} failed: {type(e).__name__}: {e}") from e
        printed = out.getvalue()


def _dedented_lines(text: str) -> list[str]:
    return [line.rstrip() for line in textwrap.dedent(text).strip("\n").splitlines()]


def test_code_quoted_in_the_docs_is_still_in_the_code() -> None:
    found = 0
    for path in [DOCS / "README.md", *CHAPTERS]:
        for source, body in quotes(path):
            want = _dedented_lines(body)
            lines = (ROOT / source).read_text(encoding="utf-8").splitlines()
            n = len(want)
            hit = any(_dedented_lines("\n".join(lines[i:i + n])) == want for i in range(len(lines) - n + 1))
            assert hit, f"{path.name}: the code quoted from {source} is no longer there:\n{body}"
            found += 1
    assert found >= 3


def test_chapters_teach_with_running_code() -> None:
    for path in CHAPTERS:
        if path.name != "07-backends-and-kernels.md":  # another branch writes chapter 7 and its checks
            assert python_blocks(path), f"{path.name} has no python block"


def test_the_generated_traces_in_chapter_2_are_current() -> None:
    from minitorch_peft.trace import DOC_PATH, update_doc

    assert DOC_PATH == DOCS / "02-one-training-step.md"
    assert update_doc(DOC_PATH, check=True), (
        "docs/02-one-training-step.md is stale: the trace of a step changed; run `python cli.py trace --update-doc`"
    )


def test_update_doc_rewrites_a_stale_trace(tmp_path) -> None:
    from minitorch_peft.trace import DOC_PATH, update_doc

    doc = tmp_path / "02.md"
    doc.write_text(DOC_PATH.read_text().replace("weight gradients skipped (frozen): 6 of 12", "stale line"))
    assert update_doc(doc, check=True) is False
    assert update_doc(doc) is False and doc.read_text() == DOC_PATH.read_text()
    assert update_doc(doc, check=True) is True


def test_every_chapter_is_linked_from_the_index_and_every_link_resolves() -> None:
    index = (DOCS / "README.md").read_text()
    for path in CHAPTERS:
        assert f"]({path.name})" in index, f"docs/README.md does not link {path.name}"
    assert "](07-backends-and-kernels.md)" in index
    for path in [DOCS / "README.md", *CHAPTERS, ROOT / "README.md"]:
        for target in LINK.findall(path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            if target == "07-backends-and-kernels.md" and not (DOCS / target).exists():
                continue  # written on another branch; linked ahead of its merge
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_the_readme_has_a_learn_section_pointing_at_the_course() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Learn" in readme and "](docs/README.md)" in readme
