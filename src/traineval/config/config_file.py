"""A run's config.yaml as traineval writes it: the settings between a head line and an end
line, so that a copy cut short at a line boundary (still valid YAML, whose lost settings
would read as defaults) is told from a whole one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..system.files import atomic_write_text

# A run's config.yaml opens with RUN_CONFIG_HEAD and closes with RUN_CONFIG_END: a copy cut
# short at a line boundary is still valid YAML, and would silently read its lost settings
# as defaults (`config.load_yaml` refuses one with the head and without the end).
RUN_CONFIG_HEAD = "# written by traineval: a run's settings; its last line is "
RUN_CONFIG_END = "# end of config.yaml"


def write_run_config(record: dict[str, Any], output_dir: str | Path) -> Path:
    """A run config's sections (`RunConfig.to_dict()`) as `output_dir/config.yaml`, with
    `training.output_dir` naming that folder (the record itself is not changed), between
    the head and end lines that let a reader tell a complete file from a cut one."""
    record = {**record, "training": {**record["training"], "output_dir": str(output_dir)}}
    return atomic_write_text(Path(output_dir) / "config.yaml", run_config_text(record))


def run_config_text(record: dict[str, Any]) -> str:
    """`record` as YAML between the head and end lines (see RUN_CONFIG_HEAD): for every run
    config traineval writes (a run's config.yaml, a study's best_config.yaml)."""
    import yaml

    text = yaml.safe_dump(record, sort_keys=False)
    return f"{RUN_CONFIG_HEAD}'{RUN_CONFIG_END}'\n{text}{RUN_CONFIG_END}\n"


def cut_run_config(text: str) -> bool:
    """Whether `text` is a run's config.yaml (it opens with the head line) whose end line is
    missing: the file was cut short."""
    if not text.startswith(RUN_CONFIG_HEAD):
        return False
    return all(line.rstrip() != RUN_CONFIG_END for line in text.splitlines())  # CRLF too
