"""The Python API: train or distill any classifier on images or on your own tensors.

    import kdistill
    data = kdistill.load_dataset("cifar10-mini")
    teacher = kdistill.create_model("seed_teacher")
    kdistill.train(teacher, data, epochs=10)
    student = kdistill.create_model("seed_student")
    result = kdistill.distill(teacher, student, data, epochs=10, alpha=0.9, temperature=4)
    print(result.metrics["top1"])

``train_data`` can be an :class:`~kdistill.data.ImageDataset` (or its name), a pair of
tensors ``(inputs, labels)`` (uint8 images (N, C, H, W) are augmented and normalised;
anything else is used as is), or any re-iterable of ``(inputs, labels)`` batches such as a
``DataLoader``. The CLI's ``kdistill run`` is built from these same functions.

Started by torchrun, these functions train data-parallel (see :mod:`kdistill.distributed`):
in-memory data is sharded automatically; an iterable of batches is used as given on every
process, so shard it yourself (e.g. a DataLoader with a DistributedSampler).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.config import DataConfig, DistillConfig, TrainConfig
from kdistill.configbase import deep_merge, format_errors
from kdistill.data.dataset import ImageDataset, channel_mean_std, load_dataset
from kdistill.data.loader import EvalData, IterableLoader, Normalize, ResizedCrop, TrainLoader
from kdistill.engine import Result, autocast_for, fit, predict_views, select_device
from kdistill.errors import ConfigError, DataError
from kdistill.evaluate import metrics_with_tta
from kdistill.methods import DEFAULT_METHOD, MethodContext, build_methods, needs_features, set_option
from kdistill.models.base import check_logits, count_parameters, feature_shapes, model_label
from kdistill.models.features import ensure_features
from kdistill.progress import log
from kdistill.tasks import Distillation, MutualLearning, Supervised
from kdistill.teacher_cache import TeacherCache, build_teacher_cache, fingerprint


@dataclass
class Prepared:
    """Training batches, evaluation sets and what a checkpoint must know about the data."""

    loader: Any  # TrainLoader or IterableLoader
    eval_sets: dict[str, EvalData]
    num_classes: int
    input_shape: tuple[int, ...]
    num_samples: int
    data_info: dict[str, Any]
    classes: list[str] | None = None
    probe: Tensor | None = None  # two training inputs as the model sees them (None: float images of input_shape)

    @property
    def known_classes(self) -> int | None:
        """The number of classes when the data set says it (its class names), None when it
        was inferred from the largest label (a model may then predict more)."""
        return self.num_classes if self.classes is not None else None

    @property
    def example(self) -> Tensor | tuple[int, ...]:
        """What shape probes run through the models (:func:`~kdistill.models.base.feature_shapes`)."""
        return self.probe if self.probe is not None else self.input_shape


def make_train_config(config: TrainConfig | dict | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a config object or dict plus keyword overrides such as
    ``epochs=5`` or ``lr=0.1`` (shorthand for ``optimizer={"lr": 0.1}``)."""
    base = config.model_dump() if isinstance(config, TrainConfig) else dict(config or {})
    if "lr" in overrides:
        overrides.setdefault("optimizer", {})["lr"] = overrides.pop("lr")
    try:
        return TrainConfig.model_validate(deep_merge(base, overrides))
    except Exception as e:
        raise ConfigError(f"train settings: {format_errors(e) if hasattr(e, 'errors') else e}") from None


def _settings(config, data: DataConfig | None, overrides: dict) -> tuple[TrainConfig, DataConfig]:
    """The keyword settings of train/distill/mutual: data keys (``augment=False``,
    ``flip=False``, ``num_classes=12``, ...) go to the :class:`DataConfig`, the others to the
    :class:`TrainConfig`."""
    data_keys = {k: overrides.pop(k) for k in list(overrides) if k in DataConfig.model_fields}
    if data_keys:
        try:
            data = DataConfig.model_validate({**(data or DataConfig()).model_dump(), **data_keys})
        except Exception as e:
            raise ConfigError(f"data settings: {format_errors(e) if hasattr(e, 'errors') else e}") from None
    return make_train_config(config, **overrides), data


