"""The whole study: teacher -> student alone (baseline) -> distilled student -> report.

Each phase trains in its own folder of the run directory (``teacher/``, ``baseline/``,
``distilled/``) with its checkpoint and ``metrics.jsonl``; ``--resume`` skips finished
phases and continues an interrupted one. The baseline and the distilled student start from
the same initial weights and see the same batches, so the difference between them is the
distillation alone. The single-model commands (:mod:`kdistill.commands`) train with the
same :class:`Phases`.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill import api, distributed
from kdistill.budget import StudyPlan, format_seconds, plan_study
from kdistill.config import RunConfig
from kdistill.data.dataset import ImageDataset
from kdistill.data.loader import centre_crop
from kdistill.engine import Result, predict, select_device
from kdistill.errors import CacheError, ConfigError
from kdistill.evaluate import agreement, classification_metrics, profile_model
from kdistill.export import EXPORT_HINT, deploy, onnx_available
from kdistill.files import atomic_write, atomic_write_text
from kdistill.progress import log, progress
from kdistill.report.compare import write_comparison
from kdistill.report.run_report import gain_words, headline, write_report
from kdistill.runs import (
    budget_left,
    build_teacher,
    check_distillation,
    input_shape,
    job,
    load_data,
    measure_phase_costs,
    new_model,
    open_run_dir,
    profile_seconds,
    spec_for,
    teacher_source,
    teacher_to_train,
    test_set,
    train_config,
)
from kdistill.stats import describe_gain, mcnemar, paired_bootstrap


def run_study(cfg: RunConfig, resume: bool = False, run_dir: Path | None = None) -> Path:
    """Run teacher -> baseline -> distilled -> report. Returns the run directory."""
    check_distillation(cfg)  # before anything is written
    with job(cfg), open_run_dir(cfg, resume, run_dir, kind="run") as run_dir:
        start = time.perf_counter()
        device = select_device(cfg.device)
        ds = load_data(cfg)
        log(
            f"data: {ds.name}: {len(ds.train_labels)} train, {len(ds.test_labels)} test, {ds.num_classes} classes; device {device}"
        )
        # 1-3. train the teacher (unless given), the student alone and the distilled student
        teacher, teacher_spec, phases, budget = _train_phases(cfg, ds, device, run_dir, resume, start)
        trained = time.perf_counter()
        # 4. evaluate them all on the test set, the same way; rank 0 profiles and reports
        models = {"teacher": teacher, **{name: r.model for name, r in phases.items() if name != "teacher"}}
        test = test_set(ds, device, size=cfg.data.train_size)
        logits = {
            name: predict(m, test, desc=f"evaluate {name}") for name, m in models.items()
        }  # sharded over the ranks
        if distributed.is_main():
            summary_models = _evaluate(cfg, ds, device, run_dir, models, logits, phases, teacher_spec)
            statistics = gain_statistics(logits["baseline"], logits["distilled"], ds.test_labels, cfg.seed)
            spending = (lambda: budget.record(trained)) if budget else None  # after the export, which it counts
            _summarise(cfg, ds, device, run_dir, summary_models, statistics, phases["distilled"].model, start, spending)
        return run_dir


def run_seeds(cfg: RunConfig, seeds: list[int], resume: bool = False, share_teacher: bool = False) -> Path:
    """The study once per seed, each a normal run in ``<output>/<name>/seed<N>`` (``resume``
    finishes the missing or interrupted ones), then one report over them in ``<name>/``:
    each model's mean and spread and the gain's t-interval over the seeds. With
    ``share_teacher`` the first seed trains the teacher and every other seed distills from it
    (the report's runs then share their teacher). Returns the folder of the report."""
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: expected two or more different seeds")
    root = cfg.output_dir / cfg.name
    summary = root / "summary.json"
    if (root / "run.json").exists() or (summary.exists() and "runs" not in json.loads(summary.read_text())):
        raise ConfigError(f"{root} is a run of its own; choose another --name for a study over seeds")
    dirs = []
    for i, seed in enumerate(seeds):
        seed_cfg = cfg.model_copy(update={"seed": seed, "name": f"seed{seed}", "output_dir": root})
        if share_teacher and i > 0 and not (cfg.teacher.checkpoint or cfg.teacher.checkpoints or cfg.teacher.trained):
            teacher = root / f"seed{seeds[0]}" / "teacher" / "checkpoint.pt"
            seed_cfg = seed_cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": teacher})})
        run_dir = root / seed_cfg.name
        if not (resume and (run_dir / "summary.json").exists()):  # a finished seed is kept as it is
            run_study(seed_cfg, resume=resume and run_dir.exists())
        dirs.append(run_dir)
    report = write_comparison(dirs, root)
    statistics = json.loads((root / "summary.json").read_text())["statistics"]
    log(
        f"over seeds {', '.join(map(str, seeds))}: the gain is {describe_gain(statistics['gain'], f'{len(seeds)} seeds')}; report: {report}"
    )
    return root


# the teacher cache of a distillation phase: the config's (distill.teacher_cache) unless given
FROM_CONFIG = "from config"


@dataclass
class Phases:
    """How a run trains its phases: its config, data, device and whether it resumes. The
    study, the single-model commands and the sweep all train through it."""

    cfg: RunConfig
    ds: ImageDataset
    device: torch.device
    resume: bool

    def train(self, model, spec: dict, phase: str, run_dir: Path, budget: float | None, desc: str) -> Result:
        """Train ``model`` with cross-entropy: the settings of ``phase`` (teacher or student)."""
        config = train_config(self.cfg, phase, budget)
        return api.train(model, self.ds, config=config, **self._where(spec, run_dir, desc))

    def distill(
        self,
        teacher,
        teacher_spec: dict,
        student,
        spec: dict,
        run_dir: Path,
        budget: float | None,
        desc: str,
        *,
        teacher_cache=FROM_CONFIG,
        methods: dict | None = None,
        alpha: float | None = None,
        max_steps: int | None = None,
    ) -> Result:
        """Distill ``student`` from ``teacher`` with the config's distillation settings (a
        sweep gives each point its own ``methods`` and ``alpha``), for at most ``max_steps``
        optimizer steps when given."""
        d = self.cfg.distill
        return api.distill(
            teacher,
            student,
            self.ds,
            methods=methods or d.methods,
            alpha=d.alpha if alpha is None else alpha,
            ce_weight=d.ce_weight,
            config=train_config(self.cfg, "distill", budget, max_steps),
            teacher_spec=teacher_spec,
            teacher_cache=d.teacher_cache if teacher_cache is FROM_CONFIG else teacher_cache,
            **self._where(spec, run_dir, desc),
        )

    def _where(self, spec: dict, run_dir: Path, desc: str) -> dict:
        cfg = self.cfg
        return {
            "data": cfg.data,
            "device": self.device,
            "run_dir": run_dir,
            "resume": self.resume,
            "seed": cfg.seed,
            "model_spec": spec,
            "desc": desc,
        }


def _train_phases(cfg: RunConfig, ds: ImageDataset, device, run_dir: Path, resume: bool, start: float):
    """The teacher (loaded or trained here), its spec, every trained phase's result and,
    with a budget, the :class:`StudyBudget` they were trained under (else None)."""
    sspec = spec_for(cfg.student, ds.num_classes, ds, cfg.data)

    def student() -> torch.nn.Module:
        return new_model(sspec, cfg.seed)  # baseline and distilled student start from the same weights

    phases: dict[str, Result] = {}
    loaded = build_teacher(cfg, ds.num_classes, device, ds)
    if cfg.distill.teacher_cache and not loaded:
        raise ConfigError(
            "distill.teacher_cache: a teacher cache needs a trained teacher (teacher.checkpoint or --teacher-checkpoint), not one trained in this run"
        )
    if cfg.distill.teacher_cache and not Path(cfg.distill.teacher_cache).is_file():  # before any phase trains
        raise CacheError(
            f"distill.teacher_cache: {cfg.distill.teacher_cache} does not exist; make it first with "
            f"`kdistill cache-teacher --teacher <checkpoint> --out {cfg.distill.teacher_cache}` (the run's config and data)"
        )
    if loaded:
        teacher, teacher_spec = loaded
    else:
        teacher_spec = spec_for(cfg.teacher, ds.num_classes, ds, cfg.data)
        teacher = teacher_to_train(cfg, teacher_spec)
    names = ["teacher"] * (not loaded) + ["baseline", "distilled"] + generation_names(cfg)
    budget = StudyBudget.plan(cfg, ds, device, start, teacher, student(), names) if cfg.budget else None
    run = Phases(cfg, ds, device, resume)
    if not loaded:  # 1. the teacher
        phases["teacher"] = run.train(
            teacher, teacher_spec, "teacher", run_dir / "teacher", _seconds(budget, "teacher"), "teacher"
        )
        _spent(budget, "teacher", phases["teacher"])
    # 2. the student alone
    phases["baseline"] = run.train(
        student(), sspec, "student", run_dir / "baseline", _seconds(budget, "baseline"), "baseline"
    )
    _spent(budget, "baseline", phases["baseline"])
    # 3. the student distilled from the teacher: with a budget, for the student alone's steps
    steps = budget.student_steps(phases["baseline"]) if budget else None
    phases["distilled"] = run.distill(
        teacher,
        teacher_spec,
        student(),
        sspec,
        run_dir / "distilled",
        _seconds(budget, "distilled"),
        "distill",
        max_steps=steps,
    )
    _spent(budget, "distilled", phases["distilled"])
    # 3b. born-again generations: each student distilled from the previous generation, live
    for g in range(2, cfg.born_again + 2):
        previous = phases["distilled" if g == 2 else f"generation{g - 1}"].model
        spec, name = {"generation": g - 1, **sspec}, f"generation{g}"
        phases[name] = run.distill(
            previous,
            spec,
            student(),
            sspec,
            run_dir / name,
            _seconds(budget, name),
            f"generation {g}",
            teacher_cache=None,
            max_steps=steps,
        )
        _spent(budget, name, phases[name])
    return teacher, teacher_spec, phases, budget


def generation_names(cfg: RunConfig) -> list[str]:
    return [f"generation{g}" for g in range(2, cfg.born_again + 2)]


def _seconds(budget: StudyBudget | None, phase: str) -> float | None:
    return budget.seconds(phase) if budget else None


def _spent(budget: StudyBudget | None, phase: str, result: Result) -> None:
    if budget:
        budget.spent(phase, result)


# the time kept for what follows training (evaluation of every model, profiling, export,
# report): this fraction of the budget, at least STUDY_RESERVE_MIN and at most STUDY_RESERVE_MAX
# seconds, and never less than the evaluation is estimated to take
STUDY_RESERVE_FRACTION = 0.15
STUDY_RESERVE_MIN, STUDY_RESERVE_MAX = 2.0, 30.0


class StudyBudget:
    """How a study with ``--budget`` spends it (see :func:`kdistill.budget.plan_study`): the
    plan made after loading and a short measurement of every phase's step, each phase's
    share of the time left when it starts, and what each one spent.

    Fairness: the student alone trains within its share; the distilled student (and any
    born-again generation) then trains for the same number of optimizer steps on the same
    batches, so that the gain is distillation's, not extra training. Its share of the time
    is a safety net only (up to one of its epochs and an evaluation past the budget): the
    teacher's forward passes make its steps dearer, and that cost, distillation's own, is
    reported next to the gain, not traded for fewer steps."""

    def __init__(self, cfg: RunConfig, plan: StudyPlan, start: float):
        self.cfg, self.plan, self.start = cfg, plan, start
        self.remaining = list(plan.phases)
        self.results: dict[str, dict[str, Any]] = {}
        self.steps: int | None = None  # the student alone's steps, every later student's
        # how far past the budget the students after the first may go to reach its steps: one
        # epoch and its evaluation of the dearest of them (as measured), for all of them together
        self.allowance = max(
            c.seconds(c.steps_per_epoch) for name, c in plan.costs.items() if name not in ("teacher", "baseline")
        )

    @classmethod
    def plan(cls, cfg: RunConfig, ds: ImageDataset, device, start: float, teacher, student, names) -> StudyBudget:
        live = not cfg.distill.teacher_cache
        costs = measure_phase_costs(cfg, ds, device, teacher, student, names, live)
        evaluation = sum(c.eval_seconds for c in costs) + profile_seconds(cfg) * (len(names) + 1) * 2
        reserve = min(max(STUDY_RESERVE_FRACTION * cfg.budget, STUDY_RESERVE_MIN), STUDY_RESERVE_MAX)
        reserve = max(reserve, evaluation)

        def make() -> StudyPlan:
            return plan_study(cfg.budget, time.perf_counter() - start, costs, reserve)

        plan = distributed.on_main(make, share=True)  # rank 0's clock and costs decide, for every rank
        parts = ", ".join(f"{n} {format_seconds(s)}" for n, s in plan.phases.items())
        log(
            f"budget {format_seconds(cfg.budget)}: {plan.steps} steps for every phase ({parts}); "
            f"{format_seconds(plan.spent)} spent loading and measuring, {format_seconds(plan.reserve)} kept for evaluation and report"
        )
        if plan.note:
            log(plan.note)
        return cls(cfg, plan, start)

    def seconds(self, phase: str) -> float:
        """``phase``'s time: its share of what is left. The phases after the student alone
        train for its steps (``max_steps``): for them this is a safety net only, all that is
        left but the planned time of the phases after them, plus :attr:`allowance` (a
        machine slower than measured may take them that far past the budget, no further)."""
        if self.steps is None:
            left = budget_left(self.cfg, self.start, self.plan.reserve)
            seconds = self.plan.share(phase, left, self.remaining)
        else:
            left = budget_left(self.cfg, self.start, self.plan.reserve - self.allowance)
            later = self.remaining[self.remaining.index(phase) + 1 :]
            seconds = max(left - sum(self.plan.phases[p] for p in later), self.plan.share(phase, left, self.remaining))
        self.remaining.remove(phase)
        return seconds

    def student_steps(self, baseline: Result) -> int:
        """The distilled student's steps: as many images as the student alone saw (its
        steps, when the two phases have the same batch size)."""
        images = baseline.budget["steps"] * self.cfg.train_for("student").batch_size
        self.steps = -(-images // self.cfg.train_for("distill").batch_size)
        return self.steps

    def spent(self, phase: str, result: Result) -> None:
        b = result.budget or {}
        self.results[phase] = {"spent_seconds": b.get("wall_seconds"), "steps": b.get("steps")}
        if self.steps is not None and b.get("steps") is not None and b["steps"] < self.steps:
            log(
                f"warning: {phase}: the budget ran out after {b['steps']} of the student alone's {self.steps} steps "
                "(the machine ran slower than measured): the gain mixes distillation with less training"
            )

    def record(self, trained: float) -> dict[str, Any]:
        """For summary.json: the plan and what each phase spent (``trained``: when the last
        phase ended, perf_counter; the evaluation's time is counted from there)."""
        record = self.plan.record()
        for phase, spent in self.results.items():
            record["phases"][phase].update(spent)
        record["evaluation"] = {"planned_seconds": self.plan.reserve, "spent_seconds": time.perf_counter() - trained}
        record["student_steps"] = self.steps
        return record


def _teacher_name(cfg: RunConfig) -> str:
    if cfg.teacher.checkpoints:
        return f"ensemble of {len(cfg.teacher.checkpoints)} teachers"
    if cfg.teacher.checkpoint:
        return f"{cfg.teacher.checkpoint}"
    return cfg.teacher.name


def _evaluate(
    cfg: RunConfig,
    ds: ImageDataset,
    device,
    run_dir: Path,
    models: dict,
    logits: dict,
    phases: dict,
    teacher_spec: dict,
) -> dict:
    """Each model's test metrics, agreement with the teacher, profile and training cost; its
    test logits saved beside its checkpoint."""
    summary_models = {}
    for name, model in progress(models.items(), total=len(models), desc="profile (MACs, size, latency)"):
        entry: dict[str, Any] = {
            "model": _teacher_name(cfg) if name == "teacher" else cfg.student.name,
            "test": classification_metrics(logits[name], ds.test_labels, ds.classes),
            "profile": profile_model(model, input_shape(ds, cfg.data.train_size), max_seconds=profile_seconds(cfg)),
        }
        adapter = getattr(model, "kdistill_input", None)  # a model at its own input (teacher.input_size, ...)
        entry["input_size"] = (adapter.size if adapter and adapter.size else None) or input_shape(
            ds, cfg.data.train_size
        )[-1]
        if name == "teacher" and name in phases and cfg.teacher.finetune is not None:
            entry["finetuned"] = True  # its training time is what fine-tuning cost
        if name != "teacher":
            entry["agreement"] = agreement(logits[name], logits["teacher"])
        if name in phases:
            r = phases[name]
            # flip TTA's and the raw weights' top-1 (train.eval_tta, train.ema), from the phase's own test evaluation
            entry["test"].update({k: r.metrics[k] for k in ("top1_tta", "nll_tta", "top1_raw") if k in r.metrics})
            entry.update(train_seconds=r.train_seconds, images_per_second=r.images_per_second, epochs=len(r.history))
            if name == "distilled":  # a teacher cache, or the teacher run once over repeated views
                entry.update(teacher_source(r))
            if r.budget:
                entry["budget"] = r.budget
        else:
            entry.update(train_seconds=0.0, images_per_second=0.0, from_checkpoint=teacher_spec)
        summary_models[name] = entry
        model.to(device)
        (run_dir / name).mkdir(exist_ok=True)
        saved = {"logits": logits[name].half(), "labels": ds.test_labels}
        atomic_write(run_dir / name / "test_logits.pt", lambda f, saved=saved: torch.save(saved, f))
    return summary_models


def gain_statistics(baseline_logits, distilled_logits, labels, seed: int) -> dict[str, Any]:
    """How sure the gain of one run is: a paired bootstrap interval over the test images and
    McNemar's exact test (see :mod:`kdistill.stats`)."""
    right_baseline = (baseline_logits.argmax(1) == labels).numpy()
    right_distilled = (distilled_logits.argmax(1) == labels).numpy()
    return {
        "gain": paired_bootstrap(right_baseline, right_distilled, seed=seed),
        "mcnemar": mcnemar(right_baseline, right_distilled),
    }


def _summarise(
    cfg: RunConfig,
    ds: ImageDataset,
    device,
    run_dir: Path,
    summary_models: dict,
    statistics: dict,
    student,
    start: float,
    spending=None,
) -> None:
    """summary.json (with the deployed student's measurements and, with a budget, how the
    study spent it: ``spending()``) and the report."""
    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "device": str(device),
        "method": "+".join(cfg.distill.methods),
        "platform": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "data": {
            "dataset": ds.name,
            "train_size": len(ds.train_labels),
            "test_size": len(ds.test_labels),
            "num_classes": ds.num_classes,
            **({"split": ds.split} if ds.split else {}),  # the train/val/test split kdistill made
        },
        "models": summary_models,
        "statistics": statistics,
        "wall_seconds": time.perf_counter() - start,
    }
    if cfg.budget:
        summary["budget_seconds"] = cfg.budget
    deployment = deploy_student(cfg, student, ds, run_dir / "distilled")
    if deployment:
        summary["deployment"] = deployment
    if spending is not None:
        summary["budget_plan"] = spending()
        cache = summary_models["distilled"].get("teacher_cache")
        if cache:  # built before the study, once for every run that reads it: not in this budget
            summary["budget_plan"]["teacher_cache"] = cache
    summary["headline"] = headline(summary)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    report = write_report(run_dir)
    h = summary["headline"]
    warn_if_teacher_not_better(summary_models)
    log(
        f"done in {summary['wall_seconds']:.0f} s: teacher {summary_models['teacher']['test']['top1']:.2f}%, "
        f"baseline {summary_models['baseline']['test']['top1']:.2f}%, distilled {summary_models['distilled']['test']['top1']:.2f}% "
        f"(gain {gain_words(summary)}; at {h['params_fraction'] * 100:.1f}% of the teacher's parameters); report: {report}"
    )


def warn_if_teacher_not_better(summary_models: dict[str, Any]) -> None:
    teacher, baseline = summary_models["teacher"]["test"]["top1"], summary_models["baseline"]["test"]["top1"]
    if teacher <= baseline:
        log(
            f"warning: the teacher ({teacher:.2f}%) is not better than the student alone ({baseline:.2f}%): it has little to "
            "teach; train it longer (teacher.train.epochs) or choose a stronger one"
        )


def deploy_student(cfg: RunConfig, student: torch.nn.Module, ds: ImageDataset, out_dir: Path) -> dict[str, Any] | None:
    """The distilled student as ONNX (verified) and int8 (``deploy`` config), measured; None
    when ONNX export is off, or automatic and the export extra is not installed."""
    if cfg.deploy.onnx is False:
        return None
    if cfg.deploy.onnx is None and not onnx_available():
        log(f"skipping the ONNX export and int8 quantization of the student: {EXPORT_HINT}")
        return None
    log(
        "exporting the distilled student to ONNX"
        + (f" and quantizing it to int8 ({cfg.deploy.quantization})" if cfg.deploy.quantization else "")
    )
    mean, std = ds.mean_std()
    device = next(student.parameters()).device
    # the student's own input: evaluation's centred train_size window of the stored images
    size = cfg.data.train_size or ds.image_shape[-1]
    try:
        return deploy(
            student,
            out_dir / "model.onnx",
            test_images=centre_crop(ds.test_images, size).contiguous(),
            test_labels=ds.test_labels,
            train_images=centre_crop(ds.train_images, size),
            train_rows=ds.train_rows,
            mean=mean,
            std=std,
            classes=ds.classes,
            quantization=cfg.deploy.quantization,
            calibration_count=cfg.deploy.calibration_images,
            seed=cfg.seed,
        )
    finally:
        student.to(device)
