"""Data-parallel training on many processes, GPUs and machines: PyTorch's own DDP.

Launch any training command with ``torchrun`` and it runs as one job of ``WORLD_SIZE``
processes::

    torchrun --nproc_per_node=4 -m kdistill run ...

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`process_group` reads them and joins the group (NCCL between GPUs, gloo on CPUs).
Without them (or with ``WORLD_SIZE=1``) every helper here is a no-op and kdistill runs as
one process: there is one code path for one CPU, one GPU and many.

What is split and what is replicated:

- ``train.batch_size`` is the *global* batch: every optimizer step consumes that many
  samples in total, and ``optimizer.lr`` is the learning rate for it. Each rank takes its
  share of every global batch of the epoch's shuffled order (``TrainLoader(shard=...)``),
  so N processes with batch 256 make the same steps as one process with batch 256.
- Gradients are averaged by DistributedDataParallel; each rank weights its loss by its
  share of the global batch, so uneven shards still give the global mean.
- The frozen teacher is replicated on every rank (it is not wrapped: it has no gradients).
- Evaluation is sharded by sample and the logits are gathered, so metrics are those of the
  whole evaluation set, identical on every rank.
- Only rank 0 writes checkpoints, metrics and reports, and only it logs.

A process that dies makes the others fail instead of hanging: torchrun stops the whole job
as soon as one worker exits with an error, and a collective that waits for a dead or stuck
peer fails after ``timeout_s``; both end in a one-line :class:`DistributedError`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdistill.errors import ConfigError, DistributedError, KDistillError

DEFAULT_TIMEOUT_S = 1800.0  # PyTorch's own default for gloo; NCCL's is 600 s
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_timeout_s = DEFAULT_TIMEOUT_S  # of the group this process joined, for error messages


def env_world_size() -> int:
    """The job's size as torchrun announces it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """This process's index on its machine (selects its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank; before the group exists, what torchrun announced."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs."""
    return rank() == 0


def enabled() -> bool:
    """True while training in a group of more than one process."""
    return world_size() > 1


def init(device: torch.device, backend: str = "auto", timeout_s: float | None = None) -> bool:
    """Join the process group torchrun's environment describes. Returns True if this call
    created it (the caller then destroys it), False when already joined or not launched."""
    if is_initialized() or env_world_size() <= 1:
        return False
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={env_world_size()} is set but {', '.join(missing)} is not: launch with "
            "torchrun (e.g. torchrun --nproc_per_node=2 -m kdistill run), which sets them all"
        )
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend: nccl needs CUDA devices, but the device is {device}; use gloo or auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: one GPU per process
    global _timeout_s
    _timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    timeout = datetime.timedelta(seconds=_timeout_s)
    try:
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    except (RuntimeError, ValueError) as e:  # rendezvous failures: DistNetworkError, DistStoreError, ...
        raise DistributedError(
            f"rank {rank()} of {env_world_size()}: cannot join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(e)})"
        ) from None
    return True


def ensure(device: torch.device) -> None:
    """Join the group of torchrun's environment if not yet joined (the Python API called from
    a script that torchrun started); the group is left when the process exits."""
    if init(device):
        atexit.register(leave)


def leave() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device, backend: str = "auto", timeout_s: float | None = None) -> Iterator[None]:
    """The whole job inside a process group (when launched by torchrun): joined on entry,
    left on exit, communication failures turned into :class:`DistributedError`."""
    created = init(device, backend, timeout_s)
    try:
        with translate_errors():
            yield
            if created:  # the ranks leave together: one tearing the group down while another still
                dist.barrier()  # works (rank 0 writing the report) could abort its process
    finally:
        if created:
            leave()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# What gloo says, without its source path, when a peer is gone or a wait timed out: a
# timed-out wait closes every pair of the process group, and the collectives still running
# on it then fail with the first of these (seen in CI) rather than with the timeout itself.
_GLOO_PEER_FAILURES = (
    "Application timeout caused pair closure",
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
)


