"""CUDA paths: run where a GPU is present, skipped elsewhere (CI has none; see the README).

python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader

from traineval import Callback, Evaluator, TrainingConfig, TrainingManager
from traineval.config import TaskType
from traineval.loggers import read_jsonl
from traineval.training.loop import TrainingInterrupted

from conftest import make_classification

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 3))


def settings(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "device": "cuda",
        "progress_bar": False,
        "tensorboard_logging": False,
        "early_stopping_patience": 0,
        "warmup_steps": 2,
        "num_epochs": 3,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "log_frequency": 5,
        "eval_frequency": 7,
    }
    values.update(overrides)
    return TrainingConfig(**values)


def loaders():
    train = DataLoader(
        make_classification(n=160, seed=1),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
        pin_memory=True,
    )
    return train, DataLoader(make_classification(n=64, seed=2), batch_size=32)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_learns_in_each_precision(tmp_path, precision):
    model = mlp()
    result = TrainingManager(settings(tmp_path / precision, precision=precision)).train(
        model, *loaders(), task_type=TaskType.CLASSIFICATION
    )
    assert next(model.parameters()).device.type == "cuda"
    losses = result.training_history["train_loss"]
    assert losses[-1] < losses[0]
    assert result.performance["cuda_peak_allocated_mb"] > 0


class InterruptAt(Callback):
    def on_step_end(self, loop):
        if loop.state.global_step == 13:
            loop.request_interrupt("SIGTERM")


def test_resume_on_cuda_equals_the_uninterrupted_run(tmp_path):
    straight = mlp(dropout=0.3)  # dropout draws from the CUDA generator
    TrainingManager(settings(tmp_path / "a", checkpoint_every_n_steps=4)).train(
        straight, *loaders(), task_type=TaskType.CLASSIFICATION
    )
    with pytest.raises(TrainingInterrupted):
        TrainingManager(settings(tmp_path / "b", checkpoint_every_n_steps=4)).train(
            mlp(dropout=0.3),
            *loaders(),
            task_type=TaskType.CLASSIFICATION,
            callbacks=[InterruptAt()],
        )
    resumed = mlp(seed=9, dropout=0.3)
    TrainingManager(settings(tmp_path / "b", checkpoint_every_n_steps=4)).train(
        resumed, *loaders(), task_type=TaskType.CLASSIFICATION, resume_from="auto"
    )
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_streaming_metrics_on_cuda_equal_sklearn():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(10_000, 7, generator=generator)
    labels = torch.randint(0, 7, (10_000,), generator=generator)
    loader = DataLoader(torch.utils.data.TensorDataset(scores, labels), batch_size=512)
    metrics = Evaluator().evaluate_model(
        nn.Identity(), loader, "cuda", task_type=TaskType.CLASSIFICATION
    )
    predicted = scores.argmax(1).numpy()
    assert metrics["accuracy"] == pytest.approx(
        accuracy_score(labels.numpy(), predicted), abs=1e-12
    )
    assert metrics["f1"] == pytest.approx(
        f1_score(labels.numpy(), predicted, average="weighted"), abs=1e-12
    )


def test_multilabel_metrics_on_cuda_equal_sklearn_without_syncs_per_batch():
    from traineval.evaluation.metrics import MultilabelStats

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4_000, 6, generator=generator)
    targets = (torch.rand(4_000, 6, generator=generator) > 0.7).float()
    stats = MultilabelStats(0.5)
    # the batches go to the GPU first: a copy from pageable host memory is itself a sync
    pairs = zip(scores.split(500), targets.split(500), strict=True)
    batches = [(s.cuda(), t.cuda()) for s, t in pairs]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch_scores, batch_targets in batches:
                stats.update(batch_scores, batch_targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)]
    predicted = (scores > 0).int().numpy()
    computed = stats.compute("macro")
    expected = f1_score(targets.int().numpy(), predicted, average="macro", zero_division=0)
    assert computed["f1"] == pytest.approx(expected, abs=1e-12)
    assert computed["accuracy"] == pytest.approx(
        accuracy_score(targets.int().numpy(), predicted), abs=1e-12
    )


def count_syncs(tmp_path, steps: int) -> int:
    """Host-device synchronisations CUDA's sync debug mode reports during a whole train()."""
    train = DataLoader(make_classification(n=16 * steps, seed=1), batch_size=16, pin_memory=True)
    config = settings(
        tmp_path / f"sync{steps}",
        num_epochs=1,
        log_frequency=10**6,
        save_best_model=False,
        save_last_checkpoint=False,
        checkpoint_save_frequency=0,
        precision="bf16",
    )
    model = mlp()
    manager = TrainingManager(config)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager.train(model, train)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_steps_do_not_synchronise_with_the_host(tmp_path):
    # what train() syncs for (setup, the final read of the losses) does not grow with steps
    few, many = count_syncs(tmp_path, 10), count_syncs(tmp_path, 40)
    assert many == few, (few, many)


