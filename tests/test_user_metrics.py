"""A user's own metric goes everywhere a built-in goes: a torchmetrics `Metric`, a streaming
metric of their own and a scikit-learn-shaped function each equal their reference on the
same predictions, drive early stopping and the best checkpoint, are a study's objective,
and appear in metrics.jsonl, TensorBoard and the report; a config file names one by import
path, and a received run directory that does is refused without --trust-code."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, r2_score
from torch.utils.data import DataLoader, TensorDataset

import traineval
from traineval import TrainingConfig, TrainingManager
from traineval.cli import main
from traineval.config import EvaluationConfig
from traineval.evaluation.model_evaluator import ModelEvaluator
from traineval.evaluation.user_metrics import metric, register_metric
from traineval.loggers import read_jsonl

from conftest import make_classification, make_mlp

torchmetrics = pytest.importorskip("torchmetrics")


class MeanAbsoluteMargin:
    """A streaming metric of a user's: the mean of |top score - runner-up| per sample."""

    higher_is_better = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = torch.tensor(0.0), 0

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        top = predictions.topk(2, dim=1).values
        self.total = self.total + (top[:, 0] - top[:, 1]).sum()
        self.count += len(targets)

    def merge(self, other: MeanAbsoluteMargin) -> None:
        self.total, self.count = self.total + other.total, self.count + other.count

    def compute(self) -> float:
        return float(self.total) / self.count


