"""The docs cannot rot: every Python snippet in README.md and docs/*.md runs, every relative link resolves.

Each ```python fence is executed on its own: a fresh namespace, a fresh
temporary working directory, matplotlib without a display, a time limit.
Tracebacks name the markdown file and its line. Console commands (``` or
```bash fences, indented blocks) are not Python and are not run.

Two exemptions, written visibly in the markdown on the line just above the
fence, and kept few:

    <!-- not run: REASON -->
        compiled (so it stays valid Python) but not executed: it needs
        something a test cannot have (a trained checkpoint, a GPU, a download).
    <!-- excerpt of PATH: ... -->
        a quotation of code in PATH (a method body, say): not executed, but
        each of its code lines must appear, in the same order, in PATH.

A snippet that imports an optional package that is not installed (torch,
CuPy, FastAPI) is skipped, saying which.
"""
from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import pytest

from npflux import settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONAL = {"torch", "cupy", "cupyx", "fastapi", "uvicorn", "httpx"}
TIME_LIMIT_S = 120       # per snippet; each runs in about a second
MAX_NOT_RUN = 3          # exemptions stay few

SETUP_COMMANDS = [
    '    pip install -e ".[fast]" && npflux train --preset shakespeare-s1 --max-iters 2000 --download',
    '    pip install -e ".[test]" && python -m pytest -q',
]

_MARK = re.compile(r"^<!--\s*(not run|excerpt of)\s*:?\s*(.*?)\s*-->\s*$")


class Snippet:
    def __init__(self, path: Path, line: int, lang: str, code: str, mark: tuple | None):
        self.path, self.line, self.lang, self.code, self.mark = path, line, lang, code, mark

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.mark is None


def fences(path: Path):
    """Every fenced code block of a markdown file: Snippet with the line of its first code line (1-based)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out, i = [], 0
    while i < len(lines):
        opening = lines[i]
        if opening.startswith("```"):
            lang = opening[3:].strip().lower()
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a code fence is never closed")
            above = lines[i - 1].strip() if i else ""
            m = _MARK.match(above)
            mark = (m.group(1), m.group(2)) if m else None
            out.append(Snippet(path, i + 2, lang, "\n".join(lines[i + 1:j]) + "\n", mark))
            i = j + 1
        else:
            i += 1
    return out


def python_snippets():
    return [s for page in PAGES for s in fences(page) if s.lang in ("python", "py", "python3")]


SNIPPETS = python_snippets()
RUNNABLE = [s for s in SNIPPETS if s.runs]


# --------------------------------------------------------------------------
# Snippets
# --------------------------------------------------------------------------
class _TimeLimit:
    """SIGALRM after ``seconds`` where that is possible (the main thread on a POSIX system)."""

    def __init__(self, seconds, where):
        self.seconds, self.where = seconds, where
        self.armed = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()

    def _fire(self, signum, frame):
        raise TimeoutError(f"{self.where}: the snippet ran over {self.seconds} s; docs snippets must stay small")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.armed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.previous)


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.where for s in RUNNABLE])
def test_python_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # blank lines in front, so a traceback's line number is the markdown file's
    code = compile("\n" * (snippet.line - 1) + snippet.code, str(snippet.path), "exec")
    namespace = {"__name__": "__docs_snippet__"}
    try:
        # The snippets show NumPy (host arrays in, host arrays out), also when the suite runs with
        # NPFLUX_BACKEND=cupy: the GPU's own usage is in docs/gpu.md.
        with _TimeLimit(TIME_LIMIT_S, snippet.where), settings.override(backend="numpy"):
            exec(code, namespace)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{snippet.where} needs {exc.name}, which is not installed")
        raise
    except pytest.skip.Exception:
        raise
    finally:
        import matplotlib.pyplot as plt  # a snippet may have drawn; close its figures

        plt.close("all")


def test_snippets_are_found():
    """The fence parser sees the snippets (a broken parser must not pass by running nothing)."""
    pages = {s.path.name for s in RUNNABLE}
    assert len(RUNNABLE) >= 10, [s.where for s in SNIPPETS]
    assert {"README.md", "backprop.md", "gradients.md", "training.md"} <= pages, pages


def test_every_python_snippet_compiles():
    for s in SNIPPETS:
        compile(s.code, s.where, "exec")


def test_exemptions_are_few_and_say_why():
    not_run = [s for s in SNIPPETS if s.mark and s.mark[0] == "not run"]
    for s in not_run:
        assert len(s.mark[1]) >= 10, f"{s.where}: a not-run snippet must say why (<!-- not run: REASON -->)"
    assert len(not_run) <= MAX_NOT_RUN, [(s.where, s.mark[1]) for s in not_run]


def _code_lines(text):
    """Stripped code lines, without blank lines and whole-line comments."""
    return [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")]


def test_excerpts_match_their_source():
    excerpts = [s for s in SNIPPETS if s.mark and s.mark[0] == "excerpt of"]
    for s in excerpts:
        source = s.mark[1].split(":")[0].split()[0]
        path = ROOT / source
        assert path.is_file(), f"{s.where}: the excerpt names {source}, which does not exist"
        have = _code_lines(path.read_text(encoding="utf-8"))
        pos = 0
        for line in _code_lines(s.code):
            try:
                pos = have.index(line, pos) + 1
            except ValueError:
                raise AssertionError(f"{s.where}: {line!r} is not in {source} (in this order); update the excerpt")


# --------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(path: Path) -> str:
    """The markdown without its fenced code blocks and inline code spans (links there are code, not links)."""
    out, in_fence = [], False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _slugs(path: Path) -> set:
    """GitHub's anchors for a markdown file's headings."""
    seen, slugs = {}, set()
    for line in _prose(path).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        slugs.add(base if n == 0 else f"{base}-{n}")
    return slugs


def relative_links(path: Path):
    for target in _LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield target


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _slugs(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    head = lines[:10]
    for command in SETUP_COMMANDS:
        assert command in head, f"the README's first lines must hold the set-up command {command.strip()!r}"
    assert head.index(SETUP_COMMANDS[0]) < head.index(SETUP_COMMANDS[1])
    assert not any(ln.startswith("## ") for ln in lines[: head.index(SETUP_COMMANDS[1])])
