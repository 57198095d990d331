"""What the training engine optimises: a model plus a loss, returning named loss terms.

The engine is the same for the teacher, the baseline student and every distillation run;
they differ only in the task:

- :class:`Supervised`: cross-entropy with the labels (optionally label-smoothed).
- :class:`Distillation`: the student against a frozen teacher, with any set of methods;
  with a :class:`~kdistill.teacher_cache.TeacherCache` the teacher's logits are read from
  the cache instead of computed.

A task's ``forward(batch, epoch)`` returns ``(student_logits, {term: weighted loss})``;
the engine sums the terms, backpropagates and logs each one. The trainable parameters are
``task.parameters()``: the model's and the methods' own. The teacher is deliberately not a
submodule, so it is never in the optimizer, never in a checkpoint and never switched to
train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data.loader import Batch
from kdistill.errors import ConfigError
from kdistill.methods import Method, kd_loss
from kdistill.models.base import KDModel, ModelOutput, forward_all
from kdistill.teacher_cache import TeacherCache


class Supervised(nn.Module):
    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, epoch: float) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(batch.images)
        return logits, {"ce": F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)}


class Distillation(nn.Module):
    """loss = ce_weight * CE(y, s) + alpha * sum_m weight_m * L_m(s, t)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        methods: dict[str, Method],
        alpha: float,
        ce_weight: float,
        label_smoothing: float = 0.0,
        teacher_cache: TeacherCache | None = None,
        compile_teacher: bool = False,
    ):
        super().__init__()
        self.model = student
        self.methods = nn.ModuleDict(methods)
        self.alpha = alpha
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing
        for p in teacher.eval().parameters():  # not Module.requires_grad_: a TorchScript module lacks it
            p.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        # teacher logits read by (epoch, sample index) instead of running the teacher
        self.teacher_cache = teacher_cache
        self.needs_features = any(m.needs_features for m in methods.values())
        # the teacher's outputs for a batch: logits only, or logits, stage features and pre-logits
        run = (
            (lambda x: forward_all(teacher, x))
            if self.needs_features
            else (lambda x: ModelOutput(teacher(x), [], None))
        )
        # compiled: a separate callable, so the teacher module itself is given back untouched
        self._run_teacher = torch.compile(run) if compile_teacher and teacher_cache is None else run
        if self.needs_features:
            names = ", ".join(n for n, m in methods.items() if m.needs_features)
            if teacher_cache is not None:
                raise ConfigError(
                    f"method(s) {names} need the teacher's stage features, which a teacher cache (logits only) does not hold; "
                    "distill without a teacher cache, or use logit methods (kd, dkd, ls, dist)"
                )
            for role, model in (("teacher", teacher), ("student", student)):
                if not isinstance(model, KDModel) and getattr(model, "kdistill_features", None) is None:
                    raise ConfigError(
                        f"method(s) {names} need stage features, but the {role} ({type(model).__name__}) has no "
                        "forward_features/forward_head; subclass kdistill.models.KDModel, or attach its stages with "
                        "kdistill.models.features.attach_features (a config's features: [module, ...])"
                    )

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # batch norm statistics and dropout of the teacher stay frozen
        return self

    def forward(self, batch: Batch, epoch: float) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.images
        if self.teacher_cache is not None:
            # the batch is epoch floor(epoch)'s views of these samples: the cache holds exactly those
            teacher = ModelOutput(self.teacher_cache.lookup(int(epoch), batch.indices), [], None)
        else:
            with torch.no_grad():
                teacher = self._run_teacher(x)
        student = forward_all(self.model, x) if self.needs_features else ModelOutput(self.model(x), [], None)
        losses = {}
        if self.ce_weight > 0:
            ce = F.cross_entropy(student.logits.float(), batch.labels, label_smoothing=self.label_smoothing)
            losses["ce"] = self.ce_weight * ce
        for method in self.methods.values():
            scale = self.alpha * method.options.weight
            for term, value in method(student, teacher, batch.labels, batch.indices, epoch).items():
                # two methods may name a term alike (kd+ls): keep both, apart
                losses[term if term not in losses else f"{method.name}.{term}"] = scale * value
        return student.logits, losses


class MutualLearning(nn.Module):
    """Deep mutual learning, Zhang, Xiang, Hospedales & Lu, CVPR 2018.

    No pre-trained teacher: K >= 2 models are trained together, each against the labels and
    against the others' *current* predictions:

        L_k = CE(y, z_k) + weight * T^2 / (K - 1) * sum_{j != k} KL( softmax(z_j/T) || softmax(z_k/T) )

    with the peers' logits detached in L_k, so each term only updates model k (the paper
    alternates updates between models; the joint step here is the usual simplification).
    ``self.model`` is the first model (the one the engine evaluates every epoch); the others
    are ``self.peers`` and are saved in the checkpoint with it.
    """

    def __init__(
        self, models: list[nn.Module], temperature: float = 1.0, weight: float = 1.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        if len(models) < 2:
            raise ValueError("mutual learning needs at least two models")
        self.model = models[0]
        self.peers = nn.ModuleList(models[1:])
        self.temperature = temperature
        self.weight = weight
        self.label_smoothing = label_smoothing

    @property
    def all_models(self) -> list[nn.Module]:
        return [self.model, *self.peers]

    def forward(self, batch: Batch, epoch: float) -> tuple[Tensor, dict[str, Tensor]]:
        logits = [m(batch.images).float() for m in self.all_models]
        K = len(logits)
        losses = {}
        for k, z in enumerate(logits):
            losses[f"ce_{k}"] = F.cross_entropy(z, batch.labels, label_smoothing=self.label_smoothing)
            kl = sum(kd_loss(z, logits[j].detach(), self.temperature) for j in range(K) if j != k)
            losses[f"dml_{k}"] = self.weight * kl / (K - 1)
        return logits[0], losses
