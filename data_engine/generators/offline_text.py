"""Real text that exists on every machine with the project installed.

Two sources, both read from disk and never downloaded:
  * the Python standard library: docstrings (prose about software) and source
    (code), read with ``ast`` from the stdlib's .py files so that no module is
    executed; a module without a readable .py file falls back to importing it
    and reading ``inspect.getdoc`` (the list below holds only modules that are
    safe to import);
  * licence texts: LICENSE / COPYING / NOTICE files in the dist-info folders
    of installed packages, and /usr/share/common-licenses when it exists.

Every function returns plain dicts ``{"text", "source", "meta"}`` in a
deterministic order; the caller samples from them with its own seed.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
import site
import sysconfig
import textwrap
from pathlib import Path

# Pure-Python modules with plenty of prose; importing any of them has no side
# effects (no GUI, no printing, no network), which the fallback path relies on.
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "_pydecimal",
    "difflib", "dis", "doctest", "email.message", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "imaplib", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "logging", "mailbox", "numbers", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "wave", "weakref", "xml.etree.ElementTree", "zipfile",
)
COMMON_LICENSES = Path("/usr/share/common-licenses")
_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|copyright)", re.I)
_MAX_FILE_CHARS = 200_000
_MAX_SRC_LINES = 80
_DOC_CHARS = 800  # a reference page of about 120 words
_MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") say nothing


# ---------------------------------------------------------------- paragraphs
def chunk_paragraphs(text: str, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Merge blank-line separated paragraphs into document-sized chunks."""
    chunks, current = [], ""
    for para in _paragraphs(text, max_chars):
        if current and len(current) + len(para) + 2 > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return [c for c in chunks if len(c) >= min_chars]


def _paragraphs(text: str, max_chars: int):
    """Paragraphs, with an over-long one (a file without blank lines) cut at line ends."""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip("\n").rstrip()
        if not para.strip():
            continue
        piece = ""
        for line in para.split("\n"):
            if piece and len(piece) + len(line) + 1 > max_chars:
                yield piece
                piece = ""
            piece = f"{piece}\n{line}" if piece else line
        if piece.strip():
            yield piece


# ---------------------------------------------------------------- stdlib
def stdlib_documents(rng: random.Random, want_doc: int, want_src: int) -> tuple[list[dict], list[dict]]:
    """Docstring and source documents from stdlib modules taken in a seeded order.

    Each module feeds one pool only, so a function's docstring never appears
    both as prose and inside its code (that would be an unplanted near-dup).
    Parsing stops once each pool holds 1.2 times what the caller wants.
    """
    order = list(STDLIB_MODULES)
    rng.shuffle(order)
    docs, srcs = [], []
    for name in order:
        need_doc, need_src = 1.2 * want_doc - len(docs), 1.2 * want_src - len(srcs)
        if need_doc <= 0 and need_src <= 0:
            break
        source = _module_source(name)
        if source is None:
            docs += _imported_docs(name) if need_doc > 0 else []
        elif need_doc / max(want_doc, 1) >= need_src / max(want_src, 1):
            docs += _docstring_docs(name, source)
        else:
            srcs += _source_docs(name, source)
    return docs, srcs


