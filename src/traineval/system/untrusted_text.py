"""Files a stranger may hand over (configs, run directories, CSV tables), read within bounds.

`read_utf8` reads text as UTF-8 (a byte-order mark dropped) and refuses other encodings,
naming the file and the line. A YAML file can ask for far more than its size: nested
aliases (`b: [*a, *a, ...]`, nine levels of ten) expand to a billion values that any walk
over the data then visits, and a 100,000-deep nesting overflows every recursive reader.
`load` refuses both in one line before anything is built: nesting deeper than `MAX_DEPTH`
(checked on the parser's events, which need no recursion) and documents whose aliases
expand to more than `MAX_VALUES` values (counted on the node graph, each shared node once;
a string counts one value per `CHARACTERS_PER_VALUE` characters).
Python tags are refused as by `yaml.safe_load`; `1e-3` is read as a float (YAML 1.1 would
read a string).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64
MAX_VALUES = 100_000
CHARACTERS_PER_VALUE = 100  # a scalar counts one value per 100 characters of its text


class Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 would read it as a string) and
    refuses a key given twice in one mapping (YAML requires unique keys; PyYAML keeps the
    last, so a second `training:` section dropped the whole first one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue  # `<<: *defaults` merges: its keys may be overridden
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice in one mapping (first on line "
                    f"{seen[key]}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The text of `path` (UTF-8, a leading byte-order mark dropped); another encoding is a
    ValueError naming `what`, the file and the line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {raw[error.start]:#04x} on line "
            f"{line}): save it as UTF-8"
        ) from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON value in `path`; a file cut short, not JSON, or nested past reason is a
    ValueError naming `what`, the file and where."""
    import json

    text = read_utf8(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON ({error.msg}, line {error.lineno}, column "
            f"{error.colno}): it may have been cut short; restore or remove it"
        ) from None
    except RecursionError:
        raise TooLarge(f"{what} {str(path)!r} nests too deeply to be read: refused") from None


class TooLarge(ValueError):
    """A YAML document nested too deeply, or expanding to too many values."""


def load(text: str) -> Any:
    """The document in `text`, refused (`TooLarge`, or yaml.YAMLError) beyond the bounds."""
    _check_depth(text)
    node = yaml.compose(text, Loader=Loader)
    if node is None:
        return None
    count = _expanded_size(node, {})
    if count > MAX_VALUES:
        raise TooLarge(
            f"its aliases expand to more than {MAX_VALUES:,} values (or "
            f"{MAX_VALUES * CHARACTERS_PER_VALUE // 10**6} MB of text): refused, as a config "
            "holds a few hundred; write the values out"
        )
    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_depth(text: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise TooLarge(
                    f"it nests deeper than {MAX_DEPTH} levels (line {line}): refused, as a "
                    "config nests a few levels"
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` stands for with its aliases expanded (each node computed once;
    the depth is bounded already, so the recursion is too)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:  # a long string weighs as its text does: 200 aliases of 100 KB wrote 20 MB
        size = 1 + len(str(node.value)) // CHARACTERS_PER_VALUE
    memo[id(node)] = min(size, MAX_VALUES + 1)  # the count stops mattering past the bound
    return memo[id(node)]
