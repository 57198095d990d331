"""What a run directory is, and that nothing kdistill writes misdescribes it.

A run directory records its kind (the command that made it) and identity (data, seed,
models, teachers, distillation settings) in ``run.json``; ``--resume`` refuses another
kind or a change of identity before anything is written. Commands given no ``--name`` get
run names that do not collide. A run that fails before its work starts leaves nothing on
disk. The fast tests check the record made by :func:`open_run_dir` itself; the slow ones
train on a six-image ImageFolder tree. The study's own case (a finished ``kdistill run``
resumed with other distillation settings) is in test_cli.py.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from kdistill.cli import _config_from_args, build_parser, main
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.runs import RUN_FILE, open_run_dir, run_identity

TREE = {
    "train/ant/0.png": (200, 10, 10),
    "train/ant/1.png": (190, 20, 10),
    "train/bee/0.png": (10, 200, 10),
    "train/bee/1.png": (20, 190, 10),
    "test/ant/0.png": (210, 0, 0),
    "test/bee/0.png": (0, 210, 0),
}


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name, colour in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(colour))
    return root


def _args(command: str, tree: Path, out: Path, *extra: str) -> list[str]:
    return [
        command,
        "--data",
        str(tree),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        "--set",
        "train.batch_size=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``train`` run (r20) and a ``distill`` run (d) distilled from it."""
    out = tmp_path_factory.mktemp("runs")
    assert main(_args("train", tree, out, "--model", "seed_student", "--name", "r20")) == 0
    assert main(_args("distill", tree, out, "--teacher", str(out / "r20" / "checkpoint.pt"), "--name", "d")) == 0
    return out


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("kdistill: error: "), err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# ------------------------------------------------------------------ resume integrity


def _made_by(argv: list[str], kind: str) -> Path:
    """The run directory of ``argv``, as a ``kind`` run with ``argv``'s config leaves it
    before any work: its record, config and lock."""
    with open_run_dir(_config_from_args(build_parser().parse_args(argv)), False, kind=kind) as run_dir:
        return run_dir


def test_a_resume_by_another_command_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _made_by(["train", "--model", "seed_student", "--output-dir", str(tmp_path), "--name", "r20"], "train")
    assert json.loads((run_dir / RUN_FILE).read_text())["kind"] == "train"
    before = _files(run_dir)
    capsys.readouterr()
    assert (
        main(
            ["distill", "--teacher", str(tmp_path / "t.pt"), "--output-dir", str(tmp_path), "--name", "r20", "--resume"]
        )
        == 2
    )
    assert f"cannot resume {run_dir}: it was made by kdistill train, not by kdistill distill" in _error(capsys)
    assert _files(run_dir) == before  # config.yaml still names what the run is


def test_a_resume_with_other_distillation_settings_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["run", "--output-dir", str(tmp_path), "--resume"]
    run_dir = _made_by(argv, "run")
    before = _files(run_dir)
    capsys.readouterr()
    assert main([*argv, "-T", "8", "--alpha", "0.1", "--method", "dkd"]) == 2
    line = _error(capsys)
    assert f"cannot resume {run_dir}: distill.methods changed from {{kd: {{" in line and "to {dkd: {" in line
    assert "distill.alpha changed from 0.5 to 0.1" in line and "use the same settings or another --name" in line
    assert _files(run_dir) == before
    assert main([*argv, "--born-again", "1"]) == 2
    assert "born_again changed from 0 to 1" in _error(capsys)


@pytest.mark.slow
def test_run_json_records_kind_and_identity(runs: Path, tree: Path) -> None:
    record = json.loads((runs / "d" / RUN_FILE).read_text())
    assert record["kind"] == "distill"
    identity = record["identity"]
    assert identity["data.dataset"] == str(tree.resolve()) and identity["seed"] == 0
    assert identity["teacher.checkpoint"] == str((runs / "r20" / "checkpoint.pt").resolve())
    assert identity["student.name"] == "seed_student" and identity["distill.alpha"] == 0.5
    assert json.loads((runs / "r20" / RUN_FILE).read_text())["kind"] == "train"


