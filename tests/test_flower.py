"""Flower integration: traineval's client training under Flower's FedAvg(M), in process."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traineval
from test_federated import _clients, _config
from traineval import TrainingManager, TrainingMode, cli
from traineval.commands.experiment import RunConfig
from traineval.commands.report import read_run
from traineval.loggers import read_jsonl
from traineval.runs.checkpoint import load_safetensors

from conftest import make_classification, make_mlp

flower = pytest.importorskip("traineval.federated.flower", exc_type=ImportError)


def _flower_run(config, clients, val=None, model_fn=make_mlp, **server_options):
    """Train model_fn() with Flower over `clients` (node i gets clients[i]); final weights."""

    def data_fn(context):
        return clients[context.node_config["partition-id"]], val

    client = flower.client_app(model_fn, data_fn, config)
    server = flower.server_app(model_fn, config, **server_options)
    flower.run_local(server, client, [{"partition-id": i} for i in range(len(clients))])
    model = model_fn()
    load_safetensors(model, f"{config.output_dir}/final_model.safetensors")
    return model


@pytest.mark.parametrize(
    "server",
    [
        {},
        {"mode_settings": {"federated": {"server_lr": 0.7, "server_momentum": 0.5}}},
        {"scheduler_type": "cosine", "warmup_steps": 1},
        {"mode_settings": {"federated": {"proximal_mu": 0.5}}},
        {"mode_settings": {"federated": {"control_variates": True}}, "num_epochs": 4},
        {
            "mode_settings": {"federated": {"control_variates": True, "server_lr": 0.7}},
            "scheduler_type": "cosine",
            "warmup_steps": 1,
        },
    ],
    ids=["fedavg", "fedavgm", "warmup-cosine-client-lr", "fedprox", "scaffold", "scaffold-lr"],
)
def test_flower_fedavg_with_traineval_clients_equals_the_in_process_simulation(
    quiet_config, tmp_path, server
):
    """Same clients, rounds, local epochs, client optimizer: Flower's FedAvg (FedAvgM) over
    the ClientApp and traineval's simulated federated mode reach the same weights."""
    clients = _clients()
    simulated = make_mlp()
    given = server.get("mode_settings", {}).get("federated", {})
    settings = {
        **server,
        "mode_settings": {"federated": {"local_epochs": 2, "clients": 3, **given}},
    }
    config = _config(quiet_config, **settings)
    TrainingManager(config).train(simulated, clients, mode=TrainingMode.FEDERATED)
    flower_config = _config({**quiet_config, "output_dir": str(tmp_path / "flower")}, **settings)
    federated = _flower_run(flower_config, clients, evaluate_on_clients=False)
    moved = sum(
        float((a - make_mlp().state_dict()[k]).abs().sum())
        for k, a in federated.state_dict().items()
    )
    assert moved > 0.1  # training happened
    for a, b in zip(federated.parameters(), simulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rounds_are_logged_with_client_and_server_evaluation(quiet_config, tmp_path):
    clients = _clients()
    val = DataLoader(make_classification(n=20, seed=3), batch_size=10)
    config = _config(quiet_config, num_epochs=2, mode_settings={"federated": {"clients": 3}})

    def accuracy(model):
        x, y = val.dataset.tensors
        return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    model = _flower_run(config, clients, val=val, server_evaluate=accuracy)
    records = read_jsonl(f"{config.output_dir}/metrics.jsonl")
    by_event = {}
    for record in records:
        by_event.setdefault(record["event"], []).append(record)
    assert [r["round"] for r in by_event["train"]] == [1, 2]
    assert all(r["train_loss"] > 0 for r in by_event["train"])
    assert [r["round"] for r in by_event["validation"]] == [1, 2]
    assert 0 <= by_event["validation"][-1]["val_accuracy"] <= 1
    assert [r["round"] for r in by_event["server_evaluation"]] == [0, 1, 2]
    # the server's last evaluation is of the saved final weights
    assert by_event["server_evaluation"][-1]["server_accuracy"] == accuracy(model)["accuracy"]
    # every client evaluated the same global model on the same data: the aggregate is its loss
    x, y = val.dataset.tensors
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y))
    assert by_event["validation"][-1]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_a_client_asked_to_evaluate_without_data_says_what_to_do(quiet_config):
    config = _config(quiet_config, num_epochs=1, mode_settings={"federated": {"clients": 3}})
    client = flower.client_app(make_mlp, lambda context: (_clients()[0], None), config)
    server = flower.server_app(make_mlp, config)
    with pytest.raises(Exception, match="returned no validation loader"):
        flower.run_local(server, client, [{"partition-id": i} for i in range(3)])


