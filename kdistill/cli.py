"""Command line: ``kdistill run | train | distill | cache-teacher | mutual | sweep | evaluate | report | export | models | methods``.

Every training command reads a YAML config (``--config``, default: the bundled
quickstart) and accepts ``--set key.path=value`` overrides plus a few shortcuts
(``--data``, ``--epochs``, ``--seed``, ...). Errors the user can fix are printed as one
line (no traceback unless ``--debug``) and exit with status 2.

The CLI only parses, calls and prints: the work is done by :mod:`kdistill.study`
(``run``), :mod:`kdistill.commands` (the single-model commands), :mod:`kdistill.sweep`,
:mod:`kdistill.report` and :mod:`kdistill.export`.

The training commands run data-parallel when started by torchrun
(``torchrun --nproc_per_node=2 -m kdistill run``): see :mod:`kdistill.distributed`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdistill import commands, runs
from kdistill.config import Override, RunConfig, apply_overrides, load_config
from kdistill.errors import ConfigError, ExportError, KDistillError
from kdistill.export import export_checkpoint
from kdistill.methods import METHODS, taking
from kdistill.models import MODELS, count_parameters, create_model
from kdistill.models.sources import SYNTAX, is_source
from kdistill.report import write_comparison, write_report
from kdistill.runs import KINDS, default_run_name
from kdistill.study import run_seeds, run_study
from kdistill.sweep import expand_grid, run_sweep


def _config_args(p: argparse.ArgumentParser, config_help: str = "(default: quickstart)") -> None:
    """The config file, its overrides and the shortcuts every config-reading command takes."""
    p.add_argument("--config", "-c", help=f"YAML config file or bundled config name {config_help}")
    set_help = "override a config key, e.g. --set train.epochs=5 (repeatable)"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    data_help = "data set: cifar10-mini, cifar10, cifar100, an ImageFolder folder/archive or a .csv/.jsonl manifest (data.dataset)"
    p.add_argument("--data", help=data_help)
    p.add_argument("--data-dir", help="download and cache folder (data.data_dir)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (device)")


def _common(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--name", help="run name: outputs go to OUTPUT_DIR/NAME (name)")
    p.add_argument("--output-dir", help="parent folder of run directories (output_dir, default runs)")
    p.add_argument("--epochs", type=int, help="epochs of every phase (train.epochs and each phase's train.epochs)")
    p.add_argument(
        "--budget",
        help="wall-clock budget of the command, e.g. 90s, 10m, 1.5h: train as many steps as fit, lr schedule stretched over them (budget)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log metrics as TensorBoard scalars in each phase's tensorboard/ (train.tensorboard; needs kdistill[tensorboard])",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _method_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="distillation method(s), e.g. kd, or kd+crd (distill.methods)")
    p.add_argument("--alpha", type=float, help="weight of the distillation terms; CE gets 1 - alpha (distill.alpha)")
    p.add_argument(
        "--temperature",
        "-T",
        type=float,
        help="temperature of the method(s) that have one (distill.methods.<method>.temperature)",
    )
    p.add_argument(
        "--logit-std",
        action="store_true",
        help="z-score logits before the temperature (Sun et al. 2024) in the method(s) that offer it (distill.methods.<method>.logit_std)",
    )


def _teacher_args(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    p.add_argument(
        "--teacher",
        required=True,
        action="append",
        help=checkpoint_help
        + ", or a trained model from a library or file used as it is (onnx:teacher.onnx, hf:<folder>, ...)",
    )
    p.add_argument(
        "--teacher-weights", type=float, nargs="+", help="weights of the teachers' soft outputs (teacher.weights)"
    )


def _add_study_commands(sub) -> None:
    p = sub.add_parser("run", help="the whole study: teacher -> student alone -> distilled student -> report")
    _common(p)
    _method_arg(p)
    p.add_argument("--teacher-checkpoint", help="use this trained teacher instead of training one (teacher.checkpoint)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="run the study once per seed, each in OUTPUT_DIR/NAME/seedN, and write one report over them "
        "with the gain's 95%% interval (default name: <config name>-seeds)",
    )
    p.add_argument(
        "--share-teacher",
        action="store_true",
        help="with --seeds: train the teacher once (first seed) and distill every seed's student from it",
    )
    p.add_argument(
        "--born-again",
        type=int,
        metavar="N",
        help="then train N more generations of the student, each distilled from the previous one (born_again)",
    )

    p = sub.add_parser("train", help="train one model with cross-entropy")
    _common(p)
    p.add_argument("--model", "-m", help="model name (teacher.name of the config; see `kdistill models`)")

    p = sub.add_parser("distill", help="distill a student from a teacher checkpoint")
    _common(p)
    _method_arg(p)
    _teacher_args(
        p,
        "teacher checkpoint (checkpoint.pt of a train or run); repeat for multi-teacher distillation (teacher.checkpoints)",
    )
    p.add_argument("--student", "-m", help="student model name (student.name)")
    p.add_argument(
        "--teacher-cache",
        help="read the teacher's logits from this cache (kdistill cache-teacher) instead of running the teacher (distill.teacher_cache)",
    )


def _add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run a teacher once over the augmented views of E epochs and store its logits for distill --teacher-cache",
    )
    _teacher_args(p, "teacher checkpoint; repeat for an ensemble (its combined logits are cached)")
    p.add_argument("--out", "-o", required=True, help="the cache file to write")
    p.add_argument("--epochs", type=int, help="epochs of views to cache: the distillation runs' epochs (train.epochs)")
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="keep only the K largest logits of each view (many classes); 0: all (default)",
    )
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="storage of the logits (default float16)"
    )
    _config_args(p, "(its data, seed and augmentation must be the distillation's)")
    p.add_argument(
        "--method",
        help="the distillation method(s); for an ensemble, its averaging temperature is theirs (distill.methods)",
    )
    p.add_argument(
        "--temperature",
        "-T",
        type=float,
        help="temperature of the method(s), used to average an ensemble (distill.methods.<method>.temperature)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _add_group_commands(sub) -> None:
    p = sub.add_parser("mutual", help="deep mutual learning: train several models together, no teacher")
    _common(p)
    p.add_argument("--models", nargs="+", help="two or more model names (mutual.models)")
    p.add_argument("--temperature", "-T", type=float, help="temperature of the mutual KL terms (mutual.temperature)")

    p = sub.add_parser(
        "sweep",
        help="distill a grid of students/methods/T/alpha from one teacher, sharing one teacher cache; leaderboard + plot",
    )
    _common(p)
    _teacher_args(p, "teacher checkpoint; repeat for an ensemble (teacher.checkpoints)")
    p.add_argument(
        "--teacher-cache",
        help="an existing cache to use (default: built once into the run directory) (distill.teacher_cache)",
    )
    p.add_argument("--students", nargs="+", help="student models (default: student.name)")
    p.add_argument("--methods", nargs="+", help="methods, each may combine several with + (default: the config's)")
    p.add_argument("--temperatures", "-T", type=float, nargs="+", help="temperatures (default: the config's)")
    p.add_argument("--alphas", type=float, nargs="+", help="alphas (default: distill.alpha)")
    p.add_argument(
        "--jobs",
        "-j",
        default="1",
        help="configurations trained at once, each in its own process with its share of "
        "the CPU cores, or one GPU each; 'auto': one per core (at most 4) or per GPU (default 1)",
    )


def _add_tool_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a data set's test split")
    p.add_argument(
        "checkpoint", help="checkpoint.pt of a train, distill or run phase (e.g. runs/x/distilled/checkpoint.pt)"
    )
    p.add_argument("--data", help="data set (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--data-dir", help="download and cache folder of the data set (default: $KDISTILL_CACHE or ~/.cache/kdistill)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N: where the test set is evaluated (latency is always measured on the CPU, and on the GPU too when there is one)",
    )
    p.add_argument("--teacher", help="also report agreement with this teacher checkpoint")
    p.add_argument(
        "--tta",
        choices=["off", "flip"],
        default="off",
        help="flip: also report flip test-time augmentation's top-1 (the mean of the logits of each image and its mirror), beside the plain top-1",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    p = sub.add_parser("report", help="(re)write the report of a run, or compare several runs in one report")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `kdistill run`")
    p.add_argument(
        "--output",
        "-o",
        help="folder of the report (one run: default its run directory; several runs: default "
        "reports/<names joined by '-vs-'>)",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX or TorchScript, verified on test images; optional int8"
    )
    p.add_argument(
        "checkpoint", help="checkpoint.pt of a train, distill or run phase (e.g. runs/x/distilled/checkpoint.pt)"
    )
    p.add_argument(
        "--format",
        "-f",
        choices=["onnx", "torchscript"],
        default="onnx",
        help="onnx (needs kdistill[export]) or torchscript (default onnx)",
    )
    p.add_argument(
        "--output", "-o", help="output file (default: model.onnx / model.torchscript.pt next to the checkpoint)"
    )
    p.add_argument(
        "--quantize",
        choices=["static", "dynamic"],
        help="also write an int8 model (ONNX Runtime): static calibrates on training images, dynamic needs no data",
    )
    p.add_argument(
        "--calibration-images", type=int, default=512, help="training images for static int8 calibration (default 512)"
    )
    p.add_argument("--data", help="data set to verify on (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--data-dir", help="download and cache folder of the data set (default: $KDISTILL_CACHE or ~/.cache/kdistill)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("methods", help="list the distillation methods and their options")


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``parser.commands`` maps each command's name to its own parser."""
    parser = argparse.ArgumentParser(
        prog="kdistill", description="Knowledge distillation of image classifiers, measured end to end."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {runs.kdistill_version()}",
        help="print kdistill's version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_study_commands(sub)
    _add_cache_command(sub)
    _add_group_commands(sub)
    _add_tool_commands(sub)
    for p in sub.choices.values():  # each command's flags, as errors name them: -T/--temperature
        p.set_defaults(
            flag_names={a.dest: "/".join(sorted(a.option_strings, key=len)) for a in p._actions if a.option_strings}
        )
    parser.commands = sub.choices
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; an unknown option is refused with its command's usage
    (argparse alone would show the top-level usage for ``kdistill train --bogus``)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# command-line shortcuts -> the config keys they set
SHORTCUTS = {
    "data": "data.dataset",
    "data_dir": "data.data_dir",
    "name": "name",
    "output_dir": "output_dir",
    "seed": "seed",
    "device": "device",
    "epochs": "train.epochs",
    "alpha": "distill.alpha",
    "teacher_checkpoint": "teacher.checkpoint",
    "model": "teacher.name",
    "student": "student.name",
    "born_again": "born_again",
    "budget": "budget",
    "teacher_cache": "distill.teacher_cache",
    "tensorboard": "train.tensorboard",
}


def _said(args: argparse.Namespace, attr: str) -> str:
    """The flag ``attr`` as the user typed it, for errors: ``-T/--temperature 0``, ``--device gpu``."""
    name = getattr(args, "flag_names", {}).get(attr) or "--" + attr.replace("_", "-")
    value = getattr(args, attr)
    if value is True:  # a switch
        return name
    values = value if isinstance(value, list) else [value]
    typed = [
        str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values
    ]  # argparse made 0.0 of "0"
    if attr == "teacher":  # repeated flag
        return " ".join(f"{name} {v}" for v in typed)
    return f"{name} {' '.join(typed)}"


def _shortcut_overrides(args: argparse.Namespace) -> list[Override]:
    """The overrides the command line's shortcuts stand for, each naming its flag."""
    pre = []
    for attr, key in SHORTCUTS.items():
        value = getattr(args, attr, None)
        if value is not None:
            pre.append(Override(f"{key}={json.dumps(value) if isinstance(value, str) else value}", _said(args, attr)))
    if getattr(args, "epochs", None) is not None:  # every phase, whatever the config's phase overrides say
        pre += [
            Override(f"{phase}.train.epochs={args.epochs}", _said(args, "epochs"))
            for phase in ("teacher", "student", "distill")
        ]
    if getattr(args, "method", None):
        pre.append(
            Override(
                "distill.methods=" + json.dumps({m.strip(): {} for m in args.method.split("+")}), _said(args, "method")
            )
        )
    if args.command == "mutual":
        if args.temperature is not None:
            pre.append(Override(f"mutual.temperature={args.temperature}", _said(args, "temperature")))
        if args.models:
            pre.append(Override("mutual.models=" + json.dumps(args.models), _said(args, "models")))
    if args.command in ("distill", "cache-teacher", "sweep"):
        teachers = args.teacher
        if len(teachers) == 1 and is_source(teachers[0]) and not Path(teachers[0]).exists():
            # a trained model from a library or file (onnx:teacher.onnx), used as it is
            pre.append(Override(f"teacher.name={json.dumps(teachers[0])}", _said(args, "teacher")))
            pre.append(Override("teacher.trained=true", _said(args, "teacher")))
            pre.append(Override("teacher.pretrained=true", _said(args, "teacher")))  # its own weights (hf, timm, ...)
            return pre
        key = (
            f"teacher.checkpoint={json.dumps(teachers[0])}"
            if len(teachers) == 1
            else "teacher.checkpoints=" + json.dumps(teachers)
        )
        pre.append(Override(key, _said(args, "teacher")))
        if args.teacher_weights:
            pre.append(Override("teacher.weights=" + json.dumps(args.teacher_weights), _said(args, "teacher_weights")))
    return pre


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config file with the command line's shortcuts applied, then its ``--set``s (which
    win); an error names the flag that set the key at fault, or else the config file."""
    pre = _shortcut_overrides(args)
    sets = [Override(text) for text in args.overrides]
    cfg = load_config(args.config, pre + sets)
    # method options given as flags go to the run's methods that have them
    options = {}
    if args.command != "mutual" and getattr(args, "temperature", None) is not None:
        options["temperature"] = (args.temperature, _said(args, "temperature"))
    if getattr(args, "logit_std", False):
        options["logit_std"] = ("true", _said(args, "logit_std"))
    set_methods = []
    said_by_set = _methods_set_explicitly(sets)
    for option, (value, said) in options.items():
        takers = taking(option, cfg.distill.methods)
        if not takers:  # a flag that would change nothing is refused, not dropped
            raise ConfigError(
                f"{said}: no method of this run has a {option} option (distill.methods: {', '.join(cfg.distill.methods)})"
            )
        # after the --set flags (a --set of a whole methods dict would otherwise drop it), but an
        # option that a --set names for a method itself wins
        takers = [m for m in takers if option not in said_by_set.get(m, {})]
        set_methods += [Override(f"distill.methods.{m}.{option}={value}", said) for m in takers]
    cfg = load_config(args.config, pre + sets + set_methods) if set_methods else cfg
    named = getattr(args, "name", None) is not None or any(
        o.partition("=")[0].strip() == "name" for o in args.overrides
    )
    kind = "seeds" if getattr(args, "seeds", None) else args.command
    if kind in (*KINDS, "seeds") and not named:  # a name of its own, not the study's
        cfg = cfg.model_copy(update={"name": default_run_name(cfg, kind)})
    return cfg


def _methods_set_explicitly(sets: list[Override]) -> dict[str, dict]:
    """The method options that the ``--set`` flags themselves give, by method."""
    distill = apply_overrides({}, sets).get("distill")
    methods = distill.get("methods") if isinstance(distill, dict) else None
    return {m: o for m, o in methods.items() if isinstance(o, dict)} if isinstance(methods, dict) else {}


def cmd_run(args) -> None:
    if args.share_teacher and not args.seeds:
        raise ConfigError("--share-teacher: only with --seeds (one teacher for every seed)")
    cfg = _config_from_args(args)
    if not args.seeds:
        run_study(cfg, resume=args.resume)
        return
    out = run_seeds(cfg, args.seeds, resume=args.resume, share_teacher=args.share_teacher)
    print(f"report over seeds {' '.join(map(str, args.seeds))}: {out / 'report.md'} and {out / 'report.html'}")


def cmd_train(args) -> None:
    commands.train_model(_config_from_args(args), args.resume)


def cmd_distill(args) -> None:
    commands.distill_model(_config_from_args(args), args.resume)


def cmd_mutual(args) -> None:
    commands.mutual_models(_config_from_args(args), args.resume)


def cmd_cache_teacher(args) -> None:
    cache = commands.cache_teacher(_config_from_args(args), args.out, args.top_k, args.dtype)
    print(
        f"wrote {args.out}: {cache.describe()}; use it with: kdistill distill --teacher ... --teacher-cache {args.out} (same data, seed and augmentation)"
    )


def cmd_sweep(args) -> None:
    cfg = _config_from_args(args)
    points = expand_grid(
        args.students or [cfg.student.name],
        args.methods or ["+".join(cfg.distill.methods)],
        args.temperatures or [cfg.distill.temperature],
        args.alphas or [cfg.distill.alpha],
    )
    jobs = int(args.jobs) if args.jobs.isdigit() else args.jobs  # anything else: resolve_jobs says what is expected
    run_sweep(cfg, points, resume=args.resume, jobs=jobs)


def cmd_evaluate(args) -> None:
    metrics = commands.evaluate_checkpoint(
        Path(args.checkpoint),
        args.data,
        Path(args.data_dir) if args.data_dir else None,
        args.device,
        Path(args.teacher) if args.teacher else None,
        args.tta,
    )
    metrics["checkpoint"] = args.checkpoint
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    t = metrics["test"]
    print(
        f"{args.checkpoint} on {metrics['dataset']} test ({t['num_samples']} images): top-1 {t['top1']:.2f}%"
        + (f" (flip TTA {t['top1_tta']:.2f}%)" if "top1_tta" in t else "")
        + f"  top-5 {t['top5']:.2f}%  NLL {t['nll']:.4f}  ECE {t['ece']:.4f}"
    )
    if "agreement" in metrics:
        a = metrics["agreement"]
        print(f"agreement with teacher: {a['agreement_top1']:.2f}%  mean KL {a['mean_kl']:.4f}")
    p = metrics["profile"]
    print(
        f"parameters {p['parameters']:,}  MACs {p['macs']:,}  size {p['disk_bytes'] / 1e6:.2f} MB  CPU latency b=1 {p['latency_b1']['median_ms']:.2f} ms "
        f"(p90 {p['latency_b1']['p90_ms']:.2f})  CPU throughput b=256 {p['throughput_b256']['images_per_second']:.0f} img/s"
    )
    print(f"CPU timings: {_load_note(p['latency_b1'])}")
    if "gpu" in p:
        g = p["gpu"]
        print(
            f"GPU ({g['device']}) latency b=1 {g['latency_b1']['median_ms']:.3f} ms  throughput b=256 {g['throughput_b256']['images_per_second']:.0f} img/s"
        )


def _load_note(timing: dict) -> str:
    """What a CPU timing depends on, for the line after it."""
    threads, load = timing.get("threads"), timing.get("load_average")
    measured = f"{threads} threads" + (f", machine load {load:.1f}" if load is not None else "")
    return f"{measured}; latency depends on the machine's load and the thread count (compare timings taken alike)"


def cmd_report(args) -> None:
    if len(args.run_dirs) == 1:
        out = write_report(Path(args.run_dirs[0]), Path(args.output) if args.output else None)
        print(f"report: {out} and {out.with_suffix('.html')}")
        return
    out = write_comparison([Path(d) for d in args.run_dirs], Path(args.output) if args.output else None)
    print(f"comparison report: {out} and {out.with_suffix('.html')}")


def cmd_export(args) -> None:
    if args.calibration_images <= 0:
        raise ExportError(
            f"--calibration-images {args.calibration_images}: expected a positive number of training images"
        )
    result = export_checkpoint(
        Path(args.checkpoint),
        args.format,
        Path(args.output) if args.output else None,
        dataset=args.data,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        quantization=args.quantize,
        calibration_count=args.calibration_images,
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
    for name in sorted(MODELS):
        print(f"{name:14s} {count_parameters(create_model(name, num_classes=10)) / 1e6:6.2f} M parameters (10 classes)")
    print(f"and from other libraries and files: {SYNTAX}")


def cmd_methods(args) -> None:
    for name, cls in sorted(METHODS.items()):
        doc = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())
        opts = ", ".join(f"{k}={f.default}" for k, f in cls.Options.model_fields.items())
        print(f"{name:8s} {doc}\n         options: {opts}")


COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "distill": cmd_distill,
    "cache-teacher": cmd_cache_teacher,
    "mutual": cmd_mutual,
    "sweep": cmd_sweep,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "export": cmd_export,
    "models": cmd_models,
    "methods": cmd_methods,
}


# the commands that run data-parallel under torchrun; the others run in one process
DISTRIBUTED_COMMANDS = ("run", "train", "distill", "mutual", "cache-teacher")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv  # the exact command line, for outputs that record it (None: sys.argv)

    def work() -> None:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(
                f"kdistill {args.command} runs in one process; launch it without torchrun "
                f"(torchrun runs only {', '.join(DISTRIBUTED_COMMANDS)})"
            )
        COMMANDS[args.command](args)

    return run_reporting_errors(
        work, "kdistill", getattr(args, "debug", False), "rerun with --resume to continue from the last checkpoint"
    )


def run_reporting_errors(work, prog: str, debug: bool, on_interrupt: str = "") -> int:
    """Run ``work()``; an error the user can fix becomes one line ``PROG: error: ...`` and
    status 2 (a traceback with ``debug``), Ctrl-C status 130, a closed output pipe a quiet
    141. Returns the exit status (0: done)."""
    try:
        work()
        sys.stdout.flush()  # a reader that went away (`kdistill models | head -1`) shows here, not at exit
    except BrokenPipeError:
        # the reader closed the pipe: end quietly, as a Unix tool killed by SIGPIPE does
        # (status 128 + 13); stdout goes to /dev/null so that the interpreter's own final
        # flush does not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KDistillError as e:
        if debug:
            raise
        # in a torchrun job every rank reports, tagged, so a failure of one is easy to find
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        print(f"{prog}: {rank}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr)
        return 130
    except OSError as e:  # the machine's fault, not kdistill's: a full disk, a read-only or vanished folder
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
