"""Models of unusual shape through training, the best export and loading: parameters cut
from one tensor, a module registered under two names, a sparse buffer, complex weights, a
module's extra state, non-persistent buffers. Each once crashed a run or lost its weights;
the reference is the run's own `best.pt` (read with torch) or a hand computation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traineval
from traineval import TrainingConfig, TrainingManager
from traineval.runs.checkpoint import load_checkpoint_file, save_safetensors

from conftest import make_classification, make_mlp


class CutFromOneTensor(nn.Module):
    """Two parameters that are views of one tensor (neither covers all of its memory)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = torch.randn(2, 8, 3) * 0.3
        self.a, self.b = nn.Parameter(block[0]), nn.Parameter(block[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a + torch.tanh(x @ self.b)


class SharedNorm(nn.Module):
    """One BatchNorm under two names (a block applied twice)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.norm, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.norm_again = self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_again(torch.relu(self.norm(self.lin(x)))))


class SparseGraph(nn.Module):
    """A sparse buffer (a graph's adjacency, as in a graph convolution)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        ring = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 0]])
        adjacency = torch.sparse_coo_tensor(ring, torch.ones(8), (8, 8), check_invariants=True)
        self.register_buffer("adjacency", adjacency)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sparse.mm(self.adjacency, x.t()).t() + x)


class ComplexWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 16, dtype=torch.cfloat) * 0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x.to(torch.cfloat) @ self.w).abs())


class CountsInForward(nn.Module):
    """A non-persistent buffer that forward changes (not in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.net(x) * (1 + 1e-3 * self.seen.clamp(max=100))


class RebindsItsBuffer(nn.Module):
    """A running mean kept by assigning a new tensor to its buffer each forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return self.net(x - self.mean)


def fit(quiet_config, model: nn.Module, **options) -> dict:
    config = TrainingConfig(**{**quiet_config, "num_epochs": 2, "batch_size": 8, **options})
    train = DataLoader(make_classification(n=48, seed=4), batch_size=8, shuffle=False)
    val = DataLoader(make_classification(n=24, seed=5), batch_size=8)
    TrainingManager(config).train(model, train, val)
    return config.to_dict()


def assert_export_is_the_best(folder: str, fresh: nn.Module) -> None:
    """best.safetensors loads into a fresh model (tied names re-tied) and equals best.pt."""
    best = load_checkpoint_file(folder + "/checkpoints/best.pt")["model"]
    traineval.load_checkpoint(folder + "/checkpoints/best.safetensors", fresh)
    state = fresh.state_dict()
    for name, value in best.items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_parameters_cut_from_one_tensor_are_exported_and_load(quiet_config, background):
    config = fit(quiet_config, CutFromOneTensor(), async_checkpointing=background)
    assert_export_is_the_best(config["output_dir"], CutFromOneTensor())


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_a_module_under_two_names_loads_from_its_export(quiet_config, sharding):
    config = fit(quiet_config, SharedNorm(), checkpoint_sharding=sharding)
    assert_export_is_the_best(config["output_dir"], SharedNorm())


def test_a_sparse_buffer_trains_with_an_average_and_skips_the_export_saying_why(
    quiet_config, caplog
):
    model = SparseGraph()
    with caplog.at_level(logging.WARNING, logger="traineval"):
        config = fit(quiet_config, model, ema_decay=0.9)
    folder = config["output_dir"] + "/checkpoints"
    said = [r.getMessage() for r in caplog.records if "best.safetensors" in r.getMessage()]
    assert len(said) == 1  # once a run, not once a save
    assert "'adjacency' is a sparse tensor" in said[0]
    assert not (Path(folder) / "best.safetensors").exists()
    loaded = SparseGraph()
    traineval.load_checkpoint(folder + "/best.pt", loaded)
    assert torch.equal(loaded.adjacency.to_dense(), model.adjacency.to_dense())
    with pytest.raises(ValueError, match="'adjacency' is a sparse tensor"):
        save_safetensors(model, config["output_dir"] + "/x.safetensors")


@pytest.mark.parametrize(
    "options", [{}, {"async_checkpointing": True}, {"checkpoint_sharding": "sharded"}]
)
def test_complex_weights_are_exported_on_every_path(quiet_config, options):
    config = fit(quiet_config, ComplexWeights(), **options)
    assert_export_is_the_best(config["output_dir"], ComplexWeights())