def _num_classes(labels: Tensor, data: DataConfig, what: str) -> int:
    """``data.num_classes``, checked against the labels, or the largest label + 1 (said)."""
    largest = int(labels.max())
    if data.num_classes is None:
        log(f"{what}: {largest + 1} classes, from the largest label ({largest}); pass num_classes= if there are more")
        return largest + 1
    if largest >= data.num_classes:
        raise DataError(f"{what}: label {largest} is out of range for num_classes={data.num_classes}")
    return data.num_classes


def prepare_data(
    train_data,
    test_data=None,
    *,
    cfg: TrainConfig,
    device: torch.device,
    data: DataConfig | None = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
) -> Prepared:
    """``shard`` = (rank, world size): this process's share of every global batch (default:
    that of the torchrun job, or everything in a single process)."""
    data = data or DataConfig()
    shard = shard or distributed.shard()
    if isinstance(train_data, (str, Path)):
        split = data.split.model_dump() if data.split else None
        train_data = load_dataset(
            train_data,
            data.image_size,
            data.data_dir,
            data.download,
            data.val_size,
            seed,
            resize=data.resize,
            split=split,
        )
    if isinstance(train_data, ImageDataset):
        return _prepare_dataset(train_data, cfg, device, data, seed, shard)
    pair = isinstance(train_data, (tuple, list)) and len(train_data) == 2
    if pair and all(isinstance(t, Tensor) for t in train_data):
        return _prepare_tensors(train_data, test_data, cfg, device, data, seed, shard)
    if hasattr(train_data, "__iter__"):
        loader = IterableLoader(train_data, device)
        first_x, first_y = next(iter(train_data))[:2]
        evals = {}
        if test_data is not None:
            evals["test"] = EvalData(None, None, cfg.eval_batch_size, device, source=test_data)
        num_classes = _num_classes(evals["test"].labels if evals else first_y, data, "train_data")
        shape = tuple(first_x.shape[1:])
        return Prepared(loader, evals, num_classes, shape, -1, {"dataset": "iterable"}, probe=first_x[:2])
    raise DataError(
        "train_data: expected an ImageDataset, a data set name, a pair of tensors (inputs, labels) or an iterable of "
        f"batches, got {type(train_data).__name__}"
    )


def augmentation(data: DataConfig, stored: tuple[int, ...], images: bool = True) -> dict[str, Any]:
    """TrainLoader's augmentation arguments for images of ``stored`` (C, H, W) shape: the
    crop-and-flip settings, the random-resized crop if chosen, and the training ``size``
    (which evaluation centre-crops to as well)."""
    if not images:
        return {"augment": False}
    resized = data.augmentation == "random_resized_crop"
    side = min(stored[-2:])
    size = data.train_size or (side if resized else None)  # None: the whole stored image
    if size is not None and size > side:
        raise DataError(
            f"data.train_size={size} is larger than the stored images ({stored[-2]}x{stored[-1]}); evaluation "
            "centre-crops train_size from them: raise data.image_size or lower data.train_size"
        )
    if not resized and size is not None and tuple(stored[-2:]) != (size, size):
        raise DataError(
            f"data.train_size={size} differs from the stored size {stored[-1]}: pad_crop trains at the stored size; "
            "use augmentation: random_resized_crop"
        )
    return {
        "augment": data.augment,
        "padding": data.crop_padding,
        "flip": data.flip,
        "resized_crop": ResizedCrop(size, data.crop_scale, data.crop_ratio) if resized else None,
        "size": size,
    }