def test_tokens_per_second_counts_non_ignored_tokens(tmp_path):
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.head = nn.Linear(32, 50)

        def forward(self, x):
            return self.head(self.embed(x))

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (64, 12), generator=generator)
    targets = tokens.clone()
    targets[:, -4:] = -100
    loader = DataLoader(torch.utils.data.TensorDataset(tokens, targets), batch_size=8)
    result = TrainingManager(settings(tmp_path, num_epochs=2, log_frequency=4)).train(
        TinyLM(), loader, task_type=TaskType.GENERATION
    )
    assert result.global_step == 16
    assert np.isfinite(result.training_history["train_loss"]).all()
    logged = [e for e in read_jsonl(tmp_path / "metrics.jsonl") if e.get("event") == "train"]
    assert len(logged) == 4
    assert all(e["tokens_per_sec"] > 0 for e in logged)


def one_task(n_train: int = 160):
    """Train and validation rows labelled by the same rule (make_classification's seed)."""
    from torch.utils.data import TensorDataset

    x, y = make_classification(n=n_train + 64, seed=1).tensors
    train = TensorDataset(x[:n_train], y[:n_train])
    return train, DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=32)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_federated_clients_train_on_cuda_in_each_precision(tmp_path, precision):
    from traineval import TrainingMode

    data, val = one_task()
    train = DataLoader(data, batch_size=16, shuffle=True, pin_memory=True)
    config = settings(
        tmp_path,
        precision=precision,
        warmup_steps=0,
        num_epochs=6,
        learning_rate=2e-2,
        mode_settings={"federated": {"clients": 4, "partition": "dirichlet", "local_epochs": 2}},
    )
    result = TrainingManager(config).train(mlp(), train, val, mode=TrainingMode.FEDERATED)
    accuracy = [m["accuracy"] for m in result["training_history"]["val_metrics"]]
    assert accuracy[-1] > 0.6  # 3 classes
    assert all(np.isfinite(result["training_history"]["train_loss"]))


def test_semi_supervised_and_meta_learning_on_cuda(tmp_path):
    from torch.utils.data import TensorDataset

    from traineval import TrainingMode
    from traineval.data import Episodes

    data, val = one_task()
    x, y = data.tensors
    hidden = y.clone()
    hidden[::2] = -1
    train = DataLoader(TensorDataset(x, hidden), batch_size=16, shuffle=True, pin_memory=True)
    config = settings(
        tmp_path / "semi",
        precision="bf16",
        learning_rate=2e-2,
        mode_settings={"semi_supervised": {"pseudo_label_threshold": 0.8}},
    )
    result = TrainingManager(config).train(mlp(), train, val, mode=TrainingMode.SEMI_SUPERVISED)
    assert result["training_history"]["val_metrics"][-1]["accuracy"] > 0.6
    tasks = DataLoader(Episodes(data, 3, 2, 4, episodes=40), batch_size=4)
    val_tasks = DataLoader(Episodes(val.dataset, 3, 2, 4, episodes=12), batch_size=4)
    config = settings(
        tmp_path / "meta", warmup_steps=0, mode_settings={"meta_learning": {"inner_lr": 0.5}}
    )
    result = TrainingManager(config).train(mlp(), tasks, val_tasks, mode=TrainingMode.META_LEARNING)
    assert result["training_history"]["val_metrics"][-1]["accuracy"] > 0.4  # chance 1/3


def test_policy_gradient_on_cuda(tmp_path):
    from traineval import TrainingMode

    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(4, 32), nn.Tanh())
            self.pi, self.v = nn.Linear(32, 2), nn.Linear(32, 1)

        def forward(self, x):
            h = self.body(x)
            return self.pi(h), self.v(h)

    config = settings(
        tmp_path,
        warmup_steps=0,
        num_epochs=2,
        mode_settings={"reinforcement": {"updates_per_epoch": 3, "eval_episodes": 2}},
    )
    result = TrainingManager(config).train(Policy(), "CartPole", mode=TrainingMode.REINFORCEMENT)
    assert result["global_step"] == 6
    assert result["training_history"]["val_metrics"][-1]["return"] >= 8  # CartPole's minimum
