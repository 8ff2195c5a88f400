"""The learning-rate range test against a hand-written one; it leaves no trace."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from traineval import LearningRateSearch, TrainingConfig, TrainingManager
from traineval.training.lr_finder import suggest

from conftest import make_classification, make_mlp, plain_sgd_config


def test_the_range_test_equals_a_hand_written_one(quiet_config):
    """Plain SGD, one update per batch: rate_t = min * (max / min) ** (t / (n - 1))."""
    data = make_classification(n=320, seed=1)
    model = make_mlp()
    reference = copy.deepcopy(model)
    config = plain_sgd_config(quiet_config, batch_size=16, seed=3)
    search = TrainingManager(config).find_learning_rate(
        model,
        DataLoader(data, batch_size=16, shuffle=True),
        min_lr=1e-4,
        max_lr=1.0,
        num_steps=30,
        divergence=1e9,  # never: all 30 updates
    )
    assert search.stop_reason == "completed"

    torch.manual_seed(3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=1e-4)
    losses, rates = [], []
    loader = DataLoader(data, batch_size=16, shuffle=True)
    batches = (batch for _ in range(2) for batch in loader)  # 20 per epoch: a second epoch
    for t in range(30):
        rate = 1e-4 * (1.0 / 1e-4) ** (t / 29)
        for group in optimizer.param_groups:
            group["lr"] = rate
        x, y = next(batches)
        loss = nn.functional.cross_entropy(reference(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        rates.append(rate)
    assert search.learning_rates == pytest.approx(rates, rel=1e-12)
    assert search.losses == pytest.approx(losses, rel=1e-5)
    # centred averages over 5 updates (k = max(2, 30 // 25)), 3 or 4 at the ends
    smoothed = [
        sum(losses[max(0, i - 2) : i + 3]) / len(losses[max(0, i - 2) : i + 3]) for i in range(30)
    ]
    assert search.smoothed_losses == pytest.approx(smoothed, rel=1e-5)


def test_it_leaves_the_model_and_the_random_streams_as_they_were(quiet_config):
    data = make_classification(n=160, seed=2)

    def train(find_first: bool) -> nn.Module:
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        loader = DataLoader(data, batch_size=16, shuffle=True)
        manager = TrainingManager(
            TrainingConfig(num_epochs=2, seed=5, **{**quiet_config, "overwrite_output_dir": True})
        )
        if find_first:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            torch.manual_seed(123)
            state = torch.get_rng_state()
            manager.find_learning_rate(model, loader, num_steps=15)
            assert torch.equal(torch.get_rng_state(), state)
            for name, value in model.state_dict().items():
                assert torch.equal(value, before[name]), name
        manager.train(model, loader)
        return model

    plain, searched = train(False), train(True)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, searched.state_dict()[name]), name


def test_a_diverging_loss_stops_the_search_and_the_suggestion_comes_before_it(quiet_config):
    data = make_classification(n=640, seed=4)
    config = plain_sgd_config(quiet_config, batch_size=32, seed=1)
    search = TrainingManager(config).find_learning_rate(
        make_mlp(hidden=32), DataLoader(data, batch_size=32, shuffle=True), max_lr=1e4
    )
    assert search.stop_reason == "diverged"  # 4x the best smoothed loss, before any NaN
    assert len(search.losses) < 100
    assert search.suggestion is not None
    assert 1e-7 < search.suggestion < search.learning_rates[-1]
    smoothed = search.smoothed_losses
    lowest = min(range(3, len(smoothed)), key=smoothed.__getitem__)  # after 3 settling updates
    assert search.suggestion < search.learning_rates[lowest]
    # a few updates at the suggested rate lower the loss
    trained = TrainingManager(
        plain_sgd_config(quiet_config, batch_size=32, seed=1, learning_rate=search.suggestion)
    ).train(make_mlp(hidden=32), DataLoader(data, batch_size=32, shuffle=True))
    history = trained["training_history"]["train_loss"]
    assert history[-1] < math.log(3)  # below chance for 3 classes


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
    rates = [10 ** (-4 + i / 4) for i in range(17)]  # 1e-4 .. 1e0, 4 per decade
    # flat, a steep fall centred on index 8 (1e-2), a minimum at 12, then a rise
    losses = [2.0] * 5 + [1.9, 1.8, 1.5, 1.0, 0.5, 0.35, 0.3, 0.28, 0.6, 1.5, 4.0, 9.0]
    assert suggest(rates, losses) == pytest.approx(1e-2)
    assert suggest(rates[:4], [3.0, 2.0, 1.0, 0.5]) is None  # too short to say


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_lr": 0}, r"min_lr=0 is invalid"),
        ({"max_lr": 1e-8}, r"max_lr=1e-08 is invalid: expected a finite number > min_lr"),
        ({"min_lr": float("nan")}, r"min_lr=nan is invalid: expected a finite number > 0"),
        ({"max_lr": float("inf")}, r"max_lr=inf is invalid: expected a finite number"),
        ({"num_steps": 1}, r"num_steps=1 \(--steps\) is invalid"),
        ({"divergence": 1.0}, r"divergence=1\.0 is invalid"),
        ({"smoothing": 1.0}, r"smoothing=1\.0 is invalid"),
    ],
)
def test_bad_arguments_are_refused_before_any_update(quiet_config, arguments, message):
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        TrainingManager(TrainingConfig(**quiet_config)).find_learning_rate(
            model, DataLoader(make_classification(), batch_size=16), **arguments
        )


def test_the_search_plots(tmp_path):
    search = LearningRateSearch(
        learning_rates=[1e-3, 1e-2, 1e-1, 1.0],
        losses=[1.0, 0.8, 0.5, 2.0],
        smoothed_losses=[1.0, 0.9, 0.7, 1.2],
        suggestion=1e-2,
        stop_reason="diverged",
    )
    assert search.plot(tmp_path / "lr.png").stat().st_size > 1000


def test_the_search_shows_one_progress_line_with_the_rate_each_update_used(
    quiet_config, monkeypatch
):
    """With progress_bar on, one bar counts the search's updates; its last rate is the last
    update's (never a rate beyond max_lr), and it is closed when the search ends."""
    import tqdm

    postfixes = []
    real = tqdm.tqdm.set_postfix

    def spy(bar, *args, **kwargs):
        postfixes.append((bar.desc, bar.n, bar.total, kwargs))
        return real(bar, *args, **kwargs)

    monkeypatch.setattr(tqdm.tqdm, "set_postfix", spy)
    config = plain_sgd_config({**quiet_config, "progress_bar": True}, batch_size=16)
    search = TrainingManager(config).find_learning_rate(
        make_mlp(),
        DataLoader(make_classification(n=320, seed=1), batch_size=16, shuffle=True),
        min_lr=1e-4,
        max_lr=1.0,
        num_steps=30,
        divergence=1e9,
    )
    assert [p[:3] for p in postfixes] == [("lr-find", n, 30) for n in range(1, 31)]
    assert postfixes[-1][3]["lr"] == f"{search.learning_rates[-1]:.3g}" == "1"
    assert not getattr(tqdm.tqdm, "_instances", None)
