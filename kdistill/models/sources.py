"""Model sources: models from other libraries and files, named ``<prefix>:<target>``.

One syntax wherever a model is named (config, command line, :func:`kdistill.create_model`):

=====================  ==========================================================  ==========
name                   what it builds                                              extra
=====================  ==========================================================  ==========
``seed_student``       kdistill's own zoo (``MODELS``)                             -
``torchvision:<name>`` ``torchvision.models.get_model(name)``                      ``vision``
``timm:<name>``        ``timm.create_model(name)``                                 ``timm``
``hf:<id or folder>``  transformers ``AutoModelForImageClassification``            ``hf``
``torchscript:<file>`` ``torch.jit.load(file)`` (trained like any module)          -
``onnx:<file>``        an onnxruntime session, inference only (teachers)           ``onnx``
``pkg.module:func``    a user's function returning an ``nn.Module``                -
=====================  ==========================================================  ==========

Each library is imported here and only when a model names it. Every failure the user can
fix (a missing library, an unknown name, a file that does not exist, a factory that raises)
is a :class:`~kdistill.errors.ConfigError` of one line naming the model.

A source also records what rebuilds its architecture without the network or the original
files where it can (a Hugging Face model's config; a file's sha256), so that a checkpoint,
which holds the trained weights, rebuilds the model from itself.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.transfer import head_path
from kdistill.progress import log

# prefix -> (the module to import, the pip extra that installs it)
LIBRARIES: dict[str, tuple[str, str]] = {
    "torchvision": ("torchvision", "vision"),
    "timm": ("timm", "timm"),
    "hf": ("transformers", "hf"),
    "onnx": ("onnxruntime", "onnx"),
}
FILE_PREFIXES = ("torchscript", "onnx")
PREFIXES = ("torchvision", "timm", "hf", "torchscript", "onnx")
SYNTAX = (
    "torchvision:<name>, timm:<name>, hf:<hub id or folder>, torchscript:<file>, onnx:<file>, <python.module>:<factory>"
)


@dataclass(frozen=True)
class ModelSource:
    """A model named ``<prefix>:<target>``: where it comes from, and how to build it."""

    name: str  # as the user wrote it
    library: str  # one of PREFIXES, or "factory"
    target: str  # the library's model name, a file, a hub id, or "module:function"

    @property
    def trainable(self) -> bool:
        """ONNX models run in onnxruntime, without gradients."""
        return self.library != "onnx"

    def build(
        self, num_classes: int, kwargs: dict[str, Any], pretrained: bool = False, record: dict | None = None
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The model, and what a checkpoint records to rebuild its architecture (``record``
        is that of an earlier build: rebuild from it rather than from the original source)."""
        builder = _BUILDERS[self.library]
        return builder(self, num_classes, dict(kwargs), pretrained, record or {})

    def input_config(self, model: nn.Module) -> dict[str, Any]:
        """The input size and normalisation the library says the model expects, where it says
        (timm's pretrained_cfg, torchvision's weights' transforms, a Hugging Face model's image
        size); ``{}`` when it does not."""
        if self.library == "timm":
            cfg = getattr(model, "pretrained_cfg", None) or {}
            return {k: cfg[k] for k in ("input_size", "mean", "std") if k in cfg}
        if self.library == "torchvision":  # its weights' preprocessing (no download: the enum's metadata)
            tv = _import(self)
            try:
                preset = tv.models.get_model_weights(self.target).DEFAULT.transforms()
            except (ValueError, KeyError, AttributeError, TypeError):  # no weights for this model
                return {}
            size = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else preset.crop_size
            return {"input_size": (3, size, size), "mean": tuple(preset.mean), "std": tuple(preset.std)}
        if self.library == "hf":
            size = getattr(getattr(model, "config", None), "image_size", None)
            said = {"input_size": (3, size, size)} if isinstance(size, int) else {}
            return said | self._hf_processor()
        return {}

    def _hf_processor(self) -> dict[str, Any]:
        """What a Hugging Face model's image processor config (``preprocessor_config.json``,
        in its folder or the hub cache) says: its mean, std and size; ``{}`` without one."""
        transformers = _import(self)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(self.target)
        except (OSError, ValueError, KeyError, TypeError):  # none saved, offline and not cached
            return {}
        said: dict[str, Any] = {}
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            said.update(mean=tuple(mean), std=tuple(std))
        size = getattr(processor, "crop_size", None) or getattr(processor, "size", None)  # a dict or a SizeDict
        get = getattr(size, "get", None)
        side = (get("height") or get("shortest_edge")) if get is not None else None
        if isinstance(side, int):
            said["input_size"] = (3, side, side)
        return said


def is_source(name: str) -> bool:
    """Whether ``name`` is written as a source (``prefix:target``) rather than a zoo name."""
    return ":" in name


