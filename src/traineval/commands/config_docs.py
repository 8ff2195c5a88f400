"""The config reference (docs/config-reference.md), generated from the config dataclasses.

    python -m traineval.commands.config_docs > docs/config-reference.md

A test compares the file with what this prints, so the reference never drifts from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ..config import registry
from ..config.checks import field_default
from ..config.training_config import EvaluationConfig, TrainingConfig
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
        "Generated from the code by `python -m traineval.commands.config_docs`; do not edit it "
        "by hand.",
        "In a config file each section is a mapping (`training: {num_epochs: 5}`); from the",
        "command line a field is `section.field=value` (`training.batch_size=64`); from Python",
        "it is a keyword of the section's class.",
    ]
    for section, cls in SECTIONS:
        lines += ["", f"## `{section}`: `{cls.__name__}`", "", _docstring(cls), ""]
        lines += _fields(cls)
    lines += [
        "",
        "## `mode`: the training mode and its settings",
        "",
        "A name (`mode: federated`) or a section naming the mode and its settings",
        "(`mode: {name: federated, clients: 10}`; command line: `mode.clients=10`); default",
        "`supervised`. In Python, `train(mode=traineval.modes.Federated(clients=10))`. The",
        "built-in modes and their settings:",
    ]
    for name in registry.names():
        mode = registry.lookup(name)
        if not mode.__module__.startswith("traineval."):
            continue  # a mode registered by the user or a test
        lines += ["", f"### `{name}`: `{mode.__name__}`", "", _docstring(mode), ""]
        lines += _fields(mode) if dataclasses.fields(mode) else ["No settings."]
    return "\n".join(lines) + "\n"


def _fields(cls: Any) -> list[str]:
    """The fields' table; with an `allowed` column when the fields carry their rules."""
    fields = dataclasses.fields(cls)
    ruled = any("rule" in field.metadata for field in fields)
    lines = ["| field | type | default |" + (" allowed |" if ruled else "")]
    lines.append("|---|---|---|" + ("---|" if ruled else ""))
    for field in fields:
        row = f"| `{field.name}` | `{_type(field.type)}` | `{_default(field)!r}` |"
        if ruled:
            row += f" {field.metadata.get('rule', '')} |"
        lines.append(row)
    return lines


def _docstring(cls: type) -> str:
    text = inspect.getdoc(cls) or ""
    return text.split("\n\nExample:")[0].split("\n    Example:")[0].strip()


def _type(annotation: Any) -> str:
    return str(annotation).replace("|", "or")


def _default(field: dataclasses.Field[Any]) -> Any:
    value = field_default(field)
    return None if value is dataclasses.MISSING else value


if __name__ == "__main__":
    print(reference_markdown(), end="")
