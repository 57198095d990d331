"""Command line: ``kdistill run | train | distill | cache-teacher | mutual | sweep | evaluate | report | export | models | methods``.

Every training command reads a YAML config (``--config``, default: the bundled
quickstart) and accepts ``--set key.path=value`` overrides plus a few shortcuts
(``--data``, ``--epochs``, ``--seed``, ...). Errors the user can fix are printed as one
line (no traceback unless ``--debug``) and exit with status 2.

The training commands run data-parallel when started by torchrun
(``torchrun --nproc_per_node=2 -m kdistill run``): see :mod:`kdistill.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kdistill.errors import ConfigError, KDistillError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file or bundled config name (default: quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--data", help="data set: cifar10-mini, cifar10, cifar100, or an ImageFolder folder/archive (data.dataset)")
    p.add_argument("--data-dir", help="download and cache folder (data.data_dir)")
    p.add_argument("--name", help="run name: outputs go to OUTPUT_DIR/NAME (name)")
    p.add_argument("--output-dir", help="parent folder of run directories (output_dir, default runs)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (device)")
    p.add_argument("--epochs", type=int, help="epochs of every phase (train.epochs and each phase's train.epochs)")
    p.add_argument("--budget", help="wall-clock budget of the command, e.g. 90s, 10m, 1.5h: train as many steps as fit, lr schedule stretched over them (budget)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log metrics as TensorBoard scalars in each phase's tensorboard/ (train.tensorboard; needs kdistill[tensorboard])")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _method_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="distillation method(s), e.g. kd, or kd+crd (distill.methods)")
    p.add_argument("--alpha", type=float, help="weight of the distillation terms; CE gets 1 - alpha (distill.alpha)")
    p.add_argument("--temperature", "-T", type=float, help="temperature of the method(s) (distill.methods.<m>.temperature)")
    p.add_argument("--logit-std", action="store_true", help="z-score logits before the temperature (Sun et al. 2024) in kd/dkd (distill.methods.<m>.logit_std)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation of image classifiers, measured end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole study: teacher -> student alone -> distilled student -> report")
    _common(p)
    _method_arg(p)
    p.add_argument("--teacher-checkpoint", help="use this trained teacher instead of training one (teacher.checkpoint)")
    p.add_argument("--born-again", type=int, metavar="N", help="then train N more generations of the student, each distilled from the previous one (born_again)")

    p = sub.add_parser("train", help="train one model with cross-entropy")
    _common(p)
    p.add_argument("--model", "-m", help="model name (teacher.name of the config; see `kdistill models`)")

    p = sub.add_parser("distill", help="distill a student from a teacher checkpoint")
    _common(p)
    _method_arg(p)
    p.add_argument("--teacher", required=True, action="append", help="teacher checkpoint (checkpoint.pt of a train or run); repeat for multi-teacher distillation (teacher.checkpoints)")
    p.add_argument("--teacher-weights", type=float, nargs="+", help="weights of the teachers' soft outputs (teacher.weights)")
    p.add_argument("--student", "-m", help="student model name (student.name)")
    p.add_argument("--teacher-cache", help="read the teacher's logits from this cache (kdistill cache-teacher) instead of running the teacher (distill.teacher_cache)")

    p = sub.add_parser("cache-teacher", help="run a teacher once over the augmented views of E epochs and store its logits for distill --teacher-cache")
    p.add_argument("--teacher", required=True, action="append", help="teacher checkpoint; repeat for an ensemble (its combined logits are cached)")
    p.add_argument("--teacher-weights", type=float, nargs="+", help="weights of the ensemble's teachers (teacher.weights)")
    p.add_argument("--out", "-o", required=True, help="the cache file to write")
    p.add_argument("--epochs", type=int, help="epochs of views to cache: the distillation runs' epochs (train.epochs)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep only the K largest logits of each view (many classes); 0: all (default)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of the logits (default float16)")
    p.add_argument("--config", "-c", help="YAML config file or bundled config name: its data, seed and augmentation must be the distillation's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--data", help="data set (data.dataset)")
    p.add_argument("--data-dir", help="download and cache folder (data.data_dir)")
    p.add_argument("--seed", type=int, help="random seed: the distillation's (seed)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (device)")
    p.add_argument("--method", help="the distillation method(s); for an ensemble, its averaging temperature is theirs (distill.methods)")
    p.add_argument("--temperature", "-T", type=float, help="temperature of the method(s), used to average an ensemble (distill.methods.<m>.temperature)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a data set's test split")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher", help="also report agreement with this teacher checkpoint")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("mutual", help="deep mutual learning: train several models together, no teacher")
    _common(p)
    p.add_argument("--models", nargs="+", help="two or more model names (mutual.models)")
    p.add_argument("--temperature", "-T", type=float, help="temperature of the mutual KL terms (mutual.temperature)")

    p = sub.add_parser("sweep", help="distill a grid of students/methods/T/alpha from one teacher, sharing one teacher cache; leaderboard + plot")
    _common(p)
    p.add_argument("--teacher", required=True, action="append", help="teacher checkpoint; repeat for an ensemble (teacher.checkpoints)")
    p.add_argument("--teacher-weights", type=float, nargs="+", help="weights of the ensemble's teachers (teacher.weights)")
    p.add_argument("--teacher-cache", help="an existing cache to use (default: built once into the run directory) (distill.teacher_cache)")
    p.add_argument("--students", nargs="+", help="student models (default: student.name)")
    p.add_argument("--methods", nargs="+", help="methods, each may combine several with + (default: the config's)")
    p.add_argument("--temperatures", "-T", type=float, nargs="+", help="temperatures (default: the config's)")
    p.add_argument("--alphas", type=float, nargs="+", help="alphas (default: distill.alpha)")
    p.add_argument("--jobs", "-j", default="1", help="configurations trained at once, each in its own process with its share of "
                   "the CPU cores, or one GPU each; 'auto': one per core (at most 4) or per GPU (default 1)")

    p = sub.add_parser("report", help="(re)write the report of a run, or compare several runs in one report")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `kdistill run`")
    p.add_argument("--output", "-o", help="folder of the comparison report (several runs; default reports/<names joined by '-vs-'>)")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, verified on test images; optional int8")
    p.add_argument("checkpoint")
    p.add_argument("--format", "-f", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--output", "-o", help="output file (default: model.onnx / model.torchscript.pt next to the checkpoint)")
    p.add_argument("--quantize", choices=["static", "dynamic"], help="also write an int8 model (ONNX Runtime): static calibrates on training images, dynamic needs no data")
    p.add_argument("--calibration-images", type=int, default=512, help="training images for static int8 calibration (default 512)")
    p.add_argument("--data", help="data set to verify on (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--debug", action="store_true")

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the distillation methods and their options")
    return parser


def _config_from_args(args: argparse.Namespace):
    from kdistill.config import load_config

    overrides = list(args.overrides)
    shortcuts = {
        "data": "data.dataset", "data_dir": "data.data_dir", "name": "name", "output_dir": "output_dir",
        "seed": "seed", "device": "device", "epochs": "train.epochs", "alpha": "distill.alpha",
        "teacher_checkpoint": "teacher.checkpoint", "model": "teacher.name", "student": "student.name",
        "born_again": "born_again", "budget": "budget", "teacher_cache": "distill.teacher_cache", "tensorboard": "train.tensorboard",
    }
    # shortcuts first, so an explicit --set wins
    pre = [f"{key}={json.dumps(getattr(args, attr)) if isinstance(getattr(args, attr), str) else getattr(args, attr)}" for attr, key in shortcuts.items() if getattr(args, attr, None) is not None]
    if getattr(args, "epochs", None) is not None:  # every phase, whatever the config's phase overrides say
        pre += [f"{phase}.train.epochs={args.epochs}" for phase in ("teacher", "student", "distill")]
    method = getattr(args, "method", None)
    methods = [m.strip() for m in method.split("+")] if method else None
    if methods:
        pre.append("distill.methods=" + json.dumps({m: {} for m in methods}))
    if getattr(args, "temperature", None) is not None:
        if args.command == "mutual":
            pre.append(f"mutual.temperature={args.temperature}")
        for m in methods or ["kd"]:
            if m in ("kd", "dkd", "ls", "dist"):
                pre.append(f"distill.methods.{m}.temperature={args.temperature}")
    if getattr(args, "logit_std", False):
        for m in methods or ["kd"]:
            if m in ("kd", "dkd"):
                pre.append(f"distill.methods.{m}.logit_std=true")
    if args.command == "mutual" and args.models:
        pre.append("mutual.models=" + json.dumps(args.models))
    if args.command in ("distill", "cache-teacher", "sweep"):
        teachers = args.teacher
        if len(teachers) == 1:
            pre.append(f"teacher.checkpoint={json.dumps(teachers[0])}")
        else:
            pre.append("teacher.checkpoints=" + json.dumps(teachers))
        if args.teacher_weights:
            pre.append("teacher.weights=" + json.dumps(args.teacher_weights))
    return load_config(args.config, pre + overrides)


@contextlib.contextmanager
def _job(cfg) -> Iterator[None]:
    """The command inside the torchrun job's process group, if torchrun started it."""
    from kdistill import distributed
    from kdistill.engine import select_device

    with distributed.process_group(select_device(cfg.device), cfg.distributed.backend, cfg.distributed.timeout_s):
        yield


