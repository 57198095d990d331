"""A study's whole budget: the plan (injected costs), its execution on a fake clock (never
more than one epoch plus an evaluation over), the same steps for both students, graceful
degradation, ``train.max_steps``, and the teacher cache's own cost kept apart."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill import runs
from kdistill.budget import BudgetPlan, PhaseCost, plan_study
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.study import StudyBudget
from kdistill.teacher_cache import TeacherCache

# the seed pair on a 2-core CPU, roughly: 40 steps per epoch, evaluation ~ a third of a step per batch
TEACHER = PhaseCost("teacher", 0.40, 1.2, 40)
BASELINE = PhaseCost("baseline", 0.10, 0.3, 40)
DISTILLED = PhaseCost("distilled", 0.17, 0.3, 40)
COSTS = [TEACHER, BASELINE, DISTILLED]


def test_plan_gives_every_phase_the_same_steps_and_fits_the_budget() -> None:
    plan = plan_study(600.0, 12.0, COSTS, 30.0)
    assert set(plan.phases) == {"teacher", "baseline", "distilled"}
    assert plan.note is None and plan.steps > 40  # more than an epoch each
    assert plan.spent + plan.reserve + sum(plan.phases.values()) <= 600.0
    # the largest step count that fits: one more step of every phase would not
    assert plan.spent + plan.reserve + sum(c.seconds(plan.steps + 1) for c in COSTS) > 600.0
    for c in COSTS:
        assert plan.phases[c.name] == pytest.approx(c.seconds(plan.steps))
    # a phase's share of what is left follows the plan's proportions
    left = 500.0
    shares = [plan.share(p, left, ["baseline", "distilled"]) for p in ("baseline", "distilled")]
    assert sum(shares) == pytest.approx(left) and shares[0] < shares[1]


def test_phase_seconds_count_every_epoch_ends_evaluation() -> None:
    assert BASELINE.seconds(40) == pytest.approx(40 * 0.1 + 0.3)
    assert BASELINE.seconds(41) == pytest.approx(41 * 0.1 + 2 * 0.3)  # a partial last epoch is evaluated too


def test_a_budget_too_small_for_one_epoch_trains_each_phase_for_a_fraction_and_says_so() -> None:
    plan = plan_study(12.0, 2.0, COSTS, 2.0)
    assert 1 <= plan.steps < 40
    assert plan.spent + plan.reserve + sum(plan.phases.values()) <= 12.0
    note = plan.note
    assert note.startswith(f"budget: --budget 12.0 s holds {plan.steps} steps of each phase")
    assert "fraction of an epoch" in note and "\n" not in note
    full = int(note.rsplit("--budget ", 1)[1].split("s ")[0])  # "--budget 35s would give each one epoch"
    assert plan_study(float(full), 2.0, COSTS, 2.0).note is None  # and that budget does


def test_a_budget_too_small_for_one_step_of_each_phase_is_refused_with_the_budget_that_would_do() -> None:
    with pytest.raises(ConfigError) as info:
        plan_study(5.0, 2.0, COSTS, 2.0)
    message = str(info.value)
    assert message.startswith("budget: --budget 5.0 s cannot hold the study") and "\n" not in message
    enough = int(message.rsplit("give --budget ", 1)[1].split("s ")[0])
    assert plan_study(float(enough), 2.0, COSTS, 2.0).steps >= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _train(clock: FakeClock, seconds: float, cost: PhaseCost, slowdown: float, max_steps: int | None):
    """A phase as the engine runs it under ``train.budget`` (and ``max_steps``), on the fake
    clock, when its steps and evaluations really cost ``slowdown`` times what was measured."""
    # the engine's plan estimates an evaluation at a third of a step per batch of 100 images until it has timed one
    eval_images = round(3 * cost.eval_seconds / cost.step_seconds * 100)
    plan = BudgetPlan(
        seconds, cost.steps_per_epoch, eval_images=eval_images, batch_size=100, max_steps=max_steps, clock=clock
    )
    done = epoch = 0
    while epoch * cost.steps_per_epoch < plan.total_steps:
        for _ in range(cost.steps_per_epoch):
            clock.now += cost.step_seconds * slowdown
            done += 1
            plan.after_step(done)
            if done >= plan.total_steps:
                break
        clock.now += cost.eval_seconds * slowdown
        plan.epoch_end(cost.eval_seconds * slowdown, done)
        epoch += 1
    return types.SimpleNamespace(budget=plan.report(done))


@pytest.mark.parametrize("slowdown", [0.7, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("budget", [20.0, 120.0, 600.0])
def test_the_whole_study_never_overruns_by_more_than_an_epoch_and_an_evaluation(
    budget: float, slowdown: float, monkeypatch
) -> None:
    """The study's phases run one after the other on the plan's shares; the machine turns
    out ``slowdown`` times slower than measured (3: other jobs started after the plan)."""
    clock = FakeClock()
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(perf_counter=clock))
    cfg = load_config(None, [f"budget={budget}"])
    start = clock.now
    clock.now += 3.0  # loading and measuring
    plan = plan_study(budget, clock.now - start, COSTS, 0.1 * budget)
    study = StudyBudget(cfg, plan, start)
    results = {}
    for cost in COSTS:
        seconds = study.seconds(cost.name)
        steps = study.steps if cost.name == "distilled" else None
        results[cost.name] = _train(clock, seconds, cost, slowdown, steps)
        study.spent(cost.name, results[cost.name])
        if cost.name == "baseline":
            study.student_steps(results["baseline"])
    clock.now += plan.reserve  # the final evaluation, as planned
    worst = max(c.seconds(c.steps_per_epoch) * slowdown for c in COSTS)  # one epoch and its evaluation
    assert clock.now - start <= budget + worst
    b, d = results["baseline"].budget["steps"], results["distilled"].budget["steps"]
    if slowdown <= 1.0:  # as measured (or faster): both students get the same steps, on time
        assert d == b and clock.now - start <= budget
    else:  # slower than measured: the safety net keeps the study on time, even if it cuts the distilled student short
        assert d <= b
    record = study.record(clock.now)
    assert record["student_steps"] == b and record["phases"]["distilled"]["steps"] == d


def test_a_distilled_student_dearer_than_measured_still_gets_the_student_alones_steps(monkeypatch) -> None:
    """Its steps cost 1.2x what was measured: it may go past the budget,
    by less than an epoch and an evaluation, to train for as many steps as the student alone."""
    clock = FakeClock()
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(perf_counter=clock))
    budget = 120.0
    cfg = load_config(None, [f"budget={budget}"])
    start = clock.now
    clock.now += 3.0
    plan = plan_study(budget, clock.now - start, COSTS, 12.0)
    study = StudyBudget(cfg, plan, start)
    results = {}
    for cost, slowdown in ((TEACHER, 1.0), (BASELINE, 1.0), (DISTILLED, 1.2)):
        results[cost.name] = _train(clock, study.seconds(cost.name), cost, slowdown, study.steps)
        if cost.name == "baseline":
            study.student_steps(results["baseline"])
    clock.now += plan.reserve
    assert results["distilled"].budget["steps"] == results["baseline"].budget["steps"]
    assert budget < clock.now - start <= budget + DISTILLED.seconds(40)  # one epoch and its evaluation, as measured


def test_max_steps_ends_a_fixed_epoch_run_inside_an_epoch_with_the_schedule_spanning_it() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    model = torch.nn.Linear(8, 4)
    r = kdistill.train(model, (x, y), epochs=5, max_steps=7, batch_size=16, device="cpu", lr=0.1)
    assert len(r.history) == 2  # 4 steps per epoch: epoch 2 ends after its 3rd step
    assert sum(h["train_images"] for h in r.history) == 7 * 16
    # one-cycle annealed over the 7 steps (its last step's lr is a seventh of the way from 0 to
    # the peak), not over 5 epochs' 20 (step 7 of 20 is near the peak)
    assert r.history[-1]["lr"] < 0.25 * 0.1


def test_the_teacher_cache_keeps_what_building_it_cost(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (32,))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    cache = kdistill.cache_teacher(teacher, (images, labels), epochs=1, device="cpu", path=tmp_path / "c.pt")
    assert cache.build_seconds is not None and cache.build_seconds > 0
    loaded = TeacherCache.load(tmp_path / "c.pt")
    assert loaded.build_seconds == pytest.approx(cache.build_seconds)
    assert loaded.to(torch.device("cpu")).build_seconds == loaded.build_seconds
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    del state["build_seconds"]  # a cache written before the cost was recorded
    torch.save(state, tmp_path / "old.pt")
    assert TeacherCache.load(tmp_path / "old.pt").build_seconds is None


@pytest.mark.slow
def test_a_budgeted_study_gives_both_students_the_same_steps(tmp_path: Path) -> None:
    """The bundled sample, end to end: the plan is recorded, both students train for the
    same steps, and the study ends near its budget (generous: the machine may be busy)."""
    budget = 40.0
    code = main(
        ["run", "--budget", f"{budget:.0f}s", "--output-dir", str(tmp_path), "--name", "b", "--device", "cpu"]
        + ["--set", "deploy.onnx=false"]
    )
    assert code == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    models, plan = summary["models"], summary["budget_plan"]
    steps = models["baseline"]["budget"]["steps"]
    assert steps > 0 and models["distilled"]["budget"]["steps"] == steps == plan["student_steps"]
    for phase in ("baseline", "distilled"):
        metrics = [json.loads(line) for line in (tmp_path / "b" / phase / "metrics.jsonl").read_text().splitlines()]
        assert sum(m["train_images"] for m in metrics) == steps * 128  # the same batches, from the run dirs' metrics
    assert set(plan["phases"]) == {"teacher", "baseline", "distilled"}
    assert all(p["spent_seconds"] > 0 for p in plan["phases"].values())
    epoch = max(p["step_seconds"] * p["steps_per_epoch"] for p in plan["phases"].values())
    assert summary["wall_seconds"] <= budget + 2 * epoch + plan["evaluation"]["spent_seconds"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## How the budget was spent" in report and f"**Both students: {steps} steps**" in report
    assert f"both students trained for {steps} steps" in report


@pytest.mark.slow
def test_a_study_budget_too_small_for_one_step_of_each_phase_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["run", "--budget", "2s", "--output-dir", str(tmp_path), "--name", "b", "--device", "cpu"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kdistill: error: budget: --budget 2.0 s cannot hold the study")
    assert "give --budget" in lines[-1] and not (tmp_path / "b").exists()  # nothing left half-made


def test_a_cached_distillation_step_is_planned_at_the_student_alones_cost() -> None:
    """With a teacher cache the distilled student's step is the student's own (the cache is a
    lookup), so a budget gives it as many steps as the student alone; a live teacher adds its
    forward pass. The models given are left as they were."""
    cfg = load_config(None, ["train.batch_size=16", "train.eval_batch_size=16"])
    # what the measurement reads of a data set: its split sizes and image shape
    mini = types.SimpleNamespace(
        train_labels=torch.zeros(320), val_labels=None, test_labels=torch.zeros(100), image_shape=(3, 32, 32)
    )
    torch.manual_seed(0)
    teacher, student = kdistill.create_model("seed_student"), kdistill.create_model("seed_student")  # small: fast
    before = {k: v.clone() for k, v in student.state_dict().items()}
    names = ["baseline", "distilled"]
    cached = {
        c.name: c for c in runs.measure_phase_costs(cfg, mini, torch.device("cpu"), teacher, student, names, False)
    }
    assert cached["distilled"].step_seconds == cached["baseline"].step_seconds
    assert cached["baseline"].steps_per_epoch == len(mini.train_labels) // 16
    live = {c.name: c for c in runs.measure_phase_costs(cfg, mini, torch.device("cpu"), teacher, student, names, True)}
    assert live["distilled"].step_seconds > live["baseline"].step_seconds
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
