"""PPO's environments in worker processes (`mode.vectorization='async'`, gymnasium's
AsyncVectorEnv) against the in-process batch: the same episodes, so the same weights, and a
checkpoint of either resumes in the other. The workers are closed however a run ends."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time

import pytest
import torch

from test_ppo import PPO, _config
from test_reinforcement import ActorCritic, Walk
from traineval import TrainingManager
from traineval.models import ActorCritic as BuiltinActorCritic
from traineval.modes import Reinforcement
from traineval.modes import env_workers as workers_module
from traineval.training.loop import TrainingInterrupted
from traineval.training.stop_rules import EvaluationError

from conftest import InterruptAt

pytest.importorskip("gymnasium")

ASYNC = dataclasses.replace(PPO, vectorization="async")
SETTINGS = {"num_epochs": 3, "optimizer_type": "adamw", "eval_frequency": 4}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def _train(quiet_config, tmp_path, name, mode, model, env=Walk, **settings):
    quiet_config["output_dir"] = str(tmp_path / name)
    config = _config(quiet_config, **{**SETTINGS, **settings})
    return TrainingManager(config).train(model, env, mode=mode)


def test_workers_train_the_weights_the_in_process_environments_do(quiet_config, tmp_path):
    # Walk has no gymnasium spaces (they are made for the workers); its episodes end and are
    # cut inside rollouts, so resets with the run's seeds happen in both
    inside, workers = ActorCritic(), ActorCritic()
    first = _train(quiet_config, tmp_path, "sync", PPO, inside)
    second = _train(quiet_config, tmp_path, "async", ASYNC, workers)
    assert _same(inside, workers)
    history = [r["training_history"]["val_metrics"] for r in (first, second)]
    assert history[0] == history[1]
    assert not multiprocessing.active_children()  # the workers were closed


@pytest.mark.parametrize(
    ("environment", "model"),
    [
        ("CartPole-v1", lambda: BuiltinActorCritic(4, 2, hidden_sizes=(16,))),
        ("Pendulum-v1", lambda: BuiltinActorCritic(3, 2, hidden_sizes=(16,), gaussian=True)),
    ],
)
def test_gymnasium_environments_by_name_discrete_and_continuous(
    quiet_config, tmp_path, environment, model
):
    mode = Reinforcement(envs=3, rollout_steps=40, minibatch_size=40, ppo_epochs=1,
                         rollouts_per_epoch=2, eval_episodes=1,
                         environment=environment)  # fmt: skip
    models = []
    for vectorization in ("sync", "async"):
        torch.manual_seed(0)
        models.append(model())
        run = dataclasses.replace(mode, vectorization=vectorization)
        _train(quiet_config, tmp_path, vectorization, run, models[-1], env=None, num_epochs=2)
    assert _same(*models)


def test_an_in_process_run_resumes_in_workers_exactly(quiet_config, tmp_path):
    straight = ActorCritic()
    _train(quiet_config, tmp_path, "straight", PPO, straight)
    quiet_config["output_dir"] = str(tmp_path / "resumed")
    config = _config(quiet_config, **SETTINGS)
    with pytest.raises(TrainingInterrupted):  # update 8 of 18: inside the second rollout
        TrainingManager(config).train(ActorCritic(), Walk, mode=ASYNC, callbacks=[InterruptAt(8)])
    assert not multiprocessing.active_children()  # closed on the interruption too
    resumed = ActorCritic()  # the interrupted episodes are replayed in the workers
    result = TrainingManager(config).train(resumed, Walk, mode=PPO, resume_from="auto")
    assert result["global_step"] == 18
    assert _same(straight, resumed)
    resumed = ActorCritic()  # and the other way round: checkpoints of workers, in-process
    quiet_config["output_dir"] = str(tmp_path / "resumed-2")
    config = _config(quiet_config, **SETTINGS)
    with pytest.raises(TrainingInterrupted):
        TrainingManager(config).train(ActorCritic(), Walk, mode=PPO, callbacks=[InterruptAt(8)])
    TrainingManager(config).train(resumed, Walk, mode=ASYNC, resume_from="auto")
    assert _same(straight, resumed)


def test_vectorization_errors_name_the_setting(quiet_config, tmp_path, monkeypatch):
    expected = r"vectorization='threads' is invalid: expected one of 'sync', 'async'"
    with pytest.raises(ValueError, match=expected):
        Reinforcement(vectorization="threads")
    with pytest.raises(ValueError, match=r"vectorization.*setting of algorithm='ppo'"):
        Reinforcement(algorithm="policy_gradient", vectorization="async")
    # where workers are not forked the factory must pickle: a lambda is refused up front
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda **_: "spawn")
    for name in ("CartPole-v1", "FrozenLake-v1", "CartPole"):  # names pickle
        workers_module.check_picklable(Reinforcement().environment_factory(name))
    expected = r"vectorization='async'.*<lambda> to worker.*spawn.*picklable"
    with pytest.raises(ValueError, match=expected):
        _train(quiet_config, tmp_path, "lambda", ASYNC, ActorCritic(), env=lambda: Walk())
    assert not multiprocessing.active_children()


def test_the_learning_rate_search_closes_its_workers(quiet_config):
    manager = TrainingManager(_config(quiet_config, **SETTINGS))
    search = manager.find_learning_rate(ActorCritic(), Walk, mode=ASYNC, num_steps=8)
    assert len(search.losses) == 8
    assert not multiprocessing.active_children()


class CrashingWalk(Walk):
    """A Walk whose 7th step fails, as a simulator might."""

    calls = 0

    def step(self, action):
        self.calls += 1
        if self.calls == 7:
            raise RuntimeError("the simulator crashed")
        return super().step(action)


@pytest.mark.filterwarnings("ignore:.*(Worker|Traceback|exception back):UserWarning")  # gymnasium's
def test_an_environment_failing_in_its_worker_stops_the_run_with_its_error(quiet_config, tmp_path):
    # it crashes in a validation's episodes: a failed validation, the training saved
    with pytest.raises(EvaluationError, match="RuntimeError: the simulator crashed; the train"):
        _train(quiet_config, tmp_path, "crash", ASYNC, ActorCritic(), env=CrashingWalk)
    assert not multiprocessing.active_children()


def test_the_final_test_episodes_in_workers_score_what_in_process_ones_do():
    model, device = ActorCritic(), torch.device("cpu")
    mode = dataclasses.replace(PPO, eval_episodes=7)
    workers = dataclasses.replace(mode, vectorization="async")
    scores = [m.score(model, Walk, device, seed=3) for m in (mode, workers)]
    assert scores[0] == scores[1]
    assert not multiprocessing.active_children()


INTERRUPTIBLE = """
import sys, time
from traineval import Callback, TrainingConfig, TrainingManager
from traineval.modes.envs import CartPole
from traineval.models import ActorCritic
from traineval.modes import Reinforcement


