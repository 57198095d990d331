"""Every bad input of :mod:`bad_inputs` through the command line: one line
``kdistill: error: ...`` naming the culprit, exit status 2, no traceback; ``--debug``
shows the traceback instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.errors import KDistillError

from .bad_inputs import CASES, LOCKS, Case


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    while LOCKS:
        LOCKS.pop().close()


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_clear_line(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = case.build(tmp_path)
    if case.patch:
        case.patch(monkeypatch)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("kdistill: error: "), err
    # progress lines (one per finished epoch, "decoding ...") may come first; the error is one line
    assert not [line for line in lines[:-1] if "error" in line.lower()], err
    for fragment in case.expect:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    for fragment in case.absent:
        assert fragment not in err, f"{fragment!r} in {err!r}"
    if case.check:
        case.check(tmp_path)


DEBUG_CASES = [c for c in CASES if c.what in ("truncated PNG", "unknown key", "disk full while writing metrics")]


@pytest.mark.parametrize("case", DEBUG_CASES, ids=[c.what for c in DEBUG_CASES])
def test_debug_shows_the_traceback(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = case.build(tmp_path)
    if case.patch:
        case.patch(monkeypatch)
    with pytest.raises((KDistillError, OSError)):
        main([*argv, "--debug"])
