"""Batches from uint8 tensors (in memory or memory-mapped), augmented on the training device.

Every batch carries the sample indices (into the training set) of its images, so index-
based methods and caches can use them. Augmentation is replayable: the shuffling order and
the crop offsets and flips of every sample in every epoch are a pure function of
(seed, epoch, sample index), computed with a dedicated generator, so a resumed run sees
exactly the batches an uninterrupted one would, and a teacher cache can replay the views.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Batch(NamedTuple):
    images: Tensor  # (B, 3, H, W) float, normalised, on the training device
    labels: Tensor  # (B,) int64
    indices: Tensor  # (B,) int64: positions in the split this batch comes from


class Views(NamedTuple):
    """The augmentation of every training sample for one epoch (indexed by sample index)."""

    order: Tensor  # (N,) the epoch's shuffled sample indices
    offsets: Tensor  # (N, 2) crop offsets (dy, dx) in [0, 2 * padding]
    flips: Tensor  # (N,) bool


def epoch_views(num_samples: int, seed: int, epoch: int, padding: int, flip: bool) -> Views:
    """Shuffle order, crop offsets and flips of one epoch: a pure function of its arguments."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    order = torch.randperm(num_samples, generator=g)
    offsets = torch.randint(0, 2 * padding + 1, (num_samples, 2), generator=g)
    flips = torch.rand(num_samples, generator=g) < 0.5 if flip else torch.zeros(num_samples, dtype=torch.bool)
    return Views(order, offsets, flips)


# a pixel of C uint8 channels, padded to a power of two, read as one wider integer
_PIXEL_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_pixels(images: Tensor) -> Tensor | None:
    """uint8 images (N, C, H, W) with C <= 8 as (N, H + 1, W + 1) integers, one per pixel
    (its channels side by side, zero-padded to 1, 2, 4 or 8 bytes), with a zero last row
    and column that every crop position outside the image reads; None for more channels.

    A crop/flip then moves one element per pixel instead of one per channel value (faster,
    see benchmarks/results/design_notes.md) and needs no mask, for more memory than the
    images alone."""
    N, C, H, W = images.shape
    width = next((w for w in _PIXEL_DTYPES if w >= C), None)
    if width is None:
        return None
    hwc = F.pad(images.permute(0, 2, 3, 1), (0, width - C, 0, 1, 0, 1))  # (N, H+1, W+1, width)
    return hwc.contiguous().view(_PIXEL_DTYPES[width]).view(N, H + 1, W + 1)