def _prepare_dataset(ds: ImageDataset, cfg: TrainConfig, device, data: DataConfig, seed: int, shard) -> Prepared:
    """An ImageDataset: augmented batches of its training split, its validation and test splits."""
    if data.num_classes is not None and data.num_classes != ds.num_classes:
        raise DataError(f"num_classes={data.num_classes}, but data set {ds.name!r} has {ds.num_classes} classes")
    mean, std = ds.mean_std()
    normalize = Normalize(mean, std, device, cfg.channels_last)
    augment = augmentation(data, ds.image_shape)
    loader = TrainLoader(
        ds.train_images,
        ds.train_labels,
        cfg.batch_size,
        device,
        normalize,
        seed,
        shard=shard,
        rows=ds.train_rows,
        pixels=ds.train_pixels,  # the store's packed training split: crops read it in place
        view_period=cfg.view_period,
        **augment,
    )
    size = augment["size"]
    evals = {}
    if ds.val_images is not None:
        evals["val"] = EvalData(
            ds.val_images, ds.val_labels, cfg.eval_batch_size, device, normalize, rows=ds.val_rows, size=size
        )
    evals["test"] = EvalData(ds.test_images, ds.test_labels, cfg.eval_batch_size, device, normalize, size=size)
    info = {
        "dataset": ds.source or ds.name,
        "checksum": ds.checksum,
        "classes": ds.classes,
        "mean": mean,
        "std": std,
        "image_size": ds.image_shape[-1],
        "resize": data.resize,  # how the stored images were made from the files
        "train_size": size,  # what the model sees: evaluation centre-crops the stored images to it
        "val_split": ds.val_split,  # a teacher trained here may be checked against a later run's split
        "split": ds.split,  # the train/val/test split kdistill made: evaluate and later runs reuse it
    }
    shape = (ds.image_shape[0], size, size) if size else ds.image_shape
    return Prepared(loader, evals, ds.num_classes, shape, len(ds.train_labels), info, ds.classes)


def _prepare_tensors(train_data, test_data, cfg: TrainConfig, device, data: DataConfig, seed: int, shard) -> Prepared:
    """A pair of tensors (inputs, labels): uint8 images (N, C, H, W) are augmented and
    normalised; anything else is used as it is."""
    inputs, labels = train_data
    if len(inputs) != len(labels):
        raise DataError(f"train_data: {len(inputs)} inputs but {len(labels)} labels")
    images = inputs.dtype == torch.uint8 and inputs.ndim == 4
    normalize = None
    info: dict[str, Any] = {"dataset": "tensors"}
    if images:
        mean, std = channel_mean_std(inputs)
        normalize = Normalize(mean, std, device, cfg.channels_last)
        info.update(mean=mean, std=std, image_size=inputs.shape[-1])
    augment = augmentation(data, tuple(inputs.shape[1:]), images)
    loader = TrainLoader(
        inputs, labels, cfg.batch_size, device, normalize, seed, shard=shard, view_period=cfg.view_period, **augment
    )
    size = augment.get("size")
    evals = {}
    if test_data is not None:
        tx, ty = test_data
        evals["test"] = EvalData(tx, ty, cfg.eval_batch_size, device, normalize, size=size if images else None)
    probe = None if images else inputs[:2]  # uint8 images reach the model normalised to float
    num_classes = _num_classes(labels, data, "train_data")
    shape = (inputs.shape[1], size, size) if size else tuple(inputs.shape[1:])
    if size:
        info["train_size"] = size
    return Prepared(loader, evals, num_classes, shape, len(labels), info, probe=probe)


def _with_test_metrics(result: Result, prepared: Prepared, cfg: TrainConfig, averaged: bool = True) -> Result:
    """``result`` with the metrics and logits of the last evaluation set ("test" if given).
    ``averaged``: the model is the one whose weights train.ema averaged (and the history measured)."""
    name = "test" if "test" in prepared.eval_sets else next(iter(prepared.eval_sets), None)
    if not name:
        return result
    data = prepared.eval_sets[name]
    logits, mirrored = predict_views(result.model, data, cfg.amp, flip=cfg.eval_tta == "flip")
    metrics = metrics_with_tta(logits, mirrored, data.labels, prepared.classes)
    last = result.history[-1] if result.history else {}
    if averaged and f"{name}_top1_raw" in last and f"{name}_subset" not in last:  # train.ema: the trained weights' own
        metrics["top1_raw"] = last[f"{name}_top1_raw"]
    return replace(result, metrics=metrics, test_logits=logits)


