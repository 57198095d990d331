"""Data parallelism (torchrun, DDP) on CPU with the gloo backend and 2 processes.

The processes are forked by the test with torchrun's environment (RANK, WORLD_SIZE, ...)
set, so kdistill takes the same path as under torchrun; the CLI tests start the real
``python -m torch.distributed.run``. Each process uses one thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import kdistill
import kdistill.engine as engine
from kdistill import distributed
from kdistill.checkpoint import load_checkpoint
from kdistill.config import load_config
from kdistill.data.dataset import ImageDataset
from kdistill.data.loader import TrainLoader
from kdistill.errors import ConfigError, DistributedError
from tests.test_engine import _subset

WORLD = 2
# two processes that follow the same global batches as one: they differ only in the order
# floating-point sums are taken (per-rank means, gradient all-reduce), a few ulps per step
ATOL, RTOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    """This process becomes rank ``rank`` of a torchrun job (the environment torchrun sets)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out: Path, scenario, args: tuple) -> None:
    """Run ``scenario(rank, out, *args)`` as one rank; record an exception instead of raising,
    so that the test can assert on it."""
    _as_rank(rank, world, port)
    try:
        scenario(rank, out, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the test through a file
        (out / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        distributed.leave()
        os._exit(0)  # skip the forked copy of pytest's own exit handlers


def _launch(scenario, out: Path, *args, world: int = WORLD, timeout: float = 300, wait_for: int | None = None) -> None:
    """Fork ``world`` ranks running ``scenario``; wait for all of them (or for the first
    ``wait_for`` ranks, then kill the others: what torchrun does when a worker fails)."""
    ctx = torch.multiprocessing.get_context("fork")  # no re-import of torch in the children
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, out, scenario, args)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs[:wait_for]:
        p.join(max(1.0, timeout - (time.monotonic() - start)))
    alive = [p for p in procs[:wait_for] if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"rank(s) still running after {timeout} s: the job hung"


def _errors(out: Path) -> dict[int, str]:
    return {r: (out / f"error{r}.txt").read_text() for r in range(WORLD) if (out / f"error{r}.txt").exists()}


@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> dict:
    """256 training and 100 test images of real CIFAR-10 (the engine tests' subset)."""
    return _subset(mini)


def _distill(small: dict, run_dir: Path | None = None, resume: bool = False, **kw) -> kdistill.Result:
    """KD into seed_student (no batch norm) from a frozen random teacher, on the CPU."""
    torch.manual_seed(1)
    teacher = kdistill.create_model("seed_student")
    torch.manual_seed(0)
    student = kdistill.create_model("seed_student")
    settings = {"epochs": 2, "batch_size": 32, "seed": 0, "grad_clip": 5.0, **kw}
    return kdistill.distill(
        teacher, student, **small, methods="kd", device="cpu", run_dir=run_dir, resume=resume, **settings
    )


def _assert_close(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- 2 ranks = 1 process


def _scenario_equivalence(rank: int, out: Path, small: dict) -> None:
    saves = []
    original = engine.save_checkpoint

    def counting(state, path):
        saves.append(state["epoch"])
        original(state, path)

    engine.save_checkpoint = counting
    # 2 ranks x 2 accumulated micro-batches of 8 = the global batch of 32
    result = _distill(small, out / "run", grad_accumulation=2)
    torch.save(
        {
            "weights": result.model.state_dict(),
            "saves": saves,
            "top1": result.metrics["top1"],
            "logits": result.test_logits,
        },
        out / f"rank{rank}.pt",
    )
    # uneven shards: a global batch of 33 is 17 + 16 samples
    result = _distill(small, batch_size=33, epochs=1)
    torch.save(result.model.state_dict(), out / f"uneven{rank}.pt")
    # PyTorch's SyncBatchNorm has no CPU implementation: refused with a clear message
    try:
        _distill(small, sync_batchnorm=True, epochs=1)
    except ConfigError as e:
        (out / f"syncbn{rank}.txt").write_text(str(e))


@pytest.mark.slow
def test_two_ranks_train_like_one_process(small: dict, tmp_path: Path) -> None:
    reference = _distill(small, tmp_path / "single")
    _launch(_scenario_equivalence, tmp_path, small)
    assert not _errors(tmp_path), _errors(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    _assert_close(r0["weights"], r1["weights"], exact=True)  # DDP keeps the replicas identical
    _assert_close(r0["weights"], reference.model.state_dict())
    assert torch.equal(r0["logits"], r1["logits"])  # sharded evaluation, gathered on every rank
    torch.testing.assert_close(r0["logits"], reference.test_logits, atol=1e-4, rtol=1e-4)

    # files are written by rank 0 only, once per epoch
    assert r0["saves"] == [1, 2] and r1["saves"] == []
    single, multi = _metrics(tmp_path / "single" / "metrics.jsonl"), _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["epoch"] for m in multi] == [1, 2]
    for a, b in zip(single, multi):
        assert b["train_images"] == a["train_images"] == 256  # the global count, not one rank's
        for key in ("train_loss", "train_kd", "train_ce", "train_top1", "test_loss", "test_top1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    assert set(os.listdir(tmp_path / "run")) == {"checkpoint.pt", "metrics.jsonl", "metrics.csv"}

    uneven = _distill(small, batch_size=33, epochs=1).model.state_dict()
    u0, u1 = (torch.load(tmp_path / f"uneven{r}.pt", weights_only=True) for r in range(WORLD))
    _assert_close(u0, u1, exact=True)
    _assert_close(u0, uneven)

    message = (tmp_path / "syncbn0.txt").read_text()
    assert "train.sync_batchnorm" in message and "CUDA" in message


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_step(small: dict) -> None:
    """One process: 4 micro-batches of 8 make the step of one batch of 32."""
    whole = _distill(small, epochs=1)
    accumulated = _distill(small, epochs=1, grad_accumulation=4)
    _assert_close(whole.model.state_dict(), accumulated.model.state_dict())
    assert accumulated.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-5)
    assert accumulated.history[0]["train_images"] == 256


def test_a_step_must_feed_every_micro_batch(small: dict) -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size=4: .*grad_accumulation=8 .*at least 8"):
        _distill(small, batch_size=4, grad_accumulation=8)


# ---------------------------------------------------------------- Ctrl-C and resume under 2 ranks


def _scenario_interrupt(rank: int, out: Path, small: dict, name: str, interrupt_at: int | None) -> None:
    original = engine.lr_factor

    def interrupting(step, *args, **kwargs):
        if rank == 0 and step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on one rank, in the middle of a step
        return original(step, *args, **kwargs)

    engine.lr_factor = interrupting
    try:
        result = _distill(small, out / name, batch_size=16)
    except KeyboardInterrupt:
        (out / f"interrupted{rank}").touch()
        return
    finally:
        engine.lr_factor = original
    torch.save(result.model.state_dict(), out / f"{name}{rank}.pt")


def _scenario_resume(rank: int, out: Path, small: dict, name: str) -> None:
    result = _distill(small, out / name, resume=True, batch_size=16)
    torch.save(result.model.state_dict(), out / f"{name}{rank}.pt")


@pytest.mark.slow
def test_ctrl_c_and_resume_under_two_ranks(small: dict, tmp_path: Path) -> None:
    _launch(_scenario_interrupt, tmp_path, small, "ref", None)
    _launch(_scenario_interrupt, tmp_path, small, "cut", 3)  # 16 steps per epoch
    assert not _errors(tmp_path), _errors(tmp_path)
    assert all((tmp_path / f"interrupted{r}").exists() for r in range(WORLD))  # both ranks stopped
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    # the ranks agree to stop at the next multiple of STOP_CHECK_STEPS steps
    assert (state["epoch"], state["step"]) == (0, engine.STOP_CHECK_STEPS)
    assert len(state["rng_ranks"]) == WORLD

    _launch(_scenario_resume, tmp_path, small, "cut")
    assert not _errors(tmp_path), _errors(tmp_path)
    ref = torch.load(tmp_path / "ref0.pt", weights_only=True)
    for r in range(WORLD):
        _assert_close(ref, torch.load(tmp_path / f"cut{r}.pt", weights_only=True), exact=True)
    a, b = _metrics(tmp_path / "ref" / "metrics.jsonl"), _metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [m["epoch"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6) and y["test_top1"] == x["test_top1"]

    # a checkpoint of 2 ranks resumes in 1 process (same global batches; float tolerance)
    single = _distill(small, tmp_path / "cut", resume=True, batch_size=16)
    _assert_close(single.model.state_dict(), ref)


# ---------------------------------------------------------------- budgets, teacher cache, NaN under 2 ranks


def _scenario_budget(rank: int, out: Path, small: dict) -> None:
    # the ranks' own plans would differ (here even their budgets do): rank 0's is followed
    result = _distill(small, out / "budget", budget=4.0 if rank == 0 else 1.0, batch_size=16, epochs=1)
    torch.save(
        {"weights": result.model.state_dict(), "steps": result.budget["steps"], "epochs": len(result.history)},
        out / f"budget{rank}.pt",
    )


@pytest.mark.slow
def test_a_budget_is_planned_by_rank_zero_for_every_rank(small: dict, tmp_path: Path) -> None:
    _launch(_scenario_budget, tmp_path, small)
    assert not _errors(tmp_path), _errors(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"budget{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["steps"] == r1["steps"] > 0 and r0["epochs"] == r1["epochs"]  # the same steps, so no collective hangs
    _assert_close(r0["weights"], r1["weights"], exact=True)
    state = load_checkpoint(tmp_path / "budget" / "checkpoint.pt")
    assert state["budget"]["seconds"] == 4.0  # rank 0 writes, with its own plan
    assert len(_metrics(tmp_path / "budget" / "metrics.jsonl")) == r0["epochs"]


def _scenario_budget_too_small(rank: int, out: Path, small: dict) -> None:
    # only rank 0's clock finds the budget too small (its first step "takes" 100 s): every rank refuses
    from kdistill.budget import BudgetPlan

    if rank == 0:
        ticks = iter(range(0, 10**6, 100))
        BudgetPlan.__init__.__kwdefaults__["clock"] = lambda: float(next(ticks))
    _distill(small, out / "tight", budget=30.0, batch_size=16, epochs=1)


@pytest.mark.slow
def test_a_budget_too_small_is_refused_on_every_rank(small: dict, tmp_path: Path) -> None:
    _launch(_scenario_budget_too_small, tmp_path, small, timeout=120)
    errors = _errors(tmp_path)
    assert sorted(errors) == [0, 1], errors
    assert errors[0].startswith(
        "BudgetTooSmall: budget: distill: 30.0 s of training time cannot hold one training step"
    ), errors[0]
    assert errors[1].startswith(
        "BudgetTooSmall: budget: distill: 30.0 s of training time cannot hold one training step"
    ), errors[1]
    assert "measured by rank 0" in errors[1]


def _scenario_cache(rank: int, out: Path, small: dict, cache: Path) -> None:
    result = _distill(small, teacher_cache=cache)
    torch.save(result.model.state_dict(), out / f"cached{rank}.pt")


@pytest.mark.slow
def test_a_teacher_cache_serves_every_rank_by_sample_index(small: dict, tmp_path: Path) -> None:
    torch.manual_seed(1)
    teacher = kdistill.create_model("seed_student")  # the teacher of _distill
    cache = tmp_path / "teacher.cache"
    kdistill.cache_teacher(teacher, small["train_data"], epochs=2, path=cache, seed=0, device="cpu", dtype="float32")
    reference = _distill(small, teacher_cache=cache).model.state_dict()
    _launch(_scenario_cache, tmp_path, small, cache)
    assert not _errors(tmp_path), _errors(tmp_path)
    c0, c1 = (torch.load(tmp_path / f"cached{r}.pt", weights_only=True) for r in range(WORLD))
    _assert_close(c0, c1, exact=True)
    _assert_close(c0, reference)  # each rank looked up its own share of the samples


def _scenario_build_cache(rank: int, out: Path, small: dict, top_k: int) -> None:
    torch.manual_seed(1)
    teacher = kdistill.create_model("seed_student")
    # batch_size 96 over 256 samples x 3 epochs: 9 work items, shared unevenly by the ranks
    kdistill.cache_teacher(
        teacher,
        small["train_data"],
        epochs=3,
        path=out / f"built{top_k}.cache",
        seed=0,
        device="cpu",
        dtype="float32",
        top_k=top_k,
        batch_size=96,
    )


@pytest.mark.parametrize("top_k", [0, 3])
def test_two_ranks_build_the_same_teacher_cache_as_one_process(small: dict, tmp_path: Path, top_k: int) -> None:
    from kdistill.teacher_cache import TeacherCache

    torch.manual_seed(1)
    teacher = kdistill.create_model("seed_student")
    reference = kdistill.cache_teacher(
        teacher, small["train_data"], epochs=3, seed=0, device="cpu", dtype="float32", top_k=top_k, batch_size=96
    )
    _launch(_scenario_build_cache, tmp_path, small, top_k)
    assert not _errors(tmp_path), _errors(tmp_path)
    built = TeacherCache.load(tmp_path / f"built{top_k}.cache")  # written once, by rank 0
    assert built.fingerprint == reference.fingerprint
    for key in ("logits", "values", "classes", "tail"):
        a, b = getattr(built, key), getattr(reference, key)
        assert (a is None) == (b is None), key
        if a is not None and a.is_floating_point():
            # the same to rounding: each rank runs with its share of the cores, and oneDNN's
            # convolutions may sum in another order with fewer threads (on AMX CPUs they do),
            # which can flip the last bit of a float16-stored top-k value (1e-3 relative)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        elif a is not None:
            assert torch.equal(a, b), key


def _scenario_non_finite(rank: int, out: Path, small: dict) -> None:
    original = engine.lr_factor

    def poisoning(step, *args, **kwargs):
        # rank 1 alone steps with an infinite learning rate at step 5: its loss is NaN at
        # step 6, rank 0's loss stays finite there, only its (all-reduced) gradient is not
        return math.inf if rank == 1 and step == 5 else original(step, *args, **kwargs)

    engine.lr_factor = poisoning
    try:
        _distill(small, out / "nan", batch_size=16, epochs=1)
    finally:
        engine.lr_factor = original


def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(small: dict, tmp_path: Path) -> None:
    _launch(_scenario_non_finite, tmp_path, small, timeout=120)
    errors = _errors(tmp_path)
    assert sorted(errors) == [0, 1], errors
    first_lines = {r: text.splitlines()[0] for r, text in errors.items()}
    for line in first_lines.values():
        assert line.startswith("TrainingError: distill: loss became non-finite at step 6 (epoch 1; term(s): "), line
    assert first_lines[0] == first_lines[1]
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()  # no checkpoint of a broken model


# ---------------------------------------------------------------- a rank that dies or hangs


def _scenario_failing_rank(rank: int, out: Path, small: dict, how: str, timeout_s: float) -> None:
    distributed.init(torch.device("cpu"), timeout_s=timeout_s)
    original = engine.lr_factor

    def failing(step, *args, **kwargs):
        if rank == 1 and step == 5:
            if how == "dies":
                os._exit(1)
            time.sleep(3600)  # hangs: alive, but never joins the next collective
        return original(step, *args, **kwargs)

    engine.lr_factor = failing
    start = time.monotonic()
    try:
        _distill(small, epochs=3)
    finally:
        (out / f"seconds{rank}.txt").write_text(str(time.monotonic() - start))


@pytest.mark.parametrize("how", ["dies", pytest.param("hangs", marks=pytest.mark.slow)])
def test_a_failing_rank_fails_the_job_in_bounded_time(small: dict, tmp_path: Path, how: str) -> None:
    timeout_s = 5.0
    _launch(_scenario_failing_rank, tmp_path, small, how, timeout_s, timeout=90, wait_for=1)
    error = (tmp_path / "error0.txt").read_text()
    assert error.startswith(
        "DistributedError: rank 0 of 2: another process of the job stopped, or did not respond within 5 s"
    )
    assert "--resume" in error
    seconds = float((tmp_path / "seconds0.txt").read_text())
    bound = 30 if how == "dies" else timeout_s + 30
    assert seconds < bound


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
        self.unused = nn.Linear(4, 4)  # never in forward: no gradient, ever

    def forward(self, x):
        return self.used(x)


def _scenario_unused_parameter(rank: int, out: Path) -> None:
    torch.manual_seed(0)
    kdistill.train(
        _WithUnusedLayer(),
        (torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))),
        epochs=1,
        batch_size=16,
        device="cpu",
    )


def test_a_parameter_without_gradient_is_a_clear_error(tmp_path: Path) -> None:
    _launch(_scenario_unused_parameter, tmp_path)
    errors = _errors(tmp_path)
    assert sorted(errors) == [0, 1]
    for r, text in errors.items():
        assert text.startswith(f"DistributedError: rank {r} of 2: some trainable parameters received no gradient"), text


# ---------------------------------------------------------------- helpers alone, environment


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.enabled() and distributed.world_size() == 1 and distributed.is_main()
    x = torch.arange(3.0)
    assert distributed.all_reduce_sum(x) is x and distributed.all_gather_rows(x) is x
    assert distributed.all_gather_object(7) == [7] and distributed.broadcast_object(7) == 7
    assert distributed.shard() == (0, 1) and distributed.shard_range(10) == (0, 10)
    assert distributed.local_main_first(lambda: 5) == 5
    with pytest.raises(ConfigError, match="boom"):
        distributed.on_main(lambda: (_ for _ in ()).throw(ConfigError("boom")))


@pytest.mark.parametrize(
    "text",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: Connection reset by peer",
        "Application timeout caused pair closure",  # what a hung peer gave rank 0 in CI: no source path
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation to complete",
    ],
)
def test_gloo_peer_failures_are_recognised(text: str) -> None:
    assert distributed._is_communication_error(RuntimeError(text))


def test_other_runtime_errors_are_not_communication_errors() -> None:
    assert not distributed._is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed._is_communication_error(ValueError("Connection closed by peer"))


def test_sync_batchnorm_alone_is_plain_batch_norm() -> None:
    """Alone there is nothing to synchronise: the flag changes nothing, layers stay as they are."""

    def run(sync: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 3))
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 3, (64,))
        kdistill.train(model, (x, y), epochs=1, batch_size=16, device="cpu", sync_batchnorm=sync)
        return model

    a, b = run(False), run(True)
    assert type(b[1]) is nn.BatchNorm2d
    _assert_close(a.state_dict(), b.state_dict(), exact=True)