def test_a_patience_that_does_nothing_with_flower_is_said(quiet_config, caplog):
    """A shared config's early stopping (the demo's patience of 4) did nothing, silently."""
    with caplog.at_level("WARNING"):
        flower.server_app(make_mlp, _config(quiet_config, early_stopping_patience=0))
        assert "does nothing with Flower" not in caplog.text  # off, as written
        flower.server_app(make_mlp, _config(quiet_config, early_stopping_patience=4))
    assert "early_stopping_patience=4 does nothing with Flower" in caplog.text


def test_bad_arguments_are_refused_before_anything_runs(quiet_config):
    config = _config(quiet_config)
    with pytest.raises(TypeError, match="model_fn must be a callable, got 3"):
        flower.server_app(3, config)
    with pytest.raises(TypeError, match="data_fn must be a callable"):
        flower.client_app(make_mlp, [1, 2], config)
    with pytest.raises(ValueError, match="scheduler_type='plateau' is not supported with Flower"):
        flower.server_app(make_mlp, _config(quiet_config, scheduler_type="plateau"))
    with pytest.raises(ValueError, match=r"ema_decay=0\.9 is not supported with Flower"):
        flower.server_app(make_mlp, _config(quiet_config, ema_decay=0.9))
    with pytest.raises(ValueError, match="class_weights are not supported with Flower"):
        flower.server_app(make_mlp, _config(quiet_config, class_weights="balanced"))
    # stops the server does not make were accepted and did nothing
    for stop, said in (
        ({"max_time": 60}, "max_time=60"),
        ({"stop_when": "val_accuracy >= 0.9"}, "stop_when=('val_accuracy >= 0.9',)"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{said} is not supported with Flower")):
            flower.server_app(make_mlp, _config(quiet_config, **stop))


def test_client_learning_rates_follow_the_schedule_per_round(quiet_config):
    config = _config(quiet_config, scheduler_type="cosine", warmup_steps=2, learning_rate=0.1)
    rates = flower.client_learning_rates(config, 5)
    assert rates[:2] == pytest.approx([0.05, 0.1])
    assert rates[2] > rates[3] > rates[4] > 0


def test_an_earlier_runs_results_are_kept_unless_overwrite_is_set(quiet_config):
    config = _config(
        quiet_config,
        num_epochs=1,
        overwrite_output_dir=False,
        mode_settings={"federated": {"clients": 3}},
    )
    clients = _clients()
    _flower_run(config, clients, evaluate_on_clients=False)
    saved = (Path(config.output_dir) / "final_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds an earlier Flower run's results"):
        _flower_run(config, clients, evaluate_on_clients=False)
    assert (Path(config.output_dir) / "final_model.safetensors").read_bytes() == saved
    again = _config(
        quiet_config,
        num_epochs=2,
        overwrite_output_dir=True,
        mode_settings={"federated": {"clients": 3}},
    )
    _flower_run(again, clients, evaluate_on_clients=False)
    rounds = read_jsonl(Path(config.output_dir) / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]  # replaced, not appended


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("example", ["flower_digits", "flower_config", "flower_config_scaffold"])
def test_the_example_app_trains_on_a_real_superlink_and_two_supernodes(tmp_path, example):
    """An example app under Flower's deployment runtime: a SuperLink, two SuperNodes (each
    its own process, talking HTTP on loopback) and `flwr run`. flower_digits is Python
    (traineval.federated.flower); flower_config is traineval.federated.flower_app with a config
    file, also with
    SCAFFOLD (plain SGD clients, the controls kept by the server)."""
    bin_dir = Path(sys.executable).parent
    link = _free_port()
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    (home / ".flwr" / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n'
        f'[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    output = tmp_path / "out"
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    logs = [(tmp_path / f"{name}.log").open("w") for name in ("link", "node0", "node1")]
    link_command = ["flower-superlink", "--insecure", "--port", str(link)]
    link_command.append("--disable-runtime-dependency-installation")  # traineval is installed
    node_commands = [
        ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port"]
        for _ in (0, 1)
    ]
    for i, command in enumerate(node_commands):
        command += [str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2"]
    commands = [link_command, *node_commands]
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            processes.append(
                subprocess.Popen(command, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
            )
            time.sleep(3)
        app = Path(__file__).resolve().parents[1] / "examples" / example.removesuffix("_scaffold")
        # as docs/modes-federated.md writes it: the settings in Flower's run config
        extra = ["--run-config", f'rounds=2 nodes=2 output-dir="{output}"']
        scaffold = [
            "mode.control_variates=true",
            "training.optimizer_type=sgd",
            "training.momentum=0",
            "training.weight_decay=0",
            "training.learning_rate=0.1",
        ]
        if example.startswith("flower_config"):
            config = tmp_path / "run.yaml"
            config.write_text(
                (Path(traineval.__file__).parent / "configs" / "demo.yaml").read_text()
                + "\n# test\nmode: federated\n"
            )
            settings = RunConfig.from_yaml(
                config,
                [
                    "training.num_epochs=2",
                    "mode.clients=2",
                    "training.warmup_steps=0",
                    f"training.output_dir={output}",
                    *(scaffold if example.endswith("scaffold") else []),
                ],
            )
            config.write_text(yaml.safe_dump(settings.to_dict()))
            extra = ["--run-config", f'traineval-config="{config}"']
        run = subprocess.run(
            ["flwr", "run", str(app), "test", "--stream", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rounds = read_jsonl(output / "metrics.jsonl")
        server = [r["server_accuracy"] for r in rounds if r["event"] == "server_evaluation"]
        assert len(server) == 3  # before training, after rounds 1 and 2
        assert server[-1] > 0.5 > server[0]  # trained, from about 0.1 (chance)
        if example.startswith("flower_config"):
            test = json.loads((output / "evaluation" / "metrics.json").read_text())["test"]
            assert test["accuracy"] > 0.5
        if example.endswith("scaffold"):  # the server learned both clients' controls
            saved = torch.load(output / "checkpoints" / "last.pt", weights_only=True)
            assert sorted(saved["controls"]["client_controls"]) == ["0", "1"]
        assert [r["round"] for r in rounds if r["event"] == "train"] == [1, 2]
        assert (output / "final_model.safetensors").exists()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def test_flower_equals_the_simulation_with_shuffling_clients_and_dropout(quiet_config, tmp_path):
    """Clients seed their shuffle and dropout from the run seed, the round and the client
    (Flower: its partition-id) in both: with every client in every round, the same weights."""
    x, y = make_classification(n=48).tensors
    shuffled = [
        DataLoader(TensorDataset(x[i::3], y[i::3]), batch_size=4, shuffle=True) for i in range(3)
    ]

    def model_fn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    settings = {"mode_settings": {"federated": {"clients": 3, "local_epochs": 2}}, "num_epochs": 3}
    simulated = model_fn()
    TrainingManager(_config(quiet_config, **settings)).train(
        simulated, shuffled, mode=TrainingMode.FEDERATED
    )
    flower_config = _config({**quiet_config, "output_dir": str(tmp_path / "fl")}, **settings)
    federated = _flower_run(flower_config, shuffled, model_fn=model_fn, evaluate_on_clients=False)
    for a, b in zip(federated.parameters(), simulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_clients_shuffle_depends_on_seed_round_and_node_not_on_visit_order(quiet_config):
    """Flower visits the sampled nodes in random order (Python's `random`); clients whose
    loaders shuffle from the global generator must still train the same way."""
    x, y = make_classification(n=48).tensors
    shuffled = [
        DataLoader(TensorDataset(x[i::3], y[i::3]), batch_size=4, shuffle=True) for i in range(3)
    ]

    def unseeded_mlp():  # make_mlp() seeds the global generator: it would hide the problem
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    results = []
    for order_seed in (0, 3):
        random.seed(order_seed)  # another visiting order of the three nodes, in both rounds
        config = _config(quiet_config, num_epochs=2, mode_settings={"federated": {"clients": 3}})
        results.append(
            _flower_run(config, shuffled, model_fn=unseeded_mlp, evaluate_on_clients=False)
        )
    for a, b in zip(*(m.parameters() for m in results), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_flower_command_trains_a_config_file_on_in_process_nodes(tmp_path, capsys):
    """`traineval flower`: traineval.federated.flower_app (the config files' app), 3 nodes."""
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    output = tmp_path / "run"
    overrides = ["mode=federated", "training.num_epochs=3", "training.warmup_steps=0"]
    overrides.append(f"training.output_dir={output}")
    code = cli.main(["flower", str(demo), "--nodes", "3", "-q", *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Trained 3 Flower rounds on 3 in-process nodes" in printed
    test = json.loads((output / "evaluation" / "metrics.json").read_text())["test"]
    assert test["accuracy"] > 0.6  # digits, 3 rounds of FedAvg from chance (0.1)
    assert f"accuracy   {test['accuracy']:.4f}" in printed
    rounds = read_jsonl(output / "metrics.jsonl")
    assert [r["round"] for r in rounds if r["event"] == "train"] == [1, 2, 3]
    server = [r["server_accuracy"] for r in rounds if r["event"] == "server_evaluation"]
    assert len(server) == 4  # val split: before training and after each round
    assert RunConfig.from_yaml(output / "config.yaml").mode.clients == 3
    from traineval.federated import flower_app

    model = flower_app.experiment(str(output / "config.yaml")).new_model()
    load_safetensors(model, output / "final_model.safetensors")  # the config's own model
    # `traineval report` reads a Flower run directory: one row per round, the server's
    # evaluation as validation, the best round on the config's monitor (val_accuracy)
    assert cli.main(["report", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "Flower run: 3 rounds; finished" in printed
    accuracy = [r["server_accuracy"] for r in rounds if r["event"] == "server_evaluation"][1:]
    best = max(range(3), key=lambda i: (accuracy[i], -i))
    assert f"best val_accuracy = {accuracy[best]:.4f} at round {best + 1}" in printed
    run = read_run(output)
    assert run.history["epoch"] == [1, 2, 3]
    assert (
        run.history["val_loss"]
        == [r["server_loss"] for r in rounds if r["event"] == "server_evaluation"][1:]
    )
    training = RunConfig.from_yaml(output / "config.yaml").training
    assert run.history["learning_rate"] == flower.client_learning_rates(training, 3)  # cosine
    assert (output / "evaluation" / "learning_curves.png").exists()
    assert "<h2>Per round</h2>" in (output / "report.html").read_text()
    # `traineval evaluate` on a Flower run: its final weights unless told, the same test
    # metrics as the server's own test of the final model
    assert cli.main(["evaluate", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "test metrics, checkpoint final:" in printed
    assert f"accuracy   {test['accuracy']:.4f}" in printed


def test_the_config_app_names_what_it_is_missing(tmp_path):
    from flwr.app import Context, RecordDict

    from traineval.federated import flower_app

    with pytest.raises(ValueError, match="needs `traineval-config = "):
        flower_app.config_path(Context(1, 2, {}, RecordDict(), {}))
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    context = Context(1, 2, {"partition-id": 0}, RecordDict(), {"traineval-config": str(demo)})
    with pytest.raises(ValueError, match="node config 'num-partitions' is missing"):
        flower_app._node_data(context)
    context.node_config["num-partitions"] = 2
    context.node_config["partition-id"] = 2
    with pytest.raises(ValueError, match=r"partition-id=2 is invalid: expected 0\.\.1"):
        flower_app._node_data(context)
    config = tmp_path / "rl.yaml"
    config.write_text("mode: {name: reinforcement, environment: CartPole}\n")
    with pytest.raises(
        ValueError, match=r"mode='ppo' is invalid for traineval\.federated\.flower_app"
    ):
        flower_app.experiment(str(config))


def test_flower_samples_as_many_clients_per_round_as_the_simulation(quiet_config):
    # 5 clients x 0.5: the simulation trains 3 per round (half up); Flower alone would take 2
    config = _config(
        quiet_config, mode_settings={"federated": {"clients": 5, "client_fraction": 0.5}}
    )
    strategy = flower.default_strategy(config, evaluate_on_clients=False)
    assert strategy.min_train_nodes == 3
    assert max(int(5 * strategy.fraction_train), strategy.min_train_nodes) == 3


def test_which_clients_train_each_round_follows_the_seed(quiet_config, tmp_path):
    """Flower picks a round's nodes with Python's `random`: the server seeds it."""
    clients = _clients()
    runs = []
    for name in ("a", "b"):
        random.seed(len(runs))  # whatever the caller's state, the run's seed decides
        config = _config(
            {**quiet_config, "output_dir": str(tmp_path / name)},
            num_epochs=3,
            mode_settings={"federated": {"clients": 3, "client_fraction": 0.34}},
        )
        runs.append(_flower_run(config, clients, evaluate_on_clients=False))
    for a, b in zip(*(m.parameters() for m in runs), strict=True):
        torch.testing.assert_close(a, b)


def _resumable_config(quiet_config, output, **overrides):
    """5 rounds of FedAvgM (server momentum carries over rounds) on 2 of 3 nodes per round
    (Flower draws them), warmup + cosine client rates (indexed by the run's round)."""
    federated = {"clients": 3, "client_fraction": 0.5, "server_lr": 0.8, "server_momentum": 0.5}
    federated.update(overrides.pop("mode_settings", {}).get("federated", {}))
    settings = {
        "mode_settings": {"federated": federated},
        "scheduler_type": "cosine",
        "warmup_steps": 1,
        "num_epochs": 5,
        "overwrite_output_dir": False,
        **overrides,
    }
    return _config({**quiet_config, "output_dir": str(output)}, **settings)


def _shuffled_clients():
    x, y = make_classification(n=48).tensors
    return [
        DataLoader(TensorDataset(x[i::3], y[i::3]), batch_size=4, shuffle=True) for i in range(3)
    ]


def _interrupting_evaluation(at_round=None):
    """The server's evaluation; a KeyboardInterrupt (Ctrl-C) during round `at_round`."""
    val = make_classification(n=20, seed=3).tensors
    rounds = iter(range(100))

    def evaluate(model):
        if next(rounds) == at_round:
            raise KeyboardInterrupt
        with torch.no_grad():
            return {"loss": float(nn.functional.cross_entropy(model(val[0]), val[1]))}

    return evaluate


@pytest.mark.parametrize("scaffold", [False, True], ids=["fedavgm", "scaffold"])
def test_a_stopped_flower_run_resumes_to_the_uninterrupted_weights(
    quiet_config, tmp_path, scaffold
):
    """Also with SCAFFOLD: the server's checkpoint carries every client's control."""
    clients = _shuffled_clients()
    extra = {"mode_settings": {"federated": {"control_variates": True}}} if scaffold else {}
    straight = _flower_run(
        _resumable_config(quiet_config, tmp_path / "straight", **extra),
        clients,
        server_evaluate=_interrupting_evaluation(),
        evaluate_on_clients=False,
    )
    config = _resumable_config(quiet_config, tmp_path / "stopped", **extra)
    with pytest.raises(KeyboardInterrupt):  # during round 3: rounds 1 and 2 are saved
        _flower_run(
            config,
            clients,
            server_evaluate=_interrupting_evaluation(at_round=3),
            evaluate_on_clients=False,
        )
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["round"] == 2
    assert saved["strategy"]["momentum"] is not None
    assert (saved["controls"] is not None) == scaffold
    with pytest.raises(ValueError, match="continue it with resume_from='auto'"):
        _flower_run(config, clients, evaluate_on_clients=False)  # nothing is overwritten
    random.seed(123)  # the caller's random state does not matter: the checkpoint's does
    resumed = _flower_run(
        config,
        clients,
        server_evaluate=_interrupting_evaluation(),
        evaluate_on_clients=False,
        resume_from="auto",
    )
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    records = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("straight", "stopped")]
    assert records[0] == records[1]  # every round's train and server records, once
    assert [r["round"] for r in records[1] if r["event"] == "train"] == [1, 2, 3, 4, 5]


def test_resuming_a_flower_run_checks_what_it_resumes(quiet_config, tmp_path, caplog):
    clients = _shuffled_clients()
    output = tmp_path / "run"
    config = _resumable_config(quiet_config, output, num_epochs=2)
    # nothing to resume: a fresh run (run config key, as `flwr run --run-config` sets it)
    client = flower.client_app(make_mlp, lambda c: (clients[c.node_config["p"]], None), config)
    server = flower.server_app(make_mlp, config, evaluate_on_clients=False)
    nodes = [{"p": i} for i in range(3)]
    flower.run_local(server, client, nodes, {"traineval-resume": "auto"})
    finished = (output / "final_model.safetensors").read_bytes()
    # a finished run: nothing to do, nothing rewritten
    with caplog.at_level("WARNING", logger="traineval.federated.flower"):
        flower.run_local(server, client, nodes, {"traineval-resume": True})
    assert "finished its 2 rounds; nothing to resume" in caplog.text
    assert (output / "final_model.safetensors").read_bytes() == finished
    # stopped after the last round's checkpoint, before the final model: only that is done
    (output / "final_model.safetensors").unlink()
    flower.run_local(server, client, nodes, {"traineval-resume": "auto"})
    assert (output / "final_model.safetensors").read_bytes() == finished
    # a config that changes which data the rounds draw is refused
    other = _resumable_config(quiet_config, output, num_epochs=3, seed=7)
    with pytest.raises(ValueError, match=r"cannot resume: .*seed: checkpoint 42, now 7"):
        _flower_run(other, clients, evaluate_on_clients=False, resume_from="auto")
    with pytest.raises(ValueError, match="traineval-resume=3 is invalid"):
        flower.run_local(server, client, nodes, {"traineval-resume": 3})
    not_flower = tmp_path / "other.pt"
    torch.save({"format": "traineval-checkpoint"}, not_flower)
    with pytest.raises(ValueError, match="is not a traineval Flower checkpoint"):
        _flower_run(config, clients, evaluate_on_clients=False, resume_from=not_flower)


def test_the_flower_command_extends_a_finished_run_with_resume(tmp_path, capsys):
    """2 rounds, then `--resume auto` with num_epochs=3: the third round continues the run
    (same weights as 3 rounds straight; a constant rate, so the schedule does not change)."""
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    common = ["mode=federated", "training.warmup_steps=0", "training.scheduler_type=constant"]

    def flower_command(output, rounds, *extra):
        overrides = [*common, f"training.num_epochs={rounds}", f"training.output_dir={output}"]
        return cli.main(["flower", str(demo), "--nodes", "3", "-q", *overrides, *extra])

    def summary(name):
        return json.loads((tmp_path / name / "summary.json").read_text())

    assert flower_command(tmp_path / "straight", 3) == 0
    assert flower_command(tmp_path / "extended", 2) == 0
    assert (summary("extended")["status"], summary("extended")["rounds_done"]) == ("finished", 2)
    assert flower_command(tmp_path / "extended", 3) == 2  # refused: it would overwrite
    assert "continue it with resume_from='auto'" in capsys.readouterr().err
    assert summary("extended")["status"] == "finished"  # the refused start changed nothing
    assert flower_command(tmp_path / "extended", 3, "--resume", "auto") == 0
    assert (summary("extended")["status"], summary("extended")["rounds_done"]) == ("finished", 3)
    assert summary("extended")["test_metrics"]["accuracy"] > 0
    assert "Trained Flower round 3 (resumed after round 2)" in capsys.readouterr().out
    assert flower_command(tmp_path / "extended", 3, "--resume", "auto") == 0
    assert "Nothing to resume: the Flower run in" in capsys.readouterr().out
    tested = tmp_path / "extended" / "evaluation" / "metrics.json"
    tested.unlink()  # stopped in its test evaluation: the resume said "Nothing to resume"
    assert cli.main(["report", str(tmp_path / "extended")]) == 0  # (it said nothing of it)
    assert "Flower run: 3 rounds; not finished (3 of 3 rounds, no final model or test)" in (
        capsys.readouterr().out
    )
    assert flower_command(tmp_path / "extended", 3, "--resume", "auto") == 0
    assert tested.exists()
    capsys.readouterr()
    (tmp_path / "extended" / "final_model.safetensors").unlink()  # stopped just before it
    assert flower_command(tmp_path / "extended", 3, "--resume", "auto") == 0
    assert "Saved the final model of the 3 finished Flower rounds" in capsys.readouterr().out
    assert (tmp_path / "extended" / "final_model.safetensors").exists()
    straight, extended = (
        json.loads((tmp_path / name / "evaluation" / "metrics.json").read_text())["test"]
        for name in ("straight", "extended")
    )
    assert extended == straight
    rounds = read_jsonl(tmp_path / "extended" / "metrics.jsonl")
    assert [r["round"] for r in rounds if r["event"] == "train"] == [1, 2, 3]
    assert cli.main(["flower", str(demo), "--resume", "auto"]) == 2
    assert "--resume needs the run directory" in capsys.readouterr().err


def test_a_custom_strategy_serves_a_run_and_its_resume_in_one_process(quiet_config, tmp_path):
    """The server delegates to the strategy (its round bookkeeping wraps it): running the
    app again (here: resuming) uses the user's object as it is."""
    from flwr.serverapp.strategy import FedAvg

    clients = _shuffled_clients()
    config = _resumable_config(quiet_config, tmp_path / "run", num_epochs=2)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
    client = flower.client_app(make_mlp, lambda c: (clients[c.node_config["p"]], None), config)
    server = flower.server_app(make_mlp, config, strategy=strategy, evaluate_on_clients=False)
    nodes = [{"p": i} for i in range(3)]
    flower.run_local(server, client, nodes)
    assert "configure_train" not in vars(strategy)  # the user's object is untouched
    longer = _resumable_config(quiet_config, tmp_path / "run", num_epochs=3)
    server = flower.server_app(make_mlp, longer, strategy=strategy, evaluate_on_clients=False)
    flower.run_local(server, client, nodes, {"traineval-resume": "auto"})
    rounds = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rounds if r["event"] == "train"] == [1, 2, 3]


def test_a_custom_strategy_with_state_gets_it_back_on_resume(quiet_config, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    class Counting(FedAvg):
        """Counts the rounds it aggregated: state the server must checkpoint."""

        def __init__(self):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
            self.aggregated = []

        def aggregate_train(self, server_round, replies):
            self.aggregated.append(server_round)
            return super().aggregate_train(server_round, replies)

        def state_dict(self):
            return {"aggregated": list(self.aggregated)}

        def load_state_dict(self, state):
            self.aggregated = list(state["aggregated"])

    clients = _shuffled_clients()
    client = flower.client_app(
        make_mlp, lambda c: (clients[c.node_config["p"]], None), _config(quiet_config)
    )
    nodes = [{"p": i} for i in range(3)]
    first = Counting()
    config = _resumable_config(quiet_config, tmp_path / "run", num_epochs=2)
    flower.run_local(
        flower.server_app(make_mlp, config, strategy=first, evaluate_on_clients=False),
        client,
        nodes,
    )
    assert first.aggregated == [1, 2]
    resumed = Counting()  # a fresh object, as in a new process
    longer = _resumable_config(quiet_config, tmp_path / "run", num_epochs=3)
    server = flower.server_app(
        make_mlp, longer, strategy=resumed, evaluate_on_clients=False, resume_from="auto"
    )
    flower.run_local(server, client, nodes)
    assert resumed.aggregated == [1, 2, 3]  # its saved state, then the run's third round


def test_a_flower_checkpoint_of_an_earlier_version_resumes(quiet_config, tmp_path):
    clients = _shuffled_clients()
    straight = _flower_run(
        _resumable_config(quiet_config, tmp_path / "straight", num_epochs=3),
        clients,
        evaluate_on_clients=False,
    )
    _flower_run(
        _resumable_config(quiet_config, tmp_path / "old", num_epochs=2),
        clients,
        evaluate_on_clients=False,
    )
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)
    config = {k: v for k, v in saved["config"].items() if k != "mode_settings"}
    legacy = {  # the layout earlier versions wrote
        "format": "traineval-flower-checkpoint",
        "version": 1,
        "round": saved["round"],
        "rounds": saved["rounds"],
        "arrays": saved["model"],
        "strategy": saved["strategy"],
        "rng": saved["rng"],
        "records": saved["records"],
        "config": {**config, "federated_clients": 3, "federated_client_fraction": 0.5},
    }
    torch.save(legacy, path)
    resumed = _flower_run(
        _resumable_config(quiet_config, tmp_path / "old", num_epochs=3),
        clients,
        evaluate_on_clients=False,
        resume_from="auto",
    )
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_scaffold_on_flower_needs_plain_sgd_clients_as_in_the_simulation(quiet_config):
    from traineval.modes import Federated

    adam = _config(quiet_config, optimizer_type="adamw")
    refusal = r"control_variates=True \(SCAFFOLD\) .* optimizer_type='sgd'"
    with pytest.raises(ValueError, match=refusal):
        flower.server_app(make_mlp, adam, federated=Federated(control_variates=True))
    with pytest.raises(ValueError, match=refusal):
        flower.client_app(
            make_mlp, lambda c: (None, None), adam, federated=Federated(control_variates=True)
        )


def test_the_node_count_is_checked_against_mode_clients_before_the_first_round(
    quiet_config, caplog
):
    """A deployment with fewer SuperNodes than mode.clients would wait forever without a
    word: after a grace period the server names the shortfall and both fixes; nodes that
    connect within it are waited for silently; a LocalGrid with too few is refused."""
    from traineval.modes import Federated

    server = flower.FlowerServer(make_mlp, _config(quiet_config), federated=Federated(clients=4))

    class Deployment:  # a SuperLink's grid: the connected nodes, polled
        def __init__(self, *counts):
            self.counts = list(counts)

        def get_node_ids(self):
            count = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
            return list(range(count))

    with caplog.at_level("WARNING"):
        server._check_nodes(Deployment(2), wait_seconds=0.05, poll_seconds=0.01)
    assert (
        "mode.clients=4: the server waits for 4 connected SuperNodes before the first round "
        "and 2 are connected after 0 s: start 2 more, or set mode.clients=2 in the config"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        server._check_nodes(Deployment(1, 3, 4), wait_seconds=5, poll_seconds=0.01)
    assert caplog.text == ""

    local = flower.LocalGrid(flower.client_app(make_mlp, lambda c: (None, None), server.config),
                             [{"partition-id": i} for i in range(2)])  # fmt: skip
    with pytest.raises(ValueError, match=r"mode\.clients=4: .* this LocalGrid has 2"):
        server._check_nodes(local)


def test_the_flower_command_prints_each_flower_line_once(tmp_path):
    """Flower's logger has a handler of its own: its lines are not passed on to ours too,
    and carry no colour codes into a file."""
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    command = [sys.executable, "-m", "traineval.cli", "flower", str(demo), "--nodes", "2"]
    command += ["mode=federated", "training.num_epochs=1", f"training.output_dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("[ROUND 1/1]") == 1
    assert "\x1b[" not in done.stderr


def test_a_flower_command_stopped_by_sigterm_says_where_and_its_summary_says_so(
    tmp_path, capsys, monkeypatch
):
    """`traineval flower` wrote no summary.json (a wrapper could not read its status), and
    a stop of a run in the default folder said 'training.output_dir=<the run directory>'
    without naming it."""
    demo = Path(traineval.__file__).parent / "configs" / "demo.yaml"
    monkeypatch.chdir(tmp_path)
    aggregate = flower.RunStrategy.aggregate_train

    def stopping(self, server_round, replies):
        if server_round == 2:
            from traineval.training.stopping import Stopped

            raise Stopped("SIGTERM")  # what the command's SIGTERM handler raises
        return aggregate(self, server_round, replies)

    monkeypatch.setattr(flower.RunStrategy, "aggregate_train", stopping)
    args = ["flower", str(demo), "--nodes", "2", "-q", "mode=federated", "training.num_epochs=3"]
    assert cli.main(args) == 143
    said = capsys.readouterr().err.strip().splitlines()[-1]
    folder = next((tmp_path / "runs").iterdir()).relative_to(tmp_path)
    assert said.endswith(f"--resume auto and training.output_dir={folder}"), said
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["status"], summary["rounds_done"]) == ("interrupted", 1)
    assert summary["stop_reason"] == "interrupted by SIGTERM"
    monkeypatch.setattr(flower.RunStrategy, "aggregate_train", aggregate)
    assert cli.main([*args, f"training.output_dir={folder}", "--resume", "auto"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["status"], summary["rounds_done"]) == ("finished", 3)


def test_a_flower_run_takes_no_folder_of_a_cross_validation(tmp_path):
    """Its metrics.jsonl and summary.json would have read as the cross-validation's."""
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "cv_plan.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a cross-validation: a Flower run goes in"):
        flower._claim(cv, overwrite=True)
    flower._claim(tmp_path / "new", overwrite=False)  # a new folder: taken