def _device(device: str | torch.device) -> torch.device:
    device = device if isinstance(device, torch.device) else select_device(str(device))
    distributed.ensure(device)  # started by torchrun: join the job (no-op otherwise, or when joined)
    return device


def _fit_prepared(
    task,
    prepared: Prepared,
    cfg: TrainConfig,
    device,
    run_dir,
    resume: bool,
    extra: dict,
    desc: str,
    max_epochs: int | None = None,
) -> Result:
    """The engine on a prepared data set: the one call train, distill and mutual share."""
    return fit(
        task,
        prepared.loader,
        cfg,
        device=device,
        eval_sets=prepared.eval_sets,
        run_dir=Path(run_dir) if run_dir else None,
        resume=resume,
        checkpoint_extra=extra,
        desc=desc,
        num_classes=prepared.num_classes,
        max_epochs=max_epochs,
    )


def _replayable(prepared: Prepared) -> TrainLoader:
    if not isinstance(prepared.loader, TrainLoader):
        raise ConfigError(
            "a teacher cache needs in-memory training data (a data set, its name, or a pair of tensors) whose augmented "
            "views can be replayed; batches from an iterable cannot"
        )
    return prepared.loader


@contextlib.contextmanager
def _borrowed(teacher: nn.Module):
    """A distillation run freezes its teacher (eval mode, no gradients); afterwards the
    module is given back as it came, so that it can still be trained or fine-tuned."""
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    training = teacher.training
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(training)


def _check_outputs(teacher_logits: Tensor, student_logits: Tensor, prepared: Prepared, teacher, student) -> None:
    """Both models give (batch, classes) logits, for the data's classes and for the same classes."""
    k_teacher = check_logits(teacher_logits, prepared.known_classes, model_label(teacher, "teacher"))
    k_student = check_logits(student_logits, prepared.known_classes, model_label(student, "student"))
    if k_teacher != k_student:
        raise ConfigError(
            f"{model_label(teacher, 'teacher')} predicts {k_teacher} classes but {model_label(student, 'student')} "
            f"{k_student}; distillation needs both for the same classes"
        )


def _place_teacher(teacher: nn.Module, device: torch.device, channels_last: bool) -> None:
    teacher.to(device)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)


