"""Gradient accumulation equals one k-times larger batch; global_step counts updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import Callback, TaskType, TrainingConfig, TrainingManager

from conftest import make_classification, make_mlp


def _train(model, loader, quiet_config, tmp_path, name, **overrides):
    quiet_config = {**quiet_config, "output_dir": str(tmp_path / name)}
    settings = {
        "num_epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.1,
        "optimizer_type": "sgd",
        "weight_decay": 0.0,
        "gradient_clipping": False,
        **quiet_config,
    }
    settings.update(overrides)
    return TrainingManager(TrainingConfig(**settings)).train(model, loader)


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (pa - pb).abs().max().item()
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_batch_16_times_4_equals_batch_64(quiet_config, tmp_path):
    dataset = make_classification(n=256)
    small, big = make_mlp(), make_mlp()
    _train(
        small,
        DataLoader(dataset, 16, shuffle=True),
        quiet_config,
        tmp_path,
        "a",
        gradient_accumulation_steps=4,
        seed=1,
    )
    _train(big, DataLoader(dataset, 64, shuffle=True), quiet_config, tmp_path, "b", seed=1)
    assert _max_difference(small, big) < 1e-6
    untouched = make_mlp()
    assert _max_difference(small, untouched) > 1e-2  # it did train


def test_clipping_acts_on_the_whole_window(quiet_config, tmp_path):
    dataset = make_classification(n=128)
    small, big = make_mlp(), make_mlp()
    clip = {"gradient_clipping": True, "max_grad_norm": 0.05}
    _train(
        small,
        DataLoader(dataset, 16),
        quiet_config,
        tmp_path,
        "a",
        gradient_accumulation_steps=4,
        **clip,
    )
    _train(big, DataLoader(dataset, 64), quiet_config, tmp_path, "b", **clip)
    assert _max_difference(small, big) < 1e-6


class _CountUpdates(Callback):
    def __init__(self):
        self.steps_per_epoch = []
        self._start = 0

    def on_epoch_start(self, loop):
        self._start = loop.state.global_step

    def on_epoch_end(self, loop, logs):
        self.steps_per_epoch.append(loop.state.global_step - self._start)


def test_partial_last_window_steps_and_is_normalised_by_its_size(quiet_config, tmp_path):
    """13 samples, batch 2, accumulation 3: windows of 6, 6 and 1 samples -> 3 updates."""
    dataset = make_classification(n=13)
    model, reference = make_mlp(), make_mlp()
    counter = _CountUpdates()
    config = TrainingConfig(
        num_epochs=2,
        batch_size=2,
        learning_rate=0.1,
        optimizer_type="sgd",
        weight_decay=0.0,
        gradient_clipping=False,
        gradient_accumulation_steps=3,
        **quiet_config,
    )
    result = TrainingManager(config).train(
        model, DataLoader(dataset, batch_size=2), callbacks=[counter]
    )
    assert counter.steps_per_epoch == [3, 3]
    assert result["global_step"] == 6

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset.tensors
    for _ in range(2):
        for chunk in (slice(0, 6), slice(6, 12), slice(12, 13)):
            nn.functional.cross_entropy(reference(x[chunk]), y[chunk]).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert _max_difference(model, reference) < 1e-6


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens)))


def _padded_tokens(n: int = 16, length: int = 10, vocab: int = 11):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocab, (n, length), generator=generator)
    targets = torch.randint(0, vocab, (n, length), generator=generator)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[:4] = 1  # the first micro-batch is mostly padding: uneven token counts matter
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    targets[padding] = -100
    return TensorDataset(inputs, targets)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_token_level_loss_with_padding_matches_the_big_batch(quiet_config, tmp_path, accumulation):
    dataset = _padded_tokens()
    small, big = _TinyLM(), _TinyLM()
    common = {"task_type": TaskType.GENERATION}
    config = dict(
        num_epochs=2,
        learning_rate=0.5,
        optimizer_type="sgd",
        weight_decay=0.0,
        gradient_clipping=False,
        **quiet_config,
    )
    TrainingManager(
        TrainingConfig(
            batch_size=16 // accumulation,
            gradient_accumulation_steps=accumulation,
            **{**config, "output_dir": str(tmp_path / "a")},
        )
    ).train(small, DataLoader(dataset, 16 // accumulation), **common)
    TrainingManager(
        TrainingConfig(batch_size=16, **{**config, "output_dir": str(tmp_path / "b")})
    ).train(big, DataLoader(dataset, 16), **common)
    assert _max_difference(small, big) < 1e-6


def test_global_step_counts_optimizer_updates_not_micro_batches(quiet_config, tmp_path):
    dataset = make_classification(n=64)
    result = _train(
        make_mlp(),
        DataLoader(dataset, 8),
        quiet_config,
        tmp_path,
        "a",
        gradient_accumulation_steps=4,
        num_epochs=3,
    )
    assert result["global_step"] == 3 * 2  # 8 micro-batches per epoch, 4 per update


def test_max_steps_stops_at_that_many_updates(quiet_config, tmp_path):
    dataset = make_classification(n=64)
    result = _train(
        make_mlp(), DataLoader(dataset, 8), quiet_config, tmp_path, "a", max_steps=5, num_epochs=10
    )
    assert result["global_step"] == 5
    # 8 updates an epoch: a stop inside epoch 1 completed none of it
    assert (result["epochs_completed"], result["batches_into_epoch"]) == (0, 5)


def test_loss_function_without_ignore_index_is_weighted_by_samples(quiet_config, tmp_path):
    """MSE with uneven micro-batches (5 + 5 + 2 samples): equal to the 12-sample batch."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=generator)
    y = torch.randn(12, 1, generator=generator)
    dataset = TensorDataset(x, y)
    torch.manual_seed(0)
    small = nn.Linear(4, 1)
    big = copy.deepcopy(small)
    _train(
        small,
        DataLoader(dataset, 5),
        quiet_config,
        tmp_path,
        "a",
        gradient_accumulation_steps=3,
        num_epochs=1,
    )
    _train(big, DataLoader(dataset, 12), quiet_config, tmp_path, "b", num_epochs=1)
    assert _max_difference(small, big) < 1e-6


