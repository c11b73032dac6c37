"""The built-in corpus: sources of a fixed list of pure-Python standard-library modules (about 2 MB).

Every machine that runs the project has these files, so the default run needs no download and no data
shipped in the repository. Each module file is split into documents at PEP 8's two blank lines between
top-level definitions, which yields many documents of varied length (docstrings, functions, classes) and so
exercises document packing. The order is fixed (the list below, then position in the file), so the corpus is
deterministic for a given Python installation; different Python patch releases may differ slightly, so all
hosts of one job should run the same image.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

STDLIB_MODULE_FILES: tuple[str, ...] = tuple(
    f"{name}.py"
    for name in (
        "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections/__init__", "colorsys",
        "contextlib", "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools",
        "getopt", "gettext", "glob", "heapq", "hmac", "inspect", "ipaddress", "json/__init__", "json/decoder",
        "json/encoder", "keyword", "linecache", "locale", "logging/__init__", "operator", "optparse", "pathlib",
        "pickle", "pprint", "queue", "random", "re/__init__", "sched", "secrets", "shlex", "shutil",
        "statistics", "string", "subprocess", "tempfile", "textwrap", "threading", "timeit", "tokenize",
        "traceback", "typing", "uuid", "warnings", "weakref", "zipfile/__init__",
    )
)  # fmt: skip
DOCUMENT_SEPARATOR = "\n\n\n"


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_corpus_files(root: Path | None = None) -> list[Path]:
    """The module files of the built-in corpus that exist under ``root`` (default: the stdlib), in fixed order.

    Files missing from a trimmed Python install are skipped; having none raises ``FileNotFoundError``.
    """
    root = stdlib_dir() if root is None else root
    files = [root / name for name in STDLIB_MODULE_FILES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"none of the built-in corpus files were found under {root}")
    return files


def builtin_corpus_documents(root: Path | None = None) -> list[str]:
    """The built-in corpus as documents: each module file split at two blank lines, stripped, empties dropped."""
    documents: list[str] = []
    for path in builtin_corpus_files(root):
        text = path.read_text(encoding="utf-8")
        documents.extend(chunk.strip() for chunk in text.split(DOCUMENT_SEPARATOR) if chunk.strip())
    return documents