class Scores(torch.nn.Module):
    """A 'model' that returns the stored scores of the samples it is given (by index)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.scores[index]


def test_each_kind_equals_its_reference_over_many_batches():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(203, 4, generator=generator)
    targets = torch.randint(0, 4, (203,), generator=generator)
    loader = DataLoader(TensorDataset(torch.arange(203), targets), batch_size=16)  # uneven last
    evaluator = ModelEvaluator(
        metrics={
            "tm_f1": torchmetrics.classification.MulticlassF1Score(4, average="macro"),
            "margin": MeanAbsoluteMargin(),
            "balanced": balanced_accuracy_score,
        }
    )
    found = evaluator.evaluate_model(Scores(scores), loader, "cpu", write_files=False)
    predicted = scores.argmax(1).numpy()
    assert found["tm_f1"] == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-6)
    top = scores.topk(2, dim=1).values
    assert found["margin"] == pytest.approx(float((top[:, 0] - top[:, 1]).mean()), rel=1e-6)
    assert found["balanced"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    # a second evaluation starts from empty states (the metrics given are templates)
    again = evaluator.evaluate_model(Scores(scores), loader, "cpu", write_files=False)
    assert again["tm_f1"] == found["tm_f1"]
    assert again["margin"] == found["margin"]


def test_a_function_sees_probabilities_when_it_asks_and_regression_values_as_they_are():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(100, 2, generator=generator)
    labels = torch.randint(0, 2, (100,), generator=generator)
    auc = metric(roc_auc_score, name="auc_of_mine", inputs="probabilities")
    found = ModelEvaluator(metrics=[auc]).compute_metrics(logits, labels)
    expected = roc_auc_score(labels, torch.softmax(logits, 1)[:, 1])
    assert found["auc_of_mine"] == pytest.approx(expected)
    values, truth = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    regression = ModelEvaluator(metrics={"r2_mine": r2_score}).compute_metrics(
        values.unsqueeze(1), truth
    )
    assert regression["r2_mine"] == pytest.approx(r2_score(truth, values), rel=1e-6)
    assert regression["r2_mine"] == pytest.approx(regression["r2_score"], rel=1e-6)


def test_bootstrap_intervals_cover_a_functions_value():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 3, generator=generator)
    labels = torch.randint(0, 3, (300,), generator=generator)
    evaluator = ModelEvaluator(
        EvaluationConfig(bootstrap_samples=200), metrics={"balanced": balanced_accuracy_score}
    )
    report = evaluator.score(logits, labels)
    low, high = report.intervals["balanced"]
    assert low < report.metrics["balanced"] < high
    # the same pairs in another order: the same interval
    order = torch.randperm(300, generator=generator)
    assert evaluator.score(logits[order], labels[order]).intervals["balanced"] == (low, high)


def test_bad_metrics_are_refused_naming_them():
    with pytest.raises(ValueError, match="'accuracy' is taken"):
        ModelEvaluator(metrics={"accuracy": balanced_accuracy_score})
    with pytest.raises(TypeError, match="is not a metric"):
        ModelEvaluator(metrics={"three": 3})
    with pytest.raises(ValueError, match="'loss' is taken"):  # would replace val_loss
        ModelEvaluator(metrics={"loss": balanced_accuracy_score})
    with pytest.raises(ValueError, match=r"scores probabilities.*inputs='probabilities'"):
        ModelEvaluator(EvaluationConfig(classification_metrics=("sklearn.metrics:log_loss",)))
    with pytest.raises(ValueError, match=r"classification_metrics\[0\]='acuracy'.*'accuracy'"):
        EvaluationConfig(classification_metrics=("acuracy",))
    with pytest.raises(ValueError, match=r"evaluation\.classification_metrics=.nopkg\.m:f."):
        ModelEvaluator(EvaluationConfig(classification_metrics=("accuracy", "nopkg.m:f")))

    class Counted(torch.nn.Module):  # streaming, but no merge: it was called as a function
        def update(self, predictions, targets): ...

        def compute(self):
            return 1.0

        def reset(self): ...

        def forward(self, *args):
            return 0.123

    with pytest.raises(TypeError, match=r"has update\(\) and compute\(\) but no merge\(\)"):
        ModelEvaluator(metrics={"counted": Counted()})


@pytest.mark.parametrize("kind", ["torchmetrics", "streaming", "function"])
def test_a_users_metric_drives_early_stopping_and_the_best_checkpoint(kind, tmp_path):
    templates = {
        "torchmetrics": torchmetrics.classification.MulticlassF1Score(3, average="macro"),
        "streaming": MeanAbsoluteMargin(),
        # declared lower-is-better: the best checkpoint is at its minimum
        "function": metric(lambda t, p: 1 - balanced_accuracy_score(t, p), higher_is_better=False),
    }
    config = TrainingConfig(
        num_epochs=8, batch_size=16, learning_rate=0.05, warmup_steps=0,
        scheduler_type="constant", monitor_metric="val_mine", early_stopping_patience=2,
        output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False, seed=0,
    )  # fmt: skip
    train = DataLoader(make_classification(n=96, seed=1), batch_size=16, shuffle=True)
    val = DataLoader(make_classification(n=48, seed=2), batch_size=16)
    evaluator = ModelEvaluator(metrics={"mine": templates[kind]})
    result = TrainingManager(config).train(make_mlp(), train, val, evaluator=evaluator)
    values = [m["mine"] for m in result.training_history["val_metrics"]]
    best = min(values) if kind == "function" else max(values)
    assert result.best_metric == best
    assert result.monitor_metric == "val_mine"
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert saved["best_metric"] == best
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["val_mine"] for r in records if r.get("split") == "val"] == values
    if result.stopped_early:  # patience 2: the last two evaluations did not improve on it
        assert best not in values[-2:]


def test_a_metrics_direction_read_from_its_name_is_scikit_learns():
    """Every scikit-learn scorer's metric, named as its function is (matthews_corrcoef,
    cohen_kappa_score, d2_log_loss_score, brier_score_loss, mean_squared_error, ...), gets
    the scorer's direction: 24 of them were taken as better when lower, so a run monitoring
    val_matthews_corrcoef kept its worst checkpoint."""
    from sklearn.metrics import get_scorer, get_scorer_names

    from traineval.config.training_config import metric_is_minimized

    checked = 0
    for name in get_scorer_names():
        scorer = get_scorer(name)
        function = getattr(scorer, "_score_func", None)
        if function is None:
            continue
        minimized = scorer._sign == -1
        assert metric_is_minimized(function.__name__) == minimized, function.__name__
        assert metric_is_minimized(name) is False  # the scorer's own name: higher is better
        checked += 1
    assert checked > 40


def test_every_built_in_metric_has_its_own_direction_and_names_match_whole_words():
    """brier_score (an error) was read as a score, better higher; head2_loss matched
    scikit-learn's d2_ and wrong_indices matched dice."""
    from traineval.config.training_config import BUILT_IN_METRICS, named_direction

    lower = {"log_loss", "brier_score", "ece", "mse", "mae", "rmse", "hamming_loss"}
    lower |= {"perplexity", "confusion_matrix"}
    for name in {n for names in BUILT_IN_METRICS.values() for n in names}:
        assert named_direction(f"val_{name}") is (name in lower), name
    for name in ("val_head2_loss", "val_round2_loss", "val_fold2_mae", "val_contrastive_neg_loss"):
        assert named_direction(name) is True, name
    assert named_direction("val_wrong_indices") is None
    assert named_direction("val_dice") is named_direction("val_neg_log_loss") is False