def _weighted_and_masked(n: int = 128):
    data = make_classification(n=n, seed=3)
    x, y = data.tensors
    y = y.clone()
    y[::7] = -100  # unlabeled samples the loss skips (ignore_index)
    return TensorDataset(x, y)


@pytest.mark.parametrize("class_weights", [None, (0.2, 1.0, 3.0)])
def test_class_weights_and_ignored_samples_match_the_big_batch(
    quiet_config, tmp_path, class_weights
):
    """Cross-entropy averages over sum(w[y]) of the samples it keeps, not over the batch
    size: a window must weigh each micro-batch by that sum to equal one big batch."""
    dataset = _weighted_and_masked()
    weight = None if class_weights is None else torch.tensor(class_weights)
    results = []
    for batch, accumulation in ((8, 4), (32, 1)):
        model = make_mlp()
        config = {"gradient_accumulation_steps": accumulation, "batch_size": batch, "seed": 1}
        TrainingManager(
            TrainingConfig(
                num_epochs=2,
                learning_rate=0.1,
                optimizer_type="sgd",
                weight_decay=0.0,
                gradient_clipping=False,
                **{**quiet_config, "output_dir": str(tmp_path / f"b{batch}")},
                **config,
            )
        ).train(
            model,
            DataLoader(dataset, batch, shuffle=True),
            loss_function=nn.CrossEntropyLoss(weight=weight),
        )
        results.append(model)
    assert _max_difference(*results) < 1e-6


def test_evaluation_loss_with_class_weights_is_the_whole_sets_weighted_mean():
    from traineval import Evaluator

    dataset = _weighted_and_masked(100)
    weight = torch.tensor([0.2, 1.0, 3.0])
    model = make_mlp()
    loss = nn.CrossEntropyLoss(weight=weight)
    metrics = Evaluator().evaluate_model(
        model, DataLoader(dataset, batch_size=16), loss_function=loss
    )
    x, y = dataset.tensors
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y, weight=weight).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def _tokens_with_empty_rows(empty: int) -> TensorDataset:
    """32 rows of `_padded_tokens` whose first `empty` rows keep no target: with
    micro-batches of four, those micro-batches' means are over no tokens (torch gives NaN,
    their gradient is zero)."""
    inputs, targets = _padded_tokens(n=32).tensors
    targets = targets.clone()
    targets[:empty] = -100
    return TensorDataset(inputs, targets)


