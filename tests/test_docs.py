"""README and docs/: every Python and shell block runs (in a scratch folder), except
blocks marked ``<!-- not run: REASON -->``; a block marked ``<!-- from FILE -->`` is
a verbatim excerpt of FILE (which its own test runs); every relative link exists."""
import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                           recursive=True))
RUN = ("python", "bash")


def blocks(page):
    """(language, code, line, marker) of each fenced block; marker: the HTML comment on
    the line before the fence, if any."""
    lines = open(os.path.join(ROOT, page)).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if m:
            indent, lang, start = m.group(1), m.group(2), i
            i += 1
            body = []
            while not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][len(indent):])
                i += 1
            prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = prev if prev.startswith("<!--") else None
            out.append((lang, "\n".join(body) + "\n", start + 1, marker))
        i += 1
    return out


def test_pages_found():
    assert "docs/api.md" in PAGES and "docs/experiments/cifar10-bird-cat.md" in PAGES


@pytest.mark.parametrize("page", PAGES)
def test_blocks_are_labelled(page):
    for lang, code, line, marker in blocks(page):
        assert lang, f"{page}:{line}: a block needs a language (python, bash: run; text, json, ...: shown)"
        if marker and marker.startswith("<!-- not run"):
            assert re.match(r"<!-- not run: \S.* -->", marker), f"{page}:{line}: say why it is not run"


@pytest.mark.parametrize("page", PAGES)
def test_links_exist(page):
    text = open(os.path.join(ROOT, page)).read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
        assert os.path.exists(path), f"{page}: link to {target} ({os.path.relpath(path, ROOT)}) is broken"


def _runnable(page):
    return [(lang, code, line, marker) for lang, code, line, marker in blocks(page)
            if lang in RUN and not (marker and marker.startswith("<!-- not run"))]


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)])
def test_blocks_run(page, tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               MPLBACKEND="Agg")
    python = []  # the page's Python blocks run in order in one interpreter, like a notebook
    for lang, code, line, marker in _runnable(page):
        if marker and marker.startswith("<!-- from "):
            source = marker[len("<!-- from "):-len(" -->")].strip()
            text = open(os.path.join(ROOT, source)).read()
            assert textwrap.dedent(code) in text, f"{page}:{line}: not a verbatim excerpt of {source}"
        elif lang == "python":
            python.append((line, code))
        else:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"{page}:{line}: bash block failed\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if python:
        script = "ns = {}\n" + "".join(f"print('--- block at line {line}', flush=True)\nexec(compile({code!r}, "
                                       f"'{page}:{line}', 'exec'), ns)\n" for line, code in python)
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{page}: a Python block failed\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
