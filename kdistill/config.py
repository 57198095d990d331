"""Typed configuration: nested pydantic models, loaded from plain YAML.

YAML is data only (``yaml.safe_load``); nothing is built from import paths. Unknown keys,
wrong types and impossible values fail at load time with the key's dotted path, e.g.
``config error in run.yaml: train.epochs: must be > 0 (got -3)``. Any key can be
overridden from the command line with ``--set train.epochs=5`` (the value is parsed as
YAML, so ``--set distill.methods.kd.temperature=2`` gives a float); an error in a key an
override set names the override (or the flag it came from, see :class:`Override`) instead
of the file: ``--set train.epoch=1: train.epoch: unknown key``.

Per-phase training settings: ``train`` holds the defaults of every phase; ``teacher.train``,
``student.train`` and ``distill.train`` override any of its keys for one phase.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from kdistill.configbase import StrictConfig, deep_merge, error_lines, format_errors
from kdistill.errors import ConfigError
from kdistill.methods import (
    DEFAULT_METHOD,
    MethodOptions,
    UnknownMethod,
    parse_methods,
    soft_target_temperature,
)
from kdistill.models import check_name, source_of

CONFIG_DIR = Path(__file__).parent / "configs"


_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a duration such as ``90s``, ``10m``, ``1.5h`` or ``1h30m``."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|h|m|s)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(min|h|m|s)", "", text).strip():
        raise ValueError(f"expected a duration such as 90s, 10m, 1.5h or 1h30m, or a number of seconds (got {value!r})")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class SplitConfig(StrictConfig):
    """How kdistill splits a data set without a test split of its own (a single root of
    class folders, a manifest without a split column): fractions of each class, drawn by a
    hash of (seed, file name), so the same files and seed always give the same split."""

    val: float | None = Field(None, ge=0, lt=1)
    """Fraction of each class held out for validation (default 0.1; 0 for none, and 0 when
    ``data.val_size`` is set). On a root/{train,test}/ tree: drawn from train/ (default 0)."""
    test: float | None = Field(None, gt=0, lt=1)
    """Fraction of each class held out for testing (default 0.1); refused for a data set
    with its own test split."""
    seed: int = Field(0, ge=0)
    """The split's own seed, not the run's: runs with other seeds test on the same images."""

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if (self.val or 0) + (self.test or 0) >= 1:
            raise ValueError(f"val + test = {(self.val or 0) + (self.test or 0)}; expected less than 1")
        return self


class DataConfig(StrictConfig):
    dataset: str = "cifar10-mini"
    """cifar10-mini (bundled sample), cifar10, cifar100, a path to an ImageFolder tree
    (root/{train,test}/<class>/<image>, or root/<class>/<image> split by ``split``), an
    archive (.tar, .tar.gz, .zip) of one, or a .csv/.jsonl manifest (path,label[,split])."""
    split: SplitConfig | None = None
    """How to split a data set without its own test split (default val 0.1, test 0.1, seed 0)."""
    data_dir: Path | None = None
    """Download and decoded data store folder (default: ~/.cache/kdistill)."""
    image_size: int = Field(32, gt=0, le=1024)
    """The stored resolution: ImageFolder images are decoded once to ``image_size`` x
    ``image_size`` uint8 (by ``resize``) and kept so; CIFAR is 32."""
    resize: Literal["crop", "squash"] = "crop"
    """How a decoded image becomes ``image_size`` square: ``crop`` scales its shorter side
    to ``image_size`` and centre-crops the longer one (keeps the aspect ratio); ``squash``
    scales both sides (keeps the whole image, stretched). Square images of that size are
    untouched by either."""
    val_size: int = Field(0, ge=0)
    """Hold out this many training images as a validation split (tune on it, not on test)."""
    augment: bool = True
    augmentation: Literal["pad_crop", "random_resized_crop"] = "pad_crop"
    """``pad_crop``: zero padding (``crop_padding``) + random crop at the stored size + flip,
    the CIFAR recipe, best for small (<= 64 px) images that are the whole object.
    ``random_resized_crop``: a random box of ``crop_scale`` x the image's area and aspect
    ratio in ``crop_ratio``, resized bilinearly to ``train_size`` + flip, the ImageNet
    recipe for larger photos. Both run batched on the training device."""
    crop_padding: int = Field(4, ge=0, le=64)
    """Random crop with this many pixels of zero padding on each side (0 = no crop)."""
    train_size: int | None = Field(None, gt=0, le=1024)
    """The training resolution (default: ``image_size``); random_resized_crop only. At most
    ``image_size``: evaluation sees the centred ``train_size`` window of the stored images
    (torchvision's resize + centre crop, e.g. image_size 256, train_size 224)."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """random_resized_crop: the box's area, as fractions of the image's (torchvision and
    ImageNet use (0.08, 1); the default keeps more of small images and short runs)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """random_resized_crop: the box's aspect ratio (width / height), drawn log-uniformly."""
    flip: bool = True
    download: bool = True
    num_classes: int | None = Field(None, ge=2)
    """The number of classes of tensors or batches given to the Python API (default: the
    largest training label + 1, logged); a data set's own folders or files decide it there."""

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"expected [low, high] with 0 < low <= high <= 1 (got {list(value)})")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"expected [low, high] with 0 < low <= high (got {list(value)})")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> DataConfig:
        if self.train_size is not None and self.train_size != self.image_size:
            if self.augmentation != "random_resized_crop":
                raise ValueError(
                    f"train_size: {self.train_size} differs from image_size {self.image_size}, which needs "
                    "augmentation: random_resized_crop (pad_crop trains at the stored size)"
                )
        return self

    @model_validator(mode="after")
    def _one_validation_split(self) -> DataConfig:
        if self.val_size and self.split is not None and self.split.val:
            raise ValueError("split.val and val_size both hold out validation images; use one of them")
        return self


