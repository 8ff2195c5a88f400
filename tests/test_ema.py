"""A moving average of the weights (ema_decay) against torch's AveragedModel, by hand, and
across an interruption."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

import traineval
from traineval import Callback, TrainingConfig, TrainingManager, TrainingMode
from traineval.runs.checkpoint import load_checkpoint_file, load_safetensors
from traineval.training.loop import TrainingInterrupted

from conftest import InterruptAt, make_classification


def bn_mlp(seed: int = 0) -> nn.Module:
    """Float buffers (running statistics) beside an integer one (num_batches_tracked)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def settings(quiet_config, **overrides) -> TrainingConfig:
    values = {
        "num_epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.05,
        "optimizer_type": "sgd",  # momentum 0.9, fused: torch.optim.SGD by hand below
        "weight_decay": 0.0,
        "gradient_clipping": False,
        "seed": 7,
        "ema_decay": 0.9,
        **quiet_config,
    }
    values.update(overrides)
    return TrainingConfig(**values)


def warmup_ema(decay: float):
    """get_ema_multi_avg_fn with TensorFlow's num_updates decay: update t = n_averaged + 1."""

    @torch.no_grad()
    def update(averaged, current, n_averaged):
        if averaged[0].is_floating_point():  # torch's EMA skips integer buffers' lerp too
            t = int(n_averaged) + 1
            torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + t) / (10 + t)))

    return update


def assert_float_entries_equal(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("warmup", [False, True])
def test_averaged_weights_and_their_evaluations_equal_torch_averaged_model(quiet_config, warmup):
    train_data, val_data = make_classification(n=96, seed=1), make_classification(n=40, seed=2)
    model = bn_mlp()
    reference = copy.deepcopy(model)
    val = DataLoader(val_data, batch_size=40)
    config = settings(quiet_config, ema_warmup=warmup)
    result = TrainingManager(config).train(
        model, DataLoader(train_data, batch_size=16, shuffle=True), val
    )

    torch.manual_seed(7)
    multi_avg_fn = warmup_ema(0.9) if warmup else get_ema_multi_avg_fn(0.9)
    averaged = AveragedModel(reference, multi_avg_fn=multi_avg_fn, use_buffers=True)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, fused=True)
    val_losses = []
    for _ in range(3):
        reference.train()
        for x, y in DataLoader(train_data, batch_size=16, shuffle=True):
            nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            averaged.update_parameters(reference)
        averaged.eval()
        with torch.no_grad():
            x, y = val_data.tensors
            val_losses.append(float(nn.functional.cross_entropy(averaged(x), y)))

    # the model ends with the averaged weights; its step count is its own
    assert_float_entries_equal(model.state_dict(), averaged.module.state_dict())
    assert torch.equal(model[1].num_batches_tracked, reference[1].num_batches_tracked)
    # evaluations ran on the averaged weights (and BatchNorm statistics)
    assert result["training_history"]["val_loss"] == pytest.approx(val_losses, rel=1e-5)
    # the last checkpoint holds the average as its model, the trained weights to resume
    saved = load_checkpoint_file(config.output_dir + "/checkpoints/last.pt")
    assert_float_entries_equal(saved["model"], averaged.module.state_dict())
    assert_float_entries_equal(saved["training_weights"], reference.state_dict())
    assert saved["ema"] == {"updates": 18, "decay": 0.9, "warmup": warmup}


def test_without_ema_the_trained_weights_differ_from_the_average(quiet_config):
    """The comparison above can fail: the average is not the trained weights."""
    train_data = make_classification(n=96, seed=1)
    plain, averaged = bn_mlp(), bn_mlp()
    loader = DataLoader(train_data, batch_size=16, shuffle=True)
    TrainingManager(settings(quiet_config, ema_decay=0.0)).train(plain, loader)
    quiet_config["output_dir"] += "-ema"
    TrainingManager(settings(quiet_config)).train(averaged, loader)
    gap = (plain[0].weight - averaged[0].weight).abs().max()
    assert gap > 1e-3