def cmd_run(args) -> None:
    from kdistill.study import run_study

    cfg = _config_from_args(args)
    with _job(cfg):
        run_study(cfg, resume=args.resume)


def cmd_train(args) -> None:
    import torch

    from kdistill import api
    from kdistill.engine import select_device
    from kdistill.models import create_model
    from kdistill.study import (
        budget_left,
        load_data,
        model_spec,
        open_run_dir,
        profile_seconds,
        train_config,
        write_single_summary,
    )

    start = time.perf_counter()
    cfg = _config_from_args(args)
    with _job(cfg), open_run_dir(cfg, args.resume) as run_dir:
        ds = load_data(cfg)
        spec = model_spec(cfg.teacher.name, cfg.teacher.kwargs, ds.num_classes)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.teacher.name, **spec["kwargs"])
        result = api.train(
            model, ds, config=train_config(cfg, "teacher", budget_left(cfg, start)), data=cfg.data, device=select_device(cfg.device), run_dir=run_dir,
            resume=args.resume, seed=cfg.seed, model_spec=spec, desc=cfg.teacher.name,
        )
        write_single_summary(run_dir, cfg.teacher.name, result, ds, profile_max_seconds=profile_seconds(cfg))


def cmd_distill(args) -> None:
    import torch

    from kdistill import api
    from kdistill.engine import select_device
    from kdistill.models import create_model
    from kdistill.study import (
        budget_left,
        build_teacher,
        load_data,
        model_spec,
        open_run_dir,
        profile_seconds,
        train_config,
        write_single_summary,
    )

    start = time.perf_counter()
    cfg = _config_from_args(args)
    with _job(cfg), open_run_dir(cfg, args.resume) as run_dir:
        ds = load_data(cfg)
        device = select_device(cfg.device)
        teacher, teacher_spec = build_teacher(cfg, ds.num_classes, device, ds)
        spec = model_spec(cfg.student.name, cfg.student.kwargs, ds.num_classes)
        torch.manual_seed(cfg.seed)
        student = create_model(cfg.student.name, **spec["kwargs"])
        d = cfg.distill
        result = api.distill(
            teacher, student, ds, methods=d.methods, alpha=d.alpha, ce_weight=d.ce_weight,
            config=train_config(cfg, "distill", budget_left(cfg, start)), data=cfg.data, device=device, run_dir=run_dir,
            resume=args.resume, seed=cfg.seed, model_spec=spec, teacher_spec=teacher_spec, desc="distill", teacher_cache=d.teacher_cache,
        )
        write_single_summary(run_dir, cfg.student.name, result, ds, teacher=teacher, profile_max_seconds=profile_seconds(cfg))


