"""`traineval report RUN_DIR`: a summary and one self-contained report.html, built only from the
files of the run directory (config.yaml, summary.json, metrics.jsonl, evaluation/)."""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..assembly.results import trained_words
from ..config.training_config import load_yaml, metric_is_minimized
from ..loggers import read_jsonl
from ..runs.checkpoint import flower_run_ended
from ..runs.rundir import in_use, is_cross_validation
from ..system.files import atomic_write_text
from ..system.untrusted_text import read_json
from ..training.loop import empty_history


@dataclasses.dataclass
class RunRecord:
    """What a run directory says about its run."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: dict[str, list[Any]]
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    unit: str = "epoch"  # "round" for a Flower run (traineval.federated.flower's metrics.jsonl)
    test_per_class: list[dict[str, Any]] | None = None
    test_intervals: dict[str, Any] | None = None  # bootstrap intervals (metrics.json)
    test_confusion: list[list[int]] | None = None  # rows true class, columns predicted
    class_names: list[str] | None = None


def read_run(run_dir: str | Path) -> RunRecord:
    """Collect a run's config, summary, per-epoch history and metrics from its files."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        if any(run_dir.glob("trial-*/metrics.jsonl")):  # a study whose storage is elsewhere
            raise FileNotFoundError(
                f"{str(run_dir)!r} holds a study's trials but not its study.db: a study kept "
                "in another storage (--storage) is not reported from here; report a trial "
                f"(e.g. {str(run_dir / 'trial-0000')!r}), or read the study with Optuna"
            )
        if is_cross_validation(run_dir):
            raise FileNotFoundError(
                f"{str(run_dir)!r} is a cross-validation: report one of its folds (e.g. "
                f"{str(run_dir / 'fold-1')!r}); the folds' scores are in cv_summary.json, "
                "and their test scores and their ensemble's in evaluation/cv.json"
            )
        kind = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory: it {kind}")
    config_path = run_dir / "config.yaml"
    config = _mapping(load_yaml(config_path)) if config_path.exists() else {}
    summary_path = run_dir / "summary.json"
    summary = _summary(summary_path)
    records = [_clean(record) for record in read_jsonl(run_dir / "metrics.jsonl")]
    flower = any("round" in record for record in records)
    history = rounds_history(records) if flower else history_from_events(records)
    if flower:
        summary = _best_round(history, _mapping(config.get("training")))
        summary["status"] = _flower_status(run_dir, summary["rounds"], config)
    elif not summary or in_use(run_dir):  # (a resumed run keeps the earlier summary.json)
        summary = _unfinished(run_dir, records)
    val = [(s, m) for s, m in zip(history["val_steps"], history["val_metrics"], strict=True)]
    best_step = summary.get("best_step")
    best: dict[str, float] = next((m for s, m in val if s == best_step), {})
    final = val[-1][1] if val else {}
    saved = _saved_evaluation(run_dir)
    test = _numbers(saved.get("test")) if saved else None
    per_class = [_mapping(row) for row in saved.get("test_per_class") or [] if row] or None
    intervals = _mapping(saved.get("test_intervals")) or None
    confusion = _square_counts(saved.get("test_confusion_matrix"))
    names = saved.get("class_names")
    if not (isinstance(names, list) and confusion and len(names) == len(confusion)):
        names = None
    unit = "round" if flower else "epoch"
    return RunRecord(
        run_dir, config or {}, summary, history, best, final, test, unit, per_class, intervals,
        confusion, [str(n) for n in names] if names else None,
    )  # fmt: skip


def _saved_evaluation(run_dir: Path) -> dict[str, Any]:
    """evaluation/metrics.json, or an empty mapping when the run has none."""
    evaluation = run_dir / "evaluation" / "metrics.json"
    return _mapping(read_json(evaluation, "evaluation record")) if evaluation.exists() else {}


def _square_counts(value: Any) -> list[list[int]] | None:
    """A confusion matrix as the run saved it: a square list of lists of counts (else None)."""
    if not isinstance(value, list) or not value:
        return None
    rows = [row for row in value if isinstance(row, list) and len(row) == len(value)]
    if len(rows) != len(value) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for r in rows for c in r
    ):
        return None
    return rows


def _summary(path: Path) -> dict[str, Any]:
    """A run's summary.json ({} where it has none); one that holds no mapping is named (it
    read as a run killed before writing one)."""
    if not path.exists():
        return {}
    found = read_json(path, "summary")
    if not isinstance(found, dict):
        raise ValueError(
            f"summary {str(path)!r} holds a {type(found).__name__}, not a run's summary: "
            "restore it, or remove it to report the run as not finished"
        )
    return found


def _mapping(value: Any) -> dict[str, Any]:
    """A run directory is untrusted input: anything but a mapping reads as empty."""
    return dict(value) if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> dict[str, float]:
    """The number-valued entries of a metrics mapping (a tampered text value is dropped)."""
    return {str(k): v for k, v in _mapping(value).items() if _is_number(v)}


def _clean(record: Any) -> dict[str, Any]:
    """A metrics.jsonl record with its `event` / `split` names and its numbers, nothing else."""
    kept = {k: v for k, v in _mapping(record).items() if v is None or _is_number(v)}
    for key in ("event", "split"):
        if isinstance(_mapping(record).get(key), str):
            kept[key] = record[key]
    return kept


def history_from_events(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-epoch losses and per-evaluation validation metrics, rebuilt from metrics.jsonl."""
    history = empty_history()
    val_at_step: dict[int, dict[str, float]] = {}
    for record in records:
        if not _is_number(record.get("step")):
            continue
        if record.get("event") == "eval" and record.get("split", "val") == "val":
            metrics = _with_prefix(record, "val")
            val_at_step[record["step"]] = metrics
            history["val_steps"].append(record["step"])
            history["val_metrics"].append(metrics)
        elif record.get("event") == "epoch":
            history["epoch"].append(record.get("epoch"))
            history["train_loss"].append(_first(record, "train_loss", "train/epoch_loss"))
            history["learning_rate"].append(_first(record, "learning_rate", "epoch_lr"))
            history["val_loss"].append(val_at_step.get(record["step"], {}).get("loss"))
    return history


def _with_prefix(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`val_accuracy` -> `accuracy` (and `val/accuracy`, the key of earlier versions)."""
    out = {}
    for key, value in record.items():
        for start in (f"{prefix}_", f"{prefix}/"):
            if key.startswith(start):
                out[key[len(start) :]] = value
    return out


def _first(record: dict[str, Any], key: str, earlier: str) -> Any:
    """`key`, or its name in the metrics.jsonl of earlier versions."""
    return record.get(key, record.get(earlier))


def rounds_history(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """A Flower run's history (traineval.federated.flower's metrics.jsonl), one entry per round: the
    clients' mean training loss and learning rate, and as validation the server's evaluation
    of the global model (the clients' evaluation when the server did not evaluate)."""
    history = empty_history()
    records = [r for r in records if _is_number(r.get("round"))]
    server = any(r.get("event") == "server_evaluation" for r in records)
    event, prefix = ("server_evaluation", "server") if server else ("validation", "val")
    val = {
        r["round"]: _with_prefix(r, prefix)
        for r in records
        if r.get("event") == event and r["round"] > 0  # round 0: the initial weights
    }
    for record in records:
        if record.get("event") == "train":
            history["epoch"].append(record["round"])
            history["train_loss"].append(_first(record, "train_loss", "train/train_loss"))
            history["learning_rate"].append(_first(record, "learning_rate", "lr"))
            history["val_loss"].append(val.get(record["round"], {}).get("loss"))
    for server_round, metrics in sorted(val.items()):
        history["val_steps"].append(server_round)
        history["val_metrics"].append(metrics)
    return history


def _best_round(history: dict[str, list[Any]], training: dict[str, Any]) -> dict[str, Any]:
    """A Flower run's summary: its rounds and its best round on the config's monitor."""
    monitor = str(training.get("monitor_metric", "val_loss"))
    name = monitor.removeprefix("val_")
    mode = training.get("monitor_mode", "auto")
    minimize = metric_is_minimized(monitor) if mode == "auto" else mode == "min"
    scored = [
        (metrics[name], server_round)
        for server_round, metrics in zip(history["val_steps"], history["val_metrics"], strict=True)
        if isinstance(metrics.get(name), (int, float))
    ]
    summary: dict[str, Any] = {"rounds": len(history["epoch"]), "monitor_metric": monitor}
    if scored:
        value, server_round = min(scored) if minimize else max(scored, key=lambda s: (s[0], -s[1]))
        summary.update(best_metric=value, best_step=server_round, best_epoch=server_round)
    return summary


def _flower_status(run_dir: Path, rounds: int, config: dict[str, Any]) -> str:
    """Whether a Flower run (which writes no summary.json) finished: its final model and
    test metrics are written at its end."""
    if in_use(run_dir):
        return "running (another process holds the folder now)"
    planned = _mapping(config.get("training")).get("num_epochs")
    of = f" of {planned}" if isinstance(planned, int) else ""
    if flower_run_ended(run_dir):
        return "finished"
    return f"not finished ({rounds}{of} rounds, no final model or test): --resume auto continues it"


def summary_text(run: RunRecord) -> str:
    """The lines `traineval report` prints."""
    s = run.summary
    lines = [f"Run: {run.run_dir}"]
    if run.unit == "round":
        lines.append(f"Flower run: {s.get('rounds')} rounds; {s.get('status')}")
        if s.get("best_metric") is not None:
            lines.append(
                f"best {s.get('monitor_metric')} = {_num(s['best_metric'])} at round "
                f"{s.get('best_step')}"
            )
    elif s:
        status = _status(s)
        line = f"{status}: {_trained(s)}"
        if "train_seconds" in s:
            line += (
                f" in {_num(s.get('train_seconds', 0.0), '.1f')}s "
                f"({_num(_mapping(s.get('performance')).get('samples_per_sec', 0.0), ',.0f')} "
                "samples/s)"
            )
        lines.append(line)
        if s.get("best_metric") is not None:
            lines.append(
                f"best {s.get('monitor_metric')} = {_num(s['best_metric'])} at epoch "
                f"{s.get('best_epoch')} (step {s.get('best_step')})"
            )
    bounds = _mapping((run.test_intervals or {}).get("metrics"))
    for title, metrics in (
        ("best validation", run.best_metrics),
        ("final validation", run.final_metrics),
        ("test", run.test_metrics or {}),
    ):
        if metrics:
            shown = bounds if title == "test" else {}
            values = ", ".join(
                f"{k} {_num(v)}" + (f" {_interval(shown[k])}" if k in shown else "")
                for k, v in metrics.items()
            )
            lines.append(f"{title}: {values}")
    level = (run.test_intervals or {}).get("confidence_level")
    if bounds and isinstance(level, (int, float)):
        samples = (run.test_intervals or {}).get("bootstrap_samples")
        lines.append(f"(test intervals: {100 * level:g}% bootstrap, {samples} resamples)")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[RunRecord, Path]:
    """Draw the learning curves and write `<run_dir>/report.html`; returns the record and path."""
    from ..reporting import plots

    run = read_run(run_dir)
    curves = run.run_dir / "evaluation" / "learning_curves.png"
    if run.history["epoch"]:
        plots.optional(plots.learning_curves, run.history, curves, unit=run.unit)
    matrix = run.run_dir / "evaluation" / "confusion_matrix_test.png"
    if run.test_confusion and not matrix.exists():  # drawn from metrics.json's counts
        counts = np.array(run.test_confusion, dtype=np.int64)
        plots.optional(plots.confusion_matrix, counts, matrix, run.class_names)
    images = sorted((run.run_dir / "evaluation").glob("*.png"), key=lambda p: (p != curves, p.name))
    page = _html(run, images)
    path = run.run_dir / "report.html"
    atomic_write_text(path, page)
    return run, path


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header) if any(header) else ""
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _fmt(value: Any) -> str:
    """A value read from the run directory as HTML text: numbers formatted, all escaped."""
    return html.escape(_num(value, ".6g"))


def _num(value: Any, spec: str = ".4f") -> str:
    """A number in `spec` (an int as it is); anything else (a tampered value) as its text."""
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _config_section(config: dict[str, Any]) -> str:
    """The settings that differ from traineval's defaults, the rest folded below them."""
    rows = _flatten(config)
    defaults = dict(_flatten(_default_config(config)))
    changed = [(k, v) for k, v in rows if k not in defaults or defaults[k] != v]
    rest = [(k, v) for k, v in rows if (k, v) not in changed]
    shown = (
        _table(changed, ("field", "value"))
        if changed
        else "<p>Every setting is traineval's default.</p>"
    )
    if rest:
        shown += (
            f"<details><summary>{len(rest)} more settings, at their defaults</summary>"
            f"{_table(rest, ('field', 'value'))}</details>"
        )
    return shown


def _default_config(config: dict[str, Any]) -> dict[str, Any]:
    """A default run config in the run's config.yaml shape (the run's mode at its defaults)."""
    from ..config.registry import lookup
    from .experiment import RunConfig

    defaults = RunConfig().to_dict()
    mode = _mapping(config.get("mode"))
    try:
        defaults["mode"] = lookup(mode.get("name")).from_settings({}).to_dict()
    except (ValueError, TypeError):  # a mode not registered here: compare nothing of it
        defaults["mode"] = {}
    return defaults


def _confusion_table(run: RunRecord) -> str:
    """The test split's confusion matrix as counts (rows true, columns predicted), shaded."""
    counts = run.test_confusion
    if not counts or len(counts) > 30:
        return ""
    names = run.class_names or [str(i) for i in range(len(counts))]
    top = max(max(row) for row in counts) or 1
    head = "<tr><th>true / predicted</th>" + "".join(f"<th>{_fmt(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{_fmt(name)}</th>"
        + "".join(
            f'<td style="background: rgba(31, 119, 180, {0.85 * c / top:.2f})">{c}</td>'
            for c in row
        )
        + "</tr>"
        for name, row in zip(names, counts, strict=True)
    )
    return f"<h2>Confusion matrix (test)</h2><table>{head}</tr>{body}</table>"


def _metrics_table(run: RunRecord) -> str:
    columns = [("best validation", run.best_metrics), ("final validation", run.final_metrics)]
    if run.test_metrics:
        columns.append(("test", run.test_metrics))
    names: list[str] = []
    for _, metrics in columns:
        names += [n for n in metrics if n not in names]
    if not names:
        return "<p>No evaluations were recorded.</p>"
    bounds = _mapping((run.test_intervals or {}).get("metrics"))
    confidence = (run.test_intervals or {}).get("confidence_level", 0)
    level = f"test, {100 * confidence if _is_number(confidence) else 0:g}% interval"
    head = "<tr><th>metric</th>" + "".join(f"<th>{t}</th>" for t, _ in columns)
    head += f"<th>{level}</th></tr>" if bounds else "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(f"<td>{_fmt(m[n]) if n in m else ''}</td>" for _, m in columns)
        + (f"<td>{html.escape(_interval(bounds.get(n)))}</td>" if bounds else "")
        + "</tr>"
        for n in names
    )
    return f"<table>{head}{rows}</table>"


def _interval(bounds: Any) -> str:
    if not isinstance(bounds, list) or len(bounds) != 2:
        return ""
    return f"[{_num(bounds[0])}, {_num(bounds[1])}]"


def _per_class_table(rows: list[dict[str, Any]] | None) -> str:
    """The test split's per-class (per-label) metrics, when the run recorded them."""
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("class", "precision", "recall", "f1", "support"))
    body = "".join(
        f"<tr><td>{_fmt(r.get('label', ''))}</td>"
        + "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in ("precision", "recall", "f1"))
        + f"<td>{_fmt(r.get('support', ''))}</td>"
        + "</tr>"
        for r in rows
    )
    return f"<h2>Per class (test)</h2><table><tr>{head}</tr>{body}</table>"


def _html(run: RunRecord, images: list[Path]) -> str:
    """The report page: overview, metrics, per-class and confusion tables, plots (embedded),
    the per-epoch (or per-round) table and the config."""
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>'
        f"{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in images
    )
    overview, epoch_rows = _overview(run), _epoch_rows(run)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>traineval report: {html.escape(run.run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
th {{ background: #f2f4f7; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
img {{ max-width: 100%; max-height: 480px; border: 1px solid #ddd; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 2rem; }}
</style></head><body>
<h1>traineval report: {html.escape(str(run.run_dir))}</h1>
<div class="grid"><div><h2>Overview</h2>{_table(overview)}</div>
<div><h2>Metrics</h2>{_metrics_table(run)}</div></div>
{_per_class_table(run.test_per_class)}
{_confusion_table(run)}
<h2>Plots</h2>{figures or "<p>No plots.</p>"}
<h2>Per {run.unit}</h2>
<table><tr><th>{run.unit}</th><th>train loss</th><th>val loss</th><th>learning rate</th></tr>
{epoch_rows}</table>
<h2>Config</h2>{_config_section(run.config)}
</body></html>
"""


def _overview(run: RunRecord) -> list[tuple[str, Any]]:
    """The overview table's rows: how the run ended, its length, best value, speed; a
    Flower run's rounds and best round."""
    s = run.summary
    if run.unit == "round":  # a Flower run: rounds, and the best one
        return [
            ("Flower rounds", s.get("rounds")),
            ("status", s.get("status")),
            ("monitored metric", s.get("monitor_metric")),
            ("best value", s.get("best_metric")),
            ("best round", s.get("best_step")),
        ]
    performance = _mapping(s.get("performance"))
    best = (s.get("best_epoch"), s.get("best_step"))
    rows = [
        ("status", _status(s)),
        ("trained", _trained(s)),
        ("monitored metric", s.get("monitor_metric")),
        ("best value", s.get("best_metric")),
        ("best epoch / step", None if best == (None, None) else f"{best[0]} / {best[1]}"),
        ("training time (s)", s.get("train_seconds")),
        ("samples / s", performance.get("samples_per_sec")),
        ("data-wait fraction", performance.get("data_wait_fraction")),
        ("peak RSS (MiB)", performance.get("peak_rss_mb")),
    ]
    return [(name, value) for name, value in rows if value is not None]  # (unknown: left out)


def _epoch_rows(run: RunRecord) -> str:
    """The per-epoch (or per-round) table's rows: train and val loss, learning rate."""
    h = run.history
    epochs = zip(h["epoch"], h["train_loss"], h["val_loss"], h["learning_rate"], strict=True)
    return "".join(
        f"<tr><td>{_fmt(e)}</td><td>{_fmt(t)}</td><td>{_fmt(v) if v is not None else ''}</td>"
        f"<td>{_fmt(lr) if lr is not None else ''}</td></tr>"
        for e, t, v, lr in epochs
    )


def _unfinished(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run directory without summary.json (written when a run ends, however it ends)
    says: a run holds it now, or its run was killed; how far metrics.jsonl got."""
    steps = [r["step"] for r in records if type(r.get("step")) is int]
    if in_use(run_dir):
        status, reason = "running", "another process holds the folder now"
    else:
        status, reason = (
            "not finished",
            (
                "no summary.json: the run was killed; --resume auto continues it from its last "
                "checkpoint"
            ),
        )
    return {"status": status, "stop_reason": reason, "global_step": max(steps, default=0)}


def _status(summary: dict[str, Any]) -> str:
    """How the run ended: summary.json's `status` (with its reason when it did not finish);
    runs of earlier versions recorded only `stopped_early`."""
    status = summary.get("status")
    if not isinstance(status, str):
        return "stopped early" if summary.get("stopped_early") else "finished"
    reason = summary.get("stop_reason")
    ended = ("interrupted", "failed", "time limit", "running", "not finished")
    if status in ended and isinstance(reason, str):
        return f"{status} ({reason})"
    return status


def _trained(summary: Mapping[str, Any]) -> str:
    """What a summary's run trained, in words (an older summary's numbers as they are)."""
    epochs, steps = summary.get("epochs_completed"), summary.get("global_step")
    batches = summary.get("batches_into_epoch", 0)
    if isinstance(epochs, int) and isinstance(batches, int) and isinstance(steps, int):
        return trained_words(epochs, batches, steps)
    if epochs is None and isinstance(steps, int):  # no summary.json: as far as the log went
        return f"{steps} optimizer updates logged"
    return f"{epochs} epochs, {steps} optimizer updates"
