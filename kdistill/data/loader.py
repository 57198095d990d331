"""Batches from uint8 tensors (in memory or memory-mapped), augmented on the training device.

Every batch carries the sample indices (into the training set) of its images, so index-
based methods and caches can use them. Augmentation is replayable: the shuffling order and
the crop offsets (or random-resized-crop boxes) and flips of every sample in every epoch
are a pure function of (seed, epoch, sample index), computed with a dedicated generator, so
a resumed run sees exactly the batches an uninterrupted one would, and a teacher cache can
replay the views.

Two augmentations: ``pad_crop`` (zero padding + random crop at the stored size + flip, the
CIFAR recipe) and ``random_resized_crop`` (a random box of the stored image, resized to the
training size with bilinear interpolation + flip, the ImageNet recipe), both batched.
"""

from __future__ import annotations

import math
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
    boxes: Tensor | None = None  # (N, 4) int64 (top, left, height, width) in stored pixels: random-resized-crop


class ResizedCrop(NamedTuple):
    """Random-resized-crop settings (torchvision's ``RandomResizedCrop``): a box of
    ``scale`` x the stored image's area and aspect ratio (width / height) in ``ratio``,
    resized to ``size`` x ``size``."""

    size: int  # output side in pixels: the training resolution
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def sample_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> Tensor:
    """``n`` random-resized-crop boxes (top, left, height, width), int64 (n, 4), of an image
    of ``height`` x ``width`` pixels, by torchvision's rule: up to 10 attempts of an area
    drawn uniformly in ``scale`` x the image's area and an aspect ratio drawn log-uniformly
    in ``ratio``; the first attempt that fits in the image is taken, at a uniformly drawn
    position; if none fits, the largest centred box whose ratio is clamped into ``ratio``.
    The attempts of all samples are drawn at once (a fixed number of draws, so the boxes
    are a pure function of the generator's state)."""
    attempts = 10
    area = height * width * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round().long()  # (n, attempts)
    h = (area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 if none does)
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
    # the fallback: the whole image, narrowed to the nearest allowed aspect ratio
    if width / height < min(ratio):
        fall_w, fall_h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fall_w, fall_h = round(height * max(ratio)), height
    else:
        fall_w, fall_h = width, height
    h = torch.where(found, h, fall_h)
    w = torch.where(found, w, fall_w)
    u = torch.rand(n, 2, generator=g)  # a uniform integer position in [0, room]
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long().clamp_max(height - h), (height - h) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long().clamp_max(width - w), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def epoch_views(
    num_samples: int,
    seed: int,
    epoch: int,
    padding: int,
    flip: bool,
    resized_crop: ResizedCrop | None = None,
    image_hw: tuple[int, int] | None = None,
) -> Views:
    """Shuffle order, crop offsets (or, with ``resized_crop``, the boxes of images of
    ``image_hw`` pixels) and flips of one epoch: a pure function of its arguments."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    order = torch.randperm(num_samples, generator=g)
    boxes = None
    if resized_crop is None:
        offsets = torch.randint(0, 2 * padding + 1, (num_samples, 2), generator=g)
    else:
        offsets = torch.zeros(num_samples, 2, dtype=torch.int64)
        boxes = sample_boxes(num_samples, *image_hw, resized_crop.scale, resized_crop.ratio, g)
    flips = torch.rand(num_samples, generator=g) < 0.5 if flip else torch.zeros(num_samples, dtype=torch.bool)
    return Views(order, offsets, flips, boxes)


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


def _taps(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear resampling of the pixels [start, start + length) of one axis to ``size``
    pixels, per sample, as ``F.interpolate(mode="bilinear", align_corners=False)`` does it:
    output pixel j reads source position (j + 0.5) * length / size - 0.5, clamped into the
    box. Returns the two source indices (B, size) int64 and the weight of the second (B, size)."""
    step = length.float()[:, None] / size  # (B, 1) source pixels per output pixel
    src = ((torch.arange(size, device=start.device) + 0.5) * step - 0.5).clamp_min(0)  # (B, size)
    lo = src.long()  # floor: src >= 0
    frac = src - lo
    last = (length - 1)[:, None]
    lo = torch.minimum(lo, last)
    hi = torch.minimum(lo + 1, last)
    return start[:, None] + lo, start[:, None] + hi, frac