def cmd_mutual(args) -> None:
    import torch

    from kdistill import api
    from kdistill.engine import select_device
    from kdistill.models import create_model
    from kdistill.study import (
        budget_left,
        load_data,
        model_spec,
        open_run_dir,
        train_config,
        write_single_summary,
    )

    start = time.perf_counter()
    cfg = _config_from_args(args)
    with _job(cfg), open_run_dir(cfg, args.resume) as run_dir:
        ds = load_data(cfg)
        specs = [model_spec(name, {}, ds.num_classes) for name in cfg.mutual.models]
        models = []
        for i, spec in enumerate(specs):
            torch.manual_seed(cfg.seed + i)  # peers of the same architecture must not start identical
            models.append(create_model(spec["name"], **spec["kwargs"]))
        results = api.mutual(
            models, ds, temperature=cfg.mutual.temperature, weight=cfg.mutual.weight, config=train_config(cfg, "student", budget_left(cfg, start)),
            data=cfg.data, device=select_device(cfg.device), run_dir=run_dir, resume=args.resume, seed=cfg.seed, model_specs=specs,
        )
        for i, (name, result) in enumerate(zip(cfg.mutual.models, results)):
            write_single_summary(run_dir / f"model{i}", name, result, ds)


def cmd_cache_teacher(args) -> None:
    from kdistill import api
    from kdistill.engine import select_device
    from kdistill.study import build_teacher, load_data

    cfg = _config_from_args(args)
    with _job(cfg):  # under torchrun the ranks share the work; rank 0 writes the file
        ds = load_data(cfg)
        device = select_device(cfg.device)
        teacher, _ = build_teacher(cfg, ds.num_classes, device, ds)
        tcfg = cfg.train_for("distill")
        cache = api.cache_teacher(
            teacher, ds, epochs=tcfg.epochs, path=args.out, data=cfg.data, seed=cfg.seed, device=device,
            batch_size=tcfg.eval_batch_size, channels_last=tcfg.channels_last, amp=tcfg.amp, top_k=args.top_k, dtype=args.dtype,
        )
    print(f"wrote {args.out}: {cache.describe()}; use it with: kdistill distill --teacher ... --teacher-cache {args.out} (same data, seed and augmentation)")


