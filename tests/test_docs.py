"""The project's documents: the README stays short, every file they or the code name exists,
every link and anchor lands, and every citation of docs/algorithm.md names a section it has.

Pure text checks: no model, no network; the whole file runs in about a second.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# Where file references are looked for (globs relative to the repository root).
SCANNED = ("README.md", "docs/*.md", "fdfo/**/*.py", "benchmarks/*.py", "benchmarks/*.sh", "benchmarks/*.md",
           "scripts/*", "configs/*.yaml", "Makefile", "setup.py", ".ci/run")
# A plain mention of a repository file: a path under one of these top-level folders.
TOP = ("docs", "fdfo", "configs", "benchmarks", "scripts", "tests", "locks", "prompts", r"\.ci")
PATH_RE = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP))
# What follows a path that is really a pattern or a template (configs/<name>.yaml, bench_{x}.py, *.json).
PATTERN_NEXT = set("*<{[$%")
LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
# A path given as the default of an output flag is what that command writes, not a repository file.
OUTPUT_DEFAULT_RE = re.compile(r"""add_argument\(\s*["']--(?:out|json)\b""")
# Files the documents tell a user to write (README, "Prompt sets"); they are not in the repository.
USER_WRITTEN = {"prompts/pickscore_train.txt", "prompts/pickscore_test.txt", "prompts/hpdv2_all.txt", "prompts/hpdv2_photo.txt"}

# The cited sections of docs/algorithm.md and a word their heading must hold, so that a renumbering
# that moves the content away from a citation fails here.
ALGORITHM_SECTIONS = {"1": "paired sampling", "1.3": "churn step", "1.4": "churn schedules", "2": "rewards",
                      "3": "loss", "4": "epoch", "5": "published defaults", "6": "policy gradients"}
CITATION_RE = re.compile(r"algorithm\.md[`)\]]*,?\s*§\s?(\d+(?:\.\d+)?)(?:\s?[-–]\s?(\d+(?:\.\d+)?))?")
SECTION_RE = re.compile(r"§\s?(\d+(?:\.\d+)?)(?:\s?[-–]\s?(\d+(?:\.\d+)?))?")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NUMBERED_HEADING_RE = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)?)\.?\s+(.*)$")


def scanned_files(root: Path = ROOT) -> list[Path]:
    files: set[Path] = set()
    for pattern in SCANNED:
        files.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(files)


