"""Typed configs: bundled files load, round-trip, take --set overrides with YAML typing, and
every rejection is a ConfigError that names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.cli import _config_from_args, build_parser, main
from kdistill.config import (
    CONFIG_DIR,
    RunConfig,
    apply_overrides,
    dump_config,
    load_config,
    validate_config,
)
from kdistill.errors import ConfigError
from kdistill.methods import METHODS
from kdistill.models import MODELS, source_of

BUNDLED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_quickstart_is_bundled() -> None:
    assert "quickstart" in {p.stem for p in BUNDLED}


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert all(name in MODELS or source_of(name) for name in (cfg.teacher.name, cfg.student.name))
    assert set(cfg.distill.methods) <= set(METHODS)
    # the bundled name resolves to the same file
    assert load_config(path.stem) == cfg
    for phase in ("teacher", "student", "distill"):
        assert cfg.train_for(phase).epochs > 0


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_dump_load_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    text = dump_config(cfg)
    assert validate_config(yaml.safe_load(text)) == cfg
    out = tmp_path / "dumped.yaml"
    out.write_text(text)
    again = load_config(out)
    assert again == cfg
    assert dump_config(again) == text


def test_round_trip_after_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.schedule.milestones=[3, 6]",
            "teacher.train.epochs=7",
            "data.val_size=100",
            "seed=3",
        ],
    )
    out = tmp_path / "c.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg
    assert load_config(out).train_for("teacher").epochs == 7


def test_default_is_quickstart() -> None:
    assert load_config() == load_config(CONFIG_DIR / "quickstart.yaml")


def test_overrides_apply_with_yaml_typing() -> None:
    cfg = load_config(
        "quickstart",
        [
            "train.epochs=5",
            "distill.methods.kd.temperature=2",
            "distill.alpha=0.7",
            "data.augment=false",
            "train.grad_clip=null",
            "train.schedule.milestones=[10, 20]",
            "train.optimizer={name: adamw, lr: 0.001}",
            "name=my run",
        ],
    )
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.distill.methods["kd"]["temperature"] == 2
    assert cfg.distill.alpha == 0.7
    assert cfg.data.augment is False
    assert cfg.train.grad_clip is None
    assert cfg.train.schedule.milestones == [10.0, 20.0]
    assert cfg.train.optimizer.name == "adamw" and cfg.train.optimizer.lr == 0.001
    assert cfg.name == "my run"
    # the rest of the file is untouched
    base = load_config("quickstart")
    assert cfg.train.batch_size == base.train.batch_size
    assert cfg.teacher == base.teacher


def test_later_override_wins() -> None:
    assert load_config(None, ["train.epochs=5", "train.epochs=6"]).train.epochs == 6


def test_apply_overrides_is_pure_and_creates_sections() -> None:
    data = {"train": {"epochs": 3}}
    out = apply_overrides(data, ["train.optimizer.lr=0.2", "teacher.name=resnet20"])
    assert data == {"train": {"epochs": 3}}  # input not modified
    assert out == {
        "train": {"epochs": 3, "optimizer": {"lr": 0.2}},
        "teacher": {"name": "resnet20"},
    }


@pytest.mark.parametrize("text", ["train.epochs", "=5", "  =5"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, [text])


def test_override_below_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        load_config(None, ["train.epochs.x=1"])


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "key", "detail"),
    [
        ("train.epoch=5", "train.epoch", "unknown key"),
        ("trian.epochs=5", "trian", "unknown key"),
        ("train.epochs=abc", "train.epochs", "integer"),
        ("train.epochs=1.5", "train.epochs", "integer"),
        ("train.optimizer.lr=-1", "train.optimizer.lr", "greater than 0"),
        ("distill.alpha=1.5", "distill.alpha", "less than or equal to 1"),
        ("train.batch_size=0", "train.batch_size", "greater than 0"),
        ("train.schedule.name=linear", "train.schedule.name", "onecycle"),
        ("device=gpu", "device", "cuda"),
        ("data.image_size=0", "data.image_size", "greater than 0"),
    ],
)
def test_rejection_names_the_key(override: str, key: str, detail: str) -> None:
    message = _error([override])
    assert f"{key}:" in message, message
    assert detail in message, message
    assert message.startswith(f"--set {override}: {key}: "), message  # and the override, not the file
    assert "quickstart.yaml" not in message, message


@pytest.mark.parametrize("override", ["train.epochs=true", "train.batch_size=yes"])
def test_boolean_is_not_an_integer(override: str) -> None:
    """YAML reads true/yes/on as booleans; a typo like ``--set train.epochs=yes`` must fail,
    not silently train for 1 epoch (pydantic's lax mode turns True into 1)."""
    key = override.partition("=")[0]
    assert f"{key}:" in _error([override])


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_unknown_model(role: str) -> None:
    message = _error([f"{role}.name=resnet9000"])
    assert f"{role}.name" in message and "resnet9000" in message
    assert "resnet20" in message and "seed_student" in message  # lists the valid ones


@pytest.mark.parametrize("override", ["distill.methods.nope={}", "distill.methods={nope: {}}"])
def test_unknown_method_lists_valid_ones(override: str) -> None:
    message = _error([override])
    assert "distill.methods" in message and "nope" in message
    for name in METHODS:
        assert name in message


def test_no_method() -> None:
    assert "distill.methods" in _error(["distill.methods={}"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("distill.methods.kd.temperature=0", "distill.methods.kd.temperature"),
        ("distill.methods.kd.temperature=-2", "distill.methods.kd.temperature"),
        ("distill.methods.kd.temp=3", "distill.methods.kd.temp"),
        ("distill.methods.kd.weight=-1", "distill.methods.kd.weight"),
    ],
)
def test_bad_method_option(override: str, key: str) -> None:
    message = _error([override])
    assert f"{key}:" in message, message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("student.train.epochs=0", "student.train.epochs"),
        ("teacher.train.epoch=3", "teacher.train.epoch"),
        ("distill.train.optimizer.lr=0", "distill.train.optimizer.lr"),
    ],
)
def test_phase_override_rejection(override: str, key: str) -> None:
    message = _error([override])
    assert key in message, message


