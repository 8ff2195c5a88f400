"""The model-output rule: tensors, tuples, mappings, a model's own loss, output_transform.

Reference: the same network returning a plain tensor, trained and evaluated the same way;
every other output form must give identical weights and metrics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from traineval import Evaluator, TrainingConfig, TrainingManager, TrainingMode
from traineval.training.batches import prediction_of

from conftest import make_classification


class Net(nn.Module):
    """An MLP whose forward returns its logits in the form `kind` names."""

    def __init__(self, kind: str = "tensor", features: int = 8, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))
        self.kind = kind

    def forward(self, x: torch.Tensor):
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, x.mean(dim=1)
        if self.kind == "list":
            return [logits]
        if self.kind == "dict":
            return {"logits": logits, "hidden": x}
        if self.kind == "custom":
            return {"scores": logits}
        return logits


class LabelledNet(Net):
    """A model that takes `labels` and computes its own loss (the Hugging Face convention)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):  # type: ignore[override]
        logits = self.body(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _config(tmp_path, name: str, **settings) -> TrainingConfig:
    return TrainingConfig(
        **{
            "num_epochs": 3,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "progress_bar": False,
            "tensorboard_logging": False,
            "early_stopping_patience": 0,
            "device": "cpu",
            "output_dir": str(tmp_path / name),
            **settings,
        }
    )


def _train(tmp_path, model: nn.Module, name: str, loader=None, val=None, **kwargs):
    loader = loader or DataLoader(make_classification(), batch_size=16)
    val = val or DataLoader(make_classification(n=48, seed=1), batch_size=16)
    settings = kwargs.pop("settings", {})
    result = TrainingManager(_config(tmp_path, name, **settings)).train(
        model, loader, val, **kwargs
    )
    return model, result


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.body.parameters(), b.body.parameters(), strict=True)
    )


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_tuple_list_and_dict_outputs_train_and_evaluate_like_a_tensor(tmp_path, kind):
    reference, expected = _train(tmp_path, Net("tensor"), "tensor")
    model, result = _train(tmp_path, Net(kind), kind)
    assert _same(model, reference)
    assert result.training_history["val_metrics"] == expected.training_history["val_metrics"]
    assert result.training_history["val_metrics"][-1]["accuracy"] > 0.5


def test_output_transform_reads_any_output_and_the_error_names_it(tmp_path):
    with pytest.raises(TypeError, match=r"'scores'.*output_transform="):
        _train(tmp_path, Net("custom"), "custom")
    reference, _ = _train(tmp_path, Net("tensor"), "tensor")
    model, result = _train(
        tmp_path, Net("custom"), "transformed", output_transform=lambda out: out["scores"]
    )
    assert _same(model, reference)
    # the evaluator reads the same outputs with the same function
    loader = DataLoader(make_classification(n=48, seed=1), batch_size=16)
    metrics = Evaluator(output_transform=lambda out: out["scores"]).evaluate_model(
        model, loader, write_files=False
    )
    assert metrics["accuracy"] == result.training_history["val_metrics"][-1]["accuracy"]


def test_a_loss_of_your_own_gets_the_output_as_returned(tmp_path):
    seen = []

    def loss(outputs, targets):  # a VAE-style loss reads the whole tuple
        seen.append(type(outputs))
        logits, extra = outputs
        return F.cross_entropy(logits, targets) + 0.0 * extra.sum()

    reference, _ = _train(tmp_path, Net("tensor"), "tensor")
    model, _ = _train(tmp_path, Net("tuple"), "own", loss_function=loss)
    assert seen
    assert set(seen) == {tuple}
    assert _same(model, reference)
    # torch's losses take the prediction
    model, _ = _train(tmp_path, Net("tuple"), "torch_loss", loss_function=nn.CrossEntropyLoss())
    assert _same(model, reference)


