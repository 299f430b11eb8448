"""The project's own design document (``docs/design.md``) and the citations of it.

Comments, docstrings, help texts and the other documents cite its sections as
"docs/design.md §N": every such number names a section that exists, and no bare "§N" (or a
"DESIGN §N" pointing at a document the repository does not hold) is left anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")
TEXT_EXT = (".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yml", ".yaml")
# one citation: "design.md" then one or more section numbers or ranges ("§6-7, §10-11")
CITATION = re.compile(r"design\.md\s+§(\d+)(?:-(\d+))?((?:\s*,\s*§\d+(?:-\d+)?)*)")
SECTION = re.compile(r"^## §(\d+) ", re.M)


def _sections() -> set[int]:
    return {int(n) for n in SECTION.findall(open(DESIGN, encoding="utf-8").read())}


def _tracked_text_files() -> list[str]:
    if shutil.which("git") is not None and os.path.exists(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    else:  # a copy without git metadata: walk it
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                 if ".git" not in d.split(os.sep)]
    return sorted(f for f in files if f.endswith(TEXT_EXT) and os.path.isfile(os.path.join(ROOT, f)))


def citation_problems(text: str, sections: set[int], where: str) -> list[str]:
    """Citations of missing sections, and every "§<digits>" that is not part of a citation."""
    bad, cited = [], set()
    for m in CITATION.finditer(text):
        nums = [(int(m.group(1)), int(m.group(2) or m.group(1)))]
        nums += [(int(a), int(b or a)) for a, b in re.findall(r"§(\d+)(?:-(\d+))?", m.group(3))]
        for lo, hi in nums:
            missing = [n for n in range(lo, hi + 1) if n not in sections]
            if missing or hi < lo:
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{where}:{line}: {m.group(0)!r} cites a section docs/design.md does not have")
        cited.update(range(m.start(), m.end()))
    for m in re.finditer(r"§\s*\d+", text):
        if m.start() not in cited:
            line = text.count("\n", 0, m.start()) + 1
            ctx = text[max(0, m.start() - 20):m.end()]
            bad.append(f"{where}:{line}: bare {ctx!r} (write docs/design.md §N)")
    for m in re.finditer(r"\bDESIGN(\.md)?\s*§", text):
        line = text.count("\n", 0, m.start()) + 1
        bad.append(f"{where}:{line}: {m.group(0)!r} points at a document the repository does not hold")
    return bad


def test_design_doc_has_the_sections_the_issue_names():
    text = open(DESIGN, encoding="utf-8").read()
    assert _sections() == set(range(1, 12)), sorted(_sections())
    heads = dict((int(n), t) for n, t in re.findall(r"^## §(\d+) (.*)$", text, re.M))
    for n, words in {2: "Layout", 3: "I-RoPE", 4: "AIPA", 6: "reference cache", 7: "export contract"}.items():
        assert words in heads[n], (n, heads[n])


def test_every_citation_points_at_a_section():
    sections = _sections()
    files = _tracked_text_files()
    assert "README.md" in files and os.path.join("model", "cli.py") in files
    bad = []
    for rel in files:
        if rel in (os.path.join("docs", "design.md"), os.path.join("tests", "test_design_doc.py")):
            continue  # the document itself, and this file's examples of bad citations
        bad += citation_problems(open(os.path.join(ROOT, rel), encoding="utf-8").read(), sections, rel)
    assert not bad, "\n".join(bad)


def test_citation_checker_sees_bad_citations():
    sections = {1, 2, 3, 6, 7, 10, 11}
    assert citation_problems("see docs/design.md §6-7, §10-11 and docs/design.md §1, §7", sections, "x") == []
    assert citation_problems("docs/design.md\n§3", sections, "x") == []
    assert "cites a section" in citation_problems("docs/design.md §12", sections, "x")[0]
    assert "cites a section" in citation_problems("docs/design.md §6-8", sections, "x")[0]
    assert "bare" in citation_problems("the §8 shapes", sections, "x")[0]
    assert any("does not hold" in p for p in citation_problems("as DESIGN §9 states", sections, "x"))


@pytest.mark.parametrize("name", ["LICENSE"])
def test_license_file_matches_setup(name):
    text = open(os.path.join(ROOT, name), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0" in text
    assert 'license="Apache-2.0"' in open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