class OptimizerConfig(StrictConfig):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    """Peak learning rate, for one global batch of ``train.batch_size`` images."""
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(StrictConfig):
    name: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up from ``warmup_start`` x lr (cosine, step and constant schedules)."""
    warmup_start: float = Field(0.1, ge=0, le=1)
    pct_start: float = Field(0.25, gt=0, lt=1)
    """One-cycle: fraction of the run spent rising linearly to the peak lr."""
    final_lr_fraction: float = Field(0.0, ge=0, le=1)
    """Cosine and one-cycle end at this fraction of the peak lr."""
    milestones: list[float] = []
    """Step schedule: epochs at which the lr is multiplied by ``gamma``."""
    gamma: float = Field(0.1, gt=0, le=1)


class EmaConfig(StrictConfig):
    """An exponential moving average of the model's weights (Polyak averaging), updated on
    the device after optimizer steps: avg <- decay * avg + (1 - decay) * weights, for the
    parameters and the floating-point buffers alike (batch-norm running statistics are
    averaged too, as timm's ModelEmaV2 does; integer buffers are copied)."""

    decay: float = Field(0.999, gt=0, lt=1)
    """The decay per update; the average spans about ``every / (1 - decay)`` optimizer steps."""
    every: int = Field(1, gt=0, le=10_000)
    """Update the average after every N-th optimizer step."""
    warmup: bool = True
    """Early updates use min(decay, (1 + n) / (10 + n)) after n updates, so that a short run's
    average is not dominated by the random initial weights."""


class TrainConfig(StrictConfig):
    epochs: int = Field(30, gt=0, le=100_000)
    batch_size: int = Field(128, gt=0)
    """The global batch: samples per optimizer step over all processes (torchrun) and
    accumulation micro-batches together; ``optimizer.lr`` is defined for it."""
    eval_batch_size: int = Field(500, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    grad_accumulation: int = Field(1, gt=0, le=1024)
    """Split every global batch into this many micro-batches per process and step once
    after them all: a large ``batch_size`` on few devices (same gradient, less memory)."""
    sync_batchnorm: bool = False
    """Multi-GPU runs (torchrun): batch-norm statistics over the global batch (SyncBatchNorm,
    CUDA only) instead of each process's shard."""
    channels_last: bool = True
    amp: Literal["auto", "bf16", "off"] = "auto"
    """auto: bf16 autocast on CUDA devices that support it, full precision on CPU."""
    compile: bool = False
    """Compile the trained model's forward with torch.compile."""
    compile_teacher: bool = False
    """Distillation runs with a live teacher: compile the frozen teacher's forward pass with
    torch.compile. The compilation is paid once per run (10-20 s on 2 CPU cores); it pays
    where the teacher's forward passes are a large part of the run: in
    configs/cifar10_seed_fast.yaml it saves about a tenth of the distilled phase
    (benchmarks/results/time_to_accuracy.md). Other runs ignore it."""
    view_period: int = Field(0, ge=0)
    """P > 0: the training augmentation repeats every P epochs (epoch e shows each image's
    crop and flip of epoch e mod P, in epoch e's own shuffled order). In a distillation run
    with a live teacher and logit methods, the teacher then runs only over the views of the
    first P epochs, once, before training (batched for inference, its cost counted in the
    run's time and budget), and the student reads its logits from memory (P x N x K float16;
    the teacher cache's storage) for every epoch: a teacher forward pass per image per epoch
    saved from epoch P on, for fewer distinct augmented views. 0: a fresh view every epoch."""
    checkpoint_every: int = Field(1, gt=0)
    """Write a resumable checkpoint every N epochs (always after the last)."""
    tensorboard: bool = False
    """Also log every epoch's metrics as TensorBoard scalars in <phase dir>/tensorboard
    (needs the optional extra: pip install 'kdistill[tensorboard]')."""

    ema: EmaConfig | None = None
    """An average of the weights (see :class:`EmaConfig`; ``{}`` for the defaults, None: off).
    When on, evaluation during and after training uses the averaged model (``top1``; the
    trained weights' own is ``top1_raw``), checkpoints store it as the model (the trained
    weights under ``ema.raw``, so that a resume continues both) and the trained model ends
    holding the averaged weights."""
    eval_tta: Literal["off", "flip"] = "off"
    """flip: also evaluate with flip test-time augmentation, the mean of the logits of each
    image and of its horizontal mirror, reported separately (``top1_tta``) from the plain
    evaluation, which it never replaces. Image inputs (N, C, H, W) only."""
    eval_subset: int | None = Field(None, gt=0)
    """Evaluate on a fixed random subset of this many samples of each evaluation set after
    every epoch but the last (metrics say ``<set>_subset``); the last epoch and the final
    metrics are always on the full sets."""

    budget: float | None = Field(None, gt=0)
    """Wall-clock budget of this phase in seconds (or 90s, 10m, 1.5h): replaces ``epochs``.
    The number of steps is planned from the throughput measured in the first steps (and
    re-planned as the run goes) and the learning-rate schedule is stretched over it."""
    max_steps: int | None = Field(None, gt=0)
    """Train at most this many optimizer steps (the schedule spans them); with ``budget``, the
    budget can only stop the run sooner. A budgeted ``run`` gives the distilled student the
    step count the student alone reached, so that the two differ only by distillation."""

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)


class ModelConfig(StrictConfig):
    name: str
    """A zoo name (``kdistill models``) or a source: torchvision:<name>, timm:<name>,
    hf:<hub id or folder>, torchscript:<file>, onnx:<file> (teachers used as they are),
    package.module:function (a function returning an nn.Module; the current folder is on
    the import path)."""
    kwargs: dict[str, Any] = {}
    """The constructor's keyword arguments (num_classes comes from the data)."""
    pretrained: bool = False
    """The library's own pretrained weights (torchvision, timm, Hugging Face; from their
    cache when offline); a head for another number of classes starts random."""
    weights_file: Path | None = None
    """A state dict to load into the model (torch.load with weights_only=True, or a
    .safetensors file; a kdistill checkpoint's model weights also do)."""
    checkpoint: Path | None = None
    """Start from (teacher: use as is) this checkpoint instead of training."""
    train: dict[str, Any] = {}
    """Overrides of the top-level ``train`` keys for this model's phase."""
    input_size: int | None = Field(None, gt=0, le=1024)
    """The side in pixels of the images this model takes (default: what its library says
    its pretrained weights expect, with ``pretrained: true``; else the data's training
    size). The data's augmented view is resized to it on the device, as a batch (bilinear,
    antialiased when shrinking): a teacher at 224 or 64 px and a student at 32 px see the
    same view."""
    mean: list[float] | None = None
    """The per-channel mean this model's inputs are normalised with (default: its library's,
    with ``pretrained: true``; else the data set's own). Give ``std`` with it."""
    std: list[float] | None = None
    """The per-channel standard deviation, with ``mean``."""
    features: list[str] | None = None
    """The modules whose outputs are this model's stage features, shallow to deep, for the
    feature methods (e.g. ``[layer2, layer3, layer4]``; read with forward hooks). Default:
    a kdistill model's own stages; timm's ``feature_info``; a Hugging Face model's hidden
    states; else the last block before each drop in resolution."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return check_name(name)

    @model_validator(mode="after")
    def _normalisation(self) -> ModelConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean, std: give both (the model's input normalisation) or neither")
        if self.mean is not None and (len(self.mean) != len(self.std) or any(s <= 0 for s in self.std)):
            raise ValueError(
                f"std: expected {len(self.mean)} positive values, one per channel of mean (got {self.std})"
            )
        return self

    @model_validator(mode="after")
    def _pretrained_needs_a_library(self) -> ModelConfig:
        if self.pretrained and not source_of(self.name):
            raise ValueError(
                f"pretrained: kdistill's zoo ({self.name!r}) has no pretrained weights; use weights_file: FILE, or a library model (timm:<name>, ...)"
            )
        return self


class FinetuneConfig(StrictConfig):
    """Transfer: the teacher phase fine-tunes a teacher pretrained on another label set
    (``pretrained: true`` or a ``weights_file`` with another head: ImageNet's 1,000 classes)
    on the run's classes, with a new, randomly initialised head. ``epochs`` and ``lr``
    override ``teacher.train`` (itself over ``train``) for that phase."""

    epochs: int | None = Field(None, gt=0, le=100_000)
    """The teacher phase's epochs (default: ``teacher.train.epochs``, else ``train.epochs``)."""
    lr: float | None = Field(None, gt=0, le=10)
    """The teacher phase's peak learning rate (default: that of its ``train`` settings)."""
    freeze_backbone: bool = False
    """Train the new head only (a linear probe): every other parameter keeps its pretrained
    value (batch-norm statistics still follow the run's data)."""


class TeacherConfig(ModelConfig):
    name: str = "seed_teacher"
    finetune: FinetuneConfig | None = None
    """Fine-tune a pretrained teacher on the run's classes (see :class:`FinetuneConfig`;
    ``{}`` for its defaults). A teacher for other classes gets a new head either way."""
    trained: bool = False
    """The model named by ``name`` is already trained for the data's classes (an ONNX or
    TorchScript file, ``pretrained`` or ``weights_file`` weights): distill from it as it is,
    with no teacher phase. Required for an onnx: teacher, which cannot be trained."""
    checkpoints: list[Path] = []
    """Multi-teacher distillation: several trained teachers whose softened outputs are
    averaged (weighted by ``weights``) into the target. Replaces ``checkpoint``."""
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _ensemble(self) -> TeacherConfig:
        if self.checkpoints and self.checkpoint:
            raise ValueError("checkpoints: set either teacher.checkpoint or teacher.checkpoints, not both")
        if self.weights is not None and len(self.weights) != len(self.checkpoints):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.checkpoints)} teacher checkpoints")
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("weights: must be non-negative with a positive sum")
        if self.trained and (self.checkpoint or self.checkpoints):
            raise ValueError("trained: a teacher checkpoint is trained already; set trained or checkpoint(s), not both")
        source = source_of(self.name)
        if source and not source.trainable and not (self.trained or self.checkpoint or self.checkpoints):
            raise ValueError(
                f"name: {self.name!r} runs in onnxruntime and cannot be trained; set teacher.trained: true to distill from it as it is"
            )
        return self


