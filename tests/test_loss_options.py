"""label_smoothing and class_weights of the default loss, against a hand-written loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TaskType, TrainingConfig, TrainingManager, TrainingMode
from traineval.assembly.build import class_weights

from conftest import make_classification, make_mlp


def skewed(n: int = 128) -> TensorDataset:
    x, y = make_classification(n=n, seed=4).tensors
    y = y.clone()
    y[y == 2] = torch.where(torch.arange(int((y == 2).sum())) % 3 == 0, 2, 0)  # class 2 rare
    return TensorDataset(x, y)


@pytest.mark.parametrize("weights", [(0.5, 1.0, 4.0), "balanced"])
def test_class_weights_and_label_smoothing_equal_a_hand_written_loop(quiet_config, weights):
    data = skewed()
    model = make_mlp()
    reference = copy.deepcopy(model)
    config = TrainingConfig(
        num_epochs=2,
        batch_size=8,
        gradient_accumulation_steps=4,  # the window must weigh micro-batches by sum(w[y])
        learning_rate=0.1,
        optimizer_type="sgd",
        momentum=0.0,
        weight_decay=0.0,
        gradient_clipping=False,
        seed=5,
        label_smoothing=0.1,
        class_weights=weights,
        **quiet_config,
    )
    TrainingManager(config).train(model, DataLoader(data, 8, shuffle=True))

    labels = data.tensors[1].numpy()
    if weights == "balanced":
        weights = compute_class_weight("balanced", classes=np.arange(3), y=labels)
        ours = class_weights(config, DataLoader(data, 8), torch.device("cpu"))
        np.testing.assert_allclose(ours.numpy(), weights, rtol=1e-6)  # the values themselves
    loss = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32), label_smoothing=0.1
    )
    torch.manual_seed(5)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        for x, y in DataLoader(data, 32, shuffle=True):  # one big batch per window
            loss(reference(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_options_are_validated_and_refused_where_they_cannot_apply(quiet_config):
    for bad, message in (
        ({"label_smoothing": 1.0}, r"label_smoothing=1\.0 is invalid"),
        ({"class_weights": "inverse"}, r"class_weights='inverse' is invalid"),
        ({"class_weights": [1.0, -1.0]}, r"class_weights=\[1\.0, -1\.0\] is invalid"),
        ({"class_weights": [0.0, 0.0]}, r"class_weights=\[0\.0, 0\.0\] is invalid"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainingConfig(**bad)
    loader = DataLoader(make_classification(n=32), 16)
    config = TrainingConfig(label_smoothing=0.1, **quiet_config)
    with pytest.raises(ValueError, match="a loss_function was passed"):
        TrainingManager(config).train(make_mlp(), loader, loss_function=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="not supported in mode='semi_supervised'"):
        TrainingManager(config).train(make_mlp(), loader, mode=TrainingMode.SEMI_SUPERVISED)
    balanced = TrainingConfig(class_weights="balanced", **quiet_config)
    with pytest.raises(ValueError, match="has none: pass one weight per class"):
        TrainingManager(balanced).train(make_mlp(), list(loader))
    # label smoothing of a regression or multi-label loss was silently left out
    x = torch.randn(32, 8)
    for task, targets in (("regression", torch.randn(32)), ("multilabel", (x[:, :3] > 0) * 1.0)):
        data = DataLoader(TensorDataset(x, targets), 16)
        with pytest.raises(ValueError, match=rf"label_smoothing=0\.1 .*this task is {task}"):
            TrainingManager(config).train(make_mlp(), data, task_type=TaskType(task))


def test_balanced_weights_count_the_rows_a_subset_sampler_draws_and_name_what_they_need(
    quiet_config,
):
    """A loader over a subset of its dataset (SubsetRandomSampler): scikit-learn's weights
    of the rows it draws, not of the whole dataset; dict samples are said, not a KeyError."""
    from torch.utils.data import Dataset, SubsetRandomSampler

    data = skewed()
    rows = np.arange(0, 128, 3)
    loader = DataLoader(data, 8, sampler=SubsetRandomSampler(rows.tolist()))
    config = TrainingConfig(class_weights="balanced", **quiet_config)
    ours = class_weights(config, loader, torch.device("cpu"))
    labels = data.tensors[1].numpy()[rows]
    expected = compute_class_weight("balanced", classes=np.unique(labels), y=labels)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)

    class Dicts(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"input": torch.zeros(8), "label": 0}

    with pytest.raises(ValueError, match=r"'balanced' reads each training sample's label.*Dicts"):
        class_weights(config, DataLoader(Dicts(), 2), torch.device("cpu"))


def test_balanced_weights_give_a_class_training_never_shows_one_and_a_wrong_list_is_said(
    quiet_config,
):
    """Training labels 0..1, validation labels 0..2, a 3-class model: scikit-learn's weights
    over the two classes training shows, 1.0 for the third (torch raised its size error);
    the validation loss is the weighted mean a hand-written loss gives with those weights."""
    data = skewed()
    x, y = data.tensors
    train = TensorDataset(x[y < 2], y[y < 2])
    config = TrainingConfig(num_epochs=1, batch_size=16, class_weights="balanced", **quiet_config)
    model = make_mlp()
    result = TrainingManager(config).train(model, DataLoader(train, 16), DataLoader(data, 16))
    shown = compute_class_weight("balanced", classes=np.arange(2), y=train.tensors[1].numpy())
    weight = torch.tensor([*shown, 1.0], dtype=torch.float32)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y, weight=weight)
    assert result["training_history"]["val_loss"][-1] == pytest.approx(float(expected), rel=1e-5)

    listed = TrainingConfig(
        num_epochs=1, class_weights=[1.0, 2.0], overwrite_output_dir=True, **quiet_config
    )
    with pytest.raises(ValueError, match=r"has 2 class weights, but the model outputs 3 classes"):
        TrainingManager(listed).train(make_mlp(), DataLoader(data, 16))


@pytest.mark.parametrize("shape", ["(N, 1)", "(N,)"])
def test_a_one_logit_classifier_trains_on_binary_cross_entropy_like_a_hand_written_loop(
    quiet_config, shape
):
    """task_type=CLASSIFICATION with one logit a sample: cross-entropy's softmax over one
    class is 1 whatever the score, so the loss was 0 and nothing trained. It is the binary
    cross-entropy of the logit, which equals cross-entropy over the scores (0, logit)."""
    from conftest import plain_sgd_config

    torch.manual_seed(0)
    x = torch.randn(48, 4)
    y = (x[:, 0] + 0.3 * torch.randn(48) > 0).long()
    y[::7] = -100  # ignored rows
    flat = shape == "(N,)"
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)) if flat else nn.Linear(4, 1)
    reference = copy.deepcopy(model)
    options = {"label_smoothing": 0.1, "class_weights": [0.5, 2.0]}
    config = plain_sgd_config(
        quiet_config,
        num_epochs=2,
        batch_size=8,
        learning_rate=0.2,
        warmup_steps=0,
        scheduler_type="constant",
        **options,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    result = TrainingManager(config).train(model, loader, task_type=TaskType.CLASSIFICATION)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
    weight = torch.tensor([0.5, 2.0])
    for _ in range(2):
        for xb, yb in loader:
            logit = reference(xb).reshape(-1)
            scores = torch.stack([torch.zeros_like(logit), logit], dim=1)  # CE's two classes
            loss = nn.functional.cross_entropy(scores, yb, weight=weight, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert result["training_history"]["train_loss"][0] > 0.3
    bad = DataLoader(TensorDataset(x, torch.full((48,), 2)), batch_size=8)
    with pytest.raises(ValueError, match="binary classifier with one logit takes labels 0 and 1"):
        TrainingManager(config).train(nn.Linear(4, 1), bad, task_type=TaskType.CLASSIFICATION)


def test_a_loss_that_sums_or_does_not_reduce_is_refused_before_any_work(quiet_config, tmp_path):
    """reduction='sum' trained (a sum weighed again by the batch's samples: under
    accumulation it matched neither a big batch's sum nor the micro-batches' sums) and
    evaluated to a meaningless 'loss'; reduction='none' failed inside torch at the first
    batch of an evaluation."""
    from traineval import Evaluator

    train = DataLoader(make_classification(n=32), batch_size=8)
    config = TrainingConfig(**quiet_config, num_epochs=1)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss\(reduction='sum'\) is refused"):
        TrainingManager(config).train(
            make_mlp(), train, loss_function=nn.CrossEntropyLoss(reduction="sum")
        )
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"MSELoss\(reduction='none'\) is refused.*'mean'"):
        Evaluator().evaluate_model(make_mlp(), train, "cpu", nn.MSELoss(reduction="none"))
    from traineval.tasks import refuse_unreduced

    refuse_unreduced(nn.KLDivLoss(reduction="batchmean"))  # a mean a sample: taken
    with pytest.raises(ValueError, match=r"KLDivLoss\(reduction='sum'\)"):
        refuse_unreduced(nn.KLDivLoss(reduction="sum"))


@pytest.mark.parametrize("task_type", [None, TaskType.CLASSIFICATION])
def test_labels_as_floats_or_as_a_column_train_like_integer_labels(quiet_config, task_type):
    """Whole-number labels as floats (from numpy or pandas) were taken for regression and
    failed on the shapes; an (N, 1) column failed in torch ("0D or 1D target tensor
    expected"). Both are the integer labels they hold; fractional ones are refused."""
    from conftest import plain_sgd_config

    data = make_classification(n=48)
    x, y = data.tensors
    finals = []
    y = y.clone()
    y[::5] = -100  # ignored rows (as floats: -100.0)
    for labels in (y, y.float(), y[:, None], y[:, None].double()):
        config = plain_sgd_config(quiet_config, num_epochs=2, batch_size=8, learning_rate=0.1)
        torch.manual_seed(0)
        model = make_mlp()
        loader = DataLoader(TensorDataset(x, labels), batch_size=8)
        TrainingManager(config).train(model, loader, loader, task_type=task_type)
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))
    fractional = DataLoader(TensorDataset(x, y.float() + 0.5), batch_size=8)
    config = plain_sgd_config(quiet_config, num_epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="class labels must be whole numbers"):
        TrainingManager(config).train(make_mlp(), fractional, task_type=TaskType.CLASSIFICATION)
