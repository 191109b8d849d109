"""The guided tour in docs/ is executable: every snippet runs and prints what the page shows.

A page is run like a notebook. Its ```python blocks run in order in one
namespace, fresh for each page. A ```python block followed directly (only
blank lines between) by a ```text or ```output block must print exactly that
text, compared line by line after stripping trailing whitespace; a ```python
block with no output block after it must print nothing. A block opened with
```python no-run is shown to the reader and not run (code that needs a GPU, a
download or minutes).

Snippets run inside a temporary working directory, so a file they write
does not land in the checkout. Pages and the README section also must not
link to a file that does not exist, and a block quoting a source file
(```cpp from kernels/crop.cu) must appear in that file word for word.

The tour is nine numbered pages about FCN (docs/01_*.md ... docs/09_*.md), each
ending with two or three exercises whose answers are snippets like the others,
and with no timings; the engine (CPU backend, CUDA kernels, data parallelism)
is in appendix pages (docs/appendix_*.md), linked from docs/README.md.
"""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from minifcn.backend.cuda import cpu_emulation

DOCS = Path(__file__).resolve().parent.parent / "docs"
TOUR = sorted(DOCS.glob("[0-9][0-9]_*.md"))
APPENDIX = sorted(DOCS.glob("appendix_*.md"))
README = DOCS.parent / "README.md"
# The tour, its appendix, index and results page, the top-level README, and pretrained.md (whose
# snippets need downloaded weights, so they are marked ```python no-run and only its links are checked).
PAGES = ([DOCS / "README.md"] + TOUR + APPENDIX
         + [DOCS / "results.md", DOCS / "pretrained.md", README])
OUTPUT_TAGS = ("text", "output")

FENCE = re.compile(r"^```(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


class Snippet:
    def __init__(self, line, code, expected):
        self.line, self.code, self.expected = line, code, expected


def fenced_blocks(text):
    """[(first line number, info string, body)] of every ``` fenced block, in order,
    and for each the text between it and the previous block."""
    blocks, lines, i, gap_start = [], text.split("\n"), 0, 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, info, body = i + 1, opening.group(1).strip(), []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start}: the fenced block opened here is never closed")
        blocks.append((start, info, "\n".join(body), "\n".join(lines[gap_start:start - 1])))
        i += 1
        gap_start = i
    return blocks


def snippets(page):
    """The runnable ```python blocks of a page, each with the output it must print (or "")."""
    found, blocks = [], fenced_blocks(page.read_text(encoding="utf-8"))
    for index, (line, info, body, _) in enumerate(blocks):
        words = info.split()
        if not words or words[0] != "python" or "no-run" in words[1:]:
            continue
        expected = ""
        if index + 1 < len(blocks):
            next_line, next_info, next_body, gap = blocks[index + 1]
            if next_info in OUTPUT_TAGS and not gap.strip():
                expected = next_body
        found.append(Snippet(line, body, expected))
    return found


def normalise(text):
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")).strip("\n")


def requirements(page):
    """What a page says it needs, in a comment: <!-- requires: g++ -->."""
    match = re.search(r"<!--\s*requires:\s*(.*?)\s*-->", page.read_text(encoding="utf-8"))
    return match.group(1).split() if match else []


def test_the_tour_has_its_pages():
    names = [page.name for page in TOUR]
    assert len(names) == 9, names
    assert [name[:2] for name in names] == [f"{i:02d}" for i in range(1, 10)], names
    assert len(APPENDIX) >= 3, [page.name for page in APPENDIX]
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    missing = [page.name for page in TOUR + APPENDIX if f"({page.name})" not in index]
    assert not missing, f"docs/README.md does not link to {missing}"
    readme = README.read_text(encoding="utf-8")
    missing = [page.name for page in TOUR + APPENDIX if f"(docs/{page.name})" not in readme]
    assert not missing, f"README.md does not link to {missing}"


def exercises(page):
    """The exercises of a tour page: [(number, the text of the exercise and its answer)]."""
    text = page.read_text(encoding="utf-8")
    heading = text.find("\n## Exercises\n")
    if heading < 0:
        return []
    section = text[heading:]
    starts = [m.start() for m in re.finditer(r"^\d+\. ", section, flags=re.M)]
    return [(section[start:].split(".", 1)[0], section[start:end])
            for start, end in zip(starts, starts[1:] + [len(section)])]


@pytest.mark.parametrize("page", TOUR, ids=[page.name for page in TOUR])
def test_each_tour_page_ends_with_exercises_checked_like_every_snippet(page):
    found = exercises(page)
    assert 2 <= len(found) <= 3, f"{page.name}: {len(found)} exercises under '## Exercises'"
    for number, body in found:
        blocks = fenced_blocks(body)
        answered = any(info == "python" and index + 1 < len(blocks)
                       and blocks[index + 1][1] in OUTPUT_TAGS and not blocks[index + 1][3].strip()
                       for index, (_, info, _, _) in enumerate(blocks))
        assert "<details>" in body and answered, (
            f"{page.name}, exercise {number}: its answer needs a <details> block with a python "
            "snippet and the output it prints")


# A duration: "12 ms", "3 min 4 s", "0.1 ms", "4 minutes", "411 s".
TIMING = re.compile(r"\b\d+(?:\.\d+)?(?:\s?(?:ms|µs|us)|\s(?:s|sec|seconds?|min|minutes?|hours?))\b")


@pytest.mark.parametrize("page", TOUR, ids=[page.name for page in TOUR])
def test_tour_pages_are_about_fcn_not_timings(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = TIMING.findall(text)
    assert not found, f"{page.name} quotes timings {found}; they belong in the appendix or bench/"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_resolve(page):
    base = page.parent  # links are relative to the page that holds them
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = [target for target in LINK.findall(text)
              if "://" not in target and not target.startswith("#")
              and not (base / target.split("#")[0]).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_snippets_print_what_the_page_shows(page, tmp_path, monkeypatch):
    if "g++" in requirements(page) and cpu_emulation.compiler() is None:
        pytest.skip(f"{page.name} compiles CUDA kernels for the CPU and needs g++ (or $CXX)")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    print_options = np.get_printoptions()
    try:
        for snippet in snippets(page):
            printed = io.StringIO()
            code = compile(snippet.code, f"{page.name}, snippet at line {snippet.line}", "exec")
            with contextlib.redirect_stdout(printed):
                exec(code, namespace)
            got, want = normalise(printed.getvalue()), normalise(snippet.expected)
            assert got == want, (f"{page.name}, snippet at line {snippet.line} printed\n{got}\n"
                                 f"---- but the page shows ----\n{want}")
    finally:
        np.set_printoptions(**print_options)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_quoted_source_is_current(page):
    for line, info, body, _ in fenced_blocks(page.read_text(encoding="utf-8")):
        words = info.split()
        if len(words) == 3 and words[1] == "from":
            source = (DOCS.parent / words[2]).read_text(encoding="utf-8")
            assert body in source, (f"{page.name}, line {line}: the code shown is no longer in "
                                    f"{words[2]}; copy it again from there")


def test_parser_pairs_code_with_output(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\nProse.\n\n"
                    "```python\nx = 2\n```\n\nSome words.\n\n```text\nnot output: prose above\n```\n"
                    "```python no-run\nimport cupy\n```\n", encoding="utf-8")
    found = snippets(page)
    assert [(s.code, s.expected) for s in found] == [("print(1)", "1"), ("x = 2", "")]
