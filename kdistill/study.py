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
from kdistill.config import RunConfig
from kdistill.data.dataset import ImageDataset
from kdistill.engine import Result, predict, select_device
from kdistill.errors import ConfigError
from kdistill.evaluate import agreement, classification_metrics, count_macs, profile_model
from kdistill.export import EXPORT_HINT, deploy, onnx_available
from kdistill.files import atomic_write, atomic_write_text
from kdistill.progress import log, progress
from kdistill.report.compare import write_comparison
from kdistill.report.run_report import gain_words, headline, write_report
from kdistill.runs import (
    budget_left,
    build_teacher,
    check_distillation,
    job,
    load_data,
    new_model,
    open_run_dir,
    profile_seconds,
    spec_for,
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
        teacher, teacher_spec, phases = _train_phases(cfg, ds, device, run_dir, resume, start)
        # 4. evaluate them all on the test set, the same way; rank 0 profiles and reports
        models = {"teacher": teacher, **{name: r.model for name, r in phases.items() if name != "teacher"}}
        test = test_set(ds, device)
        logits = {
            name: predict(m, test, desc=f"evaluate {name}") for name, m in models.items()
        }  # sharded over the ranks
        if distributed.is_main():
            summary_models = _evaluate(cfg, ds, device, run_dir, models, logits, phases, teacher_spec)
            statistics = gain_statistics(logits["baseline"], logits["distilled"], ds.test_labels, cfg.seed)
            _summarise(cfg, ds, device, run_dir, summary_models, statistics, phases["distilled"].model, start)
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
    ) -> Result:
        """Distill ``student`` from ``teacher`` with the config's distillation settings (a
        sweep gives each point its own ``methods`` and ``alpha``)."""
        d = self.cfg.distill
        return api.distill(
            teacher,
            student,
            self.ds,
            methods=methods or d.methods,
            alpha=d.alpha if alpha is None else alpha,
            ce_weight=d.ce_weight,
            config=train_config(self.cfg, "distill", budget),
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
    """The teacher (loaded or trained here), its spec, and every trained phase's result."""
    sspec = spec_for(cfg.student, ds.num_classes)

    def student() -> torch.nn.Module:
        return new_model(sspec, cfg.seed)  # baseline and distilled student start from the same weights

    phases: dict[str, Result] = {}
    loaded = build_teacher(cfg, ds.num_classes, device, ds)
    if cfg.distill.teacher_cache and not loaded:
        raise ConfigError(
            "distill.teacher_cache: a teacher cache needs a trained teacher (teacher.checkpoint or --teacher-checkpoint), not one trained in this run"
        )
    if loaded:
        teacher, teacher_spec = loaded
    else:
        teacher_spec = spec_for(cfg.teacher, ds.num_classes)
        teacher = new_model(teacher_spec, cfg.seed)
    budgets = _phase_budgets(cfg, start, teacher, student, ds.image_shape, train_teacher=not loaded)
    run = Phases(cfg, ds, device, resume)
    if not loaded:  # 1. the teacher
        phases["teacher"] = run.train(
            teacher, teacher_spec, "teacher", run_dir / "teacher", budgets("teacher"), "teacher"
        )
    # 2. the student alone
    phases["baseline"] = run.train(student(), sspec, "student", run_dir / "baseline", budgets("baseline"), "baseline")
    # 3. the student distilled from the teacher
    distilled = run_dir / "distilled"
    phases["distilled"] = run.distill(
        teacher, teacher_spec, student(), sspec, distilled, budgets("distilled"), "distill"
    )
    # 3b. born-again generations: each student distilled from the previous generation, live
    for g in range(2, cfg.born_again + 2):
        previous = phases["distilled" if g == 2 else f"generation{g - 1}"].model
        spec, folder, budget = {"generation": g - 1, **sspec}, run_dir / f"generation{g}", budgets(f"generation{g}")
        phases[f"generation{g}"] = run.distill(
            previous, spec, student(), sspec, folder, budget, f"generation {g}", teacher_cache=None
        )
    return teacher, teacher_spec, phases


def _phase_budgets(cfg: RunConfig, start: float, teacher, student, image_shape, train_teacher: bool):
    """With ``cfg.budget``: a function phase -> seconds. The time left (less a reserve for
    the final evaluation and profiling) is split over the phases still to train in
    proportion to their compute per step, estimated from MACs (a training step costs about
    three forward passes; distillation adds one teacher forward), so that every phase
    trains for about the same number of steps. Without a budget: phase -> None."""
    if not cfg.budget:
        return lambda phase: None
    mt, ms = count_macs(teacher, image_shape), count_macs(student(), image_shape)
    costs = {"teacher": 3 * mt} if train_teacher else {}
    costs.update(baseline=3 * ms, distilled=mt + 3 * ms)
    costs.update({f"generation{g}": 4 * ms for g in range(2, cfg.born_again + 2)})
    reserve = min(0.15 * cfg.budget, 30.0)  # evaluation, profiling and report of 3+ models
    remaining = list(costs)

    def budget(phase: str) -> float:
        left = budget_left(cfg, start, reserve)
        share = costs[phase] / sum(costs[p] for p in remaining)
        remaining.remove(phase)
        return left * share

    return budget


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
            "profile": profile_model(model, ds.image_shape, max_seconds=profile_seconds(cfg)),
        }
        if name != "teacher":
            entry["agreement"] = agreement(logits[name], logits["teacher"])
        if name in phases:
            r = phases[name]
            entry.update(train_seconds=r.train_seconds, images_per_second=r.images_per_second, epochs=len(r.history))
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
) -> None:
    """summary.json (with the deployed student's measurements) and the report."""
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
    try:
        return deploy(
            student,
            out_dir / "model.onnx",
            test_images=ds.test_images,
            test_labels=ds.test_labels,
            train_images=ds.train_images,
            mean=mean,
            std=std,
            classes=ds.classes,
            quantization=cfg.deploy.quantization,
            calibration_count=cfg.deploy.calibration_images,
            seed=cfg.seed,
        )
    finally:
        student.to(device)