def repository_files(root: Path = ROOT) -> list[Path]:
    """Tracked files and untracked ones git does not ignore (a walk without build folders where git is absent)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
        return [root / name for name in out.split("\0") if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "__pycache__", ".whl", "fdfo.egg-info"}
        return [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)]


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a binary file (an image)


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip())  # inline markup
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else HEADING_RE.match(line)
        if m:
            base = slug(m.group(2))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def broken_references(root: Path = ROOT) -> list[str]:
    """Every file reference of the scanned files that does not resolve, as 'file:line: reference (why)'."""
    problems = []
    anchor_cache: dict[Path, set[str]] = {}
    for path in scanned_files(root):
        text = read(path)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in ([] if OUTPUT_DEFAULT_RE.search(line) else PATH_RE.finditer(line)):
                ref = m.group(1)
                after = line[m.end():m.end() + 1]
                if after and after in PATTERN_NEXT or ref in USER_WRITTEN:
                    continue
                if not (root / ref).exists():
                    problems.append(f"{rel}:{lineno}: {ref} (no such file)")
            if path.suffix != ".md":
                continue
            for m in LINK_RE.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                if not dest.exists():
                    problems.append(f"{rel}:{lineno}: {target} (no such file)")
                elif anchor and dest.suffix == ".md":
                    if dest not in anchor_cache:
                        anchor_cache[dest] = anchors(dest.read_text(encoding="utf-8"))
                    if anchor not in anchor_cache[dest]:
                        problems.append(f"{rel}:{lineno}: {target} (no heading with anchor #{anchor})")
    return list(dict.fromkeys(problems))  # (a link whose text is its path names it twice)


def algorithm_sections(root: Path = ROOT) -> dict[str, str]:
    """Section number -> heading text of docs/algorithm.md ('## 1. Paired …' gives '1', '### 1.3 The …' '1.3')."""
    out = {}
    for line in (root / "docs" / "algorithm.md").read_text(encoding="utf-8").splitlines():
        m = NUMBERED_HEADING_RE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def algorithm_citations(root: Path = ROOT) -> list[tuple[str, str]]:
    """(where, section) of every §-citation of docs/algorithm.md: 'docs/algorithm.md §1.4' anywhere in the
    repository (a range §4-5 gives both ends), and every bare § inside docs/algorithm.md itself."""
    found = []
    own = root / "docs" / "algorithm.md"
    for path in repository_files(root):
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".sh", ".txt", "") or path.name == Path(__file__).name:
            continue
        text = read(path)
        if text is None:
            continue
        pattern = SECTION_RE if path.resolve() == own.resolve() else CITATION_RE
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                where = f"{path.relative_to(root).as_posix()}:{lineno}"
                found += [(where, s) for s in m.groups() if s]
    return found


# --------------------------------------------------------------------------- the tests


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} "
                                            "and move the rest into docs/")


def test_readme_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make train" in text and "make test" in text


def test_every_file_reference_resolves():
    problems = broken_references()
    assert not problems, "references to files that do not exist:\n" + "\n".join(problems)


def test_no_mention_of_the_old_outside_documents():
    old = [f"{name}.md" for name in ("ALGORITHM", "ARCHITECTURE")]  # (spelled so that this file holds neither)
    hits = []
    for path in repository_files():
        text = read(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT).as_posix()}:{lineno}: {name}" for name in old if name in line]
    assert not hits, "the project cites its own docs/algorithm.md and docs/architecture.md:\n" + "\n".join(hits)


def test_algorithm_sections_hold_what_the_code_cites():
    sections = algorithm_sections()
    for number, words in ALGORITHM_SECTIONS.items():
        assert number in sections, f"docs/algorithm.md has no section {number} (the code cites it)"
        assert words in sections[number].lower(), (f"docs/algorithm.md §{number} is '{sections[number]}'; the code "
                                                    f"cites it for {words}")


def test_every_algorithm_citation_names_a_section():
    sections = algorithm_sections()
    citations = algorithm_citations()
    assert citations, "no citation of docs/algorithm.md found: the pattern no longer matches the code's"
    missing = [f"{where}: §{s}" for where, s in citations if s not in sections]
    assert not missing, (f"citations of sections docs/algorithm.md does not have (it has {sorted(sections)}):\n"
                         + "\n".join(missing))


# --------------------------------------------------------------------------- the checks can fail


def _tree(tmp_path: Path, readme: str, docs: dict[str, str] | None = None) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(readme)
    for name, text in (docs or {}).items():
        (tmp_path / "docs" / name).write_text(text)
    return tmp_path


def test_a_broken_reference_is_caught(tmp_path):
    root = _tree(tmp_path, "See `docs/missing.md`, [guide](docs/guide.md#no-such-part) and [ok](docs/guide.md#usage).\n"
                           "Patterns are not files: `configs/<name>.yaml`, `configs/ds/*.json`, runs/x/y.\n",
                 {"guide.md": "# Guide\n\n## Usage\n\n[back](../README.md) [gone](other.md)\n"})
    problems = broken_references(root)
    assert any("docs/missing.md (no such file)" in p for p in problems)
    assert any("#no-such-part" in p for p in problems)
    assert any("docs/guide.md" in p and "other.md (no such file)" in p for p in problems)
    assert len(problems) == 3, problems  # not #usage, ../README.md, the patterns or the run-time path


def test_a_citation_of_a_missing_section_is_caught(tmp_path):
    root = _tree(tmp_path, "", {"algorithm.md": "## 1. Paired sampling\n\n### 1.3 The churn step\n\nsee §7\n"})
    (root / "code.py").write_text('"""Churn (docs/algorithm.md §1.3); the loss (docs/algorithm.md §3); §1-4."""\n')
    sections = algorithm_sections(root)
    assert sections == {"1": "Paired sampling", "1.3": "The churn step"}
    cited = sorted(s for _, s in algorithm_citations(root))
    assert cited == ["1.3", "3", "7"]  # the bare "§1-4" of code.py names no document


@pytest.mark.parametrize("heading, anchor", [("## 1.3 The churn step", "13-the-churn-step"),
                                             ("### FLUX.1", "flux1"),
                                             ("## Checkpoints and resume", "checkpoints-and-resume"),
                                             ("## `make train`: the digits job", "make-train-the-digits-job")])
def test_slugs(heading, anchor):
    assert anchor in anchors(heading)