def test_a_monitored_metric_whose_direction_is_a_guess_says_so(caplog):
    from sklearn.metrics import matthews_corrcoef

    evaluator = ModelEvaluator(
        metrics={
            "matthews_corrcoef": matthews_corrcoef,
            "mine": balanced_accuracy_score,
            "declared": metric(balanced_accuracy_score, higher_is_better=True),
        }
    )
    with caplog.at_level("WARNING"):
        assert evaluator.minimizes("matthews_corrcoef") is False
        assert evaluator.minimizes("declared") is False
        assert caplog.text == ""
        assert evaluator.minimizes("mine") is True
    assert "val_mine is taken as better when lower: neither its name nor" in caplog.text


def test_a_monitor_name_that_matches_no_metric_is_refused_before_training(tmp_path):
    config = TrainingConfig(monitor_metric="val_mien", output_dir=str(tmp_path), num_epochs=1)
    evaluator = ModelEvaluator(metrics={"mine": balanced_accuracy_score})
    loader = DataLoader(make_classification(n=32), batch_size=16)
    with pytest.raises(ValueError, match=r"monitor_metric=.val_mien. is invalid.*val_mine"):
        TrainingManager(config).train(make_mlp(), loader, loader, evaluator=evaluator)
    assert not (tmp_path / "metrics.jsonl").exists()


METRICS_MODULE = '''
import torch
from sklearn.metrics import balanced_accuracy_score
from torchmetrics.classification import MulticlassF1Score

from traineval.evaluation import metric


@metric(higher_is_better=False)
def balanced_error(y_true, y_pred):
    return 1.0 - balanced_accuracy_score(y_true, y_pred)


def macro_f1():
    return MulticlassF1Score(num_classes=3, average="macro")


class Margin:
    """The mean gap between the top two scores (a streaming metric)."""

    higher_is_better = True

    def __init__(self):
        self.reset()

    def reset(self):
        self.total, self.count = 0.0, 0

    def update(self, predictions, targets):
        top = predictions.topk(2, dim=1).values
        self.total += float((top[:, 0] - top[:, 1]).sum())
        self.count += len(targets)

    def merge(self, other):
        self.total, self.count = self.total + other.total, self.count + other.count

    def compute(self):
        return self.total / self.count
'''

KINDS = {  # import path -> (reported name, lower is better)
    "function": ("mymetrics:balanced_error", "balanced_error", True),
    "torchmetrics": ("mymetrics:macro_f1", "macro_f1", False),
    "streaming": ("mymetrics:Margin", "margin", False),
}


