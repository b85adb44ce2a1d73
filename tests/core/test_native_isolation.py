"""Native runtimes on any CPU: the AMX decision, and a runtime crash as one line, not a dead cllm.

These run in the default suite on whichever machine CI lands on: a quantized GGUF is
evaluated by llama.cpp, and a worker that dies of SIGSEGV is turned into a message.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from cllm.errors import InputError, NativeCrash
from cllm.standalone import guard
from tests.conftest import run_cli

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx512f {extra} avx2\nmodel name\t: X\n"


@pytest.fixture(scope="module")
def quantized(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native")
    out = {}
    for qtype in ("Q4_0",):
        path = root / f"tiny.{qtype}.gguf"
        run_cli("export", str(tiny_model), "--to", "gguf", "--gguf-type", qtype, "-o", str(path),
                check=True)  # fmt: skip
        out[qtype] = path
    return out


def test_amx_is_read_from_the_cpu_flags() -> None:
    assert guard.amx_listed(CPUINFO.format(extra="amx_bf16 amx_tile amx_int8"))
    assert not guard.amx_listed(CPUINFO.format(extra="amx_bf16"))  # no tiles, no AMX path
    assert not guard.amx_listed("")


@pytest.mark.parametrize("setting,extra", [("off", False), ("0", False), ("on", True), ("1", True)])
def test_environment_forces_the_choice(setting: str, extra: bool) -> None:
    d = guard.decide(force=setting)
    assert d["extra_bufts"] is extra and guard.ENV in d["why"]


def test_a_probe_that_dies_means_amx_is_not_usable() -> None:
    kill = f"import os, signal; os.kill(os.getpid(), signal.{signal.SIGSEGV.name})"
    ok, why = guard.probe_amx(argv=[sys.executable, "-c", kill])
    assert not ok and "signal 11 (SIGSEGV)" in why


def test_real_probe_never_approves_a_cpu_without_amx() -> None:
    """On this machine's CPU: where AMX is not listed, the real probe (kernel permission, then
    the tile instructions in a child) must fail without taking the test process down."""
    ok, why = guard.probe_amx()
    if not guard.amx_listed():
        assert not ok, why
    assert why  # always a reason, either way
    auto = guard.decide(force="auto")
    assert auto["amx_listed"] == guard.amx_listed()
    if not auto["amx_listed"]:
        assert auto["extra_bufts"]  # nothing to fear: llama.cpp keeps its repacked fast paths


def test_probe_model_is_a_gguf_llamacpp_runs(tmp_path: Path) -> None:
    """The llama.cpp probe's model, written with the standard library: the gguf package reads
    it as a one-layer Q8_0 Llama, and llama.cpp (without its extra buffer types, safe on any
    CPU) decodes it to finite logits."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = tmp_path / "probe.gguf"
    guard.write_probe_gguf(str(path))
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == 12 and types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    with guard._default_params_without_extra_bufts(pytest.importorskip("llama_cpp")):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval(list(range(1, 9)))
        assert np.isfinite(np.array(llm.scores[:8])).all()
    finally:
        llm.close()


def test_llama_probe_that_dies_means_amx_is_not_usable() -> None:
    kill = f"import os, signal; os.kill(os.getpid(), signal.{signal.SIGSEGV.name})"
    ok, why = guard.probe_llama(argv=[sys.executable, "-c", kill])
    assert not ok and "llama.cpp's AMX path died with signal 11 (SIGSEGV)" in why


def test_real_llama_probe_answers_without_harm() -> None:
    """On this machine: llama.cpp's own AMX path, run in a child. Where the CPU lists no AMX
    the child simply decodes; either way the answer has a reason and the test lives on."""
    ok, why = guard.probe_llama()
    assert why
    if not guard.amx_listed():
        assert ok, why


def test_a_parents_probe_answer_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(*_a, **_k):
        raise AssertionError("probed again")

    monkeypatch.setattr(guard, "amx_listed", lambda *_: True)
    monkeypatch.setattr(guard, "probe_amx", no_probe)
    monkeypatch.setattr(guard, "probe_llama", no_probe)
    monkeypatch.setattr(guard, "_decision", None)
    monkeypatch.delenv(guard.ENV, raising=False)
    monkeypatch.setenv(guard.PROBED_ENV, "0 llama.cpp's AMX path died with signal 11 (SIGSEGV)")
    d = guard.decide()
    assert d["extra_bufts"] is False and "died with signal 11" in d["why"]