def test_launched_without_rendezvous_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 is set but MASTER_ADDR.*torchrun"):
        distributed.init(torch.device("cpu"))


def test_only_rank_zero_logs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from kdistill.progress import log

    monkeypatch.setenv("RANK", "1")
    log("from rank 1")
    monkeypatch.setenv("RANK", "0")
    log("from rank 0")
    err = capsys.readouterr().err
    assert "from rank 0" in err and "from rank 1" not in err


def test_single_process_commands_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from kdistill.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["report", "nowhere"]) == 2  # cache-teacher, like run/train/distill/mutual, runs under torchrun
    assert (
        "kdistill: [rank 1] error: kdistill report runs in one process; launch it without torchrun"
        in capsys.readouterr().err
    )


def test_distributed_config_keys() -> None:
    cfg = load_config(
        None,
        [
            "distributed.backend=gloo",
            "distributed.timeout_s=60",
            "train.grad_accumulation=4",
            "train.sync_batchnorm=true",
        ],
    )
    assert cfg.distributed.backend == "gloo" and cfg.distributed.timeout_s == 60
    assert cfg.train.grad_accumulation == 4 and cfg.train.sync_batchnorm
    with pytest.raises(ConfigError, match="distributed.backend"):
        load_config(None, ["distributed.backend=mpi"])
    with pytest.raises(ConfigError, match="train.grad_accumulation"):
        load_config(None, ["train.grad_accumulation=0"])