def _is_communication_error(e: BaseException) -> bool:
    """gloo reports a dead or stuck peer as a plain RuntimeError, usually naming its source
    file; NCCL and the rendezvous store raise torch.distributed.DistError subclasses."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    markers = ("/gloo/", "NCCL", "ProcessGroup", *_GLOO_PEER_FAILURES)
    return isinstance(e, RuntimeError) and any(m in text for m in markers)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn a failed collective (another rank died, hung or became unreachable) into a
    one-line DistributedError. A no-op outside a process group."""
    try:
        yield
    except Exception as e:
        if is_initialized() and "Expected to have finished reduction in the prior iteration" in str(e):
            raise DistributedError(
                f"rank {rank()} of {world_size()}: some trainable parameters received no gradient in a step (for "
                "example the student's classifier when distill.ce_weight is 0 and no method uses the logits); "
                "DistributedDataParallel needs every parameter to take part in every step: use them in the loss"
            ) from None
        if not is_initialized() or not _is_communication_error(e):
            raise
        wait = f"{_timeout_s:.0f} s"
        raise DistributedError(
            f"rank {rank()} of {world_size()}: another process of the job stopped, or did not respond "
            f"within {wait} ({_first_line(e)}); see that process's own error above. "
            "Fix it, then rerun with --resume to continue from the last checkpoint"
        ) from None


# ---------------------------------------------------------------- collectives (no-ops alone)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of x over all ranks, in place (x itself when alone)."""
    if enabled():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of x over all ranks, in place (x itself when alone)."""
    if enabled():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce)."""
    if not enabled():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agree(stop: bool, proposal: int, device: torch.device) -> tuple[bool, int]:
    """One tiny all-reduce for what must be the same on every rank: whether any rank asks to
    stop (Ctrl-C), and rank 0's ``proposal`` (a step count: a time budget's plan, which
    depends on each rank's own clock and so is decided by one)."""
    if not enabled():
        return stop, proposal
    t = torch.tensor([int(stop), proposal if is_main() else -1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    flag, planned = t.tolist()
    return bool(flag), int(planned)


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of x (R_i, ...), concatenated in rank order; shards may differ in size."""
    if not enabled():
        return x
    world = world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (pickled: small host objects only)."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; rank 0 of the same job is trusted)."""
    if not enabled():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any], share: bool = False) -> Any:
    """Run ``fn`` on rank 0 only (reading or writing files). A KDistillError it raises is
    raised on every rank, so all stop alike; with ``share`` its result reaches every rank."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except KDistillError as e:
            error = e
    if enabled():
        error = broadcast_object(error)
        if error is None and share:
            result = broadcast_object(result)
    if error is not None:
        raise error
    return result


def shard() -> tuple[int, int]:
    """(rank, world size) for a data loader: this rank's share of every global batch."""
    return (rank(), world_size()) if enabled() else (0, 1)


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n items (sizes differ by at most one)."""
    world, r = world_size(), rank() if enabled() else 0
    return n * r // world, n * (r + 1) // world


def local_main_first(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, local rank 0 of every machine first (download, decode, cache),
    the others after it, finding the files in place. A KDistillError of a first one is
    raised on every rank. Just ``fn()`` alone."""
    if not enabled():
        return fn()
    first = local_rank() == 0
    result, error = None, None
    if first:
        try:
            result = fn()
        except KDistillError as e:
            error = e
    errors = all_gather_object(error)  # also the barrier the others wait at
    error = error or next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result if first else fn()


# ---------------------------------------------------------------- the model


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` inside DistributedDataParallel when training on several ranks, else itself.

    Buffers are not broadcast at every forward: memory banks (CRD) are kept identical by
    their method and would cost their whole size per step; batch-norm statistics are
    averaged once per epoch by :func:`average_batchnorm_stats` instead.
    """
    if not enabled():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # torch >= 2.13 names the per-forward buffer broadcast forward_sync_buffers (buffers are
    # then still synced once at start, which is harmless: they are equal on every rank)
    no_sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync_option = {"forward_sync_buffers": False} if no_sync else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **sync_option)


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Average the running mean/var of every batch-norm layer over the ranks, so that all
    ranks evaluate and checkpoint the same model (each saw only its shard's statistics)."""
    if not enabled():
        return
    world = world_size()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)


@contextlib.contextmanager
def sync_batchnorm(module: nn.Module, device: torch.device, enabled_: bool) -> Iterator[None]:
    """Batch norm with statistics over the global batch (SyncBatchNorm) while training on
    several GPUs; the original layers, holding the trained parameters, are put back after.

    PyTorch's SyncBatchNorm runs on CUDA only; alone (one process) it is plain batch norm.
    """
    if not (enabled_ and enabled()):
        yield
        return
    if device.type != "cuda":
        raise ConfigError(
            "train.sync_batchnorm: PyTorch's SyncBatchNorm runs on CUDA devices only (the device is "
            f"{device}); set it to false, or use models without batch norm for exact CPU data parallelism"
        )
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                replaced.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, original in replaced:
            synced = getattr(parent, name)
            # the trained tensors (moved to the device meanwhile) go back into the original layer
            original._parameters.update(synced._parameters)
            original._buffers.update(synced._buffers)
            original.train(synced.training)
            setattr(parent, name, original)
