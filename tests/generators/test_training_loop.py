"""The iteration loop of the built-in diffusion trainers, on a two-parameter model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from diffusers.training_utils import EMAModel

from segsynth.generators.training_loop import TrainingParts, run_iterations
from segsynth.io import SegsynthError


@dataclass
class LoopConfig:
    iterations: int = 4
    max_minutes: float = 0.0
    lr: float = 0.1
    warmup: int = 0
    batch_size: int = 2
    log_every: int = 1
    save_every: int = 2
    keep_every: int = 0


def parts(loss_value=None, keep=None):
    """A model of two weights whose loss is their squared sum; records each iteration's learning rate and each save."""
    weights = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.AdamW([weights], lr=0.1, weight_decay=0.0)
    seen = {"lr": [], "saves": []}

    def batch_loss(iteration):
        seen["lr"].append(optimizer.param_groups[0]["lr"])
        return weights.pow(2).sum() if loss_value is None else weights.sum() * loss_value

    return TrainingParts(name="train-test", parameters=[weights], optimizer=optimizer, ema=EMAModel([weights]),
                         batch_loss=batch_loss, save=seen["saves"].append, saved_note=lambda: "nothing saved",
                         keep=keep), seen, weights


def test_iterates_logs_saves_and_keeps(tmp_path):
    kept = []
    loop, seen, weights = parts(keep=kept.append)
    run_iterations(LoopConfig(keep_every=2), tmp_path, loop, start=0, seconds_before=0.0)
    assert [s["iterations"] for s in seen["saves"]] == [2, 4]
    assert [s["finished"] for s in seen["saves"]] == [False, True] and seen["saves"][-1]["stopped_by"] == "iterations"
    assert kept == [2, 4]
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [record["iteration"] for record in logged] == [1, 2, 3, 4]
    assert weights.abs().sum() < 3.0  # the steps went down the loss
    # cosine from the peak (no warm-up) towards 0.1 of it
    assert seen["lr"][0] == pytest.approx(0.1) and seen["lr"][-1] < seen["lr"][0]


def test_a_resumed_run_rewinds_the_log_and_continues(tmp_path):
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3)))
    loop, seen, _ = parts()
    run_iterations(LoopConfig(), tmp_path, loop, start=2, seconds_before=5.0)
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    assert seen["saves"][-1]["resumed_at"] == 2 and seen["saves"][-1]["seconds"] >= 5.0


def test_the_time_budget_counts_the_seconds_trained_before_a_resume(tmp_path):
    # half of a 1-minute budget spent before the resume: the schedule goes on from its middle, not from its peak
    loop, seen, _ = parts()

    class Stop(Exception):
        pass

    first_loss = loop.batch_loss

    def one_iteration(iteration):
        if iteration > 0:
            raise Stop
        return first_loss(iteration)

    loop.batch_loss = one_iteration
    with pytest.raises(Stop):
        run_iterations(LoopConfig(iterations=1000, max_minutes=1.0, save_every=1000), tmp_path, loop, start=0,
                       seconds_before=30.0)
    middle = 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert seen["lr"][0] == pytest.approx(middle, rel=1e-3)


def test_a_run_that_spent_its_budget_trains_no_further(tmp_path, capsys):
    loop, seen, weights = parts()
    before = weights.detach().clone()
    run_iterations(LoopConfig(iterations=100, max_minutes=1.0), tmp_path, loop, start=40, seconds_before=60.0)
    assert "already trained for its --max-minutes 1 (40 iterations); give a larger --max-minutes" in capsys.readouterr().out
    assert seen["saves"] == [] and torch.equal(weights.detach(), before)


def test_a_finished_run_is_left_alone(tmp_path, capsys):
    loop, seen, _ = parts()
    run_iterations(LoopConfig(), tmp_path, loop, start=4, seconds_before=1.0)
    assert "already trained for 4 iterations" in capsys.readouterr().out and seen["saves"] == []


def test_a_diverged_loss_stops_before_the_step(tmp_path):
    loop, seen, weights = parts(loss_value=float("nan"))
    before = weights.detach().clone()
    with pytest.raises(SegsynthError, match=r"non-finite loss \(nan\) at iteration 1 of 4: training diverged; lower "
                                            r"the learning rate \(--lr 0.1 now; try 0.01\); nothing saved"):
        run_iterations(LoopConfig(), tmp_path, loop, start=0, seconds_before=0.0)
    assert torch.equal(weights.detach(), before) and seen["saves"] == []