def cache_teacher(
    teacher: nn.Module,
    train_data,
    *,
    epochs: int,
    path: str | Path | None = None,
    data: DataConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 500,
    channels_last: bool = True,
    amp: str = "auto",
    top_k: int = 0,
    dtype: str = "float16",
    view_period: int = 0,
) -> TeacherCache:
    """Run ``teacher`` once over ``epochs`` epochs of the augmented training views that a
    distillation run with the same ``data`` settings and ``seed`` will see, and keep its
    logits (saved to ``path`` if given). Pass the result (or the path) to
    :func:`distill` as ``teacher_cache=``: the student then trains without the teacher.
    The cache is the same for any number of processes: it is looked up by (epoch, global
    sample index), and every process of a torchrun job reads the whole of it. (Started by
    torchrun, every process builds the whole cache and rank 0 writes it: no faster.)
    ``view_period`` P > 0 (``train.view_period``): the views repeat every P epochs, so the
    cache holds at most P epochs and serves a run of any length with the same period."""
    if epochs < 1:
        raise ConfigError(f"teacher cache epochs={epochs}: expected at least 1")
    cfg = make_train_config(
        None, channels_last=channels_last, amp=amp, eval_batch_size=batch_size, view_period=view_period
    )
    device = _device(device)
    prepared = prepare_data(train_data, None, cfg=cfg, device=device, data=data, seed=seed)
    loader = _replayable(prepared)
    if loader.view_period:  # the views repeat: a period's worth serves any run
        epochs = min(epochs, loader.view_period)
    _place_teacher(teacher, device, channels_last)
    check_logits(
        feature_shapes(teacher, prepared.example, model_label(teacher, "teacher")).logits,
        prepared.known_classes,
        model_label(teacher, "teacher"),
    )
    started = time.perf_counter()
    cache = build_teacher_cache(
        teacher, loader, epochs, batch_size=batch_size, autocast=autocast_for(device, amp), top_k=top_k, dtype=dtype
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cache.build_seconds = time.perf_counter() - started  # paid once, by every run that reads the cache
    log(f"teacher cache: built in {cache.build_seconds:.1f} s")
    if path is not None:
        distributed.on_main(lambda: cache.save(path))  # under torchrun every rank built the same cache: rank 0 writes
        cache.path = Path(path)
    return cache


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    train_data,
    test_data=None,
    *,
    config: TrainConfig | dict | None = None,
    data: DataConfig | None = None,
    device: str | torch.device = "auto",
    run_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    model_spec: dict | None = None,
    desc: str = "train",
    shard: tuple[int, int] | None = None,
    **overrides,
) -> Result:
    """Train ``model`` with cross-entropy. Keyword overrides go to :class:`TrainConfig`
    (``epochs=10``, ``batch_size=64``, ``lr=0.1``, ``label_smoothing=0.1``, ...)."""
    cfg, data = _settings(config, data, overrides)
    device = _device(device)
    _seed_everything(seed)
    prepared = prepare_data(train_data, test_data, cfg=cfg, device=device, data=data, seed=seed, shard=shard)
    model.to(device)
    who = model_label(model, desc)
    check_logits(feature_shapes(model, prepared.example, who).logits, prepared.known_classes, who)
    task = Supervised(model, cfg.label_smoothing)
    extra = {
        "kind": "train",
        "model_spec": model_spec,
        "data": prepared.data_info,
        "train_config": cfg.model_dump(mode="json"),
        "seed": seed,
    }
    return _with_test_metrics(_fit_prepared(task, prepared, cfg, device, run_dir, resume, extra, desc), prepared, cfg)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train_data,
    test_data=None,
    *,
    methods: str | dict[str, dict] | None = None,
    alpha: float = 0.9,
    temperature: float | None = None,
    ce_weight: float | None = None,
    config: TrainConfig | dict | None = None,
    data: DataConfig | None = None,
    device: str | torch.device = "auto",
    run_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    model_spec: dict | None = None,
    teacher_spec: dict | None = None,
    desc: str = "distill",
    shard: tuple[int, int] | None = None,
    teacher_cache: TeacherCache | str | Path | None = None,
    **overrides,
) -> Result:
    """Distill ``teacher`` into ``student``: loss = (1 - alpha) * CE + alpha * sum of the
    methods' terms (``methods="kd"`` or ``{"kd": {"temperature": 4}, ...}``; default: Hinton
    et al.'s KD). The teacher is frozen (eval mode, no gradients, never in the optimizer).

    ``teacher_cache`` (a :class:`TeacherCache` or its path, from :func:`cache_teacher`):
    read the teacher's logits from it instead of running the teacher. It must have been
    made for this teacher, data, augmentation and seed, and for at least ``epochs`` epochs
    (or for the run's ``view_period``). Without one, ``view_period=P`` (logit methods)
    repeats the views every P epochs and runs the teacher over the first P epochs' views
    once, before training, instead of at every step."""
    cfg, data = _settings(config, data, overrides)
    dcfg = _distill_config(methods, alpha, temperature, ce_weight)
    _warn_if_student_larger(student, teacher)
    device = _device(device)
    _seed_everything(seed)
    prepared = prepare_data(train_data, test_data, cfg=cfg, device=device, data=data, seed=seed, shard=shard)
    _place_teacher(teacher, device, cfg.channels_last)
    student.to(device)
    cache, cache_info = _open_cache(teacher_cache, teacher, prepared, cfg, device, desc)
    views_info, fit_cfg = None, cfg
    if cache is None and cfg.view_period:  # the teacher over the first P epochs' views, once
        cache, views_info, fit_cfg = _teacher_views(teacher, prepared, cfg, dcfg, device, desc)
    context = _method_context(student, teacher, prepared, cfg, needs_features(dcfg.method_options) and cache is None)
    with _borrowed(teacher):  # frozen for the run, given back as it came
        task = Distillation(
            student,
            teacher,
            build_methods(dcfg.method_options, context),
            dcfg.alpha,
            dcfg.effective_ce_weight,
            cfg.label_smoothing,
            teacher_cache=cache,
            compile_teacher=cfg.compile_teacher,
        )
        extra = {
            "kind": "distill",
            "model_spec": model_spec,
            "teacher_spec": teacher_spec,
            "data": prepared.data_info,
            "train_config": cfg.model_dump(mode="json"),
            "distill_config": dcfg.model_dump(mode="json"),
            "seed": seed,
            "teacher_cache": cache_info,
            "teacher_views": views_info,
        }
        result = _fit_prepared(
            task,
            prepared,
            fit_cfg,
            device,
            run_dir,
            resume,
            extra,
            desc,
            max_epochs=cache.epochs if cache and not cache.period else None,
        )
    return _with_test_metrics(_counting(result, views_info), prepared, cfg)