class StudentConfig(ModelConfig):
    name: str = "seed_student"

    @field_validator("name")
    @classmethod
    def _trainable(cls, name: str) -> str:
        return trainable_name(name, "a student")


def trainable_name(name: str, role: str) -> str:
    """``name``, if a model of that name can be trained (ONNX models cannot)."""
    source = source_of(name)
    if source and not source.trainable:
        raise ValueError(
            f"{name!r} runs in onnxruntime without gradients and cannot be {role}; use a torchscript: file"
        )
    return name


class DistillConfig(StrictConfig):
    alpha: float = Field(0.9, ge=0, le=1)
    """Weight of the distillation terms; hard-label cross-entropy gets ``1 - alpha``:
    loss = (1 - alpha) * CE(y, s) + alpha * sum_m weight_m * L_m(s, t).
    With the single method ``kd`` this is Hinton et al.'s
    (1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))."""
    ce_weight: float | None = Field(None, ge=0)
    """Set to override the weight of the cross-entropy term (default: 1 - alpha)."""
    methods: dict[str, dict[str, Any]] = {DEFAULT_METHOD: {}}
    """Method name -> its options (see ``kdistill methods``); every method's options take
    ``weight`` (default 1.0)."""
    train: dict[str, Any] = {}
    """Overrides of the top-level ``train`` keys for the distillation phase."""
    teacher_cache: Path | None = None
    """Read the teacher's logits from this cache (``kdistill cache-teacher``) instead of
    running the teacher; logit methods only."""

    _options: dict[str, MethodOptions] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _parse_methods(self) -> DistillConfig:
        """Parse every method's options once; refuse a loss in which nothing has weight."""
        if not self.methods:
            raise ValueError("methods: at least one distillation method is required, e.g. {kd: {}}")
        try:
            self._options = parse_methods(self.methods)
        except UnknownMethod as e:
            raise ValueError(f"methods: {e}") from None
        except ValueError as e:
            raise ValueError(f"methods.{e}") from None
        weights = [o.weight for o in self._options.values()]
        if self.effective_ce_weight == 0 and (self.alpha == 0 or not any(weights)):
            raise ValueError(
                f"alpha: with alpha = {self.alpha}, ce_weight = {self.effective_ce_weight} and method weights "
                f"{weights} every loss term has weight 0; nothing would be learned"
            )
        return self

    @property
    def method_options(self) -> dict[str, MethodOptions]:
        """Each method's validated options, by name."""
        return self._options

    @property
    def effective_ce_weight(self) -> float:
        return 1.0 - self.alpha if self.ce_weight is None else self.ce_weight

    @property
    def temperature(self) -> float:
        """The temperature at which a teacher ensemble averages its members' soft outputs:
        that of the first method with one (1.0 if none)."""
        return soft_target_temperature(self.methods, self._options)