def test_the_probes_answer_is_kept_for_the_next_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The probes run once per machine: the next process (no answer in its environment)
    reads the cached one; a stale key (another CPU or llama_cpp install) probes again."""
    calls: list[str] = []

    def fake_probe(*_a, **_k):
        calls.append("probe")
        return False, "died (test)"

    monkeypatch.setattr(guard, "amx_listed", lambda *_: True)
    monkeypatch.setattr(guard, "probe_amx", fake_probe)
    monkeypatch.setenv("CLLM_CACHE", str(tmp_path))
    monkeypatch.delenv(guard.ENV, raising=False)
    for _ in range(2):  # two "commands"
        monkeypatch.delenv(guard.PROBED_ENV, raising=False)
        monkeypatch.setattr(guard, "_decision", None)
        d = guard.decide()
        assert d["extra_bufts"] is False and "died (test)" in d["why"]
    assert calls == ["probe"]
    cached = json.loads((tmp_path / "amx-probe.json").read_text())
    cached["key"] = "another machine"
    (tmp_path / "amx-probe.json").write_text(json.dumps(cached))
    monkeypatch.delenv(guard.PROBED_ENV, raising=False)
    monkeypatch.setattr(guard, "_decision", None)
    guard.decide()
    assert calls == ["probe", "probe"]


def test_quantized_gguf_runs_in_llamacpp_here(quantized: dict[str, Path], tiny_model: Path,
                                              tiny_text: Path) -> None:  # fmt: skip
    """The test that died of SIGSEGV on AMX machines: quantized GGUFs evaluated by llama.cpp,
    through the CLI, agreeing with torch on the same file."""
    for qtype, path in quantized.items():
        args = ["eval", str(path), "--text", str(tiny_text), "--ctx", "64", "--chunks", "4"]
        cpp = run_cli(*args, "-b", "llama.cpp", "--json", check=True)
        ref = run_cli(*args, "-b", "torch", "--json", check=True)
        a, b = json.loads(cpp.stdout)["perplexity"], json.loads(ref.stdout)["perplexity"]
        assert np.isfinite(a) and abs(a - b) / b < 0.02, (qtype, a, b)


def test_extra_buffer_types_off_give_the_same_logits(quantized: dict[str, Path]) -> None:
    """CLLM_AMX=off (the fallback for broken AMX) changes only the kernels, not the numbers."""
    import os

    from cllm.core.eval.backends import LlamaCppBackend

    ids = np.arange(5, 69)
    got = {}
    for setting in ("auto", "off"):
        os.environ[guard.ENV] = setting
        try:
            backend = LlamaCppBackend(quantized["Q4_0"], ctx=64, threads=2)
            got[setting] = backend.logits(ids)
            backend.close()
        finally:
            del os.environ[guard.ENV]
    assert got["auto"].shape[0] == 64 and np.isfinite(got["auto"]).all()
    np.testing.assert_allclose(got["off"], got["auto"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("backend", ["llama.cpp", "onnxruntime"])
def test_eval_crash_is_one_line(quantized: dict[str, Path], tiny_model: Path, tiny_text: Path,
                                tmp_path: Path, backend: str) -> None:  # fmt: skip
    """A runtime that dies of SIGSEGV inside the worker: cllm says so in one line, exit 1."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        model = _tiny_onnx_stub(tmp_path, tiny_model)
    else:
        model = quantized["Q4_0"]
    p = run_cli("eval", str(model), "-b", backend, "--text", str(tiny_text), "--ctx", "64",
                "--chunks", "1", env={"CLLM_TEST_CRASH": backend, "NO_COLOR": "1"})  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()
    assert len([ln for ln in last if "error:" in ln]) == 1
    assert last[-1].startswith(f"cllm eval: error: {backend} crashed (signal 11 (SIGSEGV))")
    assert f"while evaluating {model}" in last[-1] and "--debug" in last[-1]


def test_bench_crash_is_one_line(quantized: dict[str, Path]) -> None:
    p = run_cli("bench", str(quantized["Q4_0"]), "--prompt", "8", "--gen", "4", "--repeat", "1",
                env={"CLLM_TEST_CRASH": "llama.cpp"})  # fmt: skip
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm bench: error: llama.cpp crashed (signal 11 (SIGSEGV))"), last
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_bench_records_the_llama_cpp_loading_choice(quantized: dict[str, Path]) -> None:
    p = run_cli("bench", str(quantized["Q4_0"]), "--prompt", "8", "--gen", "4", "--repeat", "1",
                "--json", check=True)  # fmt: skip
    rec = json.loads(p.stdout)
    choice = rec["device"]["llama_cpp_extra_bufts"]
    assert choice["amx_listed"] == guard.amx_listed()
    assert isinstance(choice["extra_bufts"], bool) and choice["why"]
    assert rec["tg_tps"]["median"] > 0