def _counting(result: Result, views_info: dict | None) -> Result:
    """``result`` with the teacher's pass over the repeated views (train.view_period), made
    for this run, counted in its training time (a shared teacher cache is not)."""
    if not views_info or not result.train_seconds:
        return result
    seen = result.images_per_second * result.train_seconds
    total = result.train_seconds + views_info["build_seconds"]
    return replace(result, train_seconds=total, images_per_second=seen / total)


def _method_context(student, teacher, prepared: Prepared, cfg: TrainConfig, features: bool) -> MethodContext:
    """What the methods are built for: the two models' output shapes (checked against each
    other and the data) and the run's length. ``features``: the methods read stage features,
    attached here to models from other libraries."""
    if features:
        ensure_features(student, prepared.example, model_label(student, "student"))
        ensure_features(teacher, prepared.example, model_label(teacher, "teacher"))
    shapes = {
        "student": feature_shapes(student, prepared.example, model_label(student, "student")),
        "teacher": feature_shapes(teacher, prepared.example, model_label(teacher, "teacher")),
    }
    _check_outputs(shapes["teacher"].logits, shapes["student"].logits, prepared, teacher, student)
    return MethodContext(
        student=shapes["student"],
        teacher=shapes["teacher"],
        num_classes=prepared.num_classes,
        num_samples=prepared.num_samples,
        epochs=cfg.epochs,
        epochs_fixed=not (cfg.budget or cfg.max_steps),
    )


def _distill_config(
    methods: str | dict[str, dict] | None, alpha: float, temperature: float | None, ce_weight: float | None
) -> DistillConfig:
    """The distillation settings of :func:`distill`'s arguments, validated."""
    if methods is None:
        methods = {DEFAULT_METHOD: {}}
    elif isinstance(methods, str):
        methods = {name.strip(): {} for name in methods.split("+")}
    if temperature is not None:  # for every method that has a temperature, unless set there
        methods = set_option(methods, "temperature", temperature)
    try:
        return DistillConfig(alpha=alpha, ce_weight=ce_weight, methods=methods)
    except Exception as e:
        raise ConfigError(f"distill settings: {format_errors(e) if hasattr(e, 'errors') else e}") from None


def _warn_if_student_larger(student: nn.Module, teacher: nn.Module) -> None:
    student_size, teacher_size = count_parameters(student), count_parameters(teacher)
    if student_size > teacher_size:  # allowed (e.g. born-again with a wider student), but rarely meant
        log(
            f"warning: the student ({student_size:,} parameters) is larger than its teacher ({teacher_size:,} parameters); "
            "distillation usually compresses into a smaller model"
        )