class SlowCartPole(CartPole):
    def step(self, action):
        time.sleep(0.002)
        return super().step(action)


class Announce(Callback):
    def on_train_start(self, loop):
        print("started", flush=True)


if __name__ == "__main__":
    mode = Reinforcement(envs=2, rollout_steps=32, minibatch_size=64, ppo_epochs=1,
                         rollouts_per_epoch=40, eval_episodes=1, vectorization="async")
    config = TrainingConfig(num_epochs=1, output_dir=sys.argv[1], progress_bar=False,
                            tensorboard_logging=False, warmup_steps=0)
    resume = "auto" if sys.argv[2:] == ["resume"] else None
    TrainingManager(config).train(ActorCritic(4, 2), SlowCartPole, mode=mode,
                                  callbacks=[Announce()], resume_from=resume)
    print("finished", flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_reaching_the_workers_too_stops_the_run_cleanly(tmp_path):
    """A terminal's Ctrl-C signals the whole process group: the workers ignore it, the
    training process saves at its next step boundary and closes them; the run resumes."""
    import os
    import signal
    import subprocess
    import sys

    script, out = tmp_path / "run.py", tmp_path / "run"
    script.write_text(INTERRUPTIBLE)
    command = [sys.executable, str(script), str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    assert run.stdout is not None
    assert run.stdout.readline().strip() == "started"
    time.sleep(0.5)  # inside a rollout, the workers stepping
    os.killpg(run.pid, signal.SIGINT)
    _, errors = run.communicate(timeout=60)
    assert run.returncode != 0
    assert errors.count("SIGINT received") == 1, errors  # not once more per worker
    assert "TrainingInterrupted: training interrupted by SIGINT" in errors
    assert "Worker" not in errors  # no worker died
    resumed = subprocess.run([*command, "resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished" in resumed.stdout


@pytest.mark.slow
def test_a_kill_9_of_the_run_ends_its_workers_without_a_traceback(tmp_path):
    """The workers outlived a killed training process long enough to write to its dead
    pipe: each printed gymnasium's BrokenPipe traceback over the terminal."""
    import os
    import signal
    import subprocess
    import sys

    script, out, errors = tmp_path / "run.py", tmp_path / "run", tmp_path / "stderr.txt"
    script.write_text(INTERRUPTIBLE)
    with errors.open("w") as err:
        run = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                               stderr=err, text=True, start_new_session=True)  # fmt: skip
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "started"
        time.sleep(0.5)  # inside a rollout, the workers stepping
        run.kill()
        run.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the workers end with it
            try:
                os.killpg(run.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(run.pid, signal.SIGKILL)
            pytest.fail("the workers outlived the killed run")
    text = errors.read_text()
    assert "Traceback" not in text, text
    assert "BrokenPipe" not in text, text


class CountedWalk(Walk):
    """A Walk that counts the instances made in this process (a costly simulator, say)."""

    made = 0

    def __init__(self) -> None:
        super().__init__()
        CountedWalk.made += 1


def test_with_workers_the_training_process_makes_two_environments_only(quiet_config, tmp_path):
    CountedWalk.made = 0  # one to check the environment, one to read its spaces
    _train(quiet_config, tmp_path, "counted", ASYNC, ActorCritic(), env=CountedWalk)
    assert CountedWalk.made == 2


def test_more_test_episodes_than_environments_are_played_in_waves_by_as_many_workers():
    model, device = ActorCritic(), torch.device("cpu")
    mode = dataclasses.replace(PPO, eval_episodes=11)  # 3 environments: 4 waves
    scores = [
        m.score(model, Walk, device, seed=s)
        for s in (3, 4)
        for m in (mode, dataclasses.replace(mode, vectorization="async"))
    ]
    assert scores[0] == scores[1]
    assert scores[2] == scores[3]
    assert scores[0] != scores[2]  # other seeds, other episodes
