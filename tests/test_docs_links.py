"""Documentation integrity: every ``METHOD.md §N`` citation resolves to a ``## §N.`` heading of
docs/METHOD.md, and every relative Markdown link or image in README.md and docs/*.md points to a file.

The checkers are plain functions returning one message per problem (``file:line: ...``); the last tests run
them on a small broken tree, so a checker that can no longer fail is caught too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Set

ROOT = Path(__file__).resolve().parents[1]
METHOD = Path("docs") / "METHOD.md"

# "METHOD.md §2", "docs/METHOD.md §2, §4", "METHOD.md §2–§5", "METHOD.md §2-4", "METHOD.md §1 and §3";
# the bare "METHOD §2" is matched too, so that it is reported (citations must name the file)
CITATION = re.compile(
    r"\bMETHOD(?P<ext>\.md)?[ \t]*(?P<list>§\d+(?:\s*[-–—]\s*§?\d+|\s*,\s*§\d+|\s+and\s+§\d+)*)")
SECTION_ITEM = re.compile(r"(?P<dash>[-–—])?\s*§?(?P<num>\d+)")
HEADING = re.compile(r"^## §(\d+)\. \S", re.MULTILINE)

# [text](target) and ![alt](target), with an optional title; <target> for paths with spaces
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*(?:<(?P<angle>[^>]+)>|(?P<plain>[^)\s]+))(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(?:<(?P<angle>[^>]+)>|(?P<plain>\S+))", re.MULTILINE)
FENCE = re.compile(r"^(?P<fence>```|~~~).*?^(?P=fence)[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def cited_files(root: Path) -> List[Path]:
    """The files whose citations must resolve: the package, the benches, the tests and the Markdown docs."""
    files = sorted((root / "ttp_ray").rglob("*.py")) + sorted((root / "bench").glob("*.py"))
    files += sorted((root / "tests").glob("*.py")) + markdown_files(root)
    return [f for f in files if f.is_file()]


def markdown_files(root: Path) -> List[Path]:
    return [f for f in [root / "README.md"] + sorted((root / "docs").glob("*.md")) if f.is_file()]


def method_sections(method_md: Path) -> Set[int]:
    """Section numbers of the ``## §N.`` headings of docs/METHOD.md."""
    return {int(n) for n in HEADING.findall(method_md.read_text(encoding="utf-8"))}


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def cited_sections(listing: str) -> List[int]:
    """``"§2, §4"`` -> [2, 4]; ``"§2–§5"`` or ``"§2-5"`` -> [2, 3, 4, 5]."""
    out: List[int] = []
    for item in SECTION_ITEM.finditer(listing):
        num = int(item.group("num"))
        if item.group("dash") and out:
            out.extend(range(out[-1] + 1, num + 1))
        else:
            out.append(num)
    return out


def citation_problems(root: Path, files: Iterable[Path], sections: Set[int]) -> List[str]:
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root)
        for m in CITATION.finditer(text):
            where = f"{rel}:{_line(text, m.start())}"
            if not m.group("ext"):
                problems.append(f"{where}: cites {m.group(0)!r}; write 'METHOD.md {m.group('list')}' (docs/METHOD.md)")
            for n in cited_sections(m.group("list")):
                if n not in sections:
                    problems.append(f"{where}: cites METHOD.md §{n}, but docs/METHOD.md has no heading '## §{n}.'")
    return problems


def _blank_code(text: str) -> str:
    """Fenced blocks and inline code spans blanked out (same length, same line breaks): their brackets
    are code, not links."""
    text = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), text)


def link_problems(root: Path, files: Iterable[Path]) -> List[str]:
    problems = []
    for path in files:
        text = _blank_code(path.read_text(encoding="utf-8"))
        rel = path.relative_to(root)
        for pattern in (LINK, REFERENCE_LINK):
            for m in pattern.finditer(text):
                target = (m.group("angle") or m.group("plain")).strip()
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # http(s), mailto, ... and anchors in the same file
                file_part = target.split("#", 1)[0].split("?", 1)[0]
                if not file_part:
                    continue
                resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
                if not resolved.exists():
                    problems.append(f"{rel}:{_line(text, m.start())}: link target {target!r} does not exist "
                                    f"(looked for {os.path.relpath(resolved, root)})")
    return problems


# ------------------------------------------------------------------------------------------ the repository