def test_phase_override_path_is_well_formed() -> None:
    """Same format as every other error: 'OVERRIDE: KEY: problem'."""
    message = _error(["student.train.epochs=0"])
    assert message.startswith("--set student.train.epochs=0: student.train.epochs: "), message


def test_phase_override_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("student:\n  train:\n    epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=3"])
    assert str(info.value).startswith(f"config error in {path}: student.train.epochs: "), info.value


def test_errors_of_the_file_and_of_overrides_each_name_their_source(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  optimiser: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=0", "seed=-1"])
    parts = str(info.value).split("; ")
    assert f"config error in {path}: train.optimiser: unknown key" in parts, parts
    assert any(p.startswith("--set train.epochs=0: train.epochs: ") for p in parts), parts
    assert any(p.startswith("--set seed=-1: seed: ") for p in parts), parts


def test_the_last_override_of_a_key_is_named() -> None:
    message = _error(["train.epochs=0", "train.epochs=-1"])
    assert message.startswith("--set train.epochs=-1: train.epochs: "), message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("distill.methods.nope={}", "distill.methods"),  # the error is on the section above the key set
        ("train.optimizer={lr: 0}", "train.optimizer.lr"),  # on a key below it
    ],
)
def test_override_named_for_keys_above_and_below_it(override: str, key: str) -> None:
    message = _error([override])
    assert message.startswith(f"--set {override}: {key}"), message


def _cli_error(argv: list[str], config: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _config_from_args(build_parser().parse_args([*argv, *(["--config", str(config)] if config else [])]))
    return str(info.value)


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["train", "--set", "train.epoch=1"], "--set train.epoch=1: train.epoch: unknown key"),
        (["distill", "--teacher", "t.pt", "-T", "0"], "-T/--temperature 0: distill.methods.kd.temperature: "),
        (
            [
                "distill",
                "--teacher",
                "t.pt",
                "--temperature",
                "2.5",
                "--set",
                "distill.methods={kd: {}, dkd: {}}",
                "--set",
                "distill.methods.dkd.temperature=0",
            ],
            "--set distill.methods.dkd.temperature=0: distill.methods.dkd.temperature: ",
        ),  # the later --set wins, and is named
        (["distill", "--teacher", "t.pt", "--alpha", "2"], "--alpha 2: distill.alpha: "),
        (["distill", "--teacher", "t.pt", "--method", "kdd"], "--method kdd: distill.methods: unknown method 'kdd'"),
        (["train", "--device", "gpu"], "--device gpu: device: expected auto, cpu, cuda, cuda:N or mps"),
        (["run", "--epochs", "0"], "--epochs 0: train.epochs: "),
        (["train", "-m", "resnet9000"], "-m/--model resnet9000: teacher.name: unknown model"),
        (["run", "--born-again", "99"], "--born-again 99: born_again: "),
        (["run", "--budget", "soon"], "--budget soon: budget: expected a duration"),
        (["mutual", "-T", "0"], "-T/--temperature 0: mutual.temperature: "),
        (["mutual", "--models", "seed_student"], "--models seed_student: mutual.models: "),
        (
            ["distill", "--teacher", "a.pt", "--teacher", "b.pt", "--teacher-weights", "1", "2", "3"],
            "--teacher-weights 1 2 3: teacher.weights: 3 weights for 2",
        ),
        (["train", "--set", "seed.x=1"], "--set seed.x=1: 'seed' is not a section"),
    ],
)
def test_flag_errors_name_the_flag_not_the_config_file(argv: list[str], start: str) -> None:
    message = _cli_error(argv)
    assert message.startswith(start), message
    assert "quickstart.yaml" not in message and "config error in" not in message, message


def test_config_file_errors_still_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    message = _cli_error(["train", "--device", "cpu", "--epochs", "2", "-m", "seed_student"], path)
    assert message == f"config error in {path}: train.epoch: unknown key", message


