"""Deployment: a trained model as an ONNX or TorchScript file, verified, optionally int8.

The exported model takes what kdistill models take: float32 images ``(N, 3, H, W)``, RGB,
pixel values divided by 255, then normalised per channel with the training set's
``(x - mean) / std``. That preprocessing, the class names and the image size are written
into the file's metadata (ONNX ``metadata_props``; TorchScript ``extra_files``
``kdistill.json``), so the file documents itself.

An ONNX export is verified with ONNX Runtime on real test images: the largest absolute
difference of its logits from PyTorch's must be <= 1e-4 and its top-1 class identical on
>= 99.9% of the images, or the export fails. Post-training int8 quantization runs in ONNX
Runtime: static (activation ranges calibrated on training images; QOperator format, uint8
activations, per-channel int8 weights, the fast path on x86 CPUs) or dynamic (int8 weights,
activation ranges computed at run time). onnx and onnxruntime are the optional extra
``pip install 'kdistill[export]'``, imported only here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.checkpoint import load_model
from kdistill.data.dataset import load_recorded
from kdistill.data.loader import Normalize, centre_crop
from kdistill.errors import ExportError
from kdistill.evaluate import time_calls
from kdistill.progress import log, progress

FORMATS = ("onnx", "torchscript")
QUANTIZATION = ("static", "dynamic")
MAX_ABS_DIFF = 1e-4  # largest |logit difference| allowed between ONNX Runtime and PyTorch
MIN_TOP1_AGREEMENT = 99.9  # % of test images whose top-1 class must be identical
OPSET = 17
EXPORT_HINT = "install the export extra: pip install 'kdistill[export]'"


def require_onnx() -> tuple[Any, Any]:
    """The onnx and onnxruntime modules, or an ExportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the packages onnx and onnxruntime ({e.name} is missing); {EXPORT_HINT}"
        ) from None
    return onnx, onnxruntime


def onnx_available() -> bool:
    try:
        require_onnx()
    except ExportError:
        return False
    return True


def preprocessing(mean: list[float], std: list[float], image_size: int, classes: list[str] | None) -> dict[str, Any]:
    """What a user of the exported file must do to an image, and what the outputs mean."""
    return {
        "input": f"float32 (N, 3, {image_size}, {image_size}), RGB, channels first",
        "normalisation": "x = (pixel / 255 - mean[c]) / std[c] for channel c",
        "mean": list(mean),
        "std": list(std),
        "image_size": image_size,
        "output": "logits (N, num_classes); softmax gives class probabilities",
        "classes": list(classes) if classes else None,
    }


