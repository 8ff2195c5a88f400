"""Federated mode (FedAvg) against hand-written references."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traineval import TrainingManager, TrainingMode
from traineval.modes import Federated
from traineval.modes.federated import partition

from conftest import make_classification, make_mlp, plain_sgd_config

FED = TrainingMode.FEDERATED


def _config(quiet_config, **overrides):
    return plain_sgd_config(
        quiet_config,
        **{
            "num_epochs": 3,
            "batch_size": 8,
            "learning_rate": 0.1,
            **overrides,
        },
    )


def _clients(sizes=(8, 16, 24)):
    data = make_classification(n=sum(sizes))
    x, y = data.tensors
    edges = np.cumsum((0, *sizes))
    return [
        DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=8)
        for a, b in itertools.pairwise(edges)
    ]


def _fedavg(model, clients, rounds, local_epochs, lr, server_lr=1.0, server_momentum=0.0, mu=0.0):
    """FedAvg written out: copy, train each client with SGD, average by samples, server step.

    `lr` is one client learning rate, or one per round; buffers are averaged like weights.
    """
    velocity = None
    for round_index in range(rounds):
        client_lr = lr[round_index] if isinstance(lr, list) else lr
        states, sizes = [], []
        for loader in clients:
            local = copy.deepcopy(model)
            optimizer = torch.optim.SGD(local.parameters(), lr=client_lr)
            start = [p.detach().clone() for p in model.parameters()]  # FedProx's anchor
            for _ in range(local_epochs):
                for x, y in loader:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(local(x), y)
                    if mu:
                        pairs = zip(local.parameters(), start, strict=True)
                        drift = sum(((p - g) ** 2).sum() for p, g in pairs)
                        loss = loss + mu / 2 * drift
                    loss.backward()
                    optimizer.step()
            states.append(local.state_dict())
            sizes.append(len(loader.dataset))
        total = sum(sizes)
        with torch.no_grad():
            average = {
                name: sum(s[name] * (n / total) for s, n in zip(states, sizes, strict=True))
                for name in states[0]
            }
            deltas = {name: p - average[name] for name, p in model.named_parameters()}
            if server_momentum:
                velocity = (
                    deltas
                    if velocity is None
                    else {k: server_momentum * velocity[k] + deltas[k] for k in deltas}
                )
                deltas = velocity
            for name, p in model.named_parameters():
                p -= server_lr * deltas[name]
            for name, buffer in model.named_buffers():
                buffer.copy_(average[name] if buffer.is_floating_point() else average[name].round())


@pytest.mark.parametrize(("server_lr", "server_momentum"), [(1.0, 0.0), (0.7, 0.9)])
def test_federated_training_equals_hand_written_fedavg(quiet_config, server_lr, server_momentum):
    clients = _clients()
    mode = Federated(local_epochs=2, server_lr=server_lr, server_momentum=server_momentum)
    ours, theirs = make_mlp(), make_mlp()
    result = TrainingManager(_config(quiet_config)).train(ours, clients, mode=mode)
    _fedavg(theirs, clients, 3, 2, 0.1, server_lr, server_momentum)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert result["global_step"] == 3  # one update per round
    assert len(result["training_history"]["train_loss"]) == 3


def test_fedprox_equals_hand_written_fedprox(quiet_config):
    clients = _clients()
    ours, theirs, plain = make_mlp(), make_mlp(), make_mlp()
    mode = Federated(local_epochs=3, proximal_mu=0.5)
    TrainingManager(_config(quiet_config)).train(ours, clients, mode=mode)
    _fedavg(theirs, clients, 3, 3, 0.1, mu=0.5)
    _fedavg(plain, clients, 3, 3, 0.1)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0].weight, plain[0].weight, atol=1e-4)  # the term acts


def test_one_client_with_one_local_epoch_is_plain_sgd_training(quiet_config):
    data = make_classification(n=48)
    ours, theirs = make_mlp(), make_mlp()
    config = _config(quiet_config)
    TrainingManager(config).train(ours, [DataLoader(data, 8)], mode=FED)
    TrainingManager(config).train(theirs, DataLoader(data, 8))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_buffers_are_averaged_and_the_schedule_sets_the_client_learning_rate(quiet_config):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    clients = _clients()
    config = _config(
        quiet_config, scheduler_type="step", scheduler_step_size=1, scheduler_gamma=0.5
    )
    ours, theirs = model(), model()
    result = TrainingManager(config).train(ours, clients, mode=FED)
    _fedavg(theirs, clients, 3, 1, [0.1, 0.05, 0.025])
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert result["training_history"]["learning_rate"] == pytest.approx([0.05, 0.025, 0.0125])


def test_iid_and_dirichlet_partitions():
    data = make_classification(n=120, classes=4)
    iid = partition(data, 5, scheme="iid", seed=0)
    assert sorted(len(share) for share in iid) == [24] * 5
    assert sorted(i for share in iid for i in share) == list(range(120))
    skewed = partition(data, 4, scheme="dirichlet", alpha=0.1, seed=0)
    assert sorted(i for share in skewed for i in share) == list(range(120))
    assert all(skewed)
    labels = data.tensors[1].numpy()
    # label skew: with alpha 0.1 a client's largest class dominates its share
    dominance = [np.bincount(labels[share], minlength=4).max() / len(share) for share in skewed]
    assert np.mean(dominance) > 0.6
    assert partition(data, 4, scheme="dirichlet", alpha=0.1, seed=0) == skewed
    assert partition(data, 4, scheme="dirichlet", alpha=0.1, seed=1) != skewed
    with pytest.raises(ValueError, match=r"federated\.clients=200 with federated\.min_samples=1 "
                                         r"need 200 training samples; there are 120"):  # fmt: skip
        partition(data, 200)


def test_every_seed_partitions_a_harsh_dirichlet_with_min_samples():
    """Dirichlet(0.05) over 50 clients refused 4 of the first 7 seeds and left clients
    with one sample: now every seed gives every client min_samples, from the seed alone."""
    data = make_classification(n=1400, classes=10)
    labels = data.tensors[1].numpy()
    for seed in range(7):
        shares = partition(data, 50, scheme="dirichlet", alpha=0.05, seed=seed, min_samples=4)
        assert min(map(len, shares)) >= 4
        assert sorted(i for share in shares for i in share) == list(range(1400))
        dominance = [np.bincount(labels[s], minlength=10).max() / len(s) for s in shares]
        assert np.mean(dominance) > 0.6  # still label-skewed
        again = partition(data, 50, scheme="dirichlet", alpha=0.05, seed=seed, min_samples=4)
        assert again == shares
    with pytest.raises(ValueError, match=r"min_samples=30 need 1500 training samples"):
        partition(data, 50, scheme="dirichlet", alpha=0.05, min_samples=30)


def test_the_partition_is_recorded_in_the_run_directory(quiet_config, tmp_path):
    """mode.json holds each client's samples and label counts, as `partition` made them."""
    data = make_classification(n=96, classes=3)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    mode = Federated(clients=5, partition="dirichlet", dirichlet_alpha=0.3, min_samples=3)
    quiet_config["output_dir"] = str(tmp_path / "run")
    config = _config(quiet_config, num_epochs=1, seed=7)
    TrainingManager(config).train(make_mlp(), loader, mode=mode)
    record = json.loads((tmp_path / "run" / "mode.json").read_text())["partition"]
    shares = partition(data, 5, scheme="dirichlet", alpha=0.3, seed=7, min_samples=3)
    labels = data.tensors[1].numpy()
    expected = [
        {"samples": len(share),
         "labels": {str(k): int(n) for k, n in enumerate(np.bincount(labels[share])) if n}}
        for share in shares
    ]  # fmt: skip
    assert record == {"scheme": "dirichlet", "seed": 7, "min_samples": 3,
                      "dirichlet_alpha": 0.3, "clients": expected}  # fmt: skip
    quiet_config["output_dir"] = str(tmp_path / "given")
    TrainingManager(_config(quiet_config, num_epochs=1)).train(make_mlp(), _clients(), mode=mode)
    given = json.loads((tmp_path / "given" / "mode.json").read_text())["partition"]
    assert given["scheme"] == "given"
    assert [c["samples"] for c in given["clients"]] == [8, 16, 24]


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_a_resumed_federated_run_ends_where_an_uninterrupted_one_does(
    quiet_config, tmp_path, sharding
):
    """Client sampling, each client's shuffle and dropout all survive a resume; with
    sharded checkpoints too (torch's state dict API must not count a round when it reads the
    server optimizer), against an uninterrupted run writing full ones."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    data = make_classification(n=96)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    val = DataLoader(make_classification(n=32, seed=1), batch_size=16)
    settings = {"optimizer_type": "adamw", "early_stopping_patience": 0}
    mode = Federated(clients=6, partition="dirichlet", client_fraction=0.5, local_epochs=2)
    quiet_config["output_dir"] = str(tmp_path / "straight")
    straight = model()
    TrainingManager(_config(quiet_config, num_epochs=4, **settings)).train(
        straight, loader, val, mode=mode
    )
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    quiet_config["checkpoint_sharding"] = sharding
    first = model()
    TrainingManager(_config(quiet_config, num_epochs=2, **settings)).train(
        first, loader, val, mode=mode
    )
    resumed = model()
    with pytest.raises(ValueError, match=r"federated\.clients: checkpoint 6, now 5"):
        TrainingManager(_config(quiet_config, num_epochs=4, **settings)).train(
            model(), loader, val, mode=dataclasses.replace(mode, clients=5), resume_from="auto"
        )
    result = TrainingManager(_config(quiet_config, num_epochs=4, **settings)).train(
        resumed, loader, val, mode=mode, resume_from="auto"
    )
    assert result["global_step"] == 4
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not all(
        torch.equal(a, b) for a, b in zip(first.parameters(), resumed.parameters(), strict=True)
    )


def test_federated_settings_and_combinations_are_checked_before_any_work(quiet_config, tmp_path):
    clients = _clients()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 is invalid in mode="):
        TrainingManager(_config(quiet_config, gradient_accumulation_steps=2)).train(
            make_mlp(), clients, mode=FED
        )
    with pytest.raises(ValueError, match="compile=True is not supported in mode='federated'"):
        TrainingManager(_config(quiet_config, compile=True)).train(make_mlp(), clients, mode=FED)
    assert not (tmp_path / "run").exists()
    for field, value, message in [
        ("client_fraction", 1.5, "expected a number in \\(0, 1\\]"),
        ("partition", "random", "expected one of"),
        ("dirichlet_alpha", 0.0, "expected a finite number > 0"),
        ("server_momentum", 1.0, "expected a number in \\[0, 1\\)"),
        ("local_epochs", 0, "expected an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=f"federated.{field}={value!r} is invalid: {message}"):
            Federated(**{field: value})


def test_federated_from_the_command_line(tmp_path):
    import json

    from traineval.cli import main

    args = ["demo", "-q", "mode=federated", "model.name=mlp", "model.options={}"]
    args += ["training.num_epochs=6", "training.warmup_steps=0", "mode.clients=5"]
    args += ["mode.partition=dirichlet", "mode.client_fraction=0.6"]
    assert main([*args, f"training.output_dir={tmp_path}"]) == 0
    record = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert record["test"]["accuracy"] > 0.8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 6  # one update per round


def _scaffold(model, clients, rounds, local_epochs, lr):
    """SCAFFOLD (option II) written out, with FedAvg's sample-weighted average of weights:
    gradients corrected by c - c_i; c_i+ = c_i - c + (x - y_i) / (K lr); c += sum / N."""
    params = list(model.parameters())
    c = [torch.zeros_like(p) for p in params]
    c_i = [[torch.zeros_like(p) for p in params] for _ in clients]
    for _ in range(rounds):
        states, sizes, changes = [], [], []
        for i, loader in enumerate(clients):
            local = copy.deepcopy(model)
            optimizer = torch.optim.SGD(local.parameters(), lr=lr)
            steps = 0
            for _ in range(local_epochs):
                for x, y in loader:
                    optimizer.zero_grad()
                    F.cross_entropy(local(x), y).backward()
                    for p, server, own in zip(local.parameters(), c, c_i[i], strict=True):
                        p.grad += server - own
                    optimizer.step()
                    steps += 1
            with torch.no_grad():
                updated = [
                    own - server + (x - y) / (steps * lr)
                    for own, server, x, y in zip(c_i[i], c, params, local.parameters(), strict=True)
                ]
            changes.append([new - own for new, own in zip(updated, c_i[i], strict=True)])
            c_i[i] = updated
            states.append(local.state_dict())
            sizes.append(len(loader.dataset))
        total = sum(sizes)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(sum(s[name] * (n / total) for s, n in zip(states, sizes, strict=True)))
            c = [server + sum(d[k] for d in changes) / len(clients) for k, server in enumerate(c)]


def test_scaffold_equals_hand_written_scaffold(quiet_config):
    clients = _clients()
    ours, theirs, plain = make_mlp(), make_mlp(), make_mlp()
    TrainingManager(_config(quiet_config)).train(
        ours, clients, mode=Federated(local_epochs=2, control_variates=True)
    )
    _scaffold(theirs, clients, 3, 2, 0.1)
    _fedavg(plain, clients, 3, 2, 0.1)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0].weight, plain[0].weight, atol=1e-4)  # the controls act


@pytest.mark.parametrize("sharding", ["full", "sharded"])
def test_a_resumed_scaffold_run_ends_where_an_uninterrupted_one_does(
    quiet_config, tmp_path, sharding
):
    """The controls live in the server optimizer's state: a checkpoint carries them (a
    sharded one too, though a fresh server optimizer has no such entries to load into)."""
    data = make_classification(n=96)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    mode = Federated(clients=4, partition="dirichlet", client_fraction=0.5, control_variates=True)
    runs = {}
    for name, epochs in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        quiet_config["output_dir"] = str(tmp_path / name)
        quiet_config["checkpoint_sharding"] = "full" if name == "straight" else sharding
        model = make_mlp()
        TrainingManager(_config(quiet_config, num_epochs=epochs)).train(
            model, loader, mode=mode, resume_from="auto" if name in runs else None
        )
        runs[name] = model
    for a, b in zip(runs["straight"].parameters(), runs["resumed"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_scaffold_needs_plain_sgd_clients(quiet_config):
    with pytest.raises(
        ValueError, match=r"control_variates=True \(SCAFFOLD\) .* optimizer_type='sgd'"
    ):
        TrainingManager(_config(quiet_config, optimizer_type="adamw")).train(
            make_mlp(), _clients(), mode=Federated(control_variates=True)
        )


def test_complex_weights_are_averaged_like_real_ones(quiet_config):
    """The round's average keeps a complex weight's imaginary part (it summed in float32),
    and the server's pseudo-gradient of a complex weight is its delta."""
    from test_unusual_models import ComplexWeights

    clients = _clients()
    ours, theirs, start = ComplexWeights(), ComplexWeights(), ComplexWeights()
    TrainingManager(_config(quiet_config)).train(ours, clients, mode=Federated(local_epochs=2))
    _fedavg(theirs, clients, 3, 2, 0.1)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (ours.w.imag - start.w.imag).abs().max() > 1e-3  # the imaginary part trained


def test_a_module_s_extra_state_stays_the_global_model_s(quiet_config):
    """Extra state (`get_extra_state`, not a tensor) is not averaged: the global model's
    own (it crashed the round before)."""
    from test_sharded_checkpoints import WithExtraState

    ours, theirs = WithExtraState(), WithExtraState()
    ours.net, theirs.net = make_mlp(), make_mlp()
    TrainingManager(_config(quiet_config)).train(ours, _clients(), mode=Federated(local_epochs=2))
    _fedavg(theirs.net, _clients(), 3, 2, 0.1)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state_dict()["_extra_state"] == {"calls": ours.calls}
