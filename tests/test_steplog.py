"""StepLog: per-step losses and norms recorded without device work, read back exactly."""

from __future__ import annotations

import math

import pytest
import torch

from traineval.training.steplog import StepLog, first_non_finite


def test_windows_weights_and_norms_read_back_per_step():
    log = StepLog(torch.device("cpu"), capacity=8)
    # step 1: two micro-batches (means 1.0 over 3 items, 4.0 over 1 item), norm 0.5
    log.add_micro_batch(torch.tensor(1.0), 3)
    log.add_micro_batch(torch.tensor(4.0), 1)
    log.close_step(1, 1, 0, torch.tensor(0.5))
    # a skipped update leaves nothing behind
    log.add_micro_batch(torch.tensor(99.0), 2)
    log.discard_step()
    # step 2: token weights on the device, no norm
    log.add_micro_batch(torch.tensor(2.0), torch.tensor(5))
    log.close_step(2, 1, 2, None)
    # an open step is not read
    log.add_micro_batch(torch.tensor(7.0), 1)
    records = log.flush()
    assert [(r.step, r.batch_index) for r in records] == [(1, 0), (2, 2)]
    assert records[0].loss_sum == pytest.approx(7.0)
    assert records[0].weight == 4
    assert records[0].loss == pytest.approx(1.75)
    assert records[0].grad_norm == pytest.approx(0.5)
    assert records[1].loss == pytest.approx(2.0)
    assert records[1].weight == 5
    assert records[1].grad_norm is None
    assert log.counts_tokens
    assert [float(t) for t in log.open_losses()] == [7.0]
    log.close_step(3, 2, 0, torch.tensor(1.0))
    (record,) = log.flush()
    assert record.loss == pytest.approx(7.0)
    assert record.grad_norm == pytest.approx(1.0)
    assert log.flush() == []


def test_the_first_non_finite_step_is_found():
    log = StepLog(torch.device("cpu"), capacity=4)
    for step, (loss, norm) in enumerate([(1.0, 1.0), (2.0, math.inf), (math.nan, 1.0)], 1):
        log.add_micro_batch(torch.tensor(loss), 1)
        log.close_step(step, 1, step, torch.tensor(norm))
    assert log.full is False
    bad = first_non_finite(log.flush())
    assert bad is not None
    assert bad.step == 2


@pytest.mark.parametrize("reads", [[4], [2, 2], [1, 3], [1, 1, 1, 1]])
def test_an_interval_s_metric_sums_the_same_however_a_stop_splits_it(reads):
    """A stop inside a log interval reads its metrics in two parts; summed in float32 per
    part, the mean differed from the uninterrupted run's (PPO's train_entropy, 8th digit)."""
    from traineval.runs.train_state import TrainState
    from traineval.training.train_log import TrainLog

    values = iter(torch.tensor([1.0, 1e-8, 1e-8, 1e-8], dtype=torch.float32))
    log = TrainLog(StepLog(torch.device("cpu"), 8), [], job=None)
    log.steps.flush = list  # the metrics alone: no step records
    state = TrainState()
    for count in reads:
        for _ in range(count):
            log._metrics.setdefault("entropy", []).append(next(values))
        log.read(state)
    exact = sum(float(v) for v in torch.tensor([1.0, 1e-8, 1e-8, 1e-8], dtype=torch.float32))
    assert state.interval_metrics["entropy"] == [exact, 4.0]
