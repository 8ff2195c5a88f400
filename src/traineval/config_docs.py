"""The config reference (docs/config-reference.md), generated from the config dataclasses.

    python -m traineval.config_docs > docs/config-reference.md

A test compares the file with what this prints, so the reference never drifts from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .config import EvaluationConfig, TrainingConfig
from .experiment import DataConfig, ModelConfig

SECTIONS = (
    ("data", DataConfig),
    ("model", ModelConfig),
    ("training", TrainingConfig),
    ("evaluation", EvaluationConfig),
)


def reference_markdown() -> str:
    """Every field of every config section: name, type, default, and the class's own notes."""
    lines = [
        "# Config reference",
        "",
        "Generated from the code by `python -m traineval.config_docs`; do not edit by hand.",
        "In a config file each section is a mapping (`training: {num_epochs: 5}`); from the",
        "command line a field is `section.field=value` (`training.batch_size=64`); from Python",
        "it is a keyword of the section's class. `mode` is one of supervised, unsupervised,",
        "semi_supervised, federated, meta_learning, reinforcement (default: supervised).",
    ]
    for section, cls in SECTIONS:
        lines += ["", f"## `{section}`: `{cls.__name__}`", ""]
        lines += [_docstring(cls), "", "| field | type | default |", "|---|---|---|"]
        for field in dataclasses.fields(cls):
            default = _default(field)
            lines.append(f"| `{field.name}` | `{_type(field.type)}` | `{default!r}` |")
    return "\n".join(lines) + "\n"


def _docstring(cls: type) -> str:
    text = inspect.getdoc(cls) or ""
    return text.split("\n\nExample:")[0].split("\n    Example:")[0].strip()


def _type(annotation: Any) -> str:
    return str(annotation).replace("|", "or")


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


if __name__ == "__main__":
    print(reference_markdown(), end="")
