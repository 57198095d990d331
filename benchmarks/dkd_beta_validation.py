"""DKD's beta for a teacher/student pair, chosen on a validation split (never the test set).

    python benchmarks/dkd_beta_validation.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --teacher-checkpoint T0.pt T1.pt --seeds 0 1 --betas 8 2 1 0.5 --set train.epochs=4

The DKD paper sets beta per data set (8 on CIFAR-100, 0.5 on ImageNet). For each seed this
holds out ``data.val_size`` training images (5,000 unless --set), trains the student alone
and distills it with DKD at each beta (the recipe of configs/cifar10_seed.yaml, alpha as
in the config, DKD's warm-up 20/240 of the schedule; one teacher cache per seed), and
prints the validation top-1 and each beta's gain over the student alone. The teachers
should have been trained with the same validation split: one trained on the validation
images makes every distilled score optimistic (a warning says so).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import kdistill
from kdistill.config import load_config
from kdistill.errors import KDistillError
from kdistill.methods.dkd import scaled_warmup_epochs
from kdistill.runs import load_data, load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--teacher-checkpoint", nargs="+", required=True, help="one per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--betas", type=float, nargs="+", default=[8.0, 2.0, 1.0, 0.5])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if len(args.teacher_checkpoint) != len(args.seeds):
        raise SystemExit(
            f"--teacher-checkpoint: {len(args.teacher_checkpoint)} checkpoints for {len(args.seeds)} seeds; expected one per seed"
        )
    cfg = load_config("cifar10_seed", [f"data.dataset={args.data}", "data.val_size=5000", *args.overrides])
    if not cfg.data.val_size:
        raise SystemExit("data.val_size: 0; this script tunes on a validation split, so it needs one")
    epochs = cfg.train_for("distill").epochs
    gains: dict[float, list[float]] = {b: [] for b in args.betas}
    print(f"| seed | student alone | {' | '.join(f'beta {b:g}' for b in args.betas)} |")
    print(f"| --- | ---: |{' ---: |' * len(args.betas)}")
    for seed, path in zip(args.seeds, args.teacher_checkpoint):
        cfg = cfg.model_copy(update={"seed": seed})
        ds = load_data(cfg)
        teacher, _ = load_teacher(Path(path), ds.num_classes, torch.device("cpu"), ds)  # warns if it saw the split

        def student(seed: int = seed, name: str = cfg.student.name) -> torch.nn.Module:
            torch.manual_seed(seed)  # every student of a seed starts from the same weights
            return kdistill.create_model(name)

        base = kdistill.train(
            student(), ds, config=cfg.train_for("student"), data=cfg.data, seed=seed, desc=f"baseline s{seed}"
        ).history[-1]["val_top1"]
        cache = kdistill.cache_teacher(teacher, ds, epochs=epochs, data=cfg.data, seed=seed)
        cells = []
        for beta in args.betas:
            methods = {"dkd": {"beta": beta, "warmup_epochs": scaled_warmup_epochs(epochs)}}
            r = kdistill.distill(
                teacher,
                student(),
                ds,
                methods=methods,
                alpha=cfg.distill.alpha,
                config=cfg.train_for("distill"),
                data=cfg.data,
                seed=seed,
                desc=f"dkd beta {beta:g} s{seed}",
                teacher_cache=cache,
            )
            top1 = r.history[-1]["val_top1"]
            gains[beta].append(top1 - base)
            cells.append(f"{top1:.2f} ({top1 - base:+.2f})")
        print(f"| {seed} | {base:.2f} | {' | '.join(cells)} |", flush=True)
    print(f"| mean gain | | {' | '.join(f'{statistics.mean(g):+.2f}' for g in gains.values())} |")


if __name__ == "__main__":
    try:
        main()
    except KDistillError as e:
        raise SystemExit(f"error: {e}") from None