@pytest.fixture(params=sorted(KINDS))
def project(request, tmp_path, monkeypatch):
    """A user's folder: `mymetrics.py` beside a config naming one of its metrics by import
    path and monitoring it."""
    import sys

    path, name, lower = KINDS[request.param]
    monkeypatch.delitem(sys.modules, "mymetrics", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymetrics.py").write_text(METRICS_MODULE)
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        data: {{name: iris}}
        model: {{name: mlp, options: {{hidden_sizes: [16]}}}}
        evaluation: {{classification_metrics: [accuracy, "{path}"]}}
        training: {{num_epochs: 4, batch_size: 16, learning_rate: 0.02, warmup_steps: 0,
                   scheduler_type: constant, seed: 3, progress_bar: false,
                   monitor_metric: val_{name}, tensorboard_logging: true}}
        """)
    )
    return tmp_path, config, name, lower


def test_a_config_names_a_metric_by_import_path_and_every_record_shows_it(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, config, name, lower = project
    run = folder / "run"
    assert main(["fit", str(config), "-q", f"training.output_dir={run}"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    values = [r[f"val_{name}"] for r in records if r.get("split") == "val"]
    assert len(values) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == (min(values) if lower else max(values))
    tested = json.loads((run / "evaluation" / "metrics.json").read_text())["test"]
    assert np.isfinite(tested[name])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert f"val_{name}" in events.Tags()["scalars"]
    assert main(["report", str(run)]) == 0
    assert f"val_{name}" in (run / "report.html").read_text()
    # received as a run directory, it names code: refused unless trusted
    assert main(["evaluate", str(run)]) == 2
    assert main(["evaluate", str(run), "--trust-code"]) == 0


def test_a_users_metric_is_the_objective_of_a_study(project):
    pytest.importorskip("optuna")
    import optuna

    folder, config, name, lower = project
    searched = folder / "search.yaml"
    searched.write_text(config.read_text() + "search: {learning_rate: {low: 0.001, high: 0.1}}\n")
    study = folder / "study"
    argv = ["tune", str(searched), "--trials", "4", "-q", f"training.output_dir={study}",
            "training.num_epochs=2", "training.tensorboard_logging=false",
            "--metric", f"val_{name}"]  # fmt: skip
    assert main(argv) == 0
    loaded = optuna.load_study(study_name="study", storage=f"sqlite:///{study / 'study.db'}")
    direction = optuna.study.StudyDirection
    assert loaded.direction == (direction.MINIMIZE if lower else direction.MAXIMIZE)
    assert len(loaded.trials) == 4
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for trial in complete:  # each finished trial's value is its run's best value
        run = study / f"trial-{trial.number:04d}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["monitor_metric"] == f"val_{name}"
        assert trial.value == pytest.approx(summary["best_metric"])
    best = min if lower else max
    assert loaded.best_value == best(t.value for t in complete)


def test_a_declared_direction_reaches_the_plateau_schedule(tmp_path):
    """'spread' reads as lower-is-better by its name; it declares otherwise."""
    seen = []

    class Spy(traineval.Callback):
        def on_train_start(self, loop):
            seen.append(loop.scheduler.plateau.minimize)

    spread = metric(lambda t, p: float(len(set(p))), name="spread", higher_is_better=True)
    config = TrainingConfig(
        num_epochs=1, batch_size=16, scheduler_type="plateau", monitor_metric="val_spread",
        output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False,
    )  # fmt: skip
    loader = DataLoader(make_classification(n=32), batch_size=16)
    evaluator = ModelEvaluator(metrics=[spread])
    result = TrainingManager(config).train(
        make_mlp(), loader, loader, evaluator=evaluator, callbacks=[Spy()]
    )
    assert seen == [False]
    assert result.monitor_metric == "val_spread"


def test_a_registered_metric_is_named_like_a_built_in():
    register_metric("weird_balanced", balanced_accuracy_score)
    register_metric("weird_balanced", balanced_accuracy_score)  # the same again: fine
    evaluator = ModelEvaluator(EvaluationConfig(classification_metrics=("weird_balanced",)))
    logits, labels = torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 1])
    found = evaluator.compute_metrics(logits, labels)
    assert found == {"weird_balanced": pytest.approx(balanced_accuracy_score(labels, [0, 1, 2, 0]))}
    with pytest.raises(ValueError, match="registered already"):
        register_metric("weird_balanced", f1_score)
    assert np.isfinite(found["weird_balanced"])
    # a built-in's name was accepted and then never used (the built-in won); "" and
    # "my metric" were accepted and refused only where named
    with pytest.raises(ValueError, match=r"'accuracy' is a built-in metric's.*'my_accuracy'"):
        register_metric("accuracy", f1_score)
    for bad in ("", "my metric", "loss"):
        with pytest.raises(ValueError, match="metric name"):
            register_metric(bad, f1_score)


def test_cross_validation_tables_and_ensembles_carry_a_users_metric(tmp_path):
    from traineval import Evaluator

    config = TrainingConfig(
        num_epochs=2, batch_size=16, learning_rate=0.05, warmup_steps=0, seed=0,
        output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False,
    )  # fmt: skip
    evaluator = Evaluator(metrics={"balanced": balanced_accuracy_score})
    summary = evaluator.cross_validate(make_mlp, make_classification(n=90, seed=4), config, 3)
    per_fold = [fold["best_metrics"]["balanced"] for fold in summary["folds"]]
    assert summary["balanced_mean"] == pytest.approx(float(np.mean(per_fold)))
    test = DataLoader(make_classification(n=30, seed=5), batch_size=8)
    found = evaluator.evaluate_ensemble(summary["fold_checkpoints"], test, model_factory=make_mlp)
    assert "balanced" in found["ensemble"]
    assert all("balanced" in member for member in found["members"])


def test_a_regression_target_equal_to_ignore_index_is_a_value_like_any_other():
    values = torch.tensor([[1.0], [2.0], [3.0]])
    targets = torch.tensor([1.5, -100.0, 3.0])
    count = metric(lambda t, p: float(len(t)), name="count")
    found = ModelEvaluator(metrics={"count": count, "r2_mine": r2_score}).compute_metrics(
        values, targets, task_type=traineval.TaskType.REGRESSION
    )
    assert found["count"] == 3.0
    assert found["r2_mine"] == pytest.approx(r2_score(targets, values.squeeze(1)))
    assert found["r2_mine"] == pytest.approx(found["r2_score"], rel=1e-6)


def test_a_users_torchmetrics_subclass_merges_across_ranks():
    """A torchmetrics Metric of a user's leaves full_state_update unset, which merge_state
    refuses; two ranks' states merge to the value of all samples."""
    from traineval.evaluation.user_metrics import UserMetric

    class Hits(torchmetrics.Metric):
        def __init__(self):
            super().__init__()
            self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")

        def update(self, predictions, targets):
            self.hits += (predictions.argmax(1) == targets).sum()

        def compute(self):
            return self.hits

    template = UserMetric("hits", Hits())
    ranks = [template.start(), template.start()]
    generator = torch.Generator().manual_seed(3)
    scores, labels = torch.randn(10, 3, generator=generator), torch.randint(0, 3, (10,))
    task = traineval.TaskType.CLASSIFICATION
    ranks[0].update(scores[:6], labels[:6], task)
    ranks[1].update(scores[6:], labels[6:], task)
    merged = ranks[0].to_cpu()
    merged.merge(ranks[1].to_cpu())
    merged.adopt(template)
    assert merged.compute(-100) == float((scores.argmax(1) == labels).sum())


def test_a_users_function_sees_what_the_built_ins_see_in_three_shapes_it_missed():
    """A batch of only ignored targets reached it empty (a reshape error); multi-label
    predictions were cut at 0.5 whatever multilabel_threshold said; a language model's
    batches of different lengths could not be joined."""
    from sklearn.metrics import accuracy_score

    from traineval import Evaluator, TaskType

    torch.manual_seed(0)
    x, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    y[:25] = -100  # the first batch: every target ignored
    model = torch.nn.Linear(5, 3)
    batches = [(x[i : i + 25], y[i : i + 25]) for i in range(0, 100, 25)]
    mine = metric(lambda t, p: accuracy_score(t, p))
    values = Evaluator(metrics={"mine": mine}).evaluate_model(model, batches)
    with torch.no_grad():
        kept = y != -100
        expected = accuracy_score(y[kept].numpy(), model(x).argmax(1)[kept].numpy())
    assert values["mine"] == pytest.approx(expected) == pytest.approx(values["accuracy"])

    labels = (torch.rand(200, 3) > 0.5).float()
    model = torch.nn.Linear(5, 3)
    x = torch.randn(200, 5)
    config = EvaluationConfig(multilabel_threshold=0.3)
    mine = metric(lambda t, p: f1_score(t, p, average="weighted", zero_division=0))
    values = Evaluator(config, metrics={"mine": mine}).evaluate_model(
        model, DataLoader(TensorDataset(x, labels), batch_size=50)
    )
    with torch.no_grad():
        predicted = (torch.sigmoid(model(x)) > 0.3).numpy()
    expected = f1_score(labels.numpy(), predicted, average="weighted", zero_division=0)
    assert values["mine"] == pytest.approx(expected)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20)

        def forward(self, tokens):
            return self.out(self.embed(tokens))

    lm, batches = LM(), []
    for length in (5, 7):  # padded per batch, as a collate function does
        tokens = torch.randint(0, 20, (4, length))
        targets = tokens.clone()
        targets[:, -1] = -100
        batches.append((tokens, targets))
    mine = metric(lambda t, p: accuracy_score(t, p))
    values = Evaluator(metrics={"mine": mine}).evaluate_model(
        lm, batches, task_type=TaskType.GENERATION
    )
    with torch.no_grad():
        truth = torch.cat([t.reshape(-1) for _, t in batches])
        guess = torch.cat([lm(b).argmax(-1).reshape(-1) for b, _ in batches])
    kept = truth != -100
    assert values["mine"] == pytest.approx(accuracy_score(truth[kept], guess[kept]))