def test_complex_weights_are_averaged(quiet_config):
    """The moving average covers complex weights as real ones (it skipped them before)."""
    from test_ema import RecordWeights, ema_by_hand

    model, record = ComplexWeights(), RecordWeights()
    config = TrainingConfig(**{**quiet_config, "num_epochs": 2, "ema_decay": 0.8})
    train = DataLoader(make_classification(n=48, seed=4), batch_size=8)
    TrainingManager(config).train(model, train, callbacks=[record])
    expected = ema_by_hand(record.weights, 0.8)
    torch.testing.assert_close(model.w.detach(), expected["w"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.w.detach(), record.weights[-1]["w"], atol=1e-5)


def test_extra_state_with_restored_best_weights(quiet_config):
    """The best weights' copy keeps a module's extra state too (it crashed before)."""
    from test_sharded_checkpoints import WithExtraState

    model = WithExtraState()
    fit(quiet_config, model, restore_best_weights=True, eval_frequency=2)
    assert model.calls > 0


def test_the_learning_rate_search_puts_back_every_buffer_and_extra_state(quiet_config):
    """After `find_learning_rate`, `train` trains exactly what it would have: non-persistent
    buffers (outside the state dict) and extra state are put back too."""
    from test_sharded_checkpoints import WithExtraState

    data = DataLoader(make_classification(n=48, seed=4), batch_size=8)
    config = TrainingConfig(**{**quiet_config, "num_epochs": 1})
    searched, plain = CountsInForward(), CountsInForward()
    manager = TrainingManager(config)
    manager.find_learning_rate(searched, data, num_steps=5)
    assert float(searched.seen) == 0
    counted = WithExtraState()
    TrainingManager(config).find_learning_rate(counted, data, num_steps=5)
    assert counted.calls == 0
    rebinding = RebindsItsBuffer()  # a running mean kept by rebinding, not in place
    TrainingManager(config).find_learning_rate(rebinding, data, num_steps=5)
    assert torch.equal(rebinding.mean, torch.zeros(8))
    TrainingManager(config).train(searched, data)
    quiet_config["output_dir"] += "-plain"
    TrainingManager(TrainingConfig(**{**quiet_config, "num_epochs": 1})).train(plain, data)
    assert torch.equal(searched.net.weight, plain.net.weight)


class SparseEmbedding(nn.Module):
    """An embedding with sparse gradients (`sparse=True`), then a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding, self.head = nn.Embedding(12, 8, sparse=True), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


def tokens() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, 12, (48,), generator=generator)
    return torch.utils.data.TensorDataset(x, x % 3)


def test_sparse_gradients_train_with_sgd_clipping_and_decay_as_by_hand(quiet_config):
    """SGD with momentum, weight decay (not on the sparse embedding: torch cannot add it to
    a sparse gradient) and clipping (the norm of the sparse gradient's values), against a
    hand-written loop; Adam refuses them before any work, naming the module."""
    from conftest import plain_sgd_config

    options = {"learning_rate": 0.5, "momentum": 0.9, "weight_decay": 0.1}
    config = plain_sgd_config(quiet_config, **options, gradient_clipping=True, max_grad_norm=0.5)
    ours, theirs = SparseEmbedding(), SparseEmbedding()
    TrainingManager(config).train(ours, DataLoader(tokens(), batch_size=8))
    groups = [
        {"params": [theirs.head.weight], "weight_decay": 0.1},
        {"params": [theirs.embedding.weight, theirs.head.bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    for _ in range(config.num_epochs):
        for x, y in DataLoader(tokens(), batch_size=8):
            nn.functional.cross_entropy(theirs(x), y).backward()
            grads = [p.grad for p in theirs.parameters()]
            norm = torch.stack([g.to_dense().norm() for g in grads]).norm()
            for grad in grads:
                grad.mul_((0.5 / (norm + 1e-6)).clamp(max=1.0))
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    adam = TrainingConfig(
        **{**quiet_config, "optimizer_type": "adam", "overwrite_output_dir": True}
    )
    with pytest.raises(ValueError, match=r"'adam' cannot train sparse gradients.*'embedding'"):
        TrainingManager(adam).train(SparseEmbedding(), DataLoader(tokens(), batch_size=8))


class SharedSparseTable(SparseEmbedding):
    """The sparse embedding's weight is also a codebook's parameter, registered first: the
    weight's first name is `codebook.table`, not `embedding.weight`."""

    def __init__(self) -> None:
        super().__init__()
        codebook = nn.Module()
        codebook.table = self.embedding.weight
        self._modules = {"codebook": codebook, **self._modules}


def test_a_sparse_embedding_whose_first_name_is_another_module_s_takes_no_decay(quiet_config):
    """torch's SGD raises on a decay added to a sparse gradient; the group was chosen by the
    weight's first name only."""
    from traineval.training.optim import parameter_groups

    from conftest import plain_sgd_config

    model = SharedSparseTable()
    assert next(iter(dict(model.named_parameters()))) == "codebook.table"
    decayed = [p for g in parameter_groups(model, 0.1) if g["weight_decay"] for p in g["params"]]
    assert all(p is not model.embedding.weight for p in decayed)
    config = plain_sgd_config(quiet_config, learning_rate=0.5, weight_decay=0.1)
    TrainingManager(config).train(model, DataLoader(tokens(), batch_size=8))


class TiedEmbedding(nn.Module):
    """The output layer's weight is the embedding's (tied), so each has two names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding, self.mid = nn.Embedding(12, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(self.embedding(tokens))))


def test_prefixes_name_a_tied_parameter_by_either_of_its_names(quiet_config):
    """frozen_parameters and lr_multipliers take the second name of a tied weight (they
    were refused: "matches no parameter"), and a model without parameters is said so."""
    from traineval.training.optim import OptimizerChoice, build_optimizer

    model = TiedEmbedding()
    optimizer = build_optimizer(model, OptimizerChoice("sgd", lr=1.0, lr_multipliers={"out": 0.5}))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates[id(model.embedding.weight)] == 0.5
    assert rates[id(model.mid.weight)] == 1.0
    before = model.embedding.weight.detach().clone()
    config = TrainingConfig(**{**quiet_config, "num_epochs": 1, "frozen_parameters": ["out"]})
    TrainingManager(config).train(model, DataLoader(tokens(), batch_size=8))
    assert not model.embedding.weight.requires_grad
    assert torch.equal(model.embedding.weight, before)
    with pytest.raises(ValueError, match=r"has no trainable parameters \(it has none\)"):
        build_optimizer(nn.ReLU(), OptimizerChoice("sgd", lr=1.0))


def test_a_float16_model_under_fp16_precision_is_refused_before_any_work(quiet_config):
    """fp16 mixed precision scales the loss of float32 weights: torch failed a float16
    model after its first update ("Attempting to unscale FP16 gradients")."""
    model = nn.Sequential(nn.Linear(8, 3)).half()
    config = TrainingConfig(**{**quiet_config, "precision": "fp16"})
    with pytest.raises(ValueError, match=r"precision='fp16'.*'0\.weight' is float16"):
        TrainingManager(config).train(model, DataLoader(make_classification(n=16), 8))
    assert not (Path(config.output_dir) / "checkpoints").exists()


def test_a_regression_model_that_squeezes_a_batch_of_one_is_evaluated():
    """`.squeeze()` makes the last batch's output a 0-d tensor (9 samples in batches of
    8): the evaluation crashed on it; its metrics are scikit-learn's."""
    from sklearn.metrics import mean_squared_error, r2_score

    from traineval import Evaluator, TaskType

    class Squeezing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).squeeze()

    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    y, model = x.sum(1), Squeezing()
    data = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    metrics = Evaluator().evaluate(model, data, task_type=TaskType.REGRESSION).metrics
    with torch.no_grad():
        predicted = model.linear(x).reshape(-1).numpy()
    assert metrics["mse"] == pytest.approx(mean_squared_error(y.numpy(), predicted), rel=1e-5)
    assert metrics["r2_score"] == pytest.approx(r2_score(y.numpy(), predicted), rel=1e-5)