def cmd_sweep(args) -> None:
    from kdistill.sweep import expand_grid, run_sweep

    cfg = _config_from_args(args)
    points = expand_grid(
        args.students or [cfg.student.name], args.methods or ["+".join(cfg.distill.methods)],
        args.temperatures or [cfg.distill.temperature], args.alphas or [cfg.distill.alpha],
    )
    jobs = int(args.jobs) if args.jobs.isdigit() else args.jobs  # anything else: resolve_jobs says what is expected
    run_sweep(cfg, points, resume=args.resume, jobs=jobs)


def cmd_evaluate(args) -> None:
    from kdistill.checkpoint import load_model
    from kdistill.data.dataset import load_dataset
    from kdistill.data.loader import EvalData, Normalize
    from kdistill.engine import predict, select_device
    from kdistill.errors import CheckpointError
    from kdistill.evaluate import agreement, classification_metrics, profile_model

    device = select_device(args.device)
    model, state = load_model(Path(args.checkpoint))
    if state.get("model_spec") is None:
        raise CheckpointError(f"{args.checkpoint} holds a model trained through the Python API without a registry name; evaluate it from Python")
    info = state.get("data", {})
    dataset = args.data or info.get("dataset")
    ds = load_dataset(dataset, info.get("image_size", 32), Path(args.data_dir) if args.data_dir else None)
    expected = state["model_spec"]["kwargs"].get("num_classes")
    if expected is not None and expected != ds.num_classes:
        raise CheckpointError(f"{args.checkpoint} predicts {expected} classes but data set {dataset!r} has {ds.num_classes}")
    mean, std = info.get("mean") or ds.mean_std()[0], info.get("std") or ds.mean_std()[1]
    test = EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))
    logits = predict(model.to(device), test, desc="evaluate")
    metrics = {"checkpoint": args.checkpoint, "dataset": dataset, "test": classification_metrics(logits, ds.test_labels, ds.classes)}
    if args.teacher:
        teacher, _ = load_model(Path(args.teacher))
        metrics["agreement"] = agreement(logits, predict(teacher.to(device), test))
    metrics["profile"] = profile_model(model, ds.image_shape)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    t = metrics["test"]
    print(f"{args.checkpoint} on {dataset} test ({t['num_samples']} images): top-1 {t['top1']:.2f}%  top-5 {t['top5']:.2f}%  NLL {t['nll']:.4f}  ECE {t['ece']:.4f}")
    if "agreement" in metrics:
        a = metrics["agreement"]
        print(f"agreement with teacher: {a['agreement_top1']:.2f}%  mean KL {a['mean_kl']:.4f}")
    p = metrics["profile"]
    print(
        f"parameters {p['parameters']:,}  MACs {p['macs']:,}  size {p['disk_bytes'] / 1e6:.2f} MB  CPU latency b=1 {p['latency_b1']['median_ms']:.2f} ms "
        f"(p90 {p['latency_b1']['p90_ms']:.2f})  CPU throughput b=256 {p['throughput_b256']['images_per_second']:.0f} img/s"
    )
    if "gpu" in p:
        g = p["gpu"]
        print(f"GPU ({g['device']}) latency b=1 {g['latency_b1']['median_ms']:.3f} ms  throughput b=256 {g['throughput_b256']['images_per_second']:.0f} img/s")


