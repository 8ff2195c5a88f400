"""Meta-learning mode (MAML, first-order MAML, Reptile) against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingManager
from traineval.data.episodes import Episodes
from traineval.modes import MetaLearning, MetaLearningStep

from conftest import plain_sgd_config

META = MetaLearning(inner_lr=0.3, inner_steps=2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _forward(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same MLP written with explicit weights: the reference never uses functional_call."""
    return F.linear(F.relu(F.linear(x, w[0], w[1])), w[2], w[3])


def _dataset(n_per_class: int = 12, classes: int = 5) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, 6, generator=generator) * 2
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), 6, generator=generator)
    return TensorDataset(x, y)


def _episodes(count: int = 8, seed: int = 0) -> Episodes:
    return Episodes(_dataset(), ways=3, shots=2, queries=3, episodes=count, seed=seed)


def _config(quiet_config, **overrides):
    return plain_sgd_config(
        quiet_config,
        **{
            "num_epochs": 2,
            "batch_size": 4,
            "learning_rate": 0.05,
            **overrides,
        },
    )


def _reference(model, loader, epochs, outer_lr, inner_lr, inner_steps, algorithm):
    weights = list(model.parameters())
    for _ in range(epochs):
        for sx, sy, qx, qy in loader:
            meta_grads = [torch.zeros_like(w) for w in weights]
            for t in range(sx.shape[0]):
                fast = list(weights)
                for _ in range(inner_steps):
                    loss = F.cross_entropy(_forward(fast, sx[t]), sy[t])
                    grads = torch.autograd.grad(loss, fast, create_graph=algorithm == "maml")
                    if algorithm != "maml":
                        grads = [g.detach() for g in grads]
                    fast = [w - inner_lr * g for w, g in zip(fast, grads, strict=True)]
                    if algorithm == "reptile":
                        fast = [w.detach().requires_grad_() for w in fast]
                if algorithm == "reptile":
                    task_grads = [
                        w.detach() - f.detach() for w, f in zip(weights, fast, strict=True)
                    ]
                else:
                    query = F.cross_entropy(_forward(fast, qx[t]), qy[t])
                    task_grads = torch.autograd.grad(query, weights)
                for total, g in zip(meta_grads, task_grads, strict=True):
                    total += g / sx.shape[0]
            with torch.no_grad():
                for w, g in zip(weights, meta_grads, strict=True):
                    w -= outer_lr * g


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_meta_learning_equals_the_hand_written_algorithm(quiet_config, algorithm):
    loader = DataLoader(_episodes(), batch_size=4)
    ours, theirs = _mlp(), _mlp()
    mode = MetaLearning(algorithm=algorithm, inner_lr=0.3, inner_steps=2)
    result = TrainingManager(_config(quiet_config)).train(ours, loader, mode=mode)
    _reference(theirs, loader, 2, 0.05, 0.3, 2, algorithm)
    assert result["global_step"] == 4
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_order_terms_matter():
    """MAML and first-order MAML differ (so the test above can tell them apart)."""
    loader = DataLoader(_episodes(), batch_size=4)
    a, b = _mlp(), _mlp()
    _reference(a, loader, 1, 0.05, 0.3, 2, "maml")
    _reference(b, loader, 1, 0.05, 0.3, 2, "fomaml")
    assert not torch.allclose(a[0].weight, b[0].weight, atol=1e-6)