class RecordWeights(Callback):
    """The weights after every optimizer update."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, loop) -> None:
        self.weights.append({k: v.detach().clone() for k, v in loop.model.state_dict().items()})


def ema_by_hand(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = dict(weights[0])
    for step in weights[1:]:
        for name, value in step.items():
            if value.is_floating_point() or value.is_complex():
                average[name] = decay * average[name] + (1 - decay) * value
    return average


def test_federated_rounds_average_the_global_weights(quiet_config):
    """Any mode: the average is over the weights after each update (a round here), and the
    run's trajectory is the one it has without averaging."""
    data = make_classification(n=96, seed=3)
    clients = [
        DataLoader(part, batch_size=8)
        for part in torch.utils.data.random_split(
            data, [32, 32, 32], generator=torch.Generator().manual_seed(0)
        )
    ]
    record = RecordWeights()
    plain = bn_mlp()
    base = settings(quiet_config, num_epochs=4, learning_rate=0.1, ema_decay=0.0)
    TrainingManager(base).train(plain, clients, mode=TrainingMode.FEDERATED, callbacks=[record])
    averaged = bn_mlp()
    quiet_config["output_dir"] += "-ema"
    config = settings(quiet_config, num_epochs=4, learning_rate=0.1, ema_decay=0.7)
    TrainingManager(config).train(averaged, clients, mode=TrainingMode.FEDERATED)
    assert len(record.weights) == 4
    expected = ema_by_hand(record.weights, 0.7)
    for name, value in averaged.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_interrupted_and_resumed_run_keeps_its_average(tmp_path, sharding):
    """Also from sharded checkpoints: the folder holds the average as the model and the
    trained weights beside it (under FSDP each rank its shards: tests/test_distributed.py)."""

    def config(path, **overrides):
        return TrainingConfig(
            num_epochs=3,
            batch_size=8,
            learning_rate=3e-3,
            gradient_accumulation_steps=2,
            warmup_steps=2,
            eval_frequency=4,
            early_stopping_patience=0,
            checkpoint_every_n_steps=3,
            output_dir=str(path),
            progress_bar=False,
            tensorboard_logging=False,
            device="cpu",
            seed=5,
            ema_decay=0.8,
            ema_warmup=True,
            checkpoint_sharding=sharding,
            **overrides,
        )

    def loaders():
        generator = torch.Generator().manual_seed(9)
        train = DataLoader(make_classification(n=80, seed=1), 8, shuffle=True, generator=generator)
        return train, DataLoader(make_classification(n=40, seed=2), batch_size=20)

    straight = bn_mlp()
    result = TrainingManager(config(tmp_path / "straight")).train(straight, *loaders())
    first = bn_mlp()
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config(tmp_path / "resumed")).train(
            first, *loaders(), callbacks=[InterruptAt(7)]
        )
    resumed = bn_mlp(seed=99)  # everything must come from the checkpoint
    again = TrainingManager(config(tmp_path / "resumed")).train(
        resumed, *loaders(), resume_from="auto"
    )
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again["training_history"]["val_metrics"] == result["training_history"]["val_metrics"]
    # resuming the finished run trains nothing and gives the weights it ended with: the
    # average (it gave the trained weights)
    finished = bn_mlp(seed=98)
    TrainingManager(config(tmp_path / "resumed")).train(finished, *loaders(), resume_from="auto")
    assert_float_entries_equal(finished.state_dict(), straight.state_dict())
    # the checkpoints' model is the average (what evaluate reads): the last one's is the
    # model the run ended with; best.safetensors is best.pt's
    folder = tmp_path / "resumed" / "checkpoints"
    for name in ("last", "best"):
        saved = load_checkpoint_file(folder / f"{name}.pt", read_shards=False)
        assert (saved["shards"] is not None) == (sharding == "sharded")
        assert saved["ema"]["updates"] == saved["global_step"]
    plain = bn_mlp(seed=3)
    traineval.load_checkpoint(folder / "last.pt", plain)
    assert_float_entries_equal(plain.state_dict(), straight.state_dict())
    traineval.load_checkpoint(folder / "best.pt", plain)
    exported = bn_mlp(seed=3)
    load_safetensors(exported, folder / "best.safetensors")
    assert_float_entries_equal(exported.state_dict(), plain.state_dict())


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_best_checkpoint_and_restored_best_weights_are_the_average(quiet_config, background):
    """Also when the save is copied for a background write (async, or put off by the write
    budget): the exported average is copied while the model holds it."""
    train_data, val_data = make_classification(n=96, seed=1), make_classification(n=40, seed=2)
    model = bn_mlp()
    config = settings(
        quiet_config,
        num_epochs=4,
        restore_best_weights=True,
        eval_frequency=2,
        async_checkpointing=background,
    )
    result = TrainingManager(config).train(
        model, DataLoader(train_data, batch_size=16, shuffle=True), DataLoader(val_data, 40)
    )
    best = load_checkpoint_file(config.output_dir + "/checkpoints/best.pt")
    assert best["global_step"] == result["best_step"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name
    assert not torch.equal(best["model"]["0.weight"], best["training_weights"]["0.weight"])
    exported = bn_mlp(seed=3)
    load_safetensors(exported, config.output_dir + "/checkpoints/best.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, exported.state_dict()[name]), name
    # the restored weights score what the best evaluation reported
    model.eval()
    with torch.no_grad():
        x, y = val_data.tensors
        loss = float(nn.functional.cross_entropy(model(x), y))
    assert loss == pytest.approx(result["best_metric"], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ema_decay": 1.0}, r"ema_decay=1\.0 is invalid: expected a number in \[0, 1\)"),
        ({"ema_decay": -0.1}, r"ema_decay=-0\.1 is invalid"),
        ({"ema_decay": "high"}, r"ema_decay='high' is invalid"),
        ({"ema_warmup": "yes"}, r"ema_warmup='yes' is invalid"),
    ],
)
def test_bad_ema_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_a_model_with_extra_state_keeps_an_average_across_a_resume(tmp_path, sharding):
    """A module's extra state (`get_extra_state`, not a tensor) is the model's own: it is
    not averaged, and travels with the checkpoint (it crashed the average before)."""
    from test_sharded_checkpoints import WithExtraState

    def run(path, model, **options):
        config = TrainingConfig(
            num_epochs=2,
            batch_size=8,
            checkpoint_every_n_steps=2,
            ema_decay=0.7,
            checkpoint_sharding=sharding,
            output_dir=str(path),
            progress_bar=False,
            tensorboard_logging=False,
            device="cpu",
            seed=3,
        )
        data = DataLoader(make_classification(n=48, seed=4), batch_size=8, shuffle=True)
        return TrainingManager(config).train(model, data, **options)

    straight = WithExtraState()
    run(tmp_path / "straight", straight)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "resumed", WithExtraState(), callbacks=[InterruptAt(5)])
    resumed = WithExtraState()
    run(tmp_path / "resumed", resumed, resume_from="auto")
    assert torch.equal(resumed.net.weight, straight.net.weight)
    assert resumed.calls == straight.calls == 12  # the count travels with the checkpoint
    saved = WithExtraState()
    traineval.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt", saved)
    assert torch.equal(saved.net.weight, straight.net.weight)
    assert saved.calls == straight.calls
