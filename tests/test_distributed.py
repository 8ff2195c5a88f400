"""Data-parallel training: 2 ranks on gloo / CPU under torchrun, against single-process runs.

The torchrun tests are marked slow (CI runs them after the fast suite); the helpers that need
no process group run in the fast suite.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, WeightedRandomSampler

import distributed_worker as worker
import traineval
from traineval import EvaluationConfig, Evaluator, TrainingConfig, TrainingManager, TrainingMode
from traineval.config import TaskType
from traineval.data.sharding import ShardSampler, shard_eval_loader, shard_train_loader
from traineval.runs.checkpoint import load_checkpoint_file
from traineval.system.distributed import Distributed

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(
    scenario: str, out: Path, timeout: float = 240, ranks: int = 2
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        str(WORKER),
        scenario,
        str(out),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


# -- without a process group ---------------------------------------------------------------


def test_a_transport_error_in_torchs_own_collectives_names_the_other_rank():
    """DDP's gradient all-reduce and FSDP's gathers run inside torch: a rank that died made
    the others fail with gloo's bare 'Connection closed by peer ... GLHF!'."""
    from traineval.system.distributed import CollectiveError, collectives_inside

    job = Distributed(rank=0, world_size=2)
    gloo = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8601"

    def raised(job, error):
        with collectives_inside(job, "the pass"):
            raise error

    with pytest.raises(CollectiveError, match=r"rank 0 of 2: the pass failed .*another rank"):
        raised(job, RuntimeError(gloo))
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as kept:
        raised(job, RuntimeError("a variable was modified by an inplace operation"))
    assert type(kept.value) is RuntimeError  # the model's own error: as it is
    with pytest.raises(RuntimeError, match="Connection closed") as alone:
        raised(Distributed(), RuntimeError(gloo))  # no job: nothing to name
    assert type(alone.value) is RuntimeError


def test_a_single_process_job_has_no_op_collectives():
    job = Distributed()
    assert job.is_main
    assert not job.enabled
    assert job.sum([1.5, 2.0]) == [1.5, 2.0]
    assert job.gather({"a": 1}) == [{"a": 1}]
    assert job.any(True)
    assert not job.any(False)


