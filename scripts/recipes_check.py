"""`make recipes-check`: every recipe in docs/recipes/ end to end on a shortened setting.

Each recipe runs with few chunks, few calibration samples and one point of each sweep, into
its own folder. Then the checks the recipes promise:
  - it ends in a report (index.md and at least one plot or heat map);
  - it is re-runnable: a second `make` has nothing to do (`make -q` is true);
  - deterministic steps give identical bytes: one model output is removed and rebuilt, and
    its sha256 must not change.
Prints one line per recipe with its wall time; exit 1 on the first failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "docs" / "recipes"
OUT = Path(os.environ.get("RECIPES_OUT", ROOT / "recipes-check"))
CLLM = Path(sys.executable).parent / "cllm"

SHORT = {
    "CHUNKS": "2", "CALIB": "4", "SEQLEN": "128", "SENS_CHUNKS": "1",
    "SPARSITIES": "50", "BITS": "4", "DROPS": "2", "PRUNINGS": "2of4",
    "SIZES": "4", "SEEDS": "0 1",
}  # fmt: skip
# per recipe: one output to rebuild and compare (a deterministic step)
REBUILD = {
    "baseline-suite": "rtn-w4",
    "heat-map": "quantize-3bit.json",
    "ordering": "pq-2of4-w4",
    "calibration": "wanda-n4-s1",
    "edge": "q4_k_m.gguf",
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def make(recipe: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [f"{k}={v}" for k, v in SHORT.items()] + [f"CLLM={CLLM}", f"OUT={out}"]
    return subprocess.run(["make", "-C", str(RECIPES / recipe), *args, *extra],
                          text=True, capture_output=True, check=False)  # fmt: skip


def check(recipe: str) -> float:
    out = OUT / recipe
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    first = make(recipe, out)
    wall = time.time() - t
    if first.returncode != 0:
        sys.exit(f"{recipe}: make failed ({first.returncode}):\n{first.stderr[-3000:]}")
    report = out / "report"
    pngs = list(report.glob("*.png"))
    if not (report / "index.md").is_file() or not pngs:
        sys.exit(f"{recipe}: no report in {report}")
    if make(recipe, out, "-q").returncode != 0:
        sys.exit(f"{recipe}: a second make would redo work (not up to date after a full run)")
    target = out / REBUILD[recipe]
    before = sha256_of(target)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    again = make(recipe, out, str(target))
    if again.returncode != 0:
        sys.exit(f"{recipe}: rebuilding {target.name} failed:\n{again.stderr[-3000:]}")
    if sha256_of(target) != before:
        sys.exit(f"{recipe}: {target.name} rebuilt with different bytes (not deterministic)")
    return wall


def main() -> None:
    names = sys.argv[1:] or [
        p.name for p in sorted(RECIPES.iterdir()) if (p / "Makefile").is_file()
    ]
    for name in names:
        wall = check(name)
        print(f"{name}: ok in {wall:.0f} s (report, up to date on a re-run, identical rebuild)")


if __name__ == "__main__":
    main()