def _resample(read_rows, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """The bilinear resampling of ``boxes`` (B, 4) to ``size`` x ``size``, flipped where
    ``flips``, one axis after the other: ``read_rows(rows (B, S))`` gives those rows of the
    batch's images as uint8 (B, S, W, P); the two rows of every output row are blended
    (float, (B, S, W, P)), then the two columns of every output pixel. Returns float
    (B, S, S, P) in [0, 255]."""
    r0, r1, fy = _taps(boxes[:, 0], boxes[:, 2], size)  # (B, S)
    c0, c1, fx = _taps(boxes[:, 1], boxes[:, 3], size)
    # a flip reverses the output columns
    c0, c1, fx = (torch.where(flips[:, None], t.flip(1), t) for t in (c0, c1, fx))
    rows = read_rows(r0).float().lerp_(read_rows(r1).float(), fy[:, :, None, None])  # (B, S, W, P)
    B, S, _, P = rows.shape

    def columns(cols: Tensor) -> Tensor:  # (B, S) -> (B, S, S, P), the index expanded without a copy
        return rows.gather(2, cols[:, None, :, None].expand(B, S, S, P))

    return columns(c0).lerp_(columns(c1), fx[:, None, :, None])


def resized_crop_flip_packed(pixels: Tensor, idx: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Random-resized-crop and horizontal flip of the images ``idx`` of ``pixels`` (from
    :func:`pack_pixels`): each box (top, left, height, width) of ``boxes`` (B, 4) resampled
    bilinearly to ``size`` x ``size``; the rows are gathered as whole pixels.

    Returns float (B, P, size, size) in [0, 255], channels_last in memory, P >= C the packed
    channels (the first C are the image's)."""
    P = pixels.element_size()

    def read_rows(rows: Tensor) -> Tensor:
        out = pixels[idx[:, None], rows]  # (B, S, W + 1) packed pixels (the last column is never read)
        return out.view(torch.uint8).view(*out.shape, P)

    return _resample(read_rows, boxes, flips, size).permute(0, 3, 1, 2)


def resized_crop_flip(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Random-resized-crop and horizontal flip of a whole batch: images (B, C, H, W) uint8,
    boxes (B, 4) int64 (top, left, height, width), flips (B,) bool. Returns float
    (B, C, size, size) in [0, 255], channels_last in memory."""
    B, C = images.shape[:2]
    pixels = pack_pixels(images)
    if pixels is not None:
        return resized_crop_flip_packed(pixels, torch.arange(B, device=images.device), boxes, flips, size)[:, :C]
    hwc = images.permute(0, 2, 3, 1)  # (B, H, W, C): more than 8 channels, a gather of every value
    b = torch.arange(B, device=images.device)[:, None]
    return _resample(lambda rows: hwc[b, rows], boxes, flips, size).permute(0, 3, 1, 2)


def centre_crop(images: Tensor, size: int) -> Tensor:
    """The centred ``size`` x ``size`` window of (B, C, H, W) images (a view; the identity
    when they are that size): what evaluation sees of images trained on random-resized
    crops at ``size`` (torchvision's resize-then-centre-crop at a stored size >= ``size``)."""
    H, W = images.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top : top + size, left : left + size]


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

    Images are augmented by zero padding + random crop + flip (``padding``, ``flip``), or,
    given ``resized_crop``, by random-resized-crop + flip at ``resized_crop.size``.
    ``size``: the training resolution of images that are not augmented (their centred
    window; default: the stored size); with ``resized_crop`` it must be its size or None.

    Images stay where they are (in memory, or memory-mapped from a data store on disk):
    each batch gathers its B images, and only those are moved to the device, packed and
    augmented, so the process never holds a second copy of the set. For CUDA the gather
    goes into pinned host memory and the copy overlaps the GPU's work.
    ``pixels``: the same images already packed a pixel per element (:func:`pack_pixels`'s
    layout, same rows; a data store keeps its training split so): the crops then read them
    in place (on the CPU) or gather their rows (for another device), with no per-batch pack.
    ``view_period``: P > 0 repeats the augmentation every P epochs (epoch e shows every
    sample as epoch e mod P did, in epoch e's own order), so that a teacher's outputs on the
    views of the first P epochs serve the whole run (``train.view_period``).
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
        resized_crop: ResizedCrop | None = None,
        size: int | None = None,
        pixels: Tensor | None = None,
        view_period: int = 0,
    ):
        if view_period < 0:
            raise ValueError(f"TrainLoader: view_period={view_period}, expected 0 or more")
        if rows is not None and len(rows) != len(labels):
            raise ValueError(f"TrainLoader: {len(rows)} rows but {len(labels)} labels")
        if pixels is not None and (
            tuple(pixels.shape) != (len(inputs), inputs.shape[-2] + 1, inputs.shape[-1] + 1)
            or pixels.element_size() < inputs.shape[1]
        ):
            raise ValueError(
                f"TrainLoader: pixels {tuple(pixels.shape)} are not the packed form of {tuple(inputs.shape)}"
            )
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
        self.resized_crop, self.size = self._geometry(inputs, images, resized_crop, size)
        # images are read per batch from where they are; other inputs (tokens, features)
        # are the user's in-memory tensors and move to the device whole, as given
        self.inputs = inputs if images else inputs.to(device)
        self.rows = rows.to(self.inputs.device) if rows is not None else None
        self.pinned = self.inputs.device.type == "cpu" and device.type == "cuda"
        self.pack_buffer: Tensor | None = None
        # the images already packed (a data store keeps its training split so): the crops
        # read them where they are, with no per-batch pack
        self.pixels = pixels if self.augment else None
        # the augmentation repeats every view_period epochs (0: a fresh view every epoch);
        # without augmentation every epoch shows the same inputs: a period of 1
        self.view_period = view_period if self.augment else min(view_period, 1)

    def _geometry(
        self, inputs: Tensor, images: bool, resized_crop: ResizedCrop | None, size: int | None
    ) -> tuple[ResizedCrop | None, int | None]:
        """The random-resized-crop settings (None unless augmenting) and the training size
        (None: the whole stored image)."""
        if not images:
            return None, None
        if resized_crop is not None:
            if size not in (None, resized_crop.size):
                raise ValueError(f"size={size} differs from resized_crop.size={resized_crop.size}")
            return (resized_crop if self.augment else None), resized_crop.size
        if size is None or tuple(inputs.shape[-2:]) == (size, size):
            return None, None
        if self.augment:
            raise ValueError(
                f"pad-and-crop augmentation trains at the stored size {tuple(inputs.shape[-2:])}, not {size}"
            )
        if size > min(inputs.shape[-2:]):
            raise ValueError(f"size={size} is larger than the stored images ({tuple(inputs.shape[-2:])})")
        return None, size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def samples_in_step(self, step: int) -> int:
        """Samples of the global batch of ``step``, over all ranks (the last may be short)."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    def views(self, epoch: int) -> Views:
        """Epoch ``epoch``'s order and augmentation; with ``view_period`` P the crops and
        flips are those of epoch ``epoch % P`` (the order stays the epoch's own)."""
        hw = tuple(self.inputs.shape[-2:])
        views = epoch_views(len(self.labels), self.seed, epoch, self.padding, self.flip, self.resized_crop, hw)
        if self.view_period and epoch >= self.view_period:
            first = epoch_views(
                len(self.labels), self.seed, epoch % self.view_period, self.padding, self.flip, self.resized_crop, hw
            )
            views = first._replace(order=views.order)
        return views

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
        return Views(*(t.to(self.device) if t is not None else None for t in self.views(epoch)))

    def _rows(self, idx: Tensor) -> Tensor:
        """The rows of ``inputs`` (and ``pixels``) that hold the samples ``idx`` (any device)."""
        rows = idx.to(self.inputs.device)
        return self.rows[rows] if self.rows is not None else rows

    def _take(self, source: Tensor, rows: Tensor) -> Tensor:
        """``source[rows]`` on the training device (through pinned memory for CUDA)."""
        if not self.pinned:  # index_select: a row copy each, many times faster than indexing
            return torch.index_select(source, 0, rows).to(self.device)
        x = torch.empty((len(rows), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        torch.index_select(source, 0, rows, out=x)
        return x.to(self.device, non_blocking=True)

    def gather(self, idx: Tensor) -> Tensor:
        """The inputs of the samples ``idx`` (any device), on the training device."""
        return self._take(self.inputs, self._rows(idx))

    def packed(self, idx: Tensor) -> tuple[Tensor, Tensor] | None:
        """The samples ``idx`` as packed pixels on the training device and their positions
        in them: the kept ``pixels`` themselves when they are on the device (the crops read
        them in place), else those rows gathered, else the gathered batch packed; None for
        images of more than 8 channels."""
        if self.pixels is not None:
            rows = self._rows(idx)
            if self.pixels.device == self.device:
                return self.pixels, rows.to(self.pixels.device)
            pixels = self._take(self.pixels, rows)
        else:
            pixels = self.pack(self.gather(idx))
            if pixels is None:
                return None
        return pixels, torch.arange(len(idx), device=pixels.device)

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
        packed = self.packed(idx) if self.augment else None  # (pixels, positions of the samples in them)
        x = self.gather(idx) if packed is None else None  # (B, C, H, W)
        idx = idx.to(self.device, non_blocking=True)
        C = self.inputs.shape[1]
        channels = None  # packed pixels carry padding channels: the image's come first
        if self.resized_crop is not None:
            boxes, flips = views.boxes[idx], views.flips[idx]
            if packed is not None:
                x = resized_crop_flip_packed(*packed, boxes, flips, self.size)[:, :C]
            else:
                x = resized_crop_flip(x, boxes, flips, self.size)
            if self.normalize is None:  # rounded to uint8, as pad-and-crop gives them
                x = x.round_().to(torch.uint8)
        elif packed is not None:
            x = crop_flip_packed(*packed, views.offsets[idx], views.flips[idx], self.padding)
            channels = C
            if self.normalize is None:
                x = x[:, :C]
        elif self.augment:
            x = crop_flip(x, views.offsets[idx], views.flips[idx], self.padding)
        elif self.size is not None:
            x = centre_crop(x, self.size)
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
    rows of ``inputs`` that form the set (a split held out by index; default all). ``size``:
    evaluate uint8 images on their centred ``size`` x ``size`` window (the training size of
    random-resized crops; default: the whole image)."""

    def __init__(
        self,
        inputs: Tensor | None,
        labels: Tensor | None,
        batch_size: int,
        device: torch.device,
        normalize: Normalize | None = None,
        source=None,
        rows: Tensor | None = None,
        size: int | None = None,
    ):
        self.size = size
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

    def select(self, indices: Tensor) -> EvalData:
        """The samples ``indices`` only (in-memory or memory-mapped data), evaluated the same
        way: rows of the same inputs, no copy of them."""
        return self._rows(indices.cpu(), self.labels[indices.cpu()])

    def subset(self, start: int, stop: int) -> EvalData:
        """Samples [start, stop) only (in-memory or memory-mapped data): one rank's share of
        an evaluation."""
        return self._rows(torch.arange(start, min(stop, len(self.labels))), self.labels[start:stop])

    def _rows(self, positions: Tensor, labels: Tensor) -> EvalData:
        """The samples at ``positions`` (of this set) as rows of the same inputs."""
        rows = self.rows[positions.to(self.rows.device)] if self.rows is not None else positions
        rows = rows.to(self.inputs.device)
        return EvalData(self.inputs, labels, self.batch_size, self.device, self.normalize, rows=rows, size=self.size)

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
            if self.size is not None:
                x = centre_crop(x, self.size)
            if self.normalize is not None:
                x = self.normalize(x)
            yield Batch(x, self.labels[start:stop].to(self.device), torch.arange(start, start + len(x)))