@pytest.mark.slow
def test_distill_resume_over_a_train_run_is_refused(runs: Path, tree: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(runs / "r20")
    capsys.readouterr()
    teacher = str(runs / "r20" / "checkpoint.pt")
    # the same student architecture: before run.json, the checkpoint fitted and this was accepted
    assert main(_args("distill", tree, runs, "--teacher", teacher, "--name", "r20", "--resume")) == 2
    line = _error(capsys)
    assert f"cannot resume {runs / 'r20'}: it was made by kdistill train, not by kdistill distill" in line
    assert "kdistill train --resume" in line
    assert _files(runs / "r20") == before  # config.yaml, checkpoint and summary untouched


@pytest.mark.slow
def test_train_resume_over_a_distill_run_is_refused(runs: Path, tree: Path, capsys: pytest.CaptureFixture) -> None:
    before = _files(runs / "d")
    capsys.readouterr()
    assert main(_args("train", tree, runs, "--model", "seed_student", "--name", "d", "--resume")) == 2
    assert "made by kdistill distill, not by kdistill train" in _error(capsys)
    assert _files(runs / "d") == before


@pytest.mark.slow
def test_resume_with_other_distillation_settings_is_refused(
    runs: Path, tree: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _files(runs / "d")
    capsys.readouterr()
    teacher = str(runs / "r20" / "checkpoint.pt")
    argv = _args(
        "distill",
        tree,
        runs,
        "--teacher",
        teacher,
        "--name",
        "d",
        "--resume",
        "-T",
        "8",
        "--alpha",
        "0.1",
        "--method",
        "dkd",
    )
    assert main(argv) == 2
    line = _error(capsys)
    assert "cannot resume" in line and "distill.methods changed from {kd: {" in line and "to {dkd: {" in line
    assert "distill.alpha changed from 0.5 to 0.1" in line
    assert "use the same settings or another --name" in line
    assert _files(runs / "d") == before

    assert main(_args("distill", tree, runs, "--teacher", teacher, "--name", "d", "--resume", "-T", "8")) == 2
    assert "distill.methods.kd.temperature changed from 4.0 to 8.0" in _error(capsys)  # one option: named alone


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, key",
    [
        (("--teacher", "OTHER"), "teacher.checkpoint changed from"),
        (("--student", "resnet20"), "student.name changed from seed_student to resnet20"),
        (("--seed", "3"), "seed changed from 0 to 3"),
        (("--set", "data.flip=false"), "data.flip changed from true to false"),
        (("--set", "data.val_size=1"), "data.val_size changed from 0 to 1"),
    ],
)
def test_resume_with_another_identity_names_the_key(
    runs: Path, tree: Path, tmp_path: Path, extra: tuple, key: str, capsys: pytest.CaptureFixture
) -> None:
    teacher = runs / "r20" / "checkpoint.pt"
    if "OTHER" in extra:
        other = tmp_path / "other.pt"
        shutil.copy(teacher, other)
        extra = ("--teacher", str(other))
    else:
        extra = ("--teacher", str(teacher), *extra)
    capsys.readouterr()
    assert main(_args("distill", tree, runs, "--name", "d", "--resume", *extra)) == 2
    assert key in _error(capsys)


@pytest.mark.slow
def test_resume_with_the_same_identity_goes_on(
    runs: Path, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where files are is not what the run is: a resume from another folder, with the
    teacher's path spelled relative to it and another data cache folder, is accepted."""
    monkeypatch.chdir(runs)
    argv = _args(
        "distill",
        tree,
        runs,
        "--teacher",
        "r20/checkpoint.pt",
        "--name",
        "d",
        "--resume",
        "--data-dir",
        str(tmp_path / "cache"),
    )
    assert main(argv) == 0
    assert json.loads((runs / "d" / RUN_FILE).read_text())["kind"] == "distill"


@pytest.mark.slow
def test_a_run_made_before_run_json_resumes_as_before(runs: Path, tree: Path, tmp_path: Path) -> None:
    old = tmp_path / "out" / "old"
    shutil.copytree(runs / "r20", old)
    (old / RUN_FILE).unlink()
    assert main(_args("train", tree, tmp_path / "out", "--model", "seed_student", "--name", "old", "--resume")) == 0
    assert not (old / RUN_FILE).exists()  # its kind is unknown: not made up


def test_unreadable_run_json_is_refused(tmp_path: Path, tree: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text("{not json")
    capsys.readouterr()
    assert main(_args("train", tree, tmp_path, "--name", "x", "--resume")) == 2
    assert f"{run_dir / RUN_FILE} is unreadable" in _error(capsys)


def test_identity_ignores_where_files_are() -> None:
    base = load_config(None, ["teacher.checkpoint=t.pt"])
    same = load_config(
        None,
        [
            "teacher.checkpoint=./t.pt",
            "data.data_dir=/elsewhere",
            "data.download=false",
            "device=cpu",
            "output_dir=other",
            "train.tensorboard=true",
            "distill.teacher_cache=c.pt",
            "name=renamed",
            "distill.methods.kd.temperature=4.0",
        ],
    )
    for kind in ("run", "train", "distill", "mutual", "sweep"):
        assert run_identity(same, kind) == run_identity(base, kind), kind
    assert run_identity(load_config(None, ["born_again=2"]), "run") != run_identity(load_config(), "run")
    assert run_identity(load_config(None, ["mutual.temperature=3"]), "mutual") != run_identity(load_config(), "mutual")


def test_open_run_dir_needs_a_known_kind(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="kind"), open_run_dir(cfg, False, kind="nonsense"):
        pass
    assert not (tmp_path / "quickstart").exists()


# ------------------------------------------------------------------ run names


def _name(argv: list[str]) -> str:
    return _config_from_args(build_parser().parse_args(argv)).name


def test_default_run_names_do_not_collide() -> None:
    names = {
        "run": _name(["run"]),
        "train": _name(["train", "--model", "resnet20"]),
        "distill": _name(["distill", "--teacher", "t.pt", "--student", "resnet20"]),
        "mutual": _name(["mutual"]),
        "sweep": _name(["sweep", "--teacher", "t.pt"]),
    }
    assert names == {
        "run": "quickstart",
        "train": "quickstart-train-resnet20",
        "distill": "quickstart-distill-resnet20",
        "mutual": "quickstart-mutual-seed_student-seed_student",
        "sweep": "quickstart-sweep",
    }
    assert _name(["train", "--name", "mine"]) == "mine" and _name(["train", "--set", "name=mine"]) == "mine"
    assert _name(["train", "--config", "cifar10_seed"]) == "cifar10_seed-train-seed_teacher"


@pytest.mark.slow
def test_train_after_the_study_gets_its_own_directory(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The README's ``kdistill run`` then ``kdistill train --model ...``: no "already exists"."""
    study = tmp_path / "quickstart"
    with open_run_dir(load_config(None, [f"output_dir={tmp_path}"]), False, kind="run"):
        pass
    before = _files(study)
    assert main(_args("train", tree, tmp_path, "--model", "seed_student")) == 0
    assert (tmp_path / "quickstart-train-seed_student" / "summary.json").is_file()
    assert _files(study) == before
    # and the advice "pass --resume", taken with the study's name, is refused before any work
    capsys.readouterr()
    assert main(_args("sweep", tree, tmp_path, "--teacher", "t.pt", "--name", "quickstart", "--resume")) == 2
    assert "made by kdistill run, not by kdistill sweep" in _error(capsys)
    assert _files(study) == before


# ------------------------------------------------------------------ failed starts leave nothing


def test_missing_teacher_leaves_no_run_directory(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new" / "runs"
    argv = _args("distill", tree, out, "--teacher", str(tmp_path / "gone.pt"))
    for _ in range(2):  # the same command fails the same way, not with "already exists"
        assert main(argv) == 2
        assert "gone.pt" in _error(capsys)
        assert not (tmp_path / "new").exists()


def test_missing_data_leaves_no_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "runs"), "--device", "cpu"]
    for _ in range(2):
        assert main(argv) == 2
        assert "nowhere" in _error(capsys)
    assert not (tmp_path / "runs").exists()


def test_unreachable_download_leaves_no_run_directory_and_says_where_the_archive_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    argv = [
        "train",
        "--data",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "runs"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    line = _error(capsys)
    archive = tmp_path.resolve() / "data" / "cifar10" / "cifar-10-python.tar.gz"
    assert "cannot download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line
    assert f"place it at {archive}" in line and "c58f30108f718f92721af3b95e74349a" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cache_mismatch_leaves_no_run_directory(
    runs: Path, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    teacher = str(runs / "r20" / "checkpoint.pt")
    cache = tmp_path / "t.cache"
    assert (
        main(
            [
                "cache-teacher",
                "--teacher",
                teacher,
                "--data",
                str(tree),
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--out",
                str(cache),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            _args(
                "distill", tree, tmp_path / "runs", "--teacher", teacher, "--teacher-cache", str(cache), "--seed", "1"
            )
        )
        == 2
    )
    assert "seed" in _error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_directory_that_existed_is_never_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def train(name: str, *extra: str) -> list[str]:
        return [
            "train",
            "--data",
            str(tmp_path / "nowhere"),
            "--output-dir",
            str(tmp_path / "runs"),
            "--name",
            name,
            "--device",
            "cpu",
            *extra,
        ]

    empty = tmp_path / "runs" / "x"
    empty.mkdir(parents=True)
    assert main(train("x")) == 2
    assert empty.is_dir()  # the user's (empty) folder stays
    argv = train("r", "--resume")
    _made_by(argv, "train")
    (tmp_path / "runs" / "r" / "checkpoint.pt").write_bytes(b"results")
    before = _files(tmp_path / "runs" / "r")
    assert main(argv) == 2
    assert "nowhere" in _error(capsys)
    assert _files(tmp_path / "runs" / "r") == before


@pytest.mark.slow
def test_a_failure_after_work_started_keeps_the_run(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.commands as commands

    def fail(*args, **kwargs):
        raise ConfigError("boom")

    monkeypatch.setattr(commands.runs, "write_single_summary", fail)  # after training, before the summary
    assert main(_args("train", tree, tmp_path, "--model", "seed_student", "--name", "t")) == 2
    assert (tmp_path / "t" / "checkpoint.pt").is_file() and (tmp_path / "t" / RUN_FILE).is_file()


def test_a_failure_at_the_first_step_leaves_no_run_directory(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A run refused at its first step (e.g. a budget too small for one step) has written
    only bookkeeping and set-up: the same command, corrected, can simply be rerun."""
    from kdistill import engine
    from kdistill.errors import TrainingError

    def refuse(*args, **kwargs):
        raise TrainingError("refused at the first step")

    monkeypatch.setattr(engine, "lr_factor", refuse)
    assert main(_args("run", tree, tmp_path / "runs")) == 2
    assert "refused at the first step" in _error(capsys)
    assert not (tmp_path / "runs").exists()


def test_the_study_joins_the_torchrun_job_before_its_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torchrun ... kdistill run`: the ranks join the process group (with the config's backend
    and timeout) before the run directory, the data and the budget, as the other commands do."""
    import contextlib

    from kdistill import study

    entered = []

    @contextlib.contextmanager
    def job(cfg):
        entered.append(cfg.distributed.timeout_s)
        raise KeyboardInterrupt  # stop here: nothing after the job's start may have run
        yield

    monkeypatch.setattr(study, "job", job)
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", "distributed.timeout_s=77"])
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg)
    assert entered == [77.0] and not (tmp_path / "runs").exists()