def cmd_report(args) -> None:
    from kdistill.report import write_comparison, write_report

    if len(args.run_dirs) == 1:
        out = write_report(Path(args.run_dirs[0]))
        print(f"report: {out} and {out.with_suffix('.html')}")
        return
    out = write_comparison([Path(d) for d in args.run_dirs], Path(args.output) if args.output else None)
    print(f"comparison report: {out} and {out.with_suffix('.html')}")


def cmd_export(args) -> None:
    from kdistill.errors import ExportError
    from kdistill.export import export_checkpoint

    if args.calibration_images <= 0:
        raise ExportError(f"--calibration-images {args.calibration_images}: expected a positive number of training images")
    result = export_checkpoint(
        Path(args.checkpoint), args.format, Path(args.output) if args.output else None, dataset=args.data,
        data_dir=Path(args.data_dir) if args.data_dir else None, quantization=args.quantize, calibration_count=args.calibration_images,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key in ("onnx", "torchscript", "int8"):
        if key not in result:
            continue
        r = result[key]
        print(
            f"{key}: {r['path']} ({r['disk_bytes'] / 1e6:.2f} MB): test top-1 {r['top1']:.2f}% (PyTorch {result['pytorch_top1']:.2f}%), "
            f"max |logit diff| {r['max_abs_diff']:.1e}, top-1 identical on {r['top1_agreement']:.2f}% of {r['num_images']} test images; "
            f"CPU latency b=1 {r['latency_b1']['median_ms']:.2f} ms (p90 {r['latency_b1']['p90_ms']:.2f}), "
            f"throughput b=256 {r['throughput_b256']['images_per_second']:.0f} img/s"
        )


def cmd_models(args) -> None:
    from kdistill.models import MODELS, count_parameters, create_model

    for name in sorted(MODELS):
        print(f"{name:14s} {count_parameters(create_model(name, num_classes=10)) / 1e6:6.2f} M parameters (10 classes)")


def cmd_methods(args) -> None:
    from kdistill.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        opts = ", ".join(f"{k}={f.default}" for k, f in cls.Options.model_fields.items())
        print(f"{name:8s} {doc}\n         options: {opts}")


COMMANDS = {
    "run": cmd_run, "train": cmd_train, "distill": cmd_distill, "cache-teacher": cmd_cache_teacher, "mutual": cmd_mutual,
    "sweep": cmd_sweep, "evaluate": cmd_evaluate, "report": cmd_report, "export": cmd_export,
    "models": cmd_models, "methods": cmd_methods,
}


# the commands that run data-parallel under torchrun; the others run in one process
DISTRIBUTED_COMMANDS = ("run", "train", "distill", "mutual", "cache-teacher")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command line, for outputs that record it (None: sys.argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(
                f"kdistill {args.command} runs in one process; launch it without torchrun "
                f"(torchrun runs only {', '.join(DISTRIBUTED_COMMANDS)})"
            )
        COMMANDS[args.command](args)
    except KDistillError as e:
        if getattr(args, "debug", False):
            raise
        # in a torchrun job every rank reports, tagged, so a failure of one is easy to find
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        print(f"kdistill: {rank}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdistill: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as e:  # the machine's fault, not kdistill's: a full disk, a read-only or vanished folder
        if getattr(args, "debug", False):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"kdistill: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