def _module_source(name: str) -> str | None:
    base = Path(sysconfig.get_paths()["stdlib"], *name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return None


def _docstring_docs(module: str, source: str) -> list[dict]:
    """Reference pages: consecutive docstrings of a module, each under its object's name.

    Grouping (as pydoc does) keeps short docstrings, which alone would be
    too short for a document, and yields more text per parsed module.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    sections = []
    for qualname, node in _named_nodes(tree, ""):
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= _MIN_DOC_CHARS:
            for piece in chunk_paragraphs(doc, min_chars=0, max_chars=_DOC_CHARS):
                sections.append((qualname or module, f"{qualname or module}\n{piece}"))
    return [_doc(text, "stdlib-doc", module, first) for first, text in _group(sections)]


def _group(sections: list[tuple[str, str]], min_chars: int = 200, max_chars: int = _DOC_CHARS):
    """Merge (name, text) sections into chunks; each chunk is named by its first section."""
    out, first, current = [], "", ""
    for name, text in sections:
        if current and len(current) + len(text) + 2 > max_chars:
            out.append((first, current))
            current = ""
        first, current = (first, f"{current}\n\n{text}") if current else (name, text)
    if current:
        out.append((first, current))
    return [(name, text) for name, text in out if len(text) >= min_chars]


def _named_nodes(node, prefix: str):
    """(qualname, node) for the module and every class and function inside it, in file order."""
    if isinstance(node, ast.Module):
        yield "", node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}" if prefix else child.name
            yield name, child
            yield from _named_nodes(child, name)


def _source_docs(module: str, source: str) -> list[dict]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines, out = source.splitlines(), []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and _span(node) > _MAX_SRC_LINES:
            parts = [(f"{node.name}.{m.name}", m) for m in node.body
                     if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [(node.name, node)]
        else:
            continue
        for qualname, part in parts:
            if 6 <= _span(part) <= _MAX_SRC_LINES:
                text = textwrap.dedent("\n".join(lines[_first_line(part) - 1:part.end_lineno]))
                out.append(_doc(text.rstrip(), "stdlib-src", module, qualname))
    return out


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _span(node) -> int:
    return node.end_lineno - _first_line(node) + 1


def _imported_docs(module: str) -> list[dict]:
    """Fallback for an install without .py files: docstrings through the imported module."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure just means this module gives no text
        return []
    members = [(module, mod)] + [(f"{module}.{k}", v) for k, v in sorted(vars(mod).items())
                                 if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
                                 and getattr(v, "__module__", None) == mod.__name__]  # not re-exports
    out = []
    for qualname, obj in members:
        for chunk in chunk_paragraphs(inspect.getdoc(obj) or ""):
            out.append(_doc(chunk, "stdlib-doc", module, qualname))
    return out


def _doc(text: str, source: str, module: str, qualname: str) -> dict:
    return {"text": text, "source": source,
            "meta": {"module": module, "object": qualname, "domain_hint": "code"}}


# ---------------------------------------------------------------- licences
def license_files(extra_dirs=(COMMON_LICENSES,)) -> list[Path]:
    """Licence files of installed packages (and extra folders that exist), sorted."""
    found = set()
    for root in _site_dirs():
        for info in root.glob("*.dist-info"):
            found.update(p for p in info.rglob("*") if p.is_file() and _is_license(p, info))
    for folder in extra_dirs:
        folder = Path(folder)
        if folder.is_dir():
            found.update(p for p in folder.iterdir() if p.is_file())
    return sorted(found, key=str)


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return sorted({Path(p).resolve() for p in candidates if Path(p).is_dir()}, key=str)


def _is_license(path: Path, info: Path) -> bool:
    return _LICENSE_NAME.match(path.name) is not None or "licenses" in path.relative_to(info).parts[:-1]


def _label(path: Path) -> str:
    """'pkg-1.0.dist-info/licenses/LICENSE' or 'common-licenses/GPL-3': no machine-specific prefix."""
    parts = path.parts
    start = next((i for i, p in enumerate(parts) if p.endswith(".dist-info")), len(parts) - 2)
    return "/".join(parts[start:])


def license_documents(extra_dirs=(COMMON_LICENSES,)) -> list[dict]:
    """Licence texts split into paragraphs; the same paragraph from two packages is kept once."""
    out, seen = [], set()
    for path in license_files(extra_dirs):
        try:
            text = path.read_bytes().decode("utf-8")[:_MAX_FILE_CHARS]
        except (OSError, UnicodeDecodeError):
            continue  # a licence in another encoding is skipped, not mangled
        for chunk in chunk_paragraphs(text.replace("\r\n", "\n"), min_chars=300, max_chars=1500):
            if chunk not in seen:
                seen.add(chunk)
                out.append({"text": chunk, "source": "license",
                            "meta": {"file": _label(path), "domain_hint": "law"}})
    return out
