"""The command line's rough edges, each fast: a closed pipe, ``--version``, unknown options,
every argument described, the thread count beside a latency."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdistill.evaluate as evaluate
from kdistill.checkpoint import save_checkpoint
from kdistill.cli import _config_from_args, build_parser, main, parse_args
from kdistill.methods import METHODS, taking
from kdistill.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_pipe_ends_quietly(kdistill_cache: Path) -> None:
    # `kdistill models | head -1`: the reader leaves after one line; no "error: Broken pipe"
    env = {**os.environ, "KDISTILL_CACHE": str(kdistill_cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdistill", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert b"parameters" in first
    assert err == "", err
    assert code in (0, 141)


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdistill {importlib.metadata.version('kdistill')}"


def test_an_unknown_option_shows_its_commands_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kdistill train ")  # train's options, not the list of commands
    assert err.strip().splitlines()[-1] == "kdistill train: error: unrecognized arguments: --bogus"


def test_every_argument_is_described() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"kdistill {name} {where} has no description"


def test_cpu_latency_says_its_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    model = create_model("seed_student", num_classes=10)
    timing = evaluate.measure_latency(model, (3, 32, 32), warmup=1, repeats=2, max_seconds=0.1, min_repeats=1)
    assert timing["threads"] == torch.get_num_threads()

    # evaluate prints them with the latency and keeps them in its JSON (fast: timings stubbed)
    fake = {"median_ms": 1.0, "p90_ms": 1.5, "images_per_second": 1000.0, "batch_size": 1, "warmup": 1, "repeats": 1}
    monkeypatch.setattr(evaluate, "time_calls", lambda *a, **k: dict(fake))
    path = tmp_path / "checkpoint.pt"
    spec = {"name": "seed_student", "kwargs": {"num_classes": 10}}
    save_checkpoint(
        {
            "kind": "train",
            "model_spec": spec,
            "model": model.state_dict(),
            "data": {"dataset": "cifar10-mini", "image_size": 32},
        },
        path,
    )
    assert main(["evaluate", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (
        f"{torch.get_num_threads()} threads" in out
        and "latency depends on the machine's load and the thread count" in out
    )
    assert main(["evaluate", str(path), "--device", "cpu", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)["profile"]
    assert profile["latency_b1"]["threads"] == torch.get_num_threads()
    assert "load_average" in profile["latency_b1"]


def test_temperature_flag_reaches_every_method_that_has_one() -> None:
    hot = taking("temperature", sorted(METHODS))[:2]
    cold = [n for n in sorted(METHODS) if n not in hot and not METHODS[n].takes("temperature")][:1]
    assert len(hot) == 2 and cold
    cfg = _config_from_args(parse_args(["distill", "--teacher", "t.pt", "--method", "+".join(hot + cold), "-T", "3"]))
    for name in hot:
        assert cfg.distill.methods[name]["temperature"] == 3
    assert "temperature" not in cfg.distill.methods[cold[0]]
    # and the README says so, as the flag's help does (it once mapped -T to one method's key)
    readme = " ".join((ROOT / "README.md").read_text().split())
    shortcut = readme.split("`-T` → ", 1)[1].split(", `--", 1)[0]
    assert "every configured method that has one" in shortcut and "distill.methods.<method>.temperature" in shortcut, (
        shortcut
    )
