"""The embedded corpus: this Python installation's own documentation, so training works offline.

A fresh clone has no network and no ``../shared`` data, yet the README's main command must train. Every
CPython ships two bodies of English technical prose that need nothing else:

* ``pydoc_data.topics.topics``: the language reference topics behind ``help("if")`` (about 0.47 MB);
* the docstrings of the standard library: module, class and function docstrings (about 1.5 MB on 3.11).

Docstrings are read with ``ast`` from the ``.py`` sources, never by importing the modules: importing the whole
stdlib has side effects (``antigravity`` opens a browser, ``this`` prints, ``tkinter``/``idlelib`` want a
display, some modules spawn threads) and would leave hundreds of modules in the trainer's process. Files are
visited in sorted order and docstrings in source order, so the corpus is byte-identical on every run of the
same Python. The result is cached as a jsonl file keyed by the Python version and stdlib location.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

EMBEDDED_VERSION = 1  # bump when the corpus recipe changes, so caches rebuild

# Directories of the stdlib whose docstrings are test fixtures, GUI code or vendored packages.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "venv",
        "__phello__",
    }
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in _SKIP_DIRS or d.startswith("config-") for d in dirs):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(p)
    return files


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    """Docstrings of the module, then of classes/functions depth first in source order."""
    out: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append(f"Module {module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{node.name}"
                if node.name.startswith("_") and not node.name.startswith("__"):
                    continue  # private helpers: terse notes to maintainers, not documentation
                doc = ast.get_docstring(node)
                if doc:
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    out.append(f"{kind} {name}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{name}.")

    visit(tree.body, f"{module}.")
    return out


def iter_embedded_documents(progress: bool = False) -> Iterator[str]:
    """Yield the corpus documents: one per pydoc topic, then one per stdlib module with docstrings."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped Pythons (some distro "minimal" packages) lack pydoc_data
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield f"Topic {name}\n\n{text}"
    root = stdlib_dir()
    files = _stdlib_sources(root) if root.is_dir() else []
    bar = tqdm(files, desc="embedded corpus (stdlib docstrings)", unit="file", disable=None if progress else True)
    for path in bar:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately invalid (e.g. bad encoding fixtures)
        docs = _docstrings(tree, _module_name(root, path))
        if docs:
            yield "\n\n".join(docs)


def embedded_cache_key() -> str:
    """Identifies the corpus this Python would produce, without building it."""
    ident = json.dumps([EMBEDDED_VERSION, sys.version, str(stdlib_dir())])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def build_embedded_corpus(cache_dir: Path, progress: bool = True) -> Path:
    """Return the path of the cached corpus jsonl (``{"text": ...}`` per line), building it once."""
    out = Path(cache_dir) / "embedded" / f"python_docs_{embedded_cache_key()}.jsonl"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    n_docs, n_bytes = 0, 0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in iter_embedded_documents(progress=progress):
            try:
                n_bytes += len(doc.encode("utf-8"))
            except UnicodeEncodeError:  # a docstring with a lone surrogate escape: not text we can train on
                continue
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n_docs += 1
    if n_docs == 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            "this Python installation ships no documentation to build the embedded corpus from (no pydoc_data "
            "and no stdlib .py sources); use data.source=local data.path=/path/to/*.parquet instead"
        )
    os.replace(tmp, out)
    return out