class MutualConfig(StrictConfig):
    """Deep mutual learning (``kdistill mutual``): these models trained together."""

    models: list[str] = ["seed_student", "seed_student"]
    temperature: float = Field(1.0, gt=0, le=100)
    weight: float = Field(1.0, ge=0)

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str]) -> list[str]:
        if len(models) < 2:
            raise ValueError("mutual learning needs at least two models")
        for name in models:
            trainable_name(check_name(name), "trained by mutual learning")
        return models


class DeployConfig(StrictConfig):
    """What ``kdistill run`` does with the distilled student after training: export it to
    ONNX (verified against PyTorch on the test images) and quantize it to int8, reporting
    accuracy, latency and size of both."""

    onnx: bool | None = None
    """null: when the export extra (onnx, onnxruntime) is installed; true: always (an error
    if it is missing); false: never."""
    quantization: Literal["static", "dynamic"] | None = "static"
    """int8 post-training quantization in ONNX Runtime: static (calibrated on training
    images), dynamic, or null for none."""
    calibration_images: int = Field(512, gt=0)


class DistributedConfig(StrictConfig):
    """Multi-process jobs launched with torchrun (ignored in a single process)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: NCCL between CUDA devices, gloo on CPUs."""
    timeout_s: float = Field(1800.0, gt=0)
    """A collective that waits longer than this for another process (dead, hung or
    unreachable) fails the job with an error. It must exceed the longest time one process
    works alone: rank 0 downloading/decoding the data set on first use, writing reports."""