def parse_source(name: str) -> ModelSource:
    """The source a name denotes; ValueError (one line) for a malformed one."""
    prefix, _, target = name.partition(":")
    if not target:
        raise ValueError(f"model {name!r}: nothing after {prefix + ':'!r}; expected one of {SYNTAX}")
    if prefix in PREFIXES:
        return ModelSource(name, prefix, target)
    if all(part.isidentifier() for part in prefix.split(".")) and all(p.isidentifier() for p in target.split(".")):
        return ModelSource(name, "factory", target=f"{prefix}:{target}")
    raise ValueError(
        f"model {name!r}: unknown prefix {prefix!r}; expected one of {', '.join(PREFIXES)} "
        "or a Python module and function (package.module:function)"
    )


def _import(source: ModelSource):
    module, extra = LIBRARIES[source.library]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"model {source.name!r} needs {module} ({e.__class__.__name__}: {str(e)[:120]}): pip install 'kdistill[{extra}]'"
        ) from None


def _unknown(source: ModelSource, known: list[str], library: str) -> ConfigError:
    close = difflib.get_close_matches(source.target, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(known)} models; list them with {library})"
    return ConfigError(f"model {source.name!r}: {library.split('.')[0]} has no model {source.target!r}{hint}")


def _offline_hint(source: ModelSource, e: Exception) -> ConfigError:
    return ConfigError(
        f"model {source.name!r} with pretrained: true: its weights are neither cached nor downloadable "
        f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
        "download them once online, or give weights_file: FILE, or pretrained: false"
    )