def test_two_tasks_accumulated_equal_a_batch_of_two(quiet_config):
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = _mlp()
        config = _config(quiet_config, batch_size=batch, gradient_accumulation_steps=accumulation)
        TrainingManager(config).train(model, DataLoader(_episodes(), batch_size=batch), mode=META)
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_episodes_are_fixed_tasks_with_renumbered_labels():
    episodes = _episodes(count=5)
    sx, sy, qx, qy = episodes[3]
    assert sx.shape == (6, 6)
    assert qx.shape == (9, 6)
    assert sorted(sy.tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(qy.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = episodes[3]
    assert all(torch.equal(a, b) for a, b in zip(episodes[3], again, strict=True))
    assert not torch.equal(episodes[4][0], sx)
    # support and query of one task come from the same classes, without overlap
    data_x = _dataset().tensors[0]
    rows = [int(np.flatnonzero((data_x == row).all(1))[0]) for row in torch.cat([sx, qx])]
    assert len(set(rows)) == 15
    with pytest.raises(ValueError, match=r"ways=6 needs 6 classes of 2 samples each \(shots="):
        Episodes(_dataset(), ways=6, shots=1, queries=1, episodes=3)
    with pytest.raises(IndexError):
        episodes[5]


def test_validation_adapts_to_each_task_and_scores_its_queries(quiet_config):
    val = DataLoader(_episodes(count=6, seed=1), batch_size=3)
    model = _mlp()
    config = _config(quiet_config, num_epochs=1, early_stopping_patience=0)
    result = TrainingManager(config).train(
        model, DataLoader(_episodes(), batch_size=4), val, mode=META
    )
    metrics = result["training_history"]["val_metrics"][-1]
    weights = list(model.parameters())
    correct, losses = 0, []
    for sx, sy, qx, qy in val:
        for t in range(sx.shape[0]):
            fast = list(weights)
            for _ in range(2):
                grads = torch.autograd.grad(F.cross_entropy(_forward(fast, sx[t]), sy[t]), fast)
                fast = [w - 0.3 * g for w, g in zip(fast, grads, strict=True)]
            out = _forward(fast, qx[t]).detach()
            losses.append(float(F.cross_entropy(out, qy[t])))
            correct += int((out.argmax(1) == qy[t]).sum())
    assert metrics["accuracy"] == pytest.approx(correct / 54)
    assert metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_maml_learns_to_adapt(quiet_config):
    """After meta-training, one inner step on a new task's support set does much better than
    the same step from the initial weights (0.76 here; chance is 1/3)."""
    data = _dataset(n_per_class=20, classes=5)
    train = DataLoader(Episodes(data, 3, 2, 5, episodes=160, seed=0), batch_size=4, shuffle=True)
    val = DataLoader(Episodes(data, 3, 2, 5, episodes=30, seed=99), batch_size=10)
    config = _config(
        quiet_config,
        num_epochs=3,
        optimizer_type="adam",
        learning_rate=1e-2,
        monitor_metric="val_accuracy",
        early_stopping_patience=0,
    )
    step = MetaLearningStep(None, "maml", inner_lr=0.5, inner_steps=1)
    untrained = step.evaluate(_mlp(), val, torch.device("cpu"))["accuracy"]
    mode = MetaLearning(inner_steps=1, inner_lr=0.5)
    result = TrainingManager(config).train(_mlp(), train, val, mode=mode)
    accuracy = [m["accuracy"] for m in result["training_history"]["val_metrics"]]
    assert accuracy[-1] > untrained + 0.1


def test_meta_learning_errors_are_clear(quiet_config):
    loader = DataLoader(_episodes(), batch_size=4)
    with pytest.raises(ValueError, match="compile=True is not supported in mode='meta_learning'"):
        TrainingManager(_config(quiet_config, compile=True)).train(_mlp(), loader, mode=META)
    with pytest.raises(ValueError, match="monitor_metric='val_f1' is invalid in mode="):
        TrainingManager(_config(quiet_config, monitor_metric="val_f1")).train(
            _mlp(), loader, mode=META
        )
    flat = DataLoader(_dataset(), batch_size=4)
    with pytest.raises(ValueError, match="meta-learning batches are \\(support_x, support_y"):
        TrainingManager(_config(quiet_config)).train(_mlp(), flat, mode=META)
    with pytest.raises(ValueError, match=r"meta_learning\.algorithm=.anil. is invalid"):
        MetaLearning(algorithm="anil")


def test_meta_learning_from_the_command_line(tmp_path, capsys):
    import json
    from pathlib import Path

    import traineval
    from traineval.cli import main

    args = ["demo", "-q", "mode=meta_learning", "model.name=mlp", "model.options={}"]
    args += ["mode.ways=3", "mode.shots=2", "mode.queries=3", "mode.train_episodes=60"]
    args += ["mode.eval_episodes=20", "training.batch_size=4", "training.num_epochs=2"]
    args += ["training.warmup_steps=0", "mode.inner_lr=0.5"]
    assert main([*args, f"training.output_dir={tmp_path / 'run'}"]) == 0
    record = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())
    assert set(record["test"]) == {"loss", "accuracy"}
    assert record["test"]["accuracy"] > 0.5  # 3-way: chance is 1/3
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val"]) == 0
    # a resume that would draw other tasks is refused (it warned, and trained on them)
    longer = [*args, "training.num_epochs=3", f"training.output_dir={tmp_path / 'run'}"]
    capsys.readouterr()
    assert main([*longer, "mode.shots=1", "--resume", "auto"]) == 2
    assert "meta_learning.shots: checkpoint 2, now 1" in capsys.readouterr().err
    # other ways change the model's head too: the setting is named, not the weights' shapes
    assert main([*longer, "mode.ways=4", "--resume", "auto"]) == 2
    assert "meta_learning.ways: checkpoint 3, now 4" in capsys.readouterr().err
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    assert main(["cv", str(demo), "-q", *args[2:], f"training.output_dir={tmp_path}"]) == 2
    assert "mode='meta_learning' is invalid for cross-validation" in capsys.readouterr().err
    # shots the val split cannot give: named with the split and the settings, not as ways
    too_many = [*args, "mode.shots=30", f"training.output_dir={tmp_path / 'x'}"]
    assert main(too_many) == 2
    assert (
        "the val split cannot make its tasks: ways=3 needs 3 classes of 33 samples each "
        "(shots=30 + queries=3); only 0 of its classes have that many (its largest has"
    ) in capsys.readouterr().err
    assert main([*args, "mode.ways=1"]) == 2
    assert "meta_learning.ways=1 is invalid: expected an integer >= 2" in capsys.readouterr().err


class _WithBuffer(nn.Module):
    """The same MLP with a (constant) buffer: buffers can change in place, so the step adapts
    its tasks one at a time instead of all at once."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_all_tasks_at_once_equals_one_task_at_a_time(algorithm):
    batch = next(iter(DataLoader(_episodes(), batch_size=4)))
    step = MetaLearningStep(None, algorithm, inner_lr=0.3, inner_steps=2)
    vectorised, one_by_one = _mlp(), _WithBuffer()
    for model in (vectorised, one_by_one):
        out = step(model, batch)
        out.loss.backward()
    assert out.weight == 4
    for a, b in zip(vectorised.parameters(), one_by_one.net.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_regression_tasks_with_trailing_target_dims_train_and_report_their_loss(quiet_config):
    def sine_tasks(count, seed):
        g = torch.Generator().manual_seed(seed)
        amplitude = torch.rand(count, 1, 1, generator=g) * 4 + 0.5
        x = torch.rand(count, 10, 1, generator=g) * 10 - 5
        y = amplitude * torch.sin(x)  # (tasks, samples, 1): as users write regression targets
        return TensorDataset(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    config = _config(quiet_config, num_epochs=2, early_stopping_patience=0)
    result = TrainingManager(config).train(
        model,
        DataLoader(sine_tasks(16, 0), batch_size=4),
        DataLoader(sine_tasks(8, 1), batch_size=4),
        loss_function=nn.MSELoss(),
        mode=MetaLearning(inner_lr=0.01),
    )
    assert set(result["training_history"]["val_metrics"][-1]) == {"loss"}  # no accuracy
    assert np.isfinite(result["training_history"]["train_loss"]).all()


def _proto_reference(model, loader, epochs, lr):
    """Prototypical networks written out: mean support embedding per class, negative squared
    distances as logits, cross-entropy over the queries, plain SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for sx, sy, qx, qy in loader:
            support, query = model(sx), model(qx)  # (tasks, samples, dim): Linear broadcasts
            one_hot = F.one_hot(sy, 3).float()
            prototypes = one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)
            logits = -(torch.cdist(query, prototypes) ** 2)
            loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_prototypical_networks_equal_the_hand_written_algorithm(quiet_config):
    loader = DataLoader(_episodes(), batch_size=4)
    val = DataLoader(_episodes(count=6, seed=1), batch_size=3)
    ours, theirs = _mlp(), _mlp()
    config = _config(quiet_config, early_stopping_patience=0)
    result = TrainingManager(config).train(
        ours, loader, val, mode=MetaLearning(algorithm="protonet")
    )
    _proto_reference(theirs, loader, 2, 0.05)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    metrics = result["training_history"]["val_metrics"][-1]
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["accuracy"] > 0.5  # 3-way: chance is 1/3