@pytest.mark.parametrize("length", [0, 1, 8, 9])
def test_shards_cover_every_sample_exactly_once(length):
    shards = [list(ShardSampler(length, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(length))
    assert [len(ShardSampler(length, rank, 2)) for rank in range(2)] == [len(s) for s in shards]


def test_the_train_loader_gets_a_distributed_sampler_with_its_shuffle():
    data = worker.data(20)
    loader = DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    sharded = shard_train_loader(loader, Distributed(rank=1, world_size=2), seed=5)
    sampler = sharded.sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    assert sampler.shuffle
    assert sampler.rank == 1
    assert sampler.num_replicas == 2
    assert sampler.seed == 5
    assert sharded.batch_size == 4
    assert len(sharded) == 3
    # worker seeds differ per rank: the generator is offset by the rank
    assert sharded.generator.initial_seed() == 4
    sequential = shard_train_loader(DataLoader(data, batch_size=4), Distributed(0, 2), seed=5)
    assert not sequential.sampler.shuffle


def test_a_custom_train_sampler_is_refused_with_advice():
    data = worker.data(20)
    loader = DataLoader(data, batch_size=4, sampler=WeightedRandomSampler([1.0] * 20, 20))
    with pytest.raises(ValueError, match=r"custom sampler.*DistributedSampler"):
        shard_train_loader(loader, Distributed(0, 2), seed=0)


def test_the_validation_loader_is_split_without_padding():
    loader = DataLoader(worker.data(9), batch_size=2)
    sizes = [len(shard_eval_loader(loader, Distributed(r, 2)).sampler) for r in range(2)]
    assert sizes == [5, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_nccl_without_cuda_is_refused_before_joining(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="distributed_backend='nccl' needs CUDA"):
        TrainingManager(TrainingConfig(device="cpu", distributed_backend="nccl"))


def test_distributed_settings_are_validated():
    with pytest.raises(ValueError, match="distributed_backend='mpi' is invalid"):
        TrainingConfig(distributed_backend="mpi")
    with pytest.raises(ValueError, match="distributed_timeout_seconds=0 is invalid"):
        TrainingConfig(distributed_timeout_seconds=0)


def test_mode_combinations_torchrun_cannot_run_are_refused_with_the_reason(tmp_path):
    import types

    from traineval.modes import Context, Federated, MetaLearning, Reinforcement, SemiSupervised

    def context(config):
        job = types.SimpleNamespace(enabled=True)  # as under torchrun
        fields = dict.fromkeys(
            ("train_data", "val_loader", "loss_function", "model_loss", "output_transform")
        )
        return Context(
            config, **fields, user_loss=False, label_shift=0, job=job, device=None, precision=None
        )

    config = TrainingConfig(output_dir=str(tmp_path))
    fsdp = TrainingConfig(output_dir=str(tmp_path), distributed_strategy="fsdp")
    for mode in (MetaLearning(), Federated(), Reinforcement()):
        mode.check(context(config))  # DDP: supported
        with pytest.raises(ValueError, match="distributed_strategy='fsdp' is not supported"):
            mode.check(context(fsdp))
    # Mean Teacher calls its teacher with the whole average, which FSDP keeps in shards
    teacher = SemiSupervised(algorithm="mean_teacher", augmentation="tabular")
    ema = {"output_dir": str(tmp_path), "ema_decay": 0.9}
    teacher.check(context(TrainingConfig(**ema)))
    SemiSupervised().check(context(TrainingConfig(**ema, distributed_strategy="fsdp")))
    with pytest.raises(ValueError, match="'fsdp' is not supported with algorithm='mean_teacher'"):
        teacher.check(context(TrainingConfig(**ema, distributed_strategy="fsdp")))


# -- two ranks under torchrun ----------------------------------------------------------------


def single_process_run(out: Path, net: torch.nn.Module, **overrides):
    """The reference: one process, batch 32, the same data and config as the ranks."""
    manager = TrainingManager(worker.config(out, batch_size=32, **overrides))
    result = manager.train(
        net,
        DataLoader(worker.data(), batch_size=32),
        DataLoader(worker.data(9, seed=5), batch_size=2),
        task_type=TaskType.CLASSIFICATION,
    )
    return net.state_dict(), result.training_history


def assert_ranks_match_one_process(folder: Path, name: str, reference, history) -> None:
    """Both ranks' weights, train losses and validation metrics (`worker.save_run`) equal
    those of one process: `reference` weights and its training `history`."""
    for rank in (0, 1):
        weights = torch.load(folder / f"{name}-weights-{rank}.pt")
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
        logged = json.loads((folder / f"{name}-history-{rank}.json").read_text())
        assert logged["train_loss"] == pytest.approx(history["train_loss"], abs=1e-6)
        for mine, theirs in zip(logged["val_metrics"], history["val_metrics"], strict=True):
            assert mine["accuracy"] == theirs["accuracy"]
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6)


def assert_same_weights(straight: Path, resumed: Path) -> None:
    """A resumed run's saved weights equal the uninterrupted run's, bit for bit."""
    expected, actual = torch.load(straight), torch.load(resumed)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.slow
def test_two_ranks_of_16_equal_one_process_of_32(tmp_path):
    ok(torchrun("equivalence", tmp_path))
    reference, history = single_process_run(tmp_path / "single", worker.model())
    for name in ("plain", "accumulated"):  # 2 x 16, and 2 x 8 x 2 accumulated (no_sync)
        # train loss summed over ranks; val metrics over all 9 samples (5 + 4 per rank)
        assert_ranks_match_one_process(tmp_path, name, reference, history)
    # rank 0 alone wrote the run's files
    events = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    assert len({json.loads(line)["step"] for line in events if '"train"' in line}) == len(
        [line for line in events if '"event": "train"' in line]
    )


@pytest.mark.slow
def test_gpt2_with_its_own_loss_two_ranks_of_8_equal_one_batch_of_16(tmp_path):
    """Each rank's padded rows keep different numbers of shifted label positions: the
    ranks' micro-batches are weighed by them, so the update is the big batch's."""
    pytest.importorskip("transformers")
    from test_huggingface import big_batch_reference, padded_lm_rows

    ok(torchrun("gpt2", tmp_path))
    reference = big_batch_reference(padded_lm_rows()).state_dict()
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"gpt2-weights-{rank}.pt")
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_semi_supervised_ranks_normalise_each_term_over_all_ranks(tmp_path):
    """Each rank's micro-batches hold different labeled / unlabeled counts; the gradient
    must still be one process's on the whole batch of 32."""
    ok(torchrun("semi_supervised", tmp_path))
    net = worker.model()
    TrainingManager(
        worker.config(
            tmp_path / "single",
            batch_size=32,
            mode_settings={"semi_supervised": {"pseudo_label_threshold": 0.4}},
        )
    ).train(
        net,
        DataLoader(worker.partly_labeled(), batch_size=32),
        mode=TrainingMode.SEMI_SUPERVISED,
    )
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"semi-weights-{rank}.pt")
        for key, value in net.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_meta_learning_ranks_average_their_tasks_meta_gradients(tmp_path):
    """MAML's inner loop cannot run through DDP: the loop averages the ranks' gradients.
    Two ranks of 2 tasks must equal one process of 4, weights and validation alike."""
    ok(torchrun("meta_learning", tmp_path))
    net, result = worker.meta_run(tmp_path / "single", batch=4)
    assert_ranks_match_one_process(tmp_path, "meta", net.state_dict(), result.training_history)


