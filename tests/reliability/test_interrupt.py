"""Ctrl-C (SIGINT) stops a run at a step boundary after saving a resumable checkpoint; the
resumed run ends with exactly the weights of an uninterrupted one."""

import dataclasses
import json
import os
import signal

import pytest
import torch

import kdistill
import kdistill.engine as engine

pytestmark = pytest.mark.slow  # every test trains and resumes a run


@pytest.fixture(scope="module")
def small(mini):
    idx = torch.arange(0, len(mini.train_labels), 20)  # 250 images of every class
    return dataclasses.replace(mini, train_images=mini.train_images[idx], train_labels=mini.train_labels[idx])


def _run(small, run_dir, resume=False, distill=False):
    torch.manual_seed(0)
    student = kdistill.create_model("seed_student")
    kw = dict(epochs=3, batch_size=25, device="cpu", run_dir=run_dir, resume=resume, seed=0)
    if distill:
        torch.manual_seed(1)
        teacher = kdistill.create_model("seed_teacher")
        torch.manual_seed(0)
        student = kdistill.create_model("seed_student")
        return kdistill.distill(teacher, student, small, methods="kd+crd", **kw)
    return kdistill.train(student, small, **kw)


def _metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in rows]


@pytest.mark.parametrize("distill", [False, True], ids=["train", "distill"])
@pytest.mark.parametrize("interrupt_at", [7, 10, 24])  # mid-epoch, at an epoch's start, late
def test_sigint_saves_and_resume_is_exact(small, tmp_path, monkeypatch, distill, interrupt_at):
    reference = _run(small, tmp_path / "ref", distill=distill)

    original = engine.lr_factor

    def counting(step, *args, **kwargs):
        # training steps call lr_factor with step = 0, 1, 2, ...; the per-epoch log line
        # repeats the previous step, which is not a new step
        if step == interrupt_at - 1 and not counting.sent:
            counting.sent = True
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends, in the middle of a step
        return original(step, *args, **kwargs)

    counting.sent = False

    monkeypatch.setattr(engine, "lr_factor", counting)
    with pytest.raises(KeyboardInterrupt):
        _run(small, tmp_path / "cut", distill=distill)
    monkeypatch.setattr(engine, "lr_factor", original)

    state = kdistill.checkpoint.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    steps_per_epoch = 10
    assert state["epoch"] * steps_per_epoch + state["step"] == interrupt_at  # stopped right after that step

    resumed = _run(small, tmp_path / "cut", resume=True, distill=distill)
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _metrics(tmp_path / "cut" / "metrics.jsonl") == _metrics(tmp_path / "ref" / "metrics.jsonl")
