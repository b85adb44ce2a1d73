"""`cllm report` core: reading and joining records, seed groups, Pareto frontiers, the folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from cllm.core.report import MARKER, ReportRequest, build_report
from cllm.core.report.job import make_page
from cllm.core.report.load import load_inputs
from cllm.core.report.markdown import render
from cllm.core.report.pareto import (
    Value,
    common_tasks,
    frontier,
    group_seeds,
    headline,
    kld,
    mean_acc,
    size_mb,
    staircase,
)
from cllm.errors import InputError, UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROTOCOL = {"text": "/d/wiki.test.raw", "text_sha256": "f" * 64, "ctx": 512, "chunks": 4,
            "tokens_scored": 1020}  # fmt: skip


def prov(label: str, setting: str, seed: int | None = None) -> dict[str, Any]:
    """What `provenance_summary` gives for a one-step chain (only the fields report reads)."""
    out: dict[str, Any] = {"label": label, "setting": setting, "steps": [{"op": "quantize"}]}
    if seed is not None:
        out["seed"] = seed
    return out


BASE_PROV = {"label": "base", "setting": "e3b0c44298fc1c14", "steps": []}


def eval_rec(
    name: str, mb: float, kld_mean: float | None, ppl: float | None = 20.0,
    provenance: dict[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    rec: dict[str, Any] = {
        "schema": "cllm.eval/1", "name": name, "path": f"/models/{name}", "format": "gguf",
        "bytes": int(mb * 1e6), "params": 1000, "bits_per_weight": mb / 10,
        "sha256": (name.encode().hex() * 64)[:64], "backend": "torch",
        "provenance": provenance if provenance is not None else BASE_PROV,
        "perplexity": ppl, "perplexity_se": None if ppl is None else 0.1,
        "kld": None, "base_perplexity": 20.0, "protocol": PROTOCOL,
    }  # fmt: skip
    if kld_mean is not None:
        rec["kld"] = {"mean": kld_mean, "mean_se": kld_mean / 20, "median": kld_mean / 2,
                      "p90": kld_mean * 2, "p99": kld_mean * 5, "max": kld_mean * 9,
                      "top1_agreement": 0.9, "base": "smollm2-135m", "base_sha256": "b" * 64,
                      "base_backend": "torch"}  # fmt: skip
    rec.update(extra)
    return rec


def bench_rec(name: str, tps: float, sha: str | None = None, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "schema": "cllm.bench/1", "name": name, "model": f"/models/{name}",
        "backend": "llama.cpp", "file_bytes": 1000, "threads": 2, "prompt": 128, "gen": 64,
        "repeat": 5, "tg_tps": {"median": tps, "min": tps * 0.9, "max": tps * 1.1},
        "pp_tps": {"median": 10 * tps, "min": 9 * tps, "max": 11 * tps},
        "ttft_ms": {"median": 5.0, "min": 4.0, "max": 6.0}, "peak_rss_bytes": 10**8,
    }  # fmt: skip
    if sha is not None:
        rec["sha256"] = sha
    rec.update(extra)
    return rec


def sha_of(name: str) -> str:
    return (name.encode().hex() * 64)[:64]


def write_ndjson(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# sizes (MB) and mean KLD: the frontier of size vs KLD is q4 (smallest), q5, q8, base
EVALS = [
    eval_rec("base.gguf", 500, 0.0),
    eval_rec("q8.gguf", 140, 0.002, provenance=prov("rtn Q8_0", "s-q8")),
    eval_rec("q4.gguf", 80, 0.09, provenance=prov("rtn Q4_0", "s-q4")),
    eval_rec("q5.gguf", 100, 0.04, provenance=prov("rtn Q5_0", "s-q5")),
    eval_rec("bad.gguf", 120, 0.2, provenance=prov("wanda 50%", "s-bad")),  # dominated by q5
    eval_rec("big.gguf", 300, 0.003, provenance=prov("rtn Q8_0 big", "s-big")),  # by q8
]


# -- Pareto frontier -----------------------------------------------------------------------


def test_sizes_a_provenance_text_apart_count_as_equal() -> None:
    # RTN and GPTQ files of one bit width: the RTN one is a few hundred bytes smaller
    # (shorter provenance) and far worse; it is not on the frontier for that
    pts: list[tuple[float, float] | None] = [(159.9001, 0.613), (159.8998, 2.10), (173.2, 0.187)]
    assert frontier(pts) == [0, 2]
    # a real size difference still counts
    assert frontier([(150.0, 2.10), (159.9, 0.613)]) == [0, 1]


def test_frontier_on_hand_made_points() -> None:
    pts: list[tuple[float, float] | None] = [
        (1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 1), None, (math.nan, 0.0), (6, 0.5),
    ]  # fmt: skip
    # (3,4) is dominated by (2,3); (5,1) by (4,1); the two (2,3) do not dominate each other
    assert frontier(pts) == [0, 1, 4, 3, 8]
    # generation speed (higher better) against KLD (lower better)
    speed = [(10.0, 0.1), (20.0, 0.2), (15.0, 0.3), (30.0, 0.5), (30.0, 0.6)]
    assert frontier(speed, x_higher=True) == [0, 1, 3]
    # size (lower better) against accuracy (higher better)
    acc = [(100.0, 0.5), (200.0, 0.6), (150.0, 0.4), (300.0, 0.6)]
    assert frontier(acc, y_higher=True) == [0, 1]


def test_staircase_turns_on_the_dominated_side() -> None:
    assert staircase([(4, 1), (1, 5), (2, 3)]) == [(1, 5), (2, 5), (2, 3), (4, 3), (4, 1)]
    assert staircase([(10, 0.1), (20, 0.2)], x_higher=True) == [(10, 0.1), (10, 0.2), (20, 0.2)]
    assert staircase([(1, 0.4), (2, 0.6)], y_higher=True) == [(1, 0.4), (2, 0.4), (2, 0.6)]


# -- records -------------------------------------------------------------------------------


def test_seeds_of_one_setting_are_one_group(tmp_path: Path) -> None:
    recs = [
        eval_rec("g0.gguf", 86, 0.050, ppl=21.0, provenance=prov("gptq Q4_0", "s-g", 0)),
        eval_rec("g1.gguf", 86, 0.056, ppl=21.6, provenance=prov("gptq Q4_0", "s-g", 1)),
        eval_rec("g2.gguf", 86, 0.047, ppl=21.3, provenance=prov("gptq Q4_0", "s-g", 2)),
        eval_rec("other.gguf", 86, 0.1, provenance=prov("gptq Q4_0 g32", "s-other", 0)),
        # same setting on another backend: its numbers differ, so a row of its own
        {
            **eval_rec("g0.gguf", 86, 0.051, provenance=prov("gptq Q4_0", "s-g", 0)),
            "backend": "llama.cpp",
        },  # fmt: skip
        # two models cllm did not make share the empty chain's setting, yet are not seeds
        eval_rec("a.gguf", 500, 0.0),
        eval_rec("b.gguf", 250, 0.01),
    ]
    inputs = load_inputs([str(write_ndjson(tmp_path / "r.ndjson", recs))])
    groups = group_seeds(inputs.candidates)
    assert [g.n for g in groups] == [3, 1, 1, 1, 1]
    g = groups[0]
    assert [m.name for m in g.members] == ["g0.gguf", "g1.gguf", "g2.gguf"]
    assert g.seeds == [0, 1, 2]
    v = g.get(kld)
    assert v is not None and v.spread and v.n == 3
    assert v.value == pytest.approx((0.050 + 0.056 + 0.047) / 3)
    assert (v.lo, v.hi) == (0.047, 0.056)
    single = groups[1].get(kld)
    assert single is not None and not single.spread and single.se == pytest.approx(0.1 / 20)


def test_table_sorted_by_size_with_the_frontier_marked(tmp_path: Path) -> None:
    inputs = load_inputs([str(write_ndjson(tmp_path / "r.ndjson", EVALS))])
    page = make_page(ReportRequest([], tmp_path / "rep"), inputs)
    rows = [line for line in render(page).splitlines() if line.startswith("| ")][1:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[2] for c in cells] == ["q4.gguf", "q5.gguf", "bad.gguf", "q8.gguf", "big.gguf",
                                     "base.gguf"]  # fmt: skip
    assert [c[2] for c in cells if c[0] == "★"] == ["q4.gguf", "q5.gguf", "q8.gguf", "base.gguf"]
    assert page.marked_by == "size vs mean KLD"
    q5 = cells[1]
    assert q5[1] == "rtn Q5_0" and q5[5] == "100.0" and q5[8] == "0.04 ± 0.002"


def test_headline_metric_and_mean_over_common_tasks(tmp_path: Path) -> None:
    tasks = {
        "hellaswag": {"acc": 0.30, "acc_stderr": 0.01, "acc_norm": 0.36, "acc_norm_stderr": 0.02},
        "winogrande": {"acc": 0.52, "acc_stderr": 0.02, "acc_norm": 0.9},
    }
    assert headline("hellaswag", tasks["hellaswag"]) == ("acc_norm", 0.36, 0.02)
    assert headline("winogrande", tasks["winogrande"]) == ("acc", 0.52, 0.02)
    recs = [
        eval_rec("a.gguf", 100, 0.01, tasks=tasks),
        eval_rec("b.gguf", 50, 0.05, tasks={**tasks, "piqa": {"acc": 0.6}}),
        eval_rec("c.gguf", 40, 0.06),  # no tasks: not counted against the common set
    ]
    inputs = load_inputs([str(write_ndjson(tmp_path / "r.ndjson", recs))])
    common, seen = common_tasks(inputs.candidates)
    assert common == ["hellaswag", "winogrande"] and seen == [*common, "piqa"]
    v = mean_acc(common)(inputs.candidates[0])
    assert v is not None
    assert v.value == pytest.approx(0.44)
    assert v.se == pytest.approx(math.sqrt(0.02**2 + 0.02**2) / 2)
    assert mean_acc(common)(inputs.candidates[2]) is None


def test_bench_joins_on_sha256_then_path_and_eval_records_merge(tmp_path: Path) -> None:
    evals = [
        eval_rec("q4.gguf", 80, 0.09, provenance=prov("rtn Q4_0", "s4")),
        eval_rec("q8.gguf", 140, 0.002, sha256=None, provenance=prov("rtn Q8_0", "s8")),
        # a --tasks run of q4: the same model and backend, so the same row
        {
            **eval_rec("q4.gguf", 80, None, ppl=None, provenance=prov("rtn Q4_0", "s4")),
            "tasks": {"arc_easy": {"acc": 0.5, "acc_stderr": 0.02}},
        },  # fmt: skip
    ]
    bench = [
        bench_rec("renamed.gguf", 70.0, sha=sha_of("q4.gguf")),  # sha256 joins across names
        bench_rec("q8.gguf", 40.0, sha="9" * 64),  # eval has no sha256: joins on the path
        bench_rec("q4.gguf", 11.0, sha="8" * 64),  # same name, other content: not q4's
    ]
    inputs = load_inputs(
        [
            str(write_ndjson(tmp_path / "e.ndjson", evals)),
            str(write_ndjson(tmp_path / "b.ndjson", bench)),
        ]  # fmt: skip
    )
    assert inputs.n_eval == 3 and inputs.n_bench == 3
    q4, q8, only = inputs.candidates
    assert q4.name == "q4.gguf" and q4.kld and q4.tasks["arc_easy"]["acc"] == 0.5
    assert q4.speed is not None and q4.speed["tg_tps"]["median"] == 70.0
    assert q8.speed is not None and q8.speed["tg_tps"]["median"] == 40.0
    assert not only.evaluated and only.speed is not None and only.speed["tg_tps"]["median"] == 11.0
    assert any("b.ndjson:3" in n and "matches no eval record" in n for n in inputs.notes)


@pytest.mark.parametrize(
    ("content", "where", "what"),
    [
        ('{"schema": "cllm.eval/1"\n', "x.ndjson:2", "not JSON"),
        ("hello world\n", "x.ndjson:2", "not JSON"),
        ('{"name": "m"}\n', "x.ndjson:2", "not a cllm record"),
        ("[1, 2]\n", "x.ndjson:2", "an array, not a cllm record"),
        ('{"schema": "cllm.eval/7", "name": "m"}\n', "x.ndjson:2", "a version this cllm does not read"),
        ('{"schema": "other/1"}\n', "x.ndjson:2", "is not a cllm record"),
        ("KLD_STRING", "x.ndjson:2", 'field "kld.mean" is a string, not a number'),
        ("NO_BYTES", "x.ndjson:2", 'field "bytes" is missing'),
        ("BAD_SENS", "x.ndjson:2", 'field "sensitivity.kld[1]" is not 2 numbers'),
        ('{"schema": "cllm.bench/1", "name": "m", "file_bytes": 1}\n', "x.ndjson:2",
         'field "tg_tps" is missing'),
    ],
)  # fmt: skip
def test_malformed_input_names_file_and_line(
    tmp_path: Path, content: str, where: str, what: str
) -> None:
    good = json.dumps(eval_rec("ok.gguf", 80, 0.1)) + "\n"
    if content == "KLD_STRING":
        rec = eval_rec("m", 80, 0.1)
        rec["kld"]["mean"] = "0.1"
        content = json.dumps(rec) + "\n"
    elif content == "NO_BYTES":
        rec = eval_rec("m", 80, 0.1)
        del rec["bytes"]
        content = json.dumps(rec) + "\n"
    elif content == "BAD_SENS":
        content = json.dumps(eval_rec("m", 80, 0.1, sensitivity={
            "candidates": ["Q4_0", "Q8_0"], "kld": [[0.1, 0.2], [0.3]]})) + "\n"  # fmt: skip
    path = tmp_path / "x.ndjson"
    path.write_text(good + content)
    with pytest.raises(InputError) as exc:
        load_inputs([str(path)])
    msg = exc.value.one_line()
    assert msg.startswith(f"{path}:2: ") and what in msg, msg
    assert exc.value.exit_code == 2 and "\n" not in msg


def test_empty_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e.ndjson").write_text("\n  \n")
    with pytest.raises(InputError, match="is empty"):
        load_inputs([str(tmp_path / "e.ndjson")])


# -- the report folder ---------------------------------------------------------------------


def test_report_folder_with_plots_and_without_speed(tmp_path: Path) -> None:
    recs = [
        *EVALS,
        eval_rec("g0.gguf", 85, 0.05, provenance=prov("gptq Q4_0", "s-g", 0)),
        eval_rec("g1.gguf", 85, 0.06, provenance=prov("gptq Q4_0", "s-g", 1)),
    ]
    src = write_ndjson(tmp_path / "results.ndjson", recs)
    out = tmp_path / "rep"
    res = build_report(ReportRequest([str(src)], out))
    assert res.status == "written" and res.rows == 7
    assert res.files == ["index.md", "pareto-size-kld.png", "pareto-size-ppl.png"]
    for f in res.files[1:]:
        data = (out / f).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not (out / "pareto-speed-kld.png").exists()
    index = (out / "index.md").read_text()
    assert "![Size vs KLD](pareto-size-kld.png)" in index
    assert "- Generation speed vs KLD (`pareto-speed-kld.png`): no bench records" in index
    assert "(`pareto-size-acc.png`): no task accuracy" in index
    assert "the base is what `kld.base` names in the eval records: `smollm2-135m`" in index
    assert "g0.gguf (+1 more)" in index and "0.055 (0.05–0.06)" in index
    assert "ctx 512, 4 chunks, 1020 tokens scored" in index
    marker = json.loads((out / MARKER).read_text())
    assert marker["schema"] == "cllm.report/1" and marker["files"] == res.files
    assert [i["name"] for i in marker["provenance"]["params"]["inputs"]] == [str(src)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "results.ndjson"]  # no temp


def test_speed_energy_and_heat_maps(tmp_path: Path) -> None:
    sens = {"candidates": ["Q4_0", "Q8_0"], "layers": 2, "kld": [[0.01, 0.001], [0.03, 0.002]],
            "layer_params": [1, 1], "model_sha256": "a" * 64, "provenance": {"op": "sensitivity"}}  # fmt: skip
    (tmp_path / "sens.json").write_text(json.dumps(sens, indent=1))
    evals = write_ndjson(tmp_path / "e.ndjson", [
        {**EVALS[1], "perplexity": None}, {**EVALS[2], "perplexity": None},
        eval_rec("p.gguf", 90, 0.05, ppl=None, provenance=prov("wanda 2:4", "s-p"),
                 sensitivity={"columns": ["attention", "mlp"], "kld": [[0.1, 0.2]],
                              "method": "wanda", "pattern": "2:4"}),
    ])  # fmt: skip
    energy = {"source": "rapl", "joules_per_token": {"median": 0.5, "min": 0.4, "max": 0.6}}
    bench = write_ndjson(tmp_path / "b.ndjson", [
        bench_rec("q8.gguf", 40.0, sha=sha_of("q8.gguf"), energy=energy),
        bench_rec("q4.gguf", 70.0, sha=sha_of("q4.gguf")),
    ])  # fmt: skip
    out = tmp_path / "rep"
    res = build_report(ReportRequest([str(evals), str(bench), str(tmp_path / "sens.json")], out))
    assert res.files == ["index.md", "pareto-size-kld.png", "pareto-speed-kld.png",
                         "pareto-energy-kld.png", "heatmap-sens.png", "heatmap-p.png"]  # fmt: skip
    for f in res.files[1:]:
        assert (out / f).read_bytes().startswith(PNG_MAGIC)
    index = (out / "index.md").read_text()
    assert "| tok/s | J/token |" in index and "| 40.0 | 0.5 |" in index
    assert "- Energy: measured by rapl." in index


def test_output_folder_rules(tmp_path: Path) -> None:
    # bench records alone: a table and no plots, so this stays fast
    a = write_ndjson(tmp_path / "a.ndjson", [bench_rec("q8.gguf", 40.0)])
    b = write_ndjson(tmp_path / "b.ndjson", [bench_rec("q4.gguf", 70.0)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep me")
    with pytest.raises(UsageError, match="existing folder that cllm did not write"):
        build_report(ReportRequest([str(a)], mine))
    assert [p.name for p in mine.iterdir()] == ["notes.md"]

    out = tmp_path / "rep"
    assert build_report(ReportRequest([str(a)], out)).status == "written"
    first = (out / "index.md").read_text()
    assert build_report(ReportRequest([str(a)], out)).status == "reused"
    assert build_report(ReportRequest([str(b)], out)).status == "written"  # replaced
    assert (out / "index.md").read_text() != first and "q4.gguf" in (out / "index.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep.")]

    (out / "mine.txt").write_text("added by hand")
    with pytest.raises(UsageError, match=r"also holds files cllm did not write \(mine.txt\)"):
        build_report(ReportRequest([str(a)], out, force=True))
    assert (out / "mine.txt").exists()


def test_a_report_folder_is_a_cllm_output_of_its_own_kind(tmp_path: Path) -> None:
    from cllm.formats.outputs import Kind, check_output, inspect_output

    a = write_ndjson(tmp_path / "a.ndjson", [bench_rec("q8.gguf", 40.0)])
    out = tmp_path / "rep"
    build_report(ReportRequest([str(a)], out))
    found = inspect_output(out)
    marker = json.loads((out / MARKER).read_text())
    assert found is not None and found.kind == Kind.REPORT
    assert found.provenance == marker["provenance"] and found.provenance["op"] == "report"
    with pytest.raises(UsageError, match="is a cllm report folder, not the HF folder"):
        check_output(out, Kind.HF_FOLDER)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    with pytest.raises(UsageError, match="existing file that cllm did not write"):
        build_report(ReportRequest([str(a)], gguf))

    # a listed file gone: still cllm's (replaced), but not up to date (redrawn, not reused)
    (out / "index.md").unlink()
    assert inspect_output(out) == type(found)(Kind.REPORT, {})
    assert build_report(ReportRequest([str(a)], out)).status == "written"
    assert (out / "index.md").is_file()

    # a file the marker does not list: not a pure cllm output, refused before any input is read
    (out / "notes.md").write_text("mine")
    assert inspect_output(out) is None
    with pytest.raises(UsageError, match=r"also holds files cllm did not write \(notes.md\)"):
        build_report(ReportRequest([str(tmp_path / "missing.ndjson")], out))
    assert (out / "notes.md").read_text() == "mine"

    # a link to a report folder is not replaced through the link
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "rep2", target_is_directory=True)
    build_report(ReportRequest([str(a)], tmp_path / "rep2"))
    with pytest.raises(UsageError, match="symbolic link to a folder"):
        build_report(ReportRequest([str(a)], link, force=True))
    assert link.is_symlink() and (tmp_path / "rep2" / MARKER).is_file()


def test_values_show_seed_spread_or_standard_error() -> None:
    from cllm.core.report.markdown import cell

    def f(v: float) -> str:
        return f"{v:.2f}"

    assert cell(Value.with_se(1.0, 0.25), f, f) == "1.00 ± 0.25"
    assert cell(Value(2.0, 1.5, 2.5, spread=True, n=2), f, f) == "2.00 (1.50–2.50)"
    assert cell(Value(2.0, 2.0, 2.0, spread=True, n=2), f, f) == "2.00"
    assert cell(None, f) == "—"
    assert size_mb(load_candidate()).value == 80.0


def load_candidate() -> Any:
    from cllm.core.report.load import eval_candidate

    return eval_candidate(EVALS[2], "t:1")