@pytest.mark.parametrize(("empty", "skip_nonfinite_steps"), [(4, 0), (4, 3), (16, 0)])
def test_a_micro_batch_whose_every_token_is_ignored_adds_nothing(
    quiet_config, tmp_path, empty, skip_nonfinite_steps
):
    """The window's gradient and loss are the big batch's (a hand-written loop's NaN mean of
    the empty micro-batch made the run stop as non-finite, or skip the update); a window
    with no token at all steps as one big batch with none does (a zero gradient)."""
    dataset = _tokens_with_empty_rows(empty)
    small, big = _TinyLM(), _TinyLM()
    config = dict(
        num_epochs=2,
        learning_rate=0.5,
        optimizer_type="adamw",
        gradient_clipping=False,
        skip_nonfinite_steps=skip_nonfinite_steps,
        **quiet_config,
    )
    results = [
        TrainingManager(
            TrainingConfig(
                batch_size=batch,
                gradient_accumulation_steps=16 // batch,
                **{**config, "output_dir": str(tmp_path / str(batch))},
            )
        ).train(model, DataLoader(dataset, batch), task_type=TaskType.GENERATION)
        for model, batch in ((small, 4), (big, 16))
    ]
    assert _max_difference(small, big) < 1e-6
    assert _max_difference(small, _TinyLM()) > 1e-2  # it trained
    losses = [r["training_history"]["train_loss"] for r in results]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert results[0]["global_step"] == results[1]["global_step"] == 4  # none skipped


def test_a_batch_whose_every_sample_is_ignored_steps_as_a_hand_written_loop(quiet_config, tmp_path):
    """One batch alone, sample-level targets all ignored: torch's loss is NaN and its
    gradient zero; the run goes on (AdamW still steps) and logs the epoch's loss over the
    samples it kept."""
    x, y = make_classification(n=32).tensors
    y = y.clone()
    y[8:16] = -100  # the second of four batches
    dataset = TensorDataset(x, y)
    model = make_mlp()
    reference = copy.deepcopy(model)
    result = _train(
        model,
        DataLoader(dataset, 8),
        quiet_config,
        tmp_path,
        "a",
        optimizer_type="adamw",
        num_epochs=1,
        batch_size=8,
    )
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.0)
    losses = []
    for inputs, targets in DataLoader(dataset, 8):
        loss = nn.functional.cross_entropy(reference(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() * int((targets != -100).sum()))
    assert _max_difference(model, reference) < 1e-6
    kept = [loss for loss in losses if loss == loss]
    assert result["training_history"]["train_loss"][0] == pytest.approx(sum(kept) / 24, rel=1e-5)


def test_an_epoch_whose_every_target_is_ignored_says_so(quiet_config, tmp_path):
    x, y = make_classification(n=16).tensors
    dataset = TensorDataset(x, torch.full_like(y, -100))
    with pytest.raises(ValueError, match="every target it yielded was ignored"):
        _train(make_mlp(), DataLoader(dataset, 8), quiet_config, tmp_path, "a", num_epochs=1)


class _CrossEntropyAndZero(nn.CrossEntropyLoss):
    """Cross-entropy plus a term whose gradient is the incoming gradient times zero: NaN
    times zero is NaN, so a window weighed 0/0 poisons the weights through it."""

    def forward(self, logits, targets):
        return super().forward(logits.transpose(1, 2), targets) + 0.0 * logits.sum()


def test_a_window_with_no_token_weighs_its_micro_batches_zero_not_nan(quiet_config, tmp_path):
    dataset = _tokens_with_empty_rows(16)
    small, big = _TinyLM(), _TinyLM()
    for model, batch in ((small, 4), (big, 16)):
        TrainingManager(
            TrainingConfig(
                num_epochs=1,
                batch_size=batch,
                gradient_accumulation_steps=16 // batch,
                optimizer_type="sgd",
                weight_decay=0.0,
                gradient_clipping=False,
                **{**quiet_config, "output_dir": str(tmp_path / str(batch))},
            )
        ).train(
            model,
            DataLoader(dataset, batch),
            task_type=TaskType.GENERATION,
            loss_function=_CrossEntropyAndZero(),
        )
    assert _max_difference(small, big) < 1e-6