def test_a_metric_function_with_defaults_or_star_args_is_a_metric_not_a_factory():
    """It was called with no arguments when named (taken for a factory of a metric)."""
    from traineval.evaluation.user_metrics import _builds_a_metric

    def with_defaults(y_true=None, y_pred=None):
        return float((y_true == y_pred).mean())

    def with_star(*arrays):
        return float((arrays[0] == arrays[1]).mean())

    def factory(num_classes=3):
        return torchmetrics.classification.MulticlassAccuracy(num_classes)

    assert not _builds_a_metric(with_defaults)
    assert not _builds_a_metric(with_star)
    assert _builds_a_metric(factory)


def test_a_metric_returning_a_zero_d_numpy_array_is_one_number():
    """np.asarray(x).mean() and friends give 0-d arrays: refused as "not one number"."""
    from traineval import Evaluator

    mine = metric(lambda t, p: np.asarray((t == p).mean()).reshape(()))
    logits, labels = torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 1])
    values = Evaluator(metrics={"mine": mine}).evaluate_model(
        torch.nn.Identity(), [(logits, labels)]
    )
    assert values["mine"] == pytest.approx(0.75)


def test_a_metric_returning_an_array_is_named_by_its_shape_on_one_line():
    """The array's repr spanned lines: the one-line message was cut inside it, and lost
    the advice."""
    from traineval import Evaluator
    from traineval.training.exit_codes import first_line

    per_sample = metric(lambda t, p: (t == p).astype(float))
    logits, labels = torch.eye(3)[[0, 1, 2, 0] * 20], torch.tensor([0, 1, 2, 1] * 20)
    with pytest.raises(ValueError) as raised:
        Evaluator(metrics={"each": per_sample}).evaluate_model(
            torch.nn.Identity(), [(logits, labels)]
        )
    assert first_line(raised.value).endswith(
        "computed ndarray of shape (80,); a metric gives one number (give per-class values "
        "as separate metrics)"
    )