class RunConfig(StrictConfig):
    name: str = "quickstart"
    seed: int = Field(0, ge=0)
    born_again: int = Field(0, ge=0, le=20)
    """Self-distillation: after the distilled student, train this many further generations
    of the student, each distilled from the previous one (born-again networks)."""
    device: str = "auto"
    output_dir: Path = Path("runs")
    budget: float | None = Field(None, gt=0)
    """Wall-clock budget of the whole command in seconds (or 90s, 10m, 1.5h); replaces the
    epoch counts: train/distill give it to their one phase; run plans its phases inside it
    (the same steps for every phase: the distilled student trains for the student alone's)."""
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    mutual: MutualConfig = MutualConfig()
    deploy: DeployConfig = DeployConfig()
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device != "auto" and not (device == "cpu" or device == "mps" or device.startswith("cuda")):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps (got {device!r})")
        return device

    @model_validator(mode="after")
    def _phase_overrides_valid(self) -> RunConfig:
        for phase in ("teacher", "student", "distill"):
            self.train_for(phase)
        return self

    def train_for(self, phase: Literal["teacher", "student", "distill"]) -> TrainConfig:
        """The top-level ``train`` settings with the phase's own overrides applied."""
        overrides = getattr(self, phase).train
        merged = deep_merge(self.train.model_dump(), overrides)
        finetune = self.teacher.finetune if phase == "teacher" else None
        if finetune is not None:
            given = {"epochs": finetune.epochs, "optimizer": {"lr": finetune.lr} if finetune.lr else None}
            merged = deep_merge(merged, {k: v for k, v in given.items() if v is not None})
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as e:
            raise ValueError(format_errors(e, prefix=f"{phase}.train")) from None