def _teacher_views(teacher, prepared: Prepared, cfg: TrainConfig, dcfg: DistillConfig, device, desc: str):
    """``train.view_period`` P with a live teacher: its logits on the views of the first P
    epochs, which every later epoch repeats, computed once before training (an in-memory
    teacher cache); what the checkpoint records of it; and the training config, whose
    budget (if any) is what is left of it after this cost, part of this run's time."""
    if needs_features(dcfg.method_options):
        raise ConfigError(
            f"train.view_period={cfg.view_period}: the teacher's logits are computed once for the repeated views, but "
            f"among the methods {', '.join(dcfg.method_options)} some need the teacher's stage features at every step; use logit "
            "methods (kd, dkd, ls, dist) or train.view_period: 0"
        )
    if not isinstance(prepared.loader, TrainLoader):
        raise ConfigError(
            f"train.view_period={cfg.view_period} needs in-memory training data whose views can be replayed (a data "
            "set, its name, or a pair of tensors); batches from an iterable cannot: use train.view_period: 0"
        )
    period = prepared.loader.view_period  # 1 without augmentation: every epoch shows the same inputs
    started = time.perf_counter()
    cache = build_teacher_cache(
        teacher,
        prepared.loader,
        period,
        batch_size=cfg.eval_batch_size,
        autocast=autocast_for(device, cfg.amp),
        desc=f"{desc}: teacher on {period} epoch(s) of views",
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cache.build_seconds = time.perf_counter() - started
    log(
        f"{desc}: the views repeat every {period} epoch(s); the teacher ran over them once "
        f"({cache.build_seconds:.1f} s, part of this run's time) and is read from memory from now on"
    )
    fit_cfg = cfg
    if cfg.budget:  # the teacher's cost comes out of the run's budget, as a live teacher's would
        fit_cfg = cfg.model_copy(update={"budget": max(cfg.budget - cache.build_seconds, 1.0)})
    info = {"period": period, "build_seconds": cache.build_seconds}
    return cache, info, fit_cfg


def _open_cache(
    cache: TeacherCache | str | Path | None, teacher, prepared: Prepared, cfg: TrainConfig, device, desc: str
):
    """The teacher cache (loaded, checked against this teacher, data and run, on the
    device) and what the checkpoint records of it; (None, None) without one."""
    if cache is None:
        return None, None
    if not isinstance(cache, TeacherCache):
        cache = TeacherCache.load(cache)
    # a budget run may not outlast the cache; an epoch run must fit in it
    cache.check(fingerprint(_replayable(prepared), teacher), epochs=1 if cfg.budget else cfg.epochs)
    info = {
        "path": str(cache.path) if cache.path else None,
        "epochs": cache.epochs,
        "fingerprint": cache.fingerprint,
        "build_seconds": cache.build_seconds,
    }
    built = (
        f"; it cost {cache.build_seconds:.1f} s once, shared by every run with this teacher, data and seed, and not counted in this run's time"
        if cache.build_seconds is not None
        else ""
    )
    log(
        f"{desc}: teacher logits from the cache{' ' + str(cache.path) if cache.path else ''} ({cache.describe()}); the teacher does not run{built}"
    )
    return cache.to(device), info


def mutual(
    models: list[nn.Module],
    train_data,
    test_data=None,
    *,
    temperature: float = 1.0,
    weight: float = 1.0,
    config: TrainConfig | dict | None = None,
    data: DataConfig | None = None,
    device: str | torch.device = "auto",
    run_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    model_specs: list[dict] | None = None,
    desc: str = "mutual",
    **overrides,
) -> list[Result]:
    """Deep mutual learning: train ``models`` (two or more) together, each distilled from the
    others' current predictions (no pre-trained teacher). Returns one Result per model."""
    cfg, data = _settings(config, data, overrides)
    device = _device(device)
    _seed_everything(seed)
    prepared = prepare_data(train_data, test_data, cfg=cfg, device=device, data=data, seed=seed)
    task = MutualLearning(list(models), temperature, weight, cfg.label_smoothing)
    extra = {
        "kind": "mutual",
        "model_spec": (model_specs or [None])[0],
        "peer_specs": (model_specs or [None])[1:],
        "data": prepared.data_info,
        "train_config": cfg.model_dump(mode="json"),
        "seed": seed,
    }
    result = _fit_prepared(task, prepared, cfg, device, run_dir, resume, extra, desc)
    # each model, the run's history and budget; train.ema averages the first model only
    return [
        _with_test_metrics(replace(result, model=m), prepared, cfg, averaged=i == 0)
        for i, m in enumerate(task.all_models)
    ]