@pytest.mark.parametrize("source", ["table.csv", "function"])
def test_a_path_or_a_function_as_supervised_training_data_is_refused_first(quiet_config, source):
    """Both are environment sources (reinforcement learning): a path was iterated letter by
    letter ("this batch has no targets"), a function asked for max_steps."""
    data = DataLoader(make_classification(n=16), 8)
    loader = source if source == "table.csv" else (lambda: data)
    config = TrainingConfig(**{**quiet_config, "max_steps": 3})
    with pytest.raises(ValueError, match=r"is a (string|function): mode='supervised' trains on"):
        TrainingManager(config).train(nn.Linear(8, 3), loader)
    assert not (Path(config.output_dir) / "checkpoints").exists()


def test_an_evaluation_batch_with_every_target_ignored_adds_nothing_to_the_mean(quiet_config):
    """Its mean was 0/0, and 0 items times NaN made val_loss NaN, which stopped the run
    (EvaluationError): the loss is the mean over the kept targets of every batch."""
    from traineval import Evaluator

    x, y = make_classification(48).tensors
    held_out = y.clone()
    held_out[:8] = -100  # the first validation batch: every target ignored
    held_out[30:34] = -100
    model = nn.Linear(8, 3)
    train = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    val = DataLoader(torch.utils.data.TensorDataset(x, held_out), batch_size=8)
    config = TrainingConfig(**{**quiet_config, "num_epochs": 1})
    result = TrainingManager(config).train(model, train, val)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), held_out))
    assert result["training_history"]["val_loss"][-1] == pytest.approx(expected, rel=1e-5)
    metrics = Evaluator().evaluate(model, val).metrics
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_loader_that_grows_is_said_not_trained_silently_at_the_schedule_s_end(
    quiet_config, caplog
):
    """The run is planned from len(train_loader) at its start: a dataset that grows made
    onecycle fail with torch's step count, and cosine train the extra updates at rate 0
    without a word."""
    from torch.utils.data import Dataset

    from traineval import Callback

    x, y = make_classification(100).tensors

    class Growing(Dataset):
        size = 48

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, i: int):
            return x[i], y[i]

    class Grow(Callback):
        def on_epoch_end(self, loop, logs=None) -> None:
            data.size = 100

    for schedule in ("onecycle", "cosine"):
        data = Growing()
        settings = {"num_epochs": 2, "scheduler_type": schedule, "overwrite_output_dir": True}
        config = TrainingConfig(**{**quiet_config, **settings})
        train = DataLoader(data, batch_size=8)
        if schedule == "onecycle":
            with pytest.raises(ValueError, match=r"yields more batches than its len\(\) says"):
                TrainingManager(config).train(make_mlp(), train, callbacks=[Grow()])
            continue
        with caplog.at_level(logging.WARNING, logger="traineval"):
            TrainingManager(config).train(make_mlp(), train, callbacks=[Grow()])
        assert "this epoch made 13 updates, where the train loader's len() planned 6" in (
            caplog.text
        )


