"""The documentation holds together: README is a front page that links every script and every
docs/ page, and every relative link in README.md and docs/*.md reaches a file of the repository
(and, with a ``#anchor``, a heading of that file). Fast: reads markdown, loads no model."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300
# Private notes kept beside the repository; the docs must say what they need themselves.
PRIVATE = ("../shared", "METHOD.md", "OFFLINE.md")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped (letters,
    digits, '_', '-' and spaces kept), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may name: its headings' slugs (a repeated slug gets
    -1, -2, ... as on GitHub) and explicit <a id/name> anchors."""
    found, seen = set(), {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link, image and <img src> outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        found += [(number, target) for target in MD_LINK.findall(line) + IMG_SRC.findall(line)]
    return found


def broken_links(path: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with each relative link of ``path``: a file outside ``repo`` or missing, or
    an anchor naming no heading of its target."""
    problems = []
    for number, target in links(path):
        if SCHEME.match(target):
            continue  # http(s), mailto: not ours to check
        where = f"{path.relative_to(repo)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        file = (path.parent / file_part).resolve() if file_part else path
        if file_part and not file.is_relative_to(repo.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor:
            if file.suffix != ".md" or file.is_dir():
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(file):
                problems.append(f"{where}: no heading with anchor #{anchor} in {file.relative_to(repo)}")
    return problems


def linked_files(path: Path) -> set[Path]:
    return {(path.parent / target.partition("#")[0]).resolve()
            for _, target in links(path) if not SCHEME.match(target) and target.partition("#")[0]}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pointer_to_private_notes(page):
    text = page.read_text(encoding="utf-8")
    assert [word for word in PRIVATE if word in text] == []


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_script_and_docs_page():
    linked = linked_files(README)
    scripts = sorted(p for p in REPO.glob("*.py"))
    assert scripts, "no top-level scripts found"
    missing = [p.name for p in [*scripts, *DOCS] if p.resolve() not in linked]
    assert missing == [], f"README.md does not link {missing}"


def test_the_checker_sees_broken_links(tmp_path):
    """The check above would fail: a missing file, a missing anchor and a path out of the
    repository are each reported, and a good link and anchor are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Stage 1: the `VLM` (tuned)\n", encoding="utf-8")
    (tmp_path / "code.py").write_text("", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md#stage-1-the-vlm-tuned) [ok](code.py) [web](https://example.org/x)\n"
        "[gone](docs/missing.md)\n"
        "[no anchor](docs/page.md#stage-2)\n"
        "<img src=\"docs/figure.png\">\n"
        "[outside](../elsewhere.md)\n"
        "```\n[in code](nowhere.md)\n```\n"
        "`[inline](nowhere.md)`\n", encoding="utf-8")
    problems = broken_links(readme, repo=tmp_path)
    assert len(problems) == 4, problems
    assert any("docs/missing.md: no such file" in p for p in problems)
    assert any("#stage-2" in p and "no heading" in p for p in problems)
    assert any("docs/figure.png: no such file" in p for p in problems)
    assert any("outside the repository" in p for p in problems)


@pytest.mark.parametrize("heading, expected", [
    ("Stage 0: instruction data", "stage-0-instruction-data"),
    ("How this differs from the reference code", "how-this-differs-from-the-reference-code"),
    ("1. Prepare the datasets", "1-prepare-the-datasets"),
    ("Demo (`demo.py`)", "demo-demopy"),
    ("Scaling out: several GPUs and nodes", "scaling-out-several-gpus-and-nodes"),
    ("The `generate_instructions.py` flags", "the-generate_instructionspy-flags"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected
