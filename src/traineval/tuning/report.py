"""`traineval report STUDY_DIR`: a hyperparameter study's trials table, optimisation
history, parameter importances and its best trial's learning curves, in one report.html.

Read from the study's storage (`STUDY_DIR/study.db`) with Optuna, and from the best trial's
run directory; plots with Optuna's own matplotlib functions (`optuna.visualization.
matplotlib`). Without matplotlib the report is written without images, and says which
extra adds them.
"""

from __future__ import annotations

import base64
import html
import logging
import warnings
from pathlib import Path
from typing import Any

from ..system.files import atomic_write_text

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"


def is_study(folder: str | Path) -> bool:
    """Whether `folder` holds a study (its SQLite storage), not a single run."""
    return (Path(folder) / STUDY_FILE).is_file() and not (Path(folder) / "metrics.jsonl").exists()


def load_study(folder: str | Path) -> Any:
    """The single study stored in `folder/study.db`."""
    import optuna

    path = Path(folder) / STUDY_FILE
    url = f"sqlite:///{path.resolve()}"
    try:
        names = optuna.get_all_study_names(storage=url)
        study = optuna.load_study(study_name=names[0], storage=url) if len(names) == 1 else None
    except Exception as error:  # not SQLite, truncated, another program's tables
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path} cannot be read as a study ({type(error).__name__}: {first}); copy it "
            "again from where the study ran"
        ) from None
    if study is None:
        raise ValueError(f"{path} holds {len(names)} studies: {names}")
    return study


def study_summary(study: Any) -> str:
    """The lines `traineval report` prints for a study."""
    from .command import trials_table
    from .study import trial_records

    trials = trial_records(study)
    lines = [f"Study: {study.study_name} ({len(trials)} trials, {study.direction.name.lower()})"]
    lines.append(trials_table(trials))
    complete = [t for t in trials if t["state"] == "complete"]
    if complete:
        best = study.best_trial
        lines.append(f"best: trial {best.number}, value {best.value:.4f}, {best.params}")
    return "\n".join(lines)


def write_study_report(folder: str | Path) -> tuple[Any, Path]:
    """Draw the study's plots and write `folder/report.html`; returns the study and path."""
    folder = Path(folder)
    study = load_study(folder)
    images, missing = _plots(study, folder / "report_files")
    page = _html(study, folder, images, missing)
    path = folder / "report.html"
    atomic_write_text(path, page)
    return study, path


def _plots(study: Any, out: Path) -> tuple[list[Path], str | None]:
    """Optimisation history, parameter importances, the best trial's curves (as PNGs)."""
    try:
        from ..reporting import plots

        plt = plots._pyplot()
    except ImportError as error:
        return [], str(error)
    from optuna.visualization import matplotlib as optuna_plots

    out.mkdir(parents=True, exist_ok=True)
    drawn: list[Path] = []
    for name, draw in (
        ("optimization_history", optuna_plots.plot_optimization_history),
        ("param_importances", optuna_plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" in Optuna's words
                axes: Any = draw(study)
            first: Any = axes if hasattr(axes, "figure") else axes.flat[0]  # one or many
            figure = first.figure
            drawn.append(plots._save(figure, out / f"{name}.png"))
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # too few trials
            logger.info("no %s plot: %s", name, error)
            plt.close("all")
    curves = _best_curves(study, out / "best_trial_curves.png")
    return drawn + ([curves] if curves else []), None


def _best_curves(study: Any, path: Path) -> Path | None:
    from ..commands.report import read_run
    from ..reporting import plots

    try:
        run_dir = study.best_trial.user_attrs.get("run_dir")
    except ValueError:
        return None  # no complete trial
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return None
    run = read_run(run_dir)
    return plots.learning_curves(run.history, path) if run.history["epoch"] else None


def _html(study: Any, folder: Path, images: list[Path], missing: str | None) -> str:
    from .study import trial_records

    trials = trial_records(study)
    names = sorted({n for t in trials for n in t["params"]})
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in ["trial", "state", "value", "seconds", *names]
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_cell(v))}</td>"
            for v in [t["number"], t["state"], t["value"], t["seconds"]]
            + [t["params"].get(n) for n in names]
        )
        + "</tr>"
        for t in trials
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>'
        f"{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in images
    )
    if missing:
        figures = f"<p>No plots: {html.escape(missing)}.</p>"
    best = ""
    if any(t["state"] == "complete" for t in trials):
        b = study.best_trial
        best = (
            f"<p>Best: trial {b.number}, value {html.escape(_cell(b.value))}, "
            f"{html.escape(str(b.params))}; config: best_config.yaml</p>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>traineval study: {html.escape(study.study_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
th {{ background: #f2f4f7; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
img {{ max-width: 100%; max-height: 480px; border: 1px solid #ddd; }}
</style></head><body>
<h1>traineval study: {html.escape(str(folder))}</h1>
<p>{len(trials)} trials, direction {html.escape(study.direction.name.lower())}</p>
{best}
<h2>Trials</h2><table><tr>{head}</tr>{body}</table>
<h2>Plots</h2>{figures or "<p>No plots.</p>"}
</body></html>
"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