def crop_flip_packed(pixels: Tensor, idx: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random crop with zero padding and horizontal flip of the images ``idx`` of
    ``pixels`` (from :func:`pack_pixels`) in one gather of whole pixels; offsets: (B, 2) in
    [0, 2*padding]; flips: (B,) bool.

    Returns uint8 (B, P, H, W) in channels_last layout, P >= C the packed channels (the
    first C are the image's): one dense tensor, so its conversion to float is vectorised."""
    N, H1, W1 = pixels.shape
    H, W = H1 - 1, W1 - 1
    B = len(idx)
    rows = offsets[:, :1] - padding + torch.arange(H, device=pixels.device)  # (B, H)
    cols = offsets[:, 1:] - padding + torch.arange(W, device=pixels.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip is a reversed column index
    rows = torch.where((rows >= 0) & (rows < H), rows, H)  # outside: the zero row / column
    cols = torch.where((cols >= 0) & (cols < W), cols, W)
    where = (idx[:, None] * H1 + rows)[:, :, None] * W1 + cols[:, None, :]  # (B, H, W)
    out = pixels.view(-1).take(where)
    return out.view(torch.uint8).view(B, H, W, pixels.element_size()).permute(0, 3, 1, 2)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random crop with zero padding and horizontal flip, for a whole batch at once.

    images: (B, C, H, W) uint8; offsets: (B, 2) in [0, 2*padding]; flips: (B,) bool.
    """
    B, C, H, W = images.shape
    pixels = pack_pixels(images)
    if pixels is not None:
        return crop_flip_packed(pixels, torch.arange(B, device=images.device), offsets, flips, padding)[:, :C]
    # more than 8 channels: one gather of every channel value
    padded = F.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
    rows = offsets[:, :1] + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(W, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class Normalize:
    """uint8 (B, C, H, W) -> float, (x/255 - mean) / std, as one fused multiply-add, in the
    model's memory format. A single mean/std value applies to every channel."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool):
        # a channel that is constant over the data set has std 0: dividing by it would make
        # every input inf/NaN. At least one grey level (1/255) maps it to 0 instead.
        std_t = torch.tensor(std, device=device).clamp_min(1 / 255).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor, channels: int | None = None) -> Tensor:
        """``channels``: use only the first ones (packed pixels carry padding channels)."""
        B, C, H, W = images.shape
        channels = channels or C
        x = images.float()[:, :channels]  # converted before the slice: a dense input stays dense, vectorised
        out = torch.empty((B, channels, H, W), device=x.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)


class TrainLoader:
    """Shuffled (and, for images, augmented) training batches from tensors.

    ``epoch(e)`` yields the batches of epoch ``e``. ``inputs`` are uint8 images
    (N, C, H, W), which are cropped/flipped and normalised on the device, or any other
    tensor (N, ...) of model inputs, used as they are. ``rows``: the rows of ``inputs`` that
    form the training set (a split held out by index; default all, in order).

    Images stay where they are (in memory, or memory-mapped from a data store on disk):
    each batch gathers its B images, and only those are moved to the device, packed and
    augmented, so the process never holds a second copy of the set. For CUDA the gather
    goes into pinned host memory and the copy overlaps the GPU's work.
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        batch_size: int,
        device: torch.device,
        normalize: Normalize | None = None,
        seed: int = 0,
        augment: bool = True,
        padding: int = 4,
        flip: bool = True,
        drop_last: bool = True,
        shard: tuple[int, int] = (0, 1),
        rows: Tensor | None = None,
    ):
        if rows is not None and len(rows) != len(labels):
            raise ValueError(f"TrainLoader: {len(rows)} rows but {len(labels)} labels")
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.normalize = normalize
        self.device = device
        self.seed = seed
        images = inputs.dtype == torch.uint8 and inputs.ndim == 4
        self.augment = augment and images
        self.padding = padding if self.augment else 0
        self.flip = flip and self.augment
        self.drop_last = drop_last and len(labels) >= batch_size
        self.rank, self.world = shard
        # images are read per batch from where they are; other inputs (tokens, features)
        # are the user's in-memory tensors and move to the device whole, as given
        self.inputs = inputs if images else inputs.to(device)
        self.rows = rows.to(self.inputs.device) if rows is not None else None
        self.pinned = self.inputs.device.type == "cpu" and device.type == "cuda"
        self.pack_buffer: Tensor | None = None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def samples_in_step(self, step: int) -> int:
        """Samples of the global batch of ``step``, over all ranks (the last may be short)."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    def views(self, epoch: int) -> Views:
        return epoch_views(len(self.labels), self.seed, epoch, self.padding, self.flip)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` on (a resumed, interrupted epoch)."""
        order = self.views(epoch).order  # on the host: the gathers read it without a device sync
        views = self.device_views(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            # each rank takes its own slice of the global batch (DDP); one rank takes it all
            idx = idx[self.rank :: self.world]
            yield self.batch(idx, views)

    def device_views(self, epoch: int) -> Views:
        """The views of ``epoch`` on the training device."""
        v = self.views(epoch)
        return Views(v.order.to(self.device), v.offsets.to(self.device), v.flips.to(self.device))

    def gather(self, idx: Tensor) -> Tensor:
        """The inputs of the samples ``idx`` (any device), on the training device."""
        rows = idx.to(self.inputs.device)
        if self.rows is not None:
            rows = self.rows[rows]
        if not self.pinned:  # index_select: a row copy each, many times faster than indexing
            return torch.index_select(self.inputs, 0, rows).to(self.device)
        x = torch.empty((len(rows), *self.inputs.shape[1:]), dtype=self.inputs.dtype, pin_memory=True)
        torch.index_select(self.inputs, 0, rows, out=x)
        return x.to(self.device, non_blocking=True)

    def pack(self, images: Tensor) -> Tensor | None:
        """:func:`pack_pixels` of a batch, into a buffer kept from batch to batch (its zero
        padding channels, last row and last column are written once, when it is made)."""
        B, C, H, W = images.shape
        width = next((w for w in _PIXEL_DTYPES if w >= C), None)
        if width is None:
            return None
        buf = self.pack_buffer
        if buf is None or len(buf) < B or buf.shape[1:] != (H + 1, W + 1, width) or buf.device != images.device:
            buf = self.pack_buffer = torch.zeros((B, H + 1, W + 1, width), dtype=torch.uint8, device=images.device)
        pixels = buf[:B].view(_PIXEL_DTYPES[width]).view(B, H + 1, W + 1)
        if C == 3 and sys.byteorder == "little":
            # RGB as the int32 r | g << 8 | b << 16 (little endian: the bytes r, g, b, 0):
            # three element-wise passes, about 3x faster than the transposing copy below
            inner = pixels[:, :H, :W]
            inner.copy_(images[:, 2]).bitwise_left_shift_(8).bitwise_or_(images[:, 1])
            inner.bitwise_left_shift_(8).bitwise_or_(images[:, 0])
        else:
            buf[:B, :H, :W, :C].copy_(images.permute(0, 2, 3, 1))  # (B, H, W, C) into each pixel's first bytes
        return pixels

    def batch(self, idx: Tensor, views: Views) -> Batch:
        """The samples ``idx`` as the given epoch's views (on the device) present them: the
        one place where a training input is made, shared with the teacher cache."""
        x = self.gather(idx)  # (B, C, H, W)
        idx = idx.to(self.device, non_blocking=True)
        channels = None  # packed pixels carry padding channels: the image's come first
        if self.augment:
            pixels = self.pack(x)  # (B, H+1, W+1): this batch only
            if pixels is not None:
                channels = x.shape[1]
                here = torch.arange(len(idx), device=x.device)
                x = crop_flip_packed(pixels, here, views.offsets[idx], views.flips[idx], self.padding)
                if self.normalize is None:
                    x = x[:, :channels]
            else:
                x = crop_flip(x, views.offsets[idx], views.flips[idx], self.padding)
        if self.normalize is not None:
            x = self.normalize(x, channels)
        return Batch(x, self.labels[idx], idx)


class IterableLoader:
    """Training batches from any re-iterable source of (inputs, labels) pairs, e.g. a
    ``torch.utils.data.DataLoader``. Indices count samples in the order they arrive, so
    index-based methods (CRD) need in-memory tensors instead."""

    def __init__(self, source, device: torch.device):
        self.source = source
        self.device = device
        self.batch_size = None
        self.labels = None

    def __len__(self) -> int:
        return len(self.source)

    def samples_in_step(self, step: int) -> None:
        """Unknown: each process iterates its own source (shard it, e.g. DistributedSampler)."""
        return None

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        seen = 0
        for step, item in enumerate(self.source):
            x, y = item[0], item[1]
            idx = torch.arange(seen, seen + len(y), device=self.device)
            seen += len(y)
            if step < start_step:  # already trained on before an interruption
                continue
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx)


class EvalData:
    """Fixed-order evaluation batches; ``labels`` holds all labels on the CPU. ``rows``: the
    rows of ``inputs`` that form the set (a split held out by index; default all)."""

    def __init__(
        self,
        inputs: Tensor | None,
        labels: Tensor | None,
        batch_size: int,
        device: torch.device,
        normalize: Normalize | None = None,
        source=None,
        rows: Tensor | None = None,
    ):
        self.inputs, self.batch_size, self.device, self.normalize, self.source = (
            inputs,
            batch_size,
            device,
            normalize,
            source,
        )
        self.rows = rows
        if source is not None:
            labels = torch.cat([item[1] for item in source])
        self.labels = labels.cpu()

    def __len__(self) -> int:
        """Number of batches."""
        if self.source is not None:
            return len(self.source) if hasattr(self.source, "__len__") else 0
        return -(-len(self.labels) // self.batch_size)

    def subset(self, start: int, stop: int) -> EvalData:
        """Samples [start, stop) only (in-memory data): one rank's share of an evaluation."""
        if self.rows is not None:
            return EvalData(
                self.inputs,
                self.labels[start:stop],
                self.batch_size,
                self.device,
                self.normalize,
                rows=self.rows[start:stop],
            )
        return EvalData(self.inputs[start:stop], self.labels[start:stop], self.batch_size, self.device, self.normalize)

    def __iter__(self) -> Iterator[Batch]:
        if self.source is not None:
            seen = 0
            for item in self.source:
                x, y = item[0], item[1]
                yield Batch(x.to(self.device), y.to(self.device), torch.arange(seen, seen + len(y)))
                seen += len(y)
            return
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            # one batch read at a time (from memory or a memory-mapped store)
            x = self.inputs[start:stop] if self.rows is None else self.inputs[self.rows[start:stop]]
            x = x.to(self.device, non_blocking=True)
            if self.normalize is not None:
                x = self.normalize(x)
            yield Batch(x, self.labels[start:stop].to(self.device), torch.arange(start, start + len(x)))