def _eval_copy(model: nn.Module) -> nn.Module:
    """A copy of the model on the CPU, in eval mode, with contiguous weights (channels_last
    is a training detail); the caller's model is left as it was."""
    device = next(model.parameters()).device
    copied = copy.deepcopy(model.to("cpu"))
    model.to(device)
    return copied.eval().to(memory_format=torch.contiguous_format)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` as ONNX (dynamic batch size) with ``metadata`` in its metadata_props."""
    onnx, _ = require_onnx()
    model = _eval_copy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        # The TorchScript-based exporter: exports a CNN in well under a second and needs only
        # the onnx package (the torch.export-based one takes ~10 s and needs onnxscript).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        except Exception as e:  # the exporter fails in many ways on operators or code it does not know
            path.unlink(missing_ok=True)
            name = getattr(model, "kdistill_name", None) or type(model).__name__
            raise ExportError(
                f"{name} cannot be exported to ONNX by torch.onnx ({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                "try --format torchscript"
            ) from None
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "kdistill"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    onnx, _ = require_onnx()
    out = {}
    for entry in onnx.load(str(path)).metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


def export_torchscript(model: nn.Module, input_shape: tuple[int, ...], path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` traced to TorchScript, with ``metadata`` as the extra file kdistill.json."""
    model = _eval_copy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is in maintenance mode; tracing a CNN is still exact
        traced = torch.jit.trace(model, torch.zeros(1, *input_shape))
        torch.jit.save(traced, str(path), _extra_files={"kdistill.json": json.dumps(metadata)})
    return path


def read_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    extra = {"kdistill.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["kdistill.json"] or "{}")


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session using as many threads as torch does (a fair comparison)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ExportError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None


def _batches(images: Tensor, normalize: Normalize, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size]).numpy()


def run_session(
    session, images: Tensor, normalize: Normalize, batch_size: int = 250, desc: str | None = None
) -> Tensor:
    """Logits (N, K) of uint8 images (N, 3, H, W) through an ONNX Runtime session."""
    batches = _batches(images, normalize, batch_size)
    if desc:
        batches = progress(batches, total=-(-len(images) // batch_size), desc=desc)
    return torch.from_numpy(np.concatenate([session.run(None, {"images": x})[0] for x in batches]))


@torch.no_grad()
def run_torch(model: nn.Module, images: Tensor, normalize: Normalize, batch_size: int = 250) -> Tensor:
    model = _eval_copy(model)
    return torch.cat([model(torch.from_numpy(x)) for x in _batches(images, normalize, batch_size)])


def compare_logits(exported: Tensor, reference: Tensor) -> dict[str, Any]:
    """How faithfully exported logits (N, K) reproduce the reference ones."""
    diff = (exported.float() - reference.float()).abs()
    agree = (exported.argmax(1) == reference.argmax(1)).float().mean().item() * 100
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": agree,
        "num_images": len(reference),
    }


def check_faithful(check: dict[str, Any], what: str) -> None:
    """Raise ExportError unless ``check`` (from compare_logits) meets the export tolerances."""
    if check["max_abs_diff"] > MAX_ABS_DIFF or check["top1_agreement"] < MIN_TOP1_AGREEMENT:
        raise ExportError(
            f"{what} does not reproduce the PyTorch model on {check['num_images']} test images: max |logit difference| "
            f"{check['max_abs_diff']:.2e} (allowed {MAX_ABS_DIFF:g}), identical top-1 on {check['top1_agreement']:.2f}% "
            f"(required {MIN_TOP1_AGREEMENT}%)"
        )


def session_latency(session, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Latency at batch 1 (median, p90) and throughput at batch 256 of an ONNX Runtime session."""
    x1 = np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)
    x256 = np.random.default_rng(1).standard_normal((256, *input_shape), dtype=np.float32)
    return {
        "latency_b1": time_calls(lambda: session.run(None, {"images": x1}), 1),
        "throughput_b256": time_calls(lambda: session.run(None, {"images": x256}), 256, warmup=2, repeats=10),
    }


def quantize_onnx(
    source: Path,
    target: Path,
    mode: str = "static",
    calibration: Tensor | None = None,
    normalize: Normalize | None = None,
) -> Path:
    """Post-training int8 quantization of an ONNX file with ONNX Runtime.

    static: activation ranges from running ``calibration`` (uint8 training images
    (N, 3, H, W), normalised with ``normalize``) through the model; dynamic: int8 weights,
    activation ranges computed per batch at run time (no calibration data).
    """
    require_onnx()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # reduce_range (7-bit weights): x86 CPUs without VNNI multiply uint8 x int8 with an
    # instruction (VPMADDUBSW) whose 16-bit sums saturate, and the model's accuracy falls
    # apart (numbers in benchmarks/results/design_notes.md). ONNX Runtime's documentation gives this remedy; it costs almost nothing on
    # other CPUs, and the file may be deployed on any of them.
    if mode not in QUANTIZATION:
        raise ExportError(f"quantization {mode!r}: expected one of {', '.join(QUANTIZATION)}")
    target = Path(target)
    prepared = target.with_name(target.stem + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared))  # shape inference and graph clean-up first
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            if mode == "dynamic":
                quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, reduce_range=True)
            else:
                if calibration is None or normalize is None or len(calibration) == 0:
                    raise ExportError("static int8 quantization needs calibration images")

                class Reader(CalibrationDataReader):
                    def __init__(self):
                        self.batches = _batches(calibration, normalize, 64)

                    def get_next(self):
                        x = next(self.batches, None)
                        return None if x is None else {"images": x}

                quantize_static(
                    str(prepared),
                    str(target),
                    Reader(),
                    quant_format=QuantFormat.QOperator,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=True,
                )
    finally:
        prepared.unlink(missing_ok=True)
    return target