@pytest.mark.slow
def test_a_users_own_mode_trains_data_parallel_like_one_process(tmp_path):
    """ProtoNet, a Mode of the tests' own, DDP-wrapped: two ranks of 2 tasks per update
    equal one process of 4 (its own evaluate runs on every rank's whole val loader)."""
    ok(torchrun("protonet", tmp_path))
    net, result = worker.protonet_run(tmp_path / "single", batch=4)
    assert_ranks_match_one_process(tmp_path, "protonet", net.state_dict(), result.training_history)


@pytest.mark.slow
def test_federated_ranks_share_the_rounds_clients_and_match_one_process(tmp_path):
    """Each rank trains its share of a round's clients (dropout on: a client's randomness
    follows its own seed); the all-reduced average equals one process training them all."""
    ok(torchrun("federated", tmp_path))
    net, result = worker.federated_run(tmp_path / "single")
    assert_ranks_match_one_process(tmp_path, "federated", net.state_dict(), result.training_history)


def _policy_update_from(episodes, net, settings):
    """The update one process computes from these episodes, written out plainly."""
    gamma, cap = 0.99, settings["max_episode_steps"]
    log_probs, entropies, values, returns = [], [], [], []
    for e in episodes:
        logits, value = net(e["obs"][:-1])
        value = value.squeeze(-1)
        logp = logits.log_softmax(-1)
        log_probs.append(logp.gather(1, e["actions"][:, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
        values.append(value)
        running = 0.0
        if not e["terminated"] and len(e["actions"]) >= cap:  # cut off: bootstrap
            with torch.no_grad():
                running = float(net(e["obs"][-1:])[1][0])
        out = []
        for reward in reversed(e["rewards"].tolist()):
            running = reward + gamma * running
            out.append(running)
        returns.append(torch.tensor(out[::-1], dtype=torch.float32))
    log_prob, entropy = torch.cat(log_probs), torch.cat(entropies)
    value, ret = torch.cat(values), torch.cat(returns)
    advantage = ret - value.detach()
    advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    loss = (
        -(log_prob * advantage).mean()
        + 0.5 * torch.nn.functional.mse_loss(value, ret)
        - 0.01 * entropy.mean()
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=worker.RL_SETTINGS["learning_rate"])
    loss.backward()
    optimizer.step()
    return net.state_dict()


@pytest.mark.slow
def test_reinforcement_ranks_play_their_own_episodes_and_update_as_one_batch(tmp_path):
    """Each rank plays 3 episodes of its own; the update equals one process's update from
    all 6 (global means, advantage normalisation over every rank's steps)."""
    ok(torchrun("reinforcement", tmp_path))
    saved = [torch.load(tmp_path / f"rl-{rank}.pt") for rank in (0, 1)]
    firsts = [s["episodes"][0]["obs"][0] for s in saved]
    assert not torch.equal(*firsts)  # the ranks played different episodes
    net = worker.ActorCritic()
    net.load_state_dict(saved[0]["initial"])
    episodes = saved[0]["episodes"] + saved[1]["episodes"]
    assert any(not e["terminated"] for e in episodes)  # a bootstrapped one among them
    expected = _policy_update_from(episodes, net, worker.RL_MODE)
    for s in saved:
        for key, value in expected.items():
            torch.testing.assert_close(s["final"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_uneven_validation_shares_give_the_single_process_metrics(tmp_path):
    ok(torchrun("uneven", tmp_path))
    net = worker.model()
    expected = {
        "classification": Evaluator(metrics=worker.user_metrics()).evaluate_model(
            net,
            DataLoader(worker.data(8, seed=3), batch_size=2),
            "cpu",
            task_type=TaskType("classification"),
        ),
        "regression": Evaluator().evaluate_model(
            net,
            DataLoader(worker.regression_data(), batch_size=2),
            "cpu",
            task_type=TaskType("regression"),
        ),
        "one_sample": Evaluator().evaluate_model(
            net,
            DataLoader(torch.utils.data.Subset(worker.data(8, seed=3), [0]), batch_size=2),
            "cpu",
            task_type=TaskType.CLASSIFICATION,
        ),
    }
    assert {"tm_f1", "correct", "balanced"} <= expected["classification"].keys()
    for task in ("classification", "regression"):  # bootstrap intervals: the same too
        mine = worker.user_metrics() if task == "classification" else {}
        evaluator = Evaluator(EvaluationConfig(bootstrap_samples=50), metrics=mine)
        data = worker.data(8, seed=3) if task == "classification" else worker.regression_data()
        intervals = evaluator.evaluate(
            net, DataLoader(data, batch_size=2), device="cpu", task_type=TaskType(task)
        ).intervals
        for rank in (0, 1):
            got = json.loads((tmp_path / f"uneven-{rank}.json").read_text())[f"{task}_intervals"]
            assert got.keys() == intervals.keys()
            for name, bounds in intervals.items():  # float32 outputs of other
                assert got[name] == pytest.approx(list(bounds), rel=1e-6)  # batch groupings
    for rank in (0, 1):
        got = json.loads((tmp_path / f"uneven-{rank}.json").read_text())
        for task, metrics in expected.items():
            assert got[task].keys() == metrics.keys()
            for name, value in metrics.items():
                if name in ("accuracy", "precision", "recall", "f1", "correct", "balanced"):
                    assert got[task][name] == value, (task, name)  # counts: exact
                else:  # float32 batch means over other batches, summed in float64
                    assert got[task][name] == pytest.approx(value, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_two_rank_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, background
):
    monkeypatch.setenv("TRAINEVAL_TEST_ASYNC", "1" if background else "0")
    ok(torchrun("resume_first", tmp_path))
    for rank in (0, 1):  # the signal reached rank 1 only; both stopped at the same step
        message = json.loads((tmp_path / f"interrupted-{rank}.json").read_text())["message"]
        assert "epoch 1, step 4" in message
    ok(torchrun("resume_second", tmp_path))
    for rank in (0, 1):
        assert_same_weights(
            tmp_path / f"straight-weights-{rank}.pt", tmp_path / f"resumed-weights-{rank}.pt"
        )
    # the logged losses too: the checkpoint keeps each rank's running sums (it kept rank
    # 0's, restored on both, so the resumed epoch's train_loss counted rank 0's part twice)
    from test_stops import logged

    assert logged(tmp_path / "interrupted") == logged(tmp_path / "straight")
    # a single process cannot continue a 2-rank run
    with pytest.raises(ValueError, match="world_size: checkpoint 2, now 1"):
        TrainingManager(worker.resume_config(tmp_path / "interrupted")).train(
            worker.model(dropout=0.3), *worker.resume_loaders(), resume_from="auto"
        )


@pytest.mark.slow
def test_a_two_rank_policy_gradient_run_resumes_to_the_uninterrupted_result(tmp_path):
    ok(torchrun("rl_resume_first", tmp_path))
    for rank in (0, 1):  # both ranks stopped at update 4 of 6
        assert "step 4" in (tmp_path / f"rl-interrupted-{rank}.txt").read_text()
    ok(torchrun("rl_resume_second", tmp_path))
    for rank in (0, 1):
        assert_same_weights(tmp_path / f"rl-straight-{rank}.pt", tmp_path / f"rl-resumed-{rank}.pt")


@pytest.mark.slow
def test_a_two_rank_ppo_run_resumes_mid_rollout_to_the_uninterrupted_result(tmp_path):
    """Each rank plays its own environments; the averaged gradients keep one policy; a run
    stopped inside a rollout resumes each rank's rollout and environments exactly."""
    ok(torchrun("ppo_resume_first", tmp_path))
    for rank in (0, 1):
        assert "step 4" in (tmp_path / f"ppo-interrupted-{rank}.txt").read_text()
    saved = torch.load(tmp_path / "ppo-interrupted" / "checkpoints" / "last.pt")
    ranks = saved["step_per_rank"]
    assert ranks[0]["position"] == 4  # inside the rollout of 8 updates
    assert ranks[0]["environments"]["seeds"] != ranks[1]["environments"]["seeds"]
    assert not torch.equal(ranks[0]["rollout"]["observations"], ranks[1]["rollout"]["observations"])
    ok(torchrun("ppo_resume_second", tmp_path))
    for rank in (0, 1):
        assert_same_weights(
            tmp_path / f"ppo-straight-{rank}.pt", tmp_path / f"ppo-resumed-{rank}.pt"
        )
    assert_same_weights(tmp_path / "ppo-straight-0.pt", tmp_path / "ppo-straight-1.pt")
    from test_stops import logged  # each rank's interval sums (train_entropy, ...) kept

    assert logged(tmp_path / "ppo-interrupted") == logged(tmp_path / "ppo-straight")


@pytest.mark.slow
def test_a_failing_rank_stops_the_job(tmp_path):
    started = time.monotonic()
    run = torchrun("failure", tmp_path, timeout=120)
    assert run.returncode != 0
    assert "rank 1 failed on purpose" in run.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_validation_failing_on_one_rank_stops_every_rank_with_its_cause(tmp_path, strategy):
    """Rank 1's metric fails in validation: both ranks stop at once, with one line naming
    the rank and its cause, after saving last.pt (they waited for the 600 s timeout; under
    FSDP, whose evaluation is in lockstep, rank 0 waited in the next batch's forward)."""
    started = time.monotonic()
    name = "validation-failure" + ("" if strategy == "ddp" else f"-{strategy}")
    run = torchrun(name.replace("-", "_"), tmp_path, timeout=200)
    assert run.returncode != 0
    assert time.monotonic() - started < 50  # the job's collective timeout is 60 s
    said = [(tmp_path / f"{name}-{rank}.txt").read_text() for rank in (0, 1)]
    assert said[0] == said[1]
    cause = "rank 1: metric 'count': its update raised RuntimeError: update failed on rank 1"
    where = "validation at epoch 1, step 3 failed"
    assert said[0].startswith(f"EvaluationError (user code): {where}: {cause}; the training")
    assert (tmp_path / name / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_the_ranks_agree_on_a_signal_within_seconds_between_log_steps(tmp_path):
    """Updates of 0.3 s, no log step before the epoch's end at update 32: a signal after
    update 3 stops both ranks at the same update within AGREE_SECONDS (2 s: by update 10),
    not at the epoch's end."""
    import re

    ok(torchrun("signal_between_logs", tmp_path, timeout=200))
    said = [(tmp_path / f"between-logs-{rank}.txt").read_text() for rank in (0, 1)]
    steps = {int(re.search(r"step (\d+)", text).group(1)) for text in said}
    assert len(steps) == 1, said
    assert 3 < steps.pop() <= 10, said
    assert (tmp_path / "between-logs" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_a_hanging_rank_times_the_others_out(tmp_path):
    run = torchrun("hang", tmp_path, timeout=180)
    assert run.returncode != 0
    assert "Timed out" in run.stderr or "timed out" in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_cli_trains_under_torchrun_and_rank_0_reports(tmp_path, strategy):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "traineval.cli",
        "fit",
        str(Path(__file__).parents[1] / "src" / "traineval" / "configs" / "demo.yaml"),
        "training.num_epochs=2",
        f"training.output_dir={tmp_path / 'run'}",
        f"training.distributed_strategy={strategy}",  # fsdp: saves after sharded evaluations
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    ok(run)
    assert run.stdout.count("Test metrics") == 1  # rank 0 reports, rank 1 stays quiet
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert (tmp_path / "run" / "evaluation" / "metrics.json").exists()
    # every rank's samples (each rank's share of the train split, padded to be even): it
    # counted rank 0's alone
    from traineval.commands.experiment import RunConfig, load_data

    rows = len(load_data(RunConfig.from_yaml(tmp_path / "run" / "config.yaml").data).train)
    assert summary["performance"]["samples"] == 2 * (rows + rows % 2)


MODE_OVERRIDES = {
    "federated": ["mode.clients=4", "training.num_epochs=3"],
    "meta_learning": [
        "model.name=mlp",
        "model.options={}",
        "mode.ways=5",
        "mode.shots=1",
        "mode.queries=5",
        "mode.train_episodes=40",
        "mode.eval_episodes=10",
        "training.batch_size=4",
        "training.num_epochs=2",
    ],
    "reinforcement": [
        "mode.environment=CartPole",
        "model.name=actor_critic",
        "model.options={}",
        "training.monitor_metric=val_return",
        "training.num_epochs=2",
        "mode.updates_per_epoch=3",
        "mode.episodes_per_update=2",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODE_OVERRIDES))
def test_the_cli_runs_the_other_modes_under_torchrun(tmp_path, mode):
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"),
        *("2", "-m", "traineval.cli", "fit"),
        str(Path(__file__).parents[1] / "src" / "traineval" / "configs" / "demo.yaml"),
        f"mode={mode}",
        *MODE_OVERRIDES[mode],
        "training.warmup_steps=0",
        f"training.output_dir={tmp_path / 'run'}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    ok(run)
    assert run.stdout.count("Test metrics") == 1  # rank 0 reports, rank 1 stays quiet
    assert (tmp_path / "run" / "evaluation" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_fsdp_trains_like_one_process_and_resumes_exactly(tmp_path, monkeypatch, background):
    monkeypatch.setenv("TRAINEVAL_TEST_ASYNC", "1" if background else "0")
    ok(torchrun("fsdp", tmp_path))
    reference, history = single_process_run(tmp_path / "single", worker.Blocks())
    for name in ("fsdp-plain", "fsdp-accumulated"):
        weights = torch.load(tmp_path / f"{name}-weights.pt")
        assert weights.keys() == reference.keys()  # full weights under the plain names
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
        logged = json.loads((tmp_path / f"{name}-history.json").read_text())
        assert logged["sharded"]
        assert logged["units"] == 3  # the two blocks of the ModuleList, and the root
        assert logged["train_loss"] == pytest.approx(history["train_loss"], abs=1e-6)
        for mine, theirs in zip(logged["val_metrics"], history["val_metrics"], strict=True):
            assert mine["accuracy"] == theirs["accuracy"]  # 3 and 2 batches, in lockstep
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        # each rank wrote its part of the checkpoint; a plain model loads it whole (2 -> 1)
        last = tmp_path / name / "checkpoints" / "last.pt"
        saved = torch.load(last, weights_only=True)
        assert "model" not in saved
        assert saved["distributed_strategy"] == "fsdp"
        assert len(list((last.parent / saved["shards"]).glob("*.distcp"))) == 2
        plain = worker.Blocks()
        traineval.load_checkpoint(last, plain)
        for key, value in weights.items():
            assert torch.equal(plain.state_dict()[key], value), key
        # best.safetensors, written by rank 0 from best's folder: best.pt's weights, whole
        exported = load_file(last.parent / "best.safetensors")
        best = load_checkpoint_file(last.parent / "best.pt")["model"]
        assert exported.keys() == best.keys() == weights.keys()
        assert all(torch.equal(exported[key], value) for key, value in best.items())
    # the best weights restored from rank 0's gathered copy; norms of whole gradients
    reference, history = single_process_run(
        tmp_path / "single-best", worker.Blocks(), **worker.BEST_AND_LAYER_NORMS
    )
    best_epoch = json.loads((tmp_path / "fsdp-best.json").read_text())["best_epoch"]
    assert best_epoch == 1 < len(history["val_metrics"])  # the restore changes the weights
    weights = torch.load(tmp_path / "fsdp-best-weights.pt")
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
    sharded, single = (
        [
            {k: v for k, v in json.loads(line).items() if k.startswith("layer_grad_norm_")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"event": "train"' in line
        ]
        for folder in (tmp_path / "fsdp-best", tmp_path / "single-best")
    )
    assert len(sharded) == len(single) == 2  # log steps
    assert len(single[0]) == 6  # one norm per parameter
    for mine, theirs in zip(sharded, single, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5), key
    for rank, name in itertools.product((0, 1), ("fsdp-interrupted", "fsdp-interrupted-gathered")):
        message = json.loads((tmp_path / f"{name}-{rank}.json").read_text())["message"]
        assert "epoch 2, step 8" in message  # after the best (update 5)
    for rank in (0, 1):  # async: each rank's part written by its writer thread
        writes = json.loads((tmp_path / f"fsdp-writes-{rank}.json").read_text())
        kinds = sorted({kind for kind, _ in writes})
        expected = [["files", "shards"], ["shards"]][rank]  # rank 0 also writes the files
        assert kinds == (expected if background else [])
        assert {thread for _, thread in writes} <= {"traineval-checkpoint"}
    # each rank's best shards travel in the folder, not gathered into the file
    interrupted = tmp_path / "fsdp-interrupted" / "checkpoints" / "last.pt"
    saved = torch.load(interrupted, weights_only=True)
    assert saved["callbacks"]["BestWeights"] == {"best_state": None}
    metadata = (interrupted.parent / saved["shards"] / ".metadata").read_bytes()
    assert b"callbacks.BestWeights.blocks.0.weight" in metadata
    shutil.copytree(tmp_path / "fsdp-interrupted", tmp_path / "fsdp-interrupted-full")
    ok(torchrun("fsdp_resume", tmp_path))
    assert_same_weights(tmp_path / "fsdp-straight-weights.pt", tmp_path / "fsdp-resumed-weights.pt")
    from test_stops import logged  # each rank's running sums, in the sharded checkpoint too

    assert logged(tmp_path / "fsdp-interrupted") == logged(tmp_path / "fsdp-straight")
    # resumed with full checkpoints (the best shards read back whole): the same end
    straight = tmp_path / "fsdp-straight-weights.pt"
    assert_same_weights(straight, tmp_path / "fsdp-resumed-full-weights.pt")
    # full checkpoints (the average gathered into the file), resumed under FSDP: the same end
    gathered = load_checkpoint_file(tmp_path / "fsdp-interrupted-gathered/checkpoints/last.pt")
    assert gathered["shards"] is None
    assert gathered["ema"]["updates"] == gathered["global_step"] == 15
    assert not torch.equal(
        gathered["model"]["head.weight"], gathered["training_weights"]["head.weight"]
    )
    assert_same_weights(straight, tmp_path / "fsdp-resumed-gathered-weights.pt")


@pytest.mark.slow
def test_fsdp_save_failures_are_every_ranks_and_extra_state_survives_a_resume(tmp_path):
    ok(torchrun("fsdp_edges", tmp_path))
    said = [json.loads((tmp_path / f"edges-{rank}.json").read_text()) for rank in (0, 1)]
    for name in ("export-fails-sync", "export-fails-async"):
        for rank in (0, 1):  # rank 0's full disk, said on both ranks
            assert "best.safetensors" in said[rank][name], (name, rank)
            assert "No space left" in said[rank][name], (name, rank)
        folder = tmp_path / name / "checkpoints"
        named = {torch.load(f, weights_only=True)["shards"] for f in folder.glob("*.pt")}
        assert {f.name for f in folder.glob("*.shards-*")} == named  # none left unnamed
        assert not (folder / "best.pt").exists()
    for rank in (0, 1):  # the best's extra state put back, resumed or not
        assert said[rank]["calls"] == said[rank]["straight_calls"] == said[rank]["best_calls"]


@pytest.mark.slow
def test_sharded_checkpoints_load_into_fsdp_models_on_any_number_of_ranks(tmp_path):
    ok(torchrun("fsdp", tmp_path))  # fsdp-plain/: a checkpoint sharded over 2 ranks
    single_process_run(tmp_path / "single-sharded", worker.Blocks(), checkpoint_sharding="sharded")
    for ranks in (1, 2):
        ok(torchrun("fsdp_load", tmp_path, ranks=ranks))
    for source in ("fsdp-plain", "single-sharded"):  # 2 -> 1 and 2 -> 2; 1 -> 1 and 1 -> 2
        whole = load_checkpoint_file(tmp_path / source / "checkpoints" / "last.pt")
        assert len(whole["optimizer"]["state"]) == 6
        for ranks in (1, 2):
            loaded = torch.load(tmp_path / f"loaded-{source}-{ranks}.pt")
            assert loaded["model"].keys() == whole["model"].keys()
            for key, value in whole["model"].items():
                assert torch.equal(loaded["model"][key], value), (source, ranks, key)
            state = loaded["optimizer"]["state"]
            assert state.keys() == whole["optimizer"]["state"].keys()
            for name, saved in whole["optimizer"]["state"].items():
                for moment in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(state[name][moment], saved[moment]), (source, name)


@pytest.mark.slow
def test_tune_under_torchrun_rank_0_talks_to_the_study_and_every_rank_trains(tmp_path):
    ok(torchrun("tune_ranks", tmp_path))
    trials = json.loads((tmp_path / "tune-0.json").read_text())["trials"]
    assert trials == [[n, "complete"] for n in range(5)] + [[5, "pruned"]]
    assert json.loads((tmp_path / "tune-1.json").read_text())["trials"] is None
    for number in range(6):  # each trial one data-parallel run directory
        run = tmp_path / "study" / f"trial-{number:04d}"
        assert (run / "summary.json").exists()
    pruned = json.loads((tmp_path / "study" / "trial-0005" / "summary.json").read_text())
    assert pruned["stopped_early"] is True
    assert pruned["epochs_completed"] < 4


def _sum_over_two_ranks(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = [
        torch.tensor([1 + 2j], dtype=torch.complex64),
        torch.tensor([1 + 1e-12], dtype=torch.float64),
        torch.tensor([3.0]),
        torch.tensor([4], dtype=torch.int64),
    ]
    Distributed(rank=rank, world_size=2).sum_in_place(values, "a test sum")
    if rank == 0:
        torch.save(values, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_sum_over_ranks_keeps_complex_and_float64_values(tmp_path):
    """Federated rounds sum their clients' weights over the ranks: the sum was made in
    float32, which dropped a complex weight's imaginary part and float64's precision."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = str(tmp_path / "sums.pt")
    mp.spawn(_sum_over_two_ranks, args=(port, out), nprocs=2)
    complex_sum, wide_sum, plain_sum, int_sum = torch.load(out)
    assert complex_sum.item() == 2 + 4j
    assert wide_sum.item() == 2 + 2e-12
    assert plain_sum.item() == 6.0
    assert int_sum.item() == 8


class _OneRankJob:
    """A job of one rank that answers the collectives as a real one would."""

    enabled = True

    def gather(self, value):
        return [value]

    def any(self, flag):
        return bool(flag)


class _LongerThanItsLen:
    def __len__(self):
        return 2

    def __iter__(self):
        return iter([1, 2, 3])


def test_lockstep_batches_agree_on_a_failure_and_refuse_a_loader_longer_than_its_len():
    """In lockstep, a batch's failure is kept and the loop ends at the next batch (every
    rank leaves together); a loader that yields more batches than its len() is a failure
    (the rest would be left out unsaid)."""
    from traineval.evaluation.ranks import RankBatches

    steps, seen = RankBatches([1, 2, 3], _OneRankJob()), []
    for batch, real in steps:
        with steps.guard():
            seen.append((batch, real))
            if batch == 2:
                raise RuntimeError("a metric failed")
    assert seen == [(1, True), (2, True)]
    with pytest.raises(RuntimeError, match="a metric failed"):
        steps.raise_failure()
    longer = RankBatches(_LongerThanItsLen(), _OneRankJob())
    assert [batch for batch, _ in longer] == [1, 2]
    with pytest.raises(ValueError, match=r"yielded more batches than its len\(\) \(2\)"):
        longer.raise_failure()
    alone = RankBatches([1, 2], None)
    with pytest.raises(RuntimeError), alone.guard():  # alone: raised at once
        raise RuntimeError("x")
