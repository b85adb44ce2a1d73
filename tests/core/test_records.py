"""Provenance summaries: the labels and fields a report groups and plots by."""

from __future__ import annotations

from cllm.core.records import provenance_summary
from cllm.formats.provenance import make_provenance


def _chain(*steps: tuple[str, dict, dict | None]) -> dict:
    prov = make_provenance("dequantize", {"alias": "smollm2-135m"}, "0" * 64, None)
    for op, params, cal in steps:
        prov = make_provenance(op, params, "1" * 64, prov, calibration=cal)
    return prov


def _cal(n: int, seed: int) -> dict:
    return {"samples": n, "seed": seed, "sha256": f"{seed}" * 64}


def test_a_chain_is_labelled_oldest_first_and_flattened() -> None:
    prune = (
        "prune",
        {"method": "sparsegpt", "config": {"sparsity": 0.5, "pattern": "2:4"}},
        _cal(64, 1),
    )
    quant = ("quantize", {"method": {"method": "gptq", "seed": 1},
                          "target": {"gguf_type": "Q4_0", "bits": 4}}, _cal(64, 1))  # fmt: skip
    s = provenance_summary(_chain(prune, quant))
    assert s["label"] == "sparsegpt 2:4 n64 → gptq Q4_0 n64"
    assert s["method"] == "gptq" and s["gguf_type"] == "Q4_0" and s["pattern"] == "2:4"
    assert s["sparsity"] == 0.5 and s["calib_samples"] == 64 and s["seed"] == 1
    assert [st["op"] for st in s["steps"]] == ["prune", "quantize"]  # the alias step is not one
    assert provenance_summary(_chain())["label"] == "base"
    assert provenance_summary(None)["label"] == "base"


def test_setting_ignores_seeds_but_not_parameters() -> None:
    def gptq(n: int, seed: int) -> dict:
        return _chain(("quantize", {"method": {"method": "gptq", "seed": seed},
                                    "target": {"bits": 4, "group_size": 128},
                                    "calibration_sha256": f"{seed}" * 64}, _cal(n, seed)))  # fmt: skip

    a, b, c = (provenance_summary(gptq(64, 0)), provenance_summary(gptq(64, 1)),
               provenance_summary(gptq(256, 0)))  # fmt: skip
    assert a["setting"] == b["setting"] and a["seed"] != b["seed"]
    assert a["label"] == "gptq 4-bit g128 n64"
    assert c["setting"] != a["setting"]


def test_structured_depth_and_mixed_labels() -> None:
    depth = provenance_summary(
        _chain(("prune", {"method": "depth", "config": {"drop_layers": 4}}, None))
    )
    mlp = provenance_summary(_chain(("prune", {"method": "structured",
                                               "config": {"target": "mlp", "ratio": 0.25}}, None)))  # fmt: skip
    mixed = provenance_summary(_chain(("quantize", {"method": {"method": "rtn"},
                                                    "target": {"bits": 4}, "mixed": {"target_bpw": 5.0}}, None)))  # fmt: skip
    assert depth["label"] == "drop 4 layers" and depth["drop_layers"] == 4
    assert mlp["label"] == "structured mlp 25%" and mlp["ratio"] == 0.25
    assert mixed["label"] == "rtn mixed 5.0 bpw" and mixed["mixed_bpw"] == 5.0