def _torchvision(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    tv = _import(source)
    known = tv.models.list_models()
    if source.target not in known:
        raise _unknown(source, known, "torchvision.models.list_models()")
    if not pretrained:
        return tv.models.get_model(source.target, weights=None, num_classes=num_classes, **kwargs), {}
    try:
        model = tv.models.get_model(source.target, weights="DEFAULT", **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise _offline_hint(source, e) from None
    before = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    model = _new_head(source, model, num_classes)
    after = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return model, {"new_head": before != after}


def _new_head(source: ModelSource, model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last linear layer when the pretrained model predicts another number of
    classes (ImageNet's 1,000): the new head starts from random weights."""
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last or last[-1][1].out_features == num_classes:
        return model
    path, linear = last[-1]
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], nn.Linear(linear.in_features, num_classes))
    log(f"{source.name}: pretrained for {linear.out_features} classes; new head {path} for {num_classes} classes")
    return model


def _timm(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    timm = _import(source)
    if source.target.split(".")[0] not in timm.list_models():
        raise _unknown(source, timm.list_models(), "timm.list_models()")
    try:
        model = timm.create_model(source.target, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise _offline_hint(source, e) from None
        raise
    if not pretrained:
        return model, {}
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    return model, {"new_head": pretrained_classes is not None and pretrained_classes != num_classes}


class HFClassifier(nn.Module):
    """A transformers image classifier as a plain classifier: pixels in, logits out (the
    library returns an output object whose ``.logits`` these are)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def _hf(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    transformers = _import(source)
    auto = transformers.AutoModelForImageClassification
    if record.get("hf_config"):  # a rebuild: the architecture from the checkpoint, not the hub or the folder
        cfg = dict(record["hf_config"])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return HFClassifier(auto.from_config(config)), record
    try:
        if pretrained:
            saved = transformers.AutoConfig.from_pretrained(source.target).num_labels
            model = auto.from_pretrained(source.target, num_labels=num_classes, ignore_mismatched_sizes=True, **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(source.target, num_labels=num_classes, **kwargs)
            model = auto.from_config(config)
    except (OSError, ValueError) as e:  # not found offline, not a folder, not an image classifier
        raise ConfigError(
            f"model {source.name!r}: transformers cannot load {source.target!r} as an image classifier "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    record = {"hf_config": model.config.to_diff_dict() | {"model_type": model.config.model_type}}
    if pretrained:
        record["new_head"] = saved != num_classes
    return HFClassifier(model), record


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file(source: ModelSource, record: dict) -> tuple[Path, dict]:
    """The model's file, and its record (absolute path and sha256). A rebuild reads the
    recorded file and says when it changed since."""
    path = Path(record.get("file") or source.target).expanduser()
    if not path.is_file():
        what = "the file the checkpoint was made from" if record else "file"
        raise ConfigError(f"model {source.name!r}: {what} {path} does not exist")
    digest = sha256(path)
    if record.get("sha256") and record["sha256"] != digest:
        log(
            f"note: {path} changed since the checkpoint was written (sha256 {digest[:12]}, was {record['sha256'][:12]})"
        )
    return path, {"file": str(path.resolve()), "sha256": digest}


def _torchscript(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    path, new_record = _file(source, record)
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model {source.name!r}: {path} is not a TorchScript archive ({str(e).splitlines()[0][:160]})"
        ) from None
    return model, new_record


class ONNXModel(nn.Module):
    """An ONNX classifier run by onnxruntime, for inference only (a teacher). Its one
    parameter is an empty tensor that records the device (no trainable weights)."""

    def __init__(self, path: Path, name: str, digest: str):
        super().__init__()
        import onnxruntime as ort  # lazy: an optional extra, checked by _import before

        self.name, self.path = name, path
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        # the file's sha256 in the state dict: what identifies these weights (a teacher cache checks it)
        self.register_buffer("file_sha256", torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8))
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ConfigError(
                f"model {name!r}: onnxruntime cannot load {path} ({str(e).splitlines()[0][:200]})"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"model {name!r}: {path} takes {len(inputs)} inputs; expected one batch of images")
        self.input_name, self.input_shape = inputs[0].name, list(inputs[0].shape)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K)
        expected = self.input_shape
        fits = len(expected) == x.dim() and all(not isinstance(e, int) or e == s for e, s in zip(expected, x.shape))
        if not fits:
            shown = "(" + ", ".join(str(e) if isinstance(e, int) else "N" for e in expected) + ")"
            raise ConfigError(
                f"model {self.name!r} expects input of shape {shown} but gets {tuple(x.shape)}; "
                "export it with the data's image size (data.image_size) or a dynamic batch axis"
            )
        array = x.detach().float().contiguous().cpu().numpy()
        (out,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(out).to(x.device)


def _onnx(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    _import(source)
    path, new_record = _file(source, record)
    return ONNXModel(path, source.name, new_record["sha256"]), new_record


def _factory(source: ModelSource, num_classes: int, kwargs: dict, pretrained: bool, record: dict):
    module_name, _, func_name = source.target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as python -m does: the user's own modules in the working folder
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name != e.name and not module_name.startswith(e.name + "."):
            raise ConfigError(
                f"model {source.name!r}: importing {module_name} raised {e.__class__.__name__}: {e}"
            ) from None
        raise ConfigError(
            f"model {source.name!r}: {module_name!r} is neither a known prefix ({', '.join(PREFIXES)}) nor an importable "
            f"Python module defining {func_name}() ({e.__class__.__name__}: {e})"
        ) from None
    except Exception as e:  # the user's module failed while importing: one line, naming it
        raise ConfigError(
            f"model {source.name!r}: importing {module_name} raised {e.__class__.__name__}: {str(e)[:200]}"
        ) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"model {source.name!r}: module {module_name} has no function {func_name!r}")
    if _takes(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    if pretrained and _takes(factory, "pretrained"):
        kwargs["pretrained"] = True
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's code: any exception, said in one line
        raise ConfigError(f"factory {source.target} raised {e.__class__.__name__}: {str(e)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {source.target} returned {type(model).__name__}, not a torch.nn.Module")
    return model, {}


def _takes(func: Callable, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "torchvision": _torchvision,
    "timm": _timm,
    "hf": _hf,
    "torchscript": _torchscript,
    "onnx": _onnx,
    "factory": _factory,
}


def load_weights(model: nn.Module, path: Path, name: str, new_head: bool = False) -> str:
    """Load a state dict file (``torch.load(weights_only=True)``, or safetensors) into
    ``model``; one line naming the file and the first mismatching keys when it does not fit.
    Returns the file's sha256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model {name!r}: weights file {path} does not exist")
    state = _read_state_dict(path, name)
    if isinstance(model, HFClassifier) and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}  # a transformers state dict, without our wrapper's prefix
    own = model.state_dict()
    head = _other_head(model, state, own)
    if head is not None and new_head:  # weights for another label set: all but the head, which starts random
        log(
            f"model {name!r}: the weights' head {head} predicts {state[f'{head}.weight'].shape[0]} classes, the run "
            f"{own[f'{head}.weight'].shape[0]}: loaded all but the head, which starts random (fine-tuned)"
        )
        state = {k: (own[k] if k.startswith(head + ".") else v) for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(
                "shape of " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
            )
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        hint = "; for weights of another label set, fine-tune them with a new head (teacher.finetune)" if head else ""
        raise ConfigError(f"model {name!r}: weights file {path} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)
    return sha256(path)


def _other_head(model: nn.Module, state: dict[str, Tensor], own: dict[str, Tensor]) -> str | None:
    """The head's path when ``state`` fits ``model`` but for the number of classes of its
    final classifier (an ImageNet state dict for a model built for the run's classes)."""
    path = head_path(model)
    if path is None or set(state) != set(own):
        return None
    wrong = {k for k in own if tuple(state[k].shape) != tuple(own[k].shape)}
    keys = {f"{path}.weight", f"{path}.bias"} & set(own)
    if not wrong or wrong != keys or state[f"{path}.weight"].shape[1:] != own[f"{path}.weight"].shape[1:]:
        return None
    return path


def _read_state_dict(path: Path, name: str) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # lazy: optional, installed with transformers

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, not a tensor file
        raise ConfigError(
            f"model {name!r}: weights file {path} is not a state dict readable safely "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "format" in state:
        state = state["model"]  # a kdistill checkpoint: its model's weights
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} wrapping
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"model {name!r}: weights file {path} holds no state dict (a dict of name -> tensor)")
    return state
