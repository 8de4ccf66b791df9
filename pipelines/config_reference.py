"""Print the config reference (every key, type, default and help) from the pydantic tree:
each key's help is its Field(description=...), a section's its class docstring.

    python -m pipelines.config_reference > docs/config.md

A test checks that docs/config.md matches, so the reference never drifts from the code.
"""
from __future__ import annotations

import json
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


_REQUIRED = object()


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, types.UnionType) or "Union" in text:
        text = " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return text.replace("NoneType", "None")


def _default(value) -> str:
    if value is _REQUIRED:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def rows(model: type[BaseModel], prefix: str = "", instance: BaseModel | None = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every key; instance: the section's default value in its
    parent, whose nested defaults are the ones a recipe gets."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        doc = (field.description or "").replace("|", "\\|")
        # the default a recipe gets: the parent's default instance's (dpo.engine's lr is not
        # EngineConfig's), else the field's own
        value = (getattr(instance, name) if instance is not None
                 else _REQUIRED if field.is_required() else field.get_default(call_default_factory=True))
        default = _default(value)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            out.append((key, sub.__name__, default, doc or (sub.__doc__ or "").split("\n")[0]))
            out += rows(sub, key + ".", value if isinstance(value, BaseModel) else None)
        else:
            if sub is not None:  # a list of sections: document the item's keys as key.N.*
                out.append((key, f"list[{sub.__name__}]", default, doc))
                out += rows(sub, key + ".N.")
                continue
            out.append((key, _type_name(field.annotation).replace("|", "\\|"), default, doc))
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
