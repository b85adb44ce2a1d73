"""The recipes in docs/recipes/ are Makefiles of cllm commands alone, each ending in
`cllm report` (what `make -n` would run; running them is `make recipes-check`)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes"
NAMES = sorted(p.name for p in RECIPES.iterdir() if (p / "Makefile").is_file())


def _planned(name: str, *args: str) -> list[list[str]]:
    out = subprocess.run(["make", "-n", "-s", "-C", str(RECIPES / name), "OUT=/tmp/x", *args],
                         text=True, capture_output=True, check=True).stdout  # fmt: skip
    lines = out.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(">")[0]) for line in lines if line.strip()]


def test_every_issue_recipe_is_there() -> None:
    assert NAMES == ["baseline-suite", "calibration", "edge", "heat-map", "ordering"]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_cllm_commands_ending_in_a_report(name: str) -> None:
    steps = _planned(name)
    assert steps and all(s[0] == "cllm" for s in steps), [s[:3] for s in steps]
    assert steps[-1][:2] == ["cllm", "report"] or (
        name == "edge" and any(s[:2] == ["cllm", "report"] for s in steps)
    )


def test_baseline_suite_covers_the_issue_sweep() -> None:
    steps = [" ".join(s) for s in _planned("baseline-suite")]
    for needle in ("--method magnitude --sparsity 0.10", "--method magnitude --sparsity 0.70",
                   "--method wanda --pattern 2:4", "--method sparsegpt --sparsity 0.5",
                   "--method awq --bits 3", "--method gptq --bits 8", "--method rtn --bits 4",
                   "--drop-layers 6"):  # fmt: skip
        assert any(needle in s for s in steps), needle
    evals = [s for s in steps if s.startswith("cllm eval")]
    assert len(evals) == 1 and evals[0].count("/tmp/x/") == 23  # 23 models, one base pass


def test_calibration_sweep_is_sizes_times_seeds() -> None:
    runs = [s for s in _planned("calibration") if s[1] in ("quantize", "prune")]
    assert len(runs) == 2 * 3 * 3
    seeds = {s[s.index("--seed") + 1] for s in runs}
    sizes = {s[s.index("--calib-samples") + 1] for s in runs}
    assert seeds == {"0", "1", "2"} and sizes == {"16", "64", "256"}