def test_worker_passes_results_and_errors_through(tmp_path: Path) -> None:
    from cllm.core.worker import Worker

    w = Worker("numpy", "testing", "numpy.random:default_rng", 7)
    try:
        big = w.call("standard_normal", (700, 600))  # 3.4 MB: through the shared file
        small = w.call("integers", 0, 100, 5)  # through the pipe
    finally:
        w.close()
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(big, rng.standard_normal((700, 600)))
    np.testing.assert_array_equal(small, rng.integers(0, 100, 5))

    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="not UTF-8 text"):  # the child's typed error, as is
        Worker("python", "reading", "cllm.core.eval.data:read_text_file", binary)


def test_worker_death_is_a_native_crash() -> None:
    from cllm.core.worker import Worker

    w = Worker("sometime", "testing the crash path", "os:getpid")
    w.proc.send_signal(signal.SIGKILL)
    with pytest.raises(NativeCrash) as err:
        w.call("__int__")
    assert "sometime crashed (signal 9 (SIGKILL)) while testing the crash path" in str(err.value)
    assert not w._shared.exists()  # the shared file is gone with the worker


def _tiny_onnx_stub(tmp_path: Path, tiny_model: Path) -> Path:
    """Any ONNX folder will do: the worker dies on its first call, after loading. A real
    export is used by the ONNX tests; here the cheapest graph onnxruntime loads."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "stub.onnx"
    folder.mkdir()
    for tok in tiny_model.glob("tokenizer*"):
        shutil.copy(tok, folder / tok.name)
    vocab, kv, hd = 256, 1, 4
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, kv, "p", hd]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, [1, kv, "p", hd]),
    ]  # fmt: skip
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", vocab]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, kv, "p", hd]),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, [1, kv, "p", hd]),
    ]
    table = helper.make_tensor("table", TensorProto.FLOAT, [vocab, vocab], [0.0] * vocab * vocab)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["logits"]),
        helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
        helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]),
    ]
    graph = helper.make_graph(nodes, "stub", inputs, outputs, initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_off_reaches_the_params_llama_cpp_loads_with() -> None:
    """llama_cpp.Llama offers no argument for use_extra_bufts: the guard hands it default
    params with the field off, through the very function Llama.__init__ calls."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama as llama_module

    assert llama_module.llama_cpp is llama_cpp.llama_cpp  # what Llama.__init__ looks up
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    with guard._default_params_without_extra_bufts(llama_cpp):
        assert not llama_module.llama_cpp.llama_model_default_params().use_extra_bufts
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts


@pytest.mark.slow  # a crashing child (about 20 s); CI runs the slow suite
def test_llama_cpp_quantizer_crash_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    """llama.cpp's own quantizer (K-quants) runs in a worker too: its crash leaves no output."""
    out = tmp_path / "k.gguf"
    args = ["quantize", str(tiny_model), "--gguf-type", "Q4_K_M", "-o", str(out)]
    p = run_cli(*args, env={"CLLM_TEST_CRASH": "llama.cpp's quantizer"})
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm quantize: error: llama.cpp's quantizer crashed (signal 11"), last
    assert not out.exists() and list(tmp_path.iterdir()) == []
    ok = run_cli(*args, check=True)  # and without the crash, the same command works
    assert ok.stdout.strip() == str(out) and out.stat().st_size > 0


def test_a_crash_with_amx_buffers_falls_back_once_without_them(
    quantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU lists AMX and the probe passed, yet llama.cpp crashes: eval runs again,
    once, without the extra buffer types, and says so. The worker stands in for the broken
    AMX path by dying only while it would load with them."""
    from cllm.core.eval.backends import LlamaCppBackend

    monkeypatch.setattr(guard, "amx_listed", lambda *_: True)
    # the probes' answer as a parent hands it down: passed (the worker inherits it too)
    monkeypatch.setenv(guard.PROBED_ENV, "1 probes passed (test)")
    monkeypatch.setattr(guard, "_decision", None)
    monkeypatch.setenv("CLLM_TEST_CRASH", "llama.cpp:extra-bufts")
    monkeypatch.delenv(guard.ENV, raising=False)
    ids = np.arange(5, 69)
    import logging

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("cllm").addHandler(handler)
    backend = LlamaCppBackend(quantized["Q4_0"], ctx=64, threads=2)
    try:
        got = backend.logits(ids)
    finally:
        backend.close()
        logging.getLogger("cllm").removeHandler(handler)
    assert got.shape[0] == 64 and np.isfinite(got).all()
    assert (
        len(said) == 1 and "crashed (signal 11 (SIGSEGV))" in said[0] and "CLLM_AMX=off" in said[0]
    )
    # forced on by the user: no second guess, the crash is the answer
    monkeypatch.setenv(guard.ENV, "on")
    monkeypatch.setattr(guard, "_decision", None)
    backend = LlamaCppBackend(quantized["Q4_0"], ctx=64, threads=2)
    with pytest.raises(NativeCrash):
        backend.logits(ids)
    backend.close()
