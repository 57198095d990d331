"""Time budgets: step planning (simulated clock), real runs ending on time, CLI, config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.budget import BudgetPlan, BudgetTooSmall
from kdistill.cli import main
from kdistill.config import load_config, parse_duration
from kdistill.data.dataset import ImageDataset
from kdistill.errors import ConfigError
from kdistill.runs import whole_budget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def simulate(
    budget: float, step_seconds, steps_per_epoch: int, eval_seconds: float, eval_images: int = 0
) -> tuple[BudgetPlan, float, int]:
    """Drive a plan the way the engine does; ``step_seconds(i)`` is the cost of step i."""
    clock = FakeClock()
    start = clock.now
    plan = BudgetPlan(budget, steps_per_epoch, eval_images=eval_images, batch_size=100, clock=clock)
    done, epoch = 0, 0
    while epoch * steps_per_epoch < plan.total_steps:
        for _ in range(steps_per_epoch):
            clock.now += step_seconds(done)
            done += 1
            plan.after_step(done)
            if done >= plan.total_steps:
                break
        clock.now += eval_seconds
        plan.epoch_end(eval_seconds, done)
        epoch += 1
        assert done == min(epoch * steps_per_epoch, plan.total_steps) or done == plan.total_steps
    return plan, clock.now - start, done


@pytest.mark.parametrize("budget", [10.0, 60.0, 600.0])
@pytest.mark.parametrize("eval_seconds", [0.0, 0.4])
def test_plan_fills_the_budget(budget: float, eval_seconds: float) -> None:
    # warm-up steps are slow, then 20 ms per step
    plan, wall, steps = simulate(budget, lambda i: 0.5 if i < 3 else 0.02, 40, eval_seconds, eval_images=1000)
    assert 0.95 * budget <= wall <= 1.0 * budget
    assert plan.total_steps == steps
    assert plan.step_seconds == pytest.approx(0.02)


def test_plan_follows_a_slowdown() -> None:
    # the machine gets twice as slow halfway through: the re-plans keep the run on time
    plan, wall, steps = simulate(60.0, lambda i: 0.02 if i < 1200 else 0.04, 50, 0.2)
    assert 0.95 * 60 <= wall <= 60.0
    assert 1200 < steps < 3000


def test_plan_respects_max_steps() -> None:
    clock = FakeClock()
    plan = BudgetPlan(100.0, 10, max_steps=30, clock=clock)
    assert plan.total_steps == 30
    for done in range(1, 20):
        clock.now += 0.01
        plan.after_step(done)
    assert plan.total_steps == 30  # the budget would allow thousands: capped


def test_a_budget_too_small_for_one_step_and_the_evaluation_is_refused_at_the_second_step() -> None:
    clock = FakeClock()
    plan = BudgetPlan(5.0, 40, eval_images=1000, batch_size=125, clock=clock, desc="distill")
    clock.now += 3.0  # set-up and the first step (a big model on a busy CPU, warm-up included)
    plan.after_step(1)  # 3 s fit in 5 s: a second step tells what a step costs
    clock.now += 1.5
    with pytest.raises(BudgetTooSmall) as info:
        plan.after_step(2)
    # evaluating 1000 images: 8 training batches' worth at a third of a 1.5 s step: 4 s more
    assert info.value.needed == pytest.approx(3.0 + 4.0)
    message = str(info.value)
    assert message.startswith(
        "budget: distill: 5.0 s of training time cannot hold one training step and the evaluation"
    )
    assert (
        "first step took 3.0 s" in message
        and "1,000 images takes about 4.0 s" in message
        and "needs about 7.0 s" in message
    )
    assert "\n" not in message


def test_a_first_step_longer_than_the_budget_is_refused_at_once() -> None:
    clock = FakeClock()
    plan = BudgetPlan(5.0, 40, eval_images=1000, batch_size=125, clock=clock)
    clock.now += 84.0  # 1.4 min
    with pytest.raises(BudgetTooSmall, match="first step took 1.4 min"):
        plan.after_step(1)


def test_a_budget_that_holds_one_step_and_the_evaluation_is_not_refused() -> None:
    clock = FakeClock()
    plan = BudgetPlan(12.0, 40, eval_images=1000, batch_size=125, clock=clock)
    clock.now += 3.0  # a slow first step (set-up, warm-up) does not stop the run by itself
    plan.after_step(1)
    clock.now += 1.5
    plan.after_step(2)  # 3 s + 4 s of evaluation fit in 12 s: not refused
    assert not plan.finished  # and 4.5 s + 1.5 s + 4 s fit too: a third step
    for done in (3, 4):
        clock.now += 1.5
        plan.after_step(done)
    assert plan.total_steps == 4  # 7.5 s + 4 s of evaluation: a fifth step would end past the budget


def test_a_resumed_run_is_not_refused_for_the_budget_it_has_spent() -> None:
    clock = FakeClock()
    plan = BudgetPlan(60.0, 40, eval_images=1000, batch_size=125, clock=clock)
    plan.restore({"elapsed": 58.0, "total_steps": 400, "planned": True, "step_seconds": 0.1, "epoch_overhead": 1.0})
    clock.now += 3.0
    plan.after_step(301)  # not the run's first step: it stops (the safety net), it is not refused
    assert plan.finished and plan.total_steps == 301


def test_no_long_overrun_before_the_first_plan() -> None:
    # steps of 2 s (resnet56 on a busy CPU) in a 5 s budget: the first plan needs 8 steps (16 s),
    # so before it the safety net must already stop the run on time
    plan, wall, steps = simulate(5.0, lambda i: 2.0, 40, 0.0)
    assert wall <= 5.0 and steps == 2


def test_epochs_shorter_than_the_first_plans_window_are_planned_at_their_end() -> None:
    # 2 steps per epoch and a slow evaluation: the first plan comes at the first epoch end,
    # not after epochs more, and the run ends within its budget
    plan, wall, steps = simulate(3.0, lambda i: 0.1, 2, 1.0)
    assert plan.planned and wall <= 3.0 and steps >= 2


def test_the_command_line_says_which_budget_would_do() -> None:
    cfg = load_config(None, ["budget=5s"])
    with pytest.raises(ConfigError) as info, whole_budget(cfg):
        raise BudgetTooSmall(
            "distill", 4.0, 11.0, "set-up and the first step took 3.0 s, evaluating 1,000 images takes about 8.0 s"
        )
    message = str(info.value)
    assert message.startswith(
        "budget: --budget 5.0 s leaves 4.0 s of training time for distill, which cannot hold one training step"
    )
    assert message.endswith(
        "give --budget 13s or more"
    )  # (5 - 4 + 11) / 0.95, rounded up: the final evaluation keeps 5%


def test_durations() -> None:
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration(42) == 42 and parse_duration(None) is None
    assert load_config(None, ["budget=2m"]).budget == 120
    with pytest.raises(ConfigError, match="budget: expected a duration such as 90s"):
        load_config(None, ["budget=ten minutes"])
    with pytest.raises(ConfigError, match="train.budget"):
        load_config(None, ["train.budget=-5"])


@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> ImageDataset:
    keep = torch.arange(0, len(mini.train_labels), 5)  # 1000 images of every class
    test = torch.arange(0, len(mini.test_labels), 4)
    return dataclasses.replace(
        mini,
        train_images=mini.train_images[keep],
        train_labels=mini.train_labels[keep],
        test_images=mini.test_images[test],
        test_labels=mini.test_labels[test],
    )


@pytest.mark.slow
def test_training_run_ends_on_budget(small: ImageDataset) -> None:
    torch.manual_seed(0)
    model = kdistill.create_model("seed_student")
    r = kdistill.train(model, small, budget=6.0, batch_size=64, device="cpu")
    b = r.budget
    # behaviour, not speed (how close to the budget a run ends on an idle machine is measured by
    # benchmarks/budget_curve.py): the run is planned, and the safety net stops it on its own
    # clock by the budget's end plus at most one step (a step of this model takes well under 1 s)
    assert b["budget_seconds"] == 6.0 and b["steps"] > 3
    assert b["wall_seconds"] <= 6.0 * 1.05 + 1.0
    # the schedule was stretched over the planned steps: one-cycle ends at its final lr (0)
    assert r.history[-1]["lr"] < 0.1 * 0.05
    assert sum(h["train_images"] for h in r.history) == b["steps"] * 64


@pytest.mark.slow
def test_budget_with_a_cache_stops_at_the_cached_epochs(small: ImageDataset) -> None:
    torch.manual_seed(0)
    teacher = kdistill.create_model("seed_teacher")
    cache = kdistill.cache_teacher(teacher, small, epochs=2, device="cpu")
    torch.manual_seed(1)
    r = kdistill.distill(
        teacher,
        kdistill.create_model("seed_student"),
        small,
        teacher_cache=cache,
        budget=120,
        batch_size=100,
        device="cpu",
    )
    assert len(r.history) == 2 and r.budget["steps"] == 20  # stopped by the cache's epochs, not by the clock


@pytest.mark.slow
def test_cli_train_with_budget(tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "--budget",
            "12s",
            "--output-dir",
            str(tmp_path),
            "--name",
            "b",
            "--device",
            "cpu",
            "--model",
            "seed_student",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["budget"]["budget_seconds"] < 12 and summary["budget"]["steps"] > 0
    assert load_config(tmp_path / "b" / "config.yaml").budget == 12


def test_cli_budget_too_small_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["train", "--budget", "0.01s", "--output-dir", str(tmp_path), "--name", "b", "--device", "cpu"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # "decoding ..." may come first
    assert lines[-1].startswith("kdistill: error: budget:") and not [line for line in lines[:-1] if "error" in line]


@pytest.mark.slow
def test_mutual_learning_reports_its_budget(small: ImageDataset) -> None:
    torch.manual_seed(0)
    models = [kdistill.create_model("seed_student") for _ in range(2)]
    # the planned steps depend on the measured speed, so the trajectory varies from run to
    # run: a gentle lr and clipping keep these batch-norm-free models from collapsing (the
    # engine stops collapsed runs) on a slow or a fast machine alike
    results = kdistill.mutual(models, small, budget=4.0, batch_size=64, device="cpu", lr=0.02, grad_clip=5.0)
    assert len(results) == 2
    for r in results:  # every model's result says what the shared run reached in its budget
        assert r.budget is not None and r.budget["budget_seconds"] == 4.0 and r.budget["steps"] > 0


def test_budget_too_small_travels_between_processes() -> None:
    """A sweep worker's refusal reaches the main process pickled: it must arrive whole."""
    import pickle

    from kdistill.budget import BudgetTooSmall

    error = pickle.loads(pickle.dumps(BudgetTooSmall("distill", 3.0, 20.0, "one step took 2.5 s")))
    assert isinstance(error, BudgetTooSmall) and "one step took 2.5 s" in str(error) and error.needed == 20.0