@dataclass(frozen=True)
class Override:
    """One ``KEY=VALUE`` override and what the user typed to give it, which its errors name:
    ``--set train.epochs=5`` (the default), ``-T/--temperature 0``, ``--device gpu``."""

    text: str
    flag: str = ""

    @property
    def key(self) -> str:
        return self.text.partition("=")[0].strip()

    @property
    def source(self) -> str:
        return self.flag or f"--set {self.text}"


def as_override(override: str | Override) -> Override:
    return override if isinstance(override, Override) else Override(override)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str | Override]) -> dict:
    data = copy.deepcopy(data)
    for override in map(as_override, overrides):
        path, value = parse_override(override.text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{override.source}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a bundled config (``quickstart``, ``cifar10_seed``, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (bundled configs: {known})")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config error in {path}:{where}: malformed YAML: {problem}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error in {path}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    return data


def validate_config(data: dict, source: str = "config", overrides: Sequence[str | Override] = ()) -> RunConfig:
    """The typed config of ``data`` (read from ``source`` with ``overrides`` applied). An
    error names what the user typed: the override that set the key at fault, else the file."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        given, groups = [as_override(o) for o in overrides], {}
        for path, line in error_lines(e):
            setter = _setter(path, given)
            groups.setdefault(setter.source if setter else f"config error in {source}", []).append(line)
        raise ConfigError("; ".join(f"{who}: {'; '.join(lines)}" for who, lines in groups.items())) from None


def _setter(path: str, overrides: list[Override]) -> Override | None:
    """The last override that set the key at ``path``, a key below it or its section."""
    for override in reversed(overrides):
        key = override.key
        if path and (path == key or path.startswith(f"{key}.") or key.startswith(f"{path}.")):
            return override
    return None


def load_config(path: str | Path | None = None, overrides: list[str | Override] | None = None) -> RunConfig:
    """Load a YAML config (default: the bundled quickstart), apply ``--set`` overrides, validate."""
    resolved = resolve_config_path(path or "quickstart")
    data = apply_overrides(load_yaml(resolved), overrides or [])
    return validate_config(data, source=str(resolved), overrides=overrides or [])


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
