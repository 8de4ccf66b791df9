"""Print the config reference (every key, type, default and help) from the pydantic tree.

    python -m pipelines.config_reference > docs/config.md

A test checks that docs/config.md matches, so the reference never drifts from the code.
"""
from __future__ import annotations

import inspect
import json
import re
import types
import typing

from pydantic import BaseModel

from pipelines.config import PipelineConfig


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, types.UnionType) or "Union" in text:
        text = " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """How the config classes document keys: a trailing ``# comment`` on the field's line,
    or a ``#: comment`` line just above it (for lines that would run long)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s{4}(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M):
            found[m.group(1)] = m.group(2).strip()
        for m in re.finditer(r"^\s{4}#:\s*(.+)\n\s{4}(\w+)\s*:", source, re.M):
            found[m.group(2)] = m.group(1).strip()  # a "#: help" line above the field
    return found


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    comments = _comments(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        doc = (field.description or comments.get(name, "")).replace("|", "\\|")
        if sub is not None and typing.get_origin(field.annotation) is not list:
            out.append((key, sub.__name__, _default(field), doc or (sub.__doc__ or "").split("\n")[0]))
            out += rows(sub, key + ".")
        else:
            if sub is not None:  # a list of sections: document the item's keys as key.N.*
                out.append((key, f"list[{sub.__name__}]", _default(field), doc))
                out += rows(sub, key + ".N.")
                continue
            out.append((key, _type_name(field.annotation).replace("|", "\\|"), _default(field), doc))
    return out


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from `pipelines/config.py` by `python -m pipelines.config_reference`.",
             "Every section rejects unknown keys; `--set KEY=VALUE` overrides any key.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    # "<" would open an HTML tag in rendered Markdown (pii:<kind>, <EMAIL>)
    lines += [f"| `{k}` | {t} | {d} | {m.replace('<', '&lt;')} |" for k, t, d, m in rows(PipelineConfig)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