def test_phase_override_merges_into_train() -> None:
    cfg = load_config(
        None, ["train.epochs=9", "train.batch_size=64", "student.train.optimizer.lr=0.2", "distill.train.epochs=3"]
    )
    assert cfg.train_for("student").optimizer.lr == 0.2
    assert cfg.train_for("student").optimizer.momentum == cfg.train.optimizer.momentum
    assert cfg.train_for("student").batch_size == 64
    assert cfg.train_for("student").epochs == 15  # the quickstart's own phase override stays
    assert cfg.train_for("distill").epochs == 3
    assert cfg.train_for("teacher") == cfg.train


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 3\n  optimizer: {lr: 0.1\nseed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "malformed YAML" in message
    assert "line 5" in message, message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == RunConfig()


def test_missing_file_lists_bundled_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "quickstart" in str(info.value)


def test_yaml_is_plain_data(tmp_path: Path) -> None:
    """safe_load only: a python tag is a YAML error, never an object."""
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(path)


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(-1000, 200_000), batch_size=st.integers(-1000, 100_000))
def test_epochs_and_batch_size_property(epochs: int, batch_size: int) -> None:
    overrides = [f"train.epochs={epochs}", f"train.batch_size={batch_size}"]
    valid_epochs = 0 < epochs <= 100_000
    valid_batch = batch_size > 0
    if valid_epochs and valid_batch:
        cfg = load_config(None, overrides)
        assert cfg.train.epochs == epochs and cfg.train.batch_size == batch_size
        assert cfg.train_for("teacher").epochs == epochs
    else:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        message = str(info.value)
        if not valid_epochs:
            assert "train.epochs" in message
        if not valid_batch:
            assert "train.batch_size" in message


def test_the_epochs_shortcut_sets_every_phase_over_the_configs_own_phase_overrides() -> None:
    default = _config_from_args(build_parser().parse_args(["run"]))
    assert (
        default.train_for("teacher").epochs,
        default.train_for("student").epochs,
        default.train_for("distill").epochs,
    ) == (30, 15, 15)
    cfg = _config_from_args(build_parser().parse_args(["run", "--epochs", "3"]))
    assert {cfg.train_for(phase).epochs for phase in ("teacher", "student", "distill")} == {3}
    cfg = _config_from_args(build_parser().parse_args(["run", "--epochs", "3", "--set", "student.train.epochs=2"]))
    assert (cfg.train_for("teacher").epochs, cfg.train_for("student").epochs) == (3, 2)  # an explicit --set wins


def test_a_method_setting_that_cannot_take_effect_is_refused_before_a_distillation(tmp_path) -> None:
    """DKD's warm-up longer than the distillation phase would never reach full weight: a run
    that distills refuses it before writing anything; commands that do not distill load it."""
    from kdistill.runs import check_distillation

    cfg = load_config(None, ["distill.methods={dkd: {warmup_epochs: 20}}"])  # the quickstart distills for 15 epochs
    with pytest.raises(
        ConfigError, match=r"distill\.methods\.dkd\.warmup_epochs: 20 is longer than the run's 15 epochs"
    ):
        check_distillation(cfg)
    check_distillation(load_config(None, ["distill.methods={dkd: {}}"]))  # default: scaled to the run
    check_distillation(load_config(None, ["distill.methods={dkd: {warmup_epochs: 20}}", "budget=60"]))  # planned length
    out = tmp_path / "runs"
    assert main(["run", "--set", "distill.methods={dkd: {warmup_epochs: 20}}", "--output-dir", str(out)]) == 2
    assert not out.exists()
    # the bundled full-CIFAR config (dkd warm-up 2.5) still trains a 2-epoch teacher
    assert load_config("cifar10_seed", ["train.epochs=2", "teacher.train.epochs=2"]).train_for("teacher").epochs == 2


def test_temperature_flag_goes_to_the_configured_methods_that_have_one() -> None:
    from kdistill.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    cfg = _config_from_args(parse(["run", "--config", "cifar10_seed", "-T", "3"]))  # its method is dkd, not kd
    assert set(cfg.distill.methods) == {"dkd"} and cfg.distill.methods["dkd"]["temperature"] == 3.0
    cfg = _config_from_args(parse(["run", "--method", "kd+at", "-T", "3"]))
    assert cfg.distill.methods == {"kd": {"temperature": 3.0}, "at": {}}


@pytest.mark.parametrize("argv", [["run", "--method", "at", "-T", "4"], ["run", "--method", "fitnets", "--logit-std"]])
def test_a_method_flag_that_would_change_nothing_is_refused(argv: list[str]) -> None:
    from kdistill.cli import _config_from_args, build_parser

    with pytest.raises(ConfigError, match="no method of this run has"):
        _config_from_args(build_parser().parse_args(argv))


def test_temperature_flag_survives_a_set_of_the_methods_but_an_explicit_set_wins() -> None:
    from kdistill.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    cfg = _config_from_args(parse(["run", "--set", "distill.methods={dkd: {}}", "-T", "2"]))
    assert cfg.distill.methods == {"dkd": {"temperature": 2.0}}
    cfg = _config_from_args(parse(["run", "--set", "distill.methods.kd.temperature=3", "-T", "2"]))
    assert cfg.distill.methods["kd"]["temperature"] == 3