def test_method_md_has_numbered_sections():
    method = ROOT / METHOD
    assert method.is_file(), f"{METHOD} is missing"
    numbers = [int(n) for n in HEADING.findall(method.read_text(encoding="utf-8"))]
    assert numbers, f"{METHOD}: no '## §N. Title' headings"
    assert len(numbers) == len(set(numbers)), f"{METHOD}: duplicate section numbers {sorted(numbers)}"
    assert numbers == list(range(1, len(numbers) + 1)), f"{METHOD}: sections not numbered 1..n in order: {numbers}"


def test_every_method_citation_resolves():
    files = [f for f in cited_files(ROOT) if f.resolve() != Path(__file__).resolve()]  # not this file's examples
    assert any(f.suffix == ".py" for f in files) and any(f.suffix == ".md" for f in files)
    problems = citation_problems(ROOT, files, method_sections(ROOT / METHOD))
    assert not problems, "unresolved METHOD.md citations:\n" + "\n".join(problems)


def test_citations_are_found_at_all():
    """Guards the regex: the code cites METHOD.md dozens of times; zero matches means the pattern broke."""
    count = sum(len(CITATION.findall(f.read_text(encoding="utf-8"))) for f in cited_files(ROOT))
    assert count >= 30, f"only {count} METHOD.md citations found; the citation pattern no longer matches"


def test_every_relative_markdown_link_exists():
    problems = link_problems(ROOT, markdown_files(ROOT))
    assert not problems, "broken Markdown links:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------- the checkers can fail


def _tree(tmp_path: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return tmp_path


def test_citation_checker_reports_missing_sections(tmp_path):
    root = _tree(tmp_path, {
        "docs/METHOD.md": "# m\n\n## §1. One\n\n## §2. Two\n\n## §3. Three\n",
        "ttp_ray/a.py": '"""Fine (METHOD.md §1, §2).\n\nRange (docs/METHOD.md §1–§3), short range (METHOD.md §2-3)."""\n'
                        "# broken (METHOD.md §9)\n# list (METHOD.md §2, §7)\n# range (METHOD.md §2–5)\n"
                        "# bare (METHOD §1)\n",
    })
    problems = citation_problems(root, cited_files(root), method_sections(root / METHOD))
    text = "\n".join(problems)
    assert "ttp_ray/a.py:4: cites METHOD.md §9" in text
    assert "ttp_ray/a.py:5: cites METHOD.md §7" in text
    assert "ttp_ray/a.py:6: cites METHOD.md §4" in text and "ttp_ray/a.py:6: cites METHOD.md §5" in text
    assert "ttp_ray/a.py:7: cites 'METHOD §1'" in text
    assert not any(":1:" in p or ":3:" in p for p in problems), problems
    assert len(problems) == 5, problems


def test_cited_sections_parses_lists_and_ranges():
    assert cited_sections("§2") == [2]
    assert cited_sections("§2, §4") == [2, 4]
    assert cited_sections("§2–§5") == [2, 3, 4, 5]
    assert cited_sections("§2-4") == [2, 3, 4]
    assert cited_sections("§1 and §3") == [1, 3]
    m = CITATION.search("see METHOD.md §4's collapse, 2020")
    assert m and cited_sections(m.group("list")) == [4]
    m = CITATION.search("(METHOD.md §7, supplement App. D)")
    assert m and cited_sections(m.group("list")) == [7]


def test_link_checker_reports_missing_files(tmp_path):
    root = _tree(tmp_path, {
        "README.md": "[ok](docs/A.md) ![img](docs/img/x.png) [gone](docs/missing.md) [web](https://x.org/a.md)\n"
                     "[anchor](#top) [ok anchor](docs/A.md#part) `[code](not/a/link.md)`\n"
                     "```\n[fenced](not/a/link.md)\n```\n[ref]: docs/nothing.md\n",
        "docs/A.md": "[up](../README.md) [sibling](B.md) ![gone image](img/none.png \"title\")\n",
        "docs/img/x.png": "",
    })
    problems = link_problems(root, markdown_files(root))
    text = "\n".join(problems)
    assert "README.md:1: link target 'docs/missing.md'" in text
    assert "README.md:6: link target 'docs/nothing.md'" in text
    assert "docs/A.md:1: link target 'B.md'" in text
    assert "img/none.png" in text
    assert "not/a/link.md" not in text and "x.org" not in text and "../README.md" not in text
    assert len(problems) == 4, problems