@metric(higher_is_better=False)
def balanced_error(y_true, y_pred):
    return 1 - balanced_accuracy_score(y_true, y_pred)


def test_a_declared_metric_pickles_and_leaves_the_function_it_declares_untouched():
    """metric() marked the function itself (declaring scikit-learn's function changed it
    for every later use); its wrapper must still pickle, by name where it decorates."""
    import pickle

    assert pickle.loads(pickle.dumps(balanced_error)) is balanced_error
    assert balanced_error.__name__ == "balanced_error"
    assert balanced_error.__module__ == __name__
    declared = metric(f1_score, higher_is_better=True, name="f1_again")
    assert not hasattr(f1_score, "higher_is_better")
    again = pickle.loads(pickle.dumps(declared))
    assert (again.metric_name, again.higher_is_better, again.function) == (
        "f1_again",
        True,
        f1_score,
    )
    pickle.dumps(ModelEvaluator(metrics={"error": balanced_error, "f1_again": declared}))


class _RaisingCompute(MeanAbsoluteMargin):
    def compute(self) -> float:
        return 1 / 0


class _TextCompute(MeanAbsoluteMargin):
    def compute(self) -> str:  # type: ignore[override]
        return "good"


@pytest.mark.parametrize(
    ("metrics", "said"),
    [
        ({"ratio": lambda y, p: 1 / 0}, "metric 'ratio': its function raised ZeroDivisionError"),
        ({"margin": _RaisingCompute()}, "metric 'margin': its compute raised ZeroDivisionError"),
        ({"margin": _TextCompute()}, "metric 'margin' computed str 'good'; a metric gives one"),
    ],
    ids=["function", "compute", "not-a-number"],
)
def test_a_users_metric_that_raises_is_bad_input_and_the_training_is_saved(tmp_path, metrics, said):
    """A metric of the user's that raises fails the same way on every machine: exit status
    2 (bad input), naming the metric; it was 1 ('may pass elsewhere'), as a diverged run's
    NaN predictions still are. The training before the validation is in last.pt."""
    from traineval.training.exit_codes import BAD_INPUT, FAULT, exit_status_of
    from traineval.training.stop_rules import EvaluationError

    config = TrainingConfig(
        num_epochs=2, output_dir=str(tmp_path), progress_bar=False, tensorboard_logging=False
    )
    loader = DataLoader(make_classification(n=32, seed=1), batch_size=8)
    with pytest.raises(EvaluationError, match="validation at epoch 1, step 4 failed: ") as info:
        TrainingManager(config).train(
            make_mlp(), loader, loader, evaluator=ModelEvaluator(metrics=metrics)
        )
    assert said in str(info.value)
    assert info.value.user_code
    assert exit_status_of(info.value) == BAD_INPUT
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    import pickle

    assert pickle.loads(pickle.dumps(info.value)).user_code  # as a tune worker sends it
    assert exit_status_of(EvaluationError("the model predicted NaN")) == FAULT


def test_a_users_metric_that_raises_ends_the_cli_with_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "brokenmetric.py").write_text("def broken(y_true, y_pred):\n    return {}[1]\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent("""\
        data: {name: iris}
        model: {name: mlp, options: {hidden_sizes: [8]}}
        evaluation: {classification_metrics: [accuracy, "brokenmetric:broken"]}
        training: {num_epochs: 2, batch_size: 32, progress_bar: false,
                   tensorboard_logging: false}
        """)
    )
    assert main(["fit", str(config), "-q", f"training.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "metric 'broken': its function raised KeyError: 1" in err[0]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