def calibration_images(train_images: Tensor, count: int, seed: int = 0, rows: Tensor | None = None) -> Tensor:
    """A seeded random subset of ``count`` training images for int8 calibration (of the
    ``rows`` of ``train_images`` that form the training split, if given)."""
    n = len(rows) if rows is not None else len(train_images)
    count = min(count, n)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return train_images[rows[index] if rows is not None else index]


def deploy(
    model: nn.Module,
    path: Path,
    *,
    test_images: Tensor,
    test_labels: Tensor,
    train_images: Tensor,
    train_rows: Tensor | None = None,
    mean: list[float],
    std: list[float],
    classes: list[str] | None,
    quantization: str | None = "static",
    calibration_count: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``model`` to the ONNX file ``path``, verify it on the test images, quantize it
    to int8 (``path`` with suffix ``.int8.onnx``) and measure both: test accuracy,
    faithfulness to PyTorch, CPU latency and size. Returns the numbers for summary.json."""
    path = Path(path)
    input_shape = tuple(test_images.shape[1:])
    normalize = Normalize(mean, std, torch.device("cpu"), False)
    meta = {"kdistill": "1", "preprocessing": preprocessing(mean, std, input_shape[-1], classes)}
    reference = run_torch(model, test_images, normalize)
    labels = test_labels.long()

    def top1(logits: Tensor) -> float:
        return (logits.argmax(1) == labels).float().mean().item() * 100

    fp32_path = export_onnx(model, input_shape, path, meta)
    session = onnx_session(fp32_path)
    fp32_logits = run_session(session, test_images, normalize, desc="verify ONNX")
    check = compare_logits(fp32_logits, reference)
    check_faithful(check, f"ONNX export {fp32_path}")
    result: dict[str, Any] = {
        "pytorch_top1": top1(reference),
        "onnx": {
            "path": str(fp32_path),
            "top1": top1(fp32_logits),
            "disk_bytes": fp32_path.stat().st_size,
            **check,
            **session_latency(session, input_shape),
        },
    }
    if quantization:
        calib = (
            calibration_images(train_images, calibration_count, seed, train_rows) if quantization == "static" else None
        )
        int8_path = quantize_onnx(
            fp32_path, path.with_name(path.name.removesuffix(".onnx") + ".int8.onnx"), quantization, calib, normalize
        )
        qsession = onnx_session(int8_path)
        int8_logits = run_session(qsession, test_images, normalize, desc="evaluate int8")
        result["int8"] = {
            "path": str(int8_path),
            "mode": quantization,
            "calibration_images": len(calib) if calib is not None else 0,
            "top1": top1(int8_logits),
            "disk_bytes": int8_path.stat().st_size,
            **compare_logits(int8_logits, reference),
            **session_latency(qsession, input_shape),
        }
    log(
        f"ONNX export verified on {check['num_images']} test images (max |diff| {check['max_abs_diff']:.1e}, "
        f"top-1 identical on {check['top1_agreement']:.1f}%)"
        + (
            f"; int8 ({quantization}): top-1 {result['int8']['top1']:.2f}% vs {result['pytorch_top1']:.2f}%"
            if quantization
            else ""
        )
    )
    return result


def export_checkpoint(
    checkpoint: Path,
    fmt: str = "onnx",
    output: Path | None = None,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    quantization: str | None = None,
    calibration_count: int = 512,
) -> dict[str, Any]:
    """``kdistill export``: write a checkpoint's model as ONNX or TorchScript next to it (or
    at ``output``), verified against PyTorch on the test images of the data set it was
    trained on (or ``dataset``); ONNX files can also be quantized to int8."""
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if quantization and fmt != "onnx":
        raise ExportError(f"int8 quantization (--quantize {quantization}) runs in ONNX Runtime; use --format onnx")
    if fmt == "onnx":
        require_onnx()  # before any work
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    info = state.get("data") or {}
    name = dataset or info.get("dataset")
    if not name or name in ("tensors", "iterable"):
        raise ExportError(
            f"{checkpoint} was trained on in-memory data; pass --data with a data set of the same classes to verify the export on"
        )
    ds = load_recorded(info, dataset, data_dir)  # at its training size below (evaluation's centre crop)
    if info.get("train_size"):
        # the training images stay a view (of the data store): calibration gathers a few of them
        size = info["train_size"]
        ds = dataclasses.replace(
            ds,
            train_images=centre_crop(ds.train_images, size),
            test_images=centre_crop(ds.test_images, size).contiguous(),
        )
    expected = (state.get("model_spec") or {}).get("kwargs", {}).get("num_classes")
    if expected is not None and expected != ds.num_classes:
        raise ExportError(f"{checkpoint} predicts {expected} classes but data set {name!r} has {ds.num_classes}")
    mean, std = info.get("mean") or ds.mean_std()[0], info.get("std") or ds.mean_std()[1]
    classes = info.get("classes") or ds.classes
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    # runs/x/distilled/checkpoint.pt -> runs/x/distilled/model.onnx; other names keep their stem
    stem = "model" if checkpoint.stem == "checkpoint" else checkpoint.stem
    output = Path(output) if output else checkpoint.with_name(stem + suffix)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "format": fmt,
        "dataset": name,
        "test_images": len(ds.test_labels),
    }
    if fmt == "onnx":
        result.update(
            deploy(
                model,
                output,
                test_images=ds.test_images,
                test_labels=ds.test_labels,
                train_images=ds.train_images,
                train_rows=ds.train_rows,
                mean=mean,
                std=std,
                classes=classes,
                quantization=quantization,
                calibration_count=calibration_count,
            )
        )
        return result
    result.update(_export_torchscript_verified(model, ds, output, mean, std, classes))
    return result


def _export_torchscript_verified(model: nn.Module, ds, output: Path, mean, std, classes) -> dict[str, Any]:
    """The model as TorchScript at ``output``, checked against PyTorch on the test images and timed."""
    result: dict[str, Any] = {}
    input_shape = tuple(ds.test_images.shape[1:])
    normalize = Normalize(mean, std, torch.device("cpu"), False)
    export_torchscript(
        model,
        input_shape,
        output,
        {"kdistill": "1", "preprocessing": preprocessing(mean, std, input_shape[-1], classes)},
    )
    loaded, _ = read_torchscript(output)
    reference = run_torch(model, ds.test_images, normalize)
    with torch.no_grad():
        scripted = torch.cat([loaded(torch.from_numpy(x)) for x in _batches(ds.test_images, normalize, 250)])
    check = compare_logits(scripted, reference)
    check_faithful(check, f"TorchScript export {output}")
    x1, x256 = torch.randn(1, *input_shape), torch.randn(256, *input_shape)
    with torch.no_grad():
        latency = {
            "latency_b1": time_calls(lambda: loaded(x1), 1),
            "throughput_b256": time_calls(lambda: loaded(x256), 256, warmup=2, repeats=10),
        }
    labels = ds.test_labels.long()
    result["torchscript"] = {
        "path": str(output),
        "top1": (scripted.argmax(1) == labels).float().mean().item() * 100,
        "disk_bytes": output.stat().st_size,
        **check,
        **latency,
    }
    result["pytorch_top1"] = (reference.argmax(1) == labels).float().mean().item() * 100
    return result