def test_a_model_that_computes_its_own_loss_from_labels(tmp_path):
    data = make_classification()
    rows = [{"x": x, "labels": y} for x, y in data]
    val = DataLoader([{"x": x, "labels": y} for x, y in make_classification(48, seed=1)], 16)
    calls = []

    class Counting(LabelledNet):
        def forward(self, x, labels=None):
            calls.append(labels is not None)
            return super().forward(x, labels)

    reference, expected = _train(tmp_path, Net("tensor"), "tensor")
    loader = DataLoader(rows, batch_size=16)
    model, result = _train(tmp_path, Counting(), "own_loss", loader=loader, val=val)
    assert all(calls)  # labels went into the model, in training and in evaluation
    assert _same(model, reference)
    for key in ("train_loss", "val_loss"):
        assert result.training_history[key] == pytest.approx(
            expected.training_history[key], rel=1e-6
        )
    # a loss function you pass wins over the model's own: the model then gets no labels
    calls.clear()
    model, _ = _train(
        tmp_path,
        Counting(),
        "user_loss",
        loader=loader,
        val=val,
        loss_function=nn.CrossEntropyLoss(),
    )
    assert calls
    assert not any(calls)
    assert _same(model, reference)
    # label smoothing shapes the default loss: the model then gets no labels
    calls.clear()
    _train(
        tmp_path,
        Counting(),
        "smoothed",
        loader=loader,
        val=val,
        settings={"label_smoothing": 0.1},
    )
    assert calls
    assert not any(calls)


def test_autoencoder_returning_reconstruction_and_code(tmp_path):
    class AutoEncoder(nn.Module):
        def __init__(self, tuple_output: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encode, self.decode = nn.Linear(8, 3), nn.Linear(3, 8)
            self.tuple_output = tuple_output

        def forward(self, x):
            code = self.encode(x)
            return (self.decode(code), code) if self.tuple_output else self.decode(code)

    x = make_classification().tensors[0]
    loader = DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    models = []
    for tuple_output in (False, True):
        model = AutoEncoder(tuple_output)
        TrainingManager(_config(tmp_path, f"ae{tuple_output}")).train(
            model, loader, loader, mode=TrainingMode.UNSUPERVISED
        )
        models.append(model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
    )


def test_ensemble_of_dict_models():
    loader = DataLoader(make_classification(n=48, seed=1), batch_size=16)
    plain = Evaluator().evaluate_ensemble([Net("tensor"), Net("tensor")], loader)
    mapped = Evaluator().evaluate_ensemble([Net("dict"), Net("tuple")], loader)
    assert mapped["ensemble"] == plain["ensemble"]


def test_prediction_rule_order_and_errors():
    logits = torch.zeros(2, 3)
    assert prediction_of({"loss": torch.tensor(1.0), "logits": logits}) is logits
    assert prediction_of({"output": logits}) is logits
    assert prediction_of((logits, torch.ones(1))) is logits
    with pytest.raises(TypeError, match="a tuple whose first element is str"):
        prediction_of(("text", logits))
    with pytest.raises(TypeError, match="output_transform returned int"):
        prediction_of(logits, lambda out: 3)


def test_evaluation_puts_the_model_back_in_its_mode_even_when_a_batch_fails():
    """Dropout and BatchNorm in eval mode while evaluating; afterwards the model is in the
    mode it was given in (train or eval), also when the loader raises midway."""
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    stats = model[1].running_mean.clone()
    for start_in_training in (True, False):
        model.train(start_in_training)
        Evaluator().evaluate(model, DataLoader(list(zip(x, y, strict=True)), batch_size=8))
        assert model.training is start_in_training
        assert all(m.training is start_in_training for m in model.modules())
        assert torch.equal(model[1].running_mean, stats)  # eval mode: statistics untouched

    def failing():
        yield x[:8], y[:8]
        raise RuntimeError("disk gone")

    model.train()
    with pytest.raises(RuntimeError, match="disk gone"):
        Evaluator().evaluate(model, failing())
    assert model.training
    assert torch.equal(model[1].running_mean, stats)