def test_sparse_gradients_under_torchrun_are_refused_naming_the_module():
    """The ranks' all-reduce (DDP's, or the loop's) takes dense gradients only: it failed
    at the first update with torch's "reshape is not implemented for sparse tensors"."""
    from traineval.system.distributed import Distributed
    from traineval.training.update import Placement, UpdateRule, WindowUpdate

    model = SparseEmbedding()
    rule = UpdateRule(step_fn=lambda m, b: None, optimizer=torch.optim.SGD(model.parameters()))
    place = Placement(torch.device("cpu"), job=Distributed(rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"'embedding' \(an embedding with sparse=True\)"):
        WindowUpdate(rule, place, model, log_every=1)
    WindowUpdate(rule, Placement(torch.device("cpu")), model, log_every=1)  # one process


class Squeezing(nn.Module):
    """A classifier whose forward ends in `.squeeze()`: a batch of one gives `(C,)`."""

    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.squeeze = nn.Linear(4, 3), squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out.squeeze() if self.squeeze else out


def test_a_classifier_that_squeezes_a_batch_of_one_trains_as_one_that_does_not(tmp_path):
    """33 rows in batches of 8: the last batch's (3,) scores read as three samples against
    one label ('Expected input batch_size (3) to match target batch_size (1)')."""
    from traineval import TrainingConfig, TrainingManager

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(33, 4, generator=generator),
                         torch.randint(0, 3, (33,), generator=generator))  # fmt: skip
    models = {}
    for squeeze in (True, False):
        folder = str(tmp_path / str(squeeze))
        config = TrainingConfig(num_epochs=2, batch_size=8, warmup_steps=0, progress_bar=False,
                                tensorboard_logging=False, output_dir=folder)  # fmt: skip
        models[squeeze] = Squeezing(squeeze)
        TrainingManager(config).train(models[squeeze], DataLoader(data, 8), DataLoader(data, 8))
    for a, b in zip(models[True].parameters(), models[False].parameters(), strict=True):
        assert torch.equal(a, b)
