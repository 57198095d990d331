"""The benchmark scripts' own logic (their measurements are run by hand, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


methods_cifar10 = _script("methods_cifar10")


def test_row_names_carry_the_recipe_and_the_method_options():
    parse = methods_cifar10.parse_row
    assert parse("kd") == ("kd", False, {})
    assert parse("dkd:paper") == ("dkd", True, {})
    assert parse("dkd:beta=2") == ("dkd", False, {"beta": 2})
    assert parse("dkd:paper:beta=0.5,temperature=2") == ("dkd", True, {"beta": 0.5, "temperature": 2})
    for bad, message in [("nope", "unknown method 'nope'"), ("dkd:beta", "expected :paper or :KEY=VALUE")]:
        with pytest.raises(SystemExit, match=message):
            parse(bad)


def test_the_table_gives_each_method_its_mean_gain_over_the_same_seeds_baseline(tmp_path):
    base = methods_cifar10.BASELINE
    row = lambda seed, top1: {"seed": seed, "top1": top1, "agreement": 80.0, "seconds": 10.0}  # noqa: E731
    result = {
        "commands": ["python benchmarks/methods_cifar10.py ..."],
        "recipe": ["r", "r"],
        "seeds": [0, 1],
        "rows": {
            base: [row(0, 70.0), row(1, 68.0)],
            "dkd:beta=2": [row(1, 69.5), row(0, 70.5)],  # seed order does not matter
            "fitnets": [{"seed": 0, "top1": None, "failed": "training collapsed", "seconds": 5.0}],
        },
    }
    out = tmp_path / "t.md"
    methods_cifar10.write_table(result, out)
    table = out.read_text()
    assert "| dkd:beta=2 | 70.00 ± 0.50 | +1.00 | 80.00 ± 0.00 | 10 |" in table
    assert "| fitnets | seed 0: training collapsed |" in table
    assert json.loads(out.with_suffix(".json").read_text()) == result