def test_loader_shards_cover_every_global_batch() -> None:
    x, y = torch.arange(50).float().view(50, 1), torch.arange(50)
    full = TrainLoader(x, y, 10, torch.device("cpu"), augment=False)
    shards = [TrainLoader(x, y, 10, torch.device("cpu"), augment=False, shard=(r, 3)) for r in range(3)]
    for whole, *parts in zip(full.epoch(2), *(s.epoch(2) for s in shards)):
        assert sorted(torch.cat([p.indices for p in parts]).tolist()) == sorted(whole.indices.tolist())
        assert [len(p.indices) for p in parts] == [4, 3, 3]
    assert full.samples_in_step(0) == 10


# ---------------------------------------------------------------- the CLI under torchrun


def _image_folder(mini: ImageDataset, root: Path, per_class: int) -> Path:
    """A small ImageFolder tree of real CIFAR-10 images (decoded in well under a second)."""
    for split, images, labels in (
        ("train", mini.train_images, mini.train_labels),
        ("test", mini.test_images, mini.test_labels),
    ):
        for c, name in enumerate(mini.classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in torch.nonzero(labels == c).flatten()[: per_class if split == "train" else 10].tolist():
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def _torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "kdistill",
        *args,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ranks(job: subprocess.Popen) -> dict[int, int]:
    """pid of every worker of a torchrun job, by rank (from their environment)."""
    found = {}
    for pid in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
            if "RANK" in env:
                found[int(env["RANK"])] = int(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_torchrun_cli_killed_rank_then_resume(mini: ImageDataset, tmp_path: Path) -> None:
    data = _image_folder(mini, tmp_path / "data", per_class=60)
    args = [
        "train",
        "--data",
        str(data),
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path),
        "--name",
        "t",
        "--epochs",
        "3",
        "--set",
        "train.batch_size=20",
        "--set",
        "distributed.timeout_s=30",
    ]
    job = _torchrun(*args)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()
    os.kill(_ranks(job)[1], signal.SIGKILL)  # rank 1 dies during epoch 2
    killed = time.monotonic()
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 90  # the job ends, it does not hang (about a second on an idle machine)
    assert "kdistill" in err and ("Signal 9" in err or "SIGKILL" in err or "exitcode" in err), err[-2000:]
    assert len(_metrics(metrics)) >= 1

    job = _torchrun(*args, "--resume")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert [m["epoch"] for m in _metrics(metrics)] == [1, 2, 3]
    assert err.count("epoch 3/3:") == 1  # rank 0 logs, alone
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["test"]["num_samples"] == 100
    assert load_checkpoint(tmp_path / "t" / "checkpoint.pt")["epoch"] == 3


@pytest.mark.slow
def test_torchrun_cli_errors_are_one_line_on_every_rank(tmp_path: Path) -> None:
    job = _torchrun("train", "--data", str(tmp_path / "missing"), "--device", "cpu", "--output-dir", str(tmp_path))
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    for r in range(WORLD):
        assert f"kdistill: [rank {r}] error: data set" in err
    assert "kdistill/cli.py" not in err  # no worker traceback (torchrun adds its own summary)


@pytest.mark.slow
def test_torchrun_cli_run_writes_one_report(mini: ImageDataset, tmp_path: Path) -> None:
    """The whole study on 2 ranks: teacher, baseline, distilled, report, written by rank 0."""
    data = _image_folder(mini, tmp_path / "data", per_class=20)
    job = _torchrun(
        "run",
        "--data",
        str(data),
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path),
        "--name",
        "s",
        "--epochs",
        "1",
        "--set",
        "train.batch_size=20",
    )
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    run_dir = tmp_path / "s"
    for phase in ("teacher", "baseline", "distilled"):
        assert [m["epoch"] for m in _metrics(run_dir / phase / "metrics.jsonl")] == [1]
        assert load_checkpoint(run_dir / phase / "checkpoint.pt")["epoch"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "distilled"}
    assert summary["models"]["distilled"]["test"]["num_samples"] == 100  # the whole test split, gathered
    assert summary["models"]["baseline"]["train_seconds"] > 0
    assert (run_dir / "report.md").is_file() and err.count("done in") == 1
    assert not list(run_dir.glob("**/*.tmp"))
