"""Power meters for `cllm bench` (cllm.standalone.energy) on fixture folders that mimic each
machine's sysfs, and the runner's `energy` field: absent without a meter, present with one."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cllm.standalone import energy, runner
from tests.conftest import cli_in_process


def _write(path: Path, value: object) -> None:
    """Write a sysfs-like file atomically (a reader never sees it half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def _zone(root: Path, zone: str, name: str, uj: int, wrap: int = 262143999938) -> Path:
    d = root / "sys" / "class" / "powercap" / zone
    _write(d / "name", name)
    _write(d / "energy_uj", uj)
    _write(d / "max_energy_range_uj", wrap)
    return d / "energy_uj"


# --- RAPL ----------------------------------------------------------------------------------


def test_rapl_sums_packages_not_subzones_and_counts_a_wrap(tmp_path: Path) -> None:
    pkg0 = _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    core0 = _zone(tmp_path, "intel-rapl:0:0", "core", 5_000_000)
    dram0 = _zone(tmp_path, "intel-rapl:0:2", "dram", 7_000_000)
    pkg1 = _zone(tmp_path, "intel-rapl:1", "package-1", 9_500_000, wrap=10_000_000)
    core1 = _zone(tmp_path, "intel-rapl:1:0", "core", 100)
    psys = _zone(tmp_path, "intel-rapl:2", "psys", 40_000_000)  # contains the packages
    mmio = _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 1_000_000)  # same package again

    meter = energy.rapl_meter(tmp_path)
    assert meter is not None and meter.source == "rapl"
    assert meter.domains == ["package-0", "package-1"]
    meter.start()
    _write(pkg0, 3_000_000)  # +2 J
    _write(pkg1, 500_000)  # wrapped at 10 J: +0.5 J to the top, +0.5 J after: +1 J
    for f in (core0, dram0, core1, psys, mmio):  # none of these may be added
        _write(f, 90_000_000)
    joules = meter.stop()
    assert joules == pytest.approx(3.0)
    assert meter.seconds > 0


def test_rapl_counts_every_wrap_seen_between_polls(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 900, wrap=1000)
    meter = energy.rapl_meter(tmp_path)
    assert meter is not None
    meter.start()
    for value in (100, 800, 300):  # +200 (wrap), +700, +500 (wrap): what the 1 s poll sees
        _write(pkg, value)
        meter._poll()
    _write(pkg, 350)  # +50
    assert meter.stop() == pytest.approx(1450 / 1e6)


def test_rapl_psys_only_when_there_is_no_package(tmp_path: Path) -> None:
    psys = _zone(tmp_path, "intel-rapl:1", "psys", 0)
    meter = energy.rapl_meter(tmp_path)
    assert meter is not None and meter.domains == ["psys"]
    meter.start()
    _write(psys, 4_000_000)
    assert meter.stop() == pytest.approx(4.0)


def test_mirrored_die_zones_of_one_package_count_once(tmp_path: Path) -> None:
    """Multi-die AMD: one zone per die, all showing the socket's one counter."""
    _zone(tmp_path, "intel-rapl:0", "package-0-die-0", 123_456_789)
    _zone(tmp_path, "intel-rapl:1", "package-0-die-1", 123_456_789)
    _zone(tmp_path, "intel-rapl:2", "package-1-die-0", 123_456_789)  # another socket
    meter = energy.rapl_meter(tmp_path)
    assert meter is not None and meter.domains == ["package-0-die-0", "package-1-die-0"]


def test_rapl_readable_only_by_root_is_no_meter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    os.chmod(counter, 0)  # since Linux 5.10 only root reads it (and root ignores modes: so)
    real = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == "energy_uj":  # what a non-root user gets, also when tests run as root
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert energy.rapl_meter(tmp_path) is None
    assert energy.open_meter(tmp_path) is None  # and no other source in this folder


# --- Jetson INA3221 --------------------------------------------------------------------------


def _hwmon(root: Path, device: str, channels: dict[int, tuple[str, int, int]]) -> Path:
    """JetPack 5/6 layout: in<c>_label, in<c>_input (mV), curr<c>_input (mA)."""
    hw = root / "sys/bus/i2c/drivers/ina3221" / device / "hwmon" / "hwmon3"
    for c, (label, mv, ma) in channels.items():
        _write(hw / f"in{c}_label", label)
        _write(hw / f"in{c}_input", mv)
        _write(hw / f"curr{c}_input", ma)
    # the chip's other files, which are not rails
    _write(hw / "in4_input", 1200)  # shunt voltage, uV
    _write(hw / "curr4_input", 9999)  # sum of currents
    _write(hw / "in7_label", "sum of shunt voltages")
    _write(hw / "in7_input", 3600)
    _write(hw / "update_interval", 140)
    return hw


def _constant_power(meter: energy.Meter, watts: float, seconds: float = 0.25) -> None:
    meter.start()
    time.sleep(seconds)
    joules = meter.stop()
    assert meter.seconds == pytest.approx(seconds, abs=0.15)
    assert joules == pytest.approx(watts * meter.seconds, rel=1e-9)


def test_jetson_hwmon_uses_the_module_input_rail(tmp_path: Path) -> None:
    # Orin Nano / NX on JetPack 6: VDD_IN carries the other two
    _hwmon(tmp_path, "1-0040", {1: ("VDD_IN", 5000, 2000), 2: ("VDD_CPU_GPU_CV", 5000, 700),
                                3: ("VDD_SOC", 5000, 500)})  # fmt: skip
    meter = energy.ina3221_meter(tmp_path)
    assert meter is not None and meter.source == "ina3221" and meter.domains == ["VDD_IN"]
    _constant_power(meter, 10.0)
    assert isinstance(meter, energy.PowerMeter) and len(meter.samples) >= 4  # thread sampled


def test_jetson_hwmon_sums_rails_without_an_input_rail(tmp_path: Path) -> None:
    # AGX Orin: no VDD_IN; unconnected channels are labelled NC
    _hwmon(tmp_path, "1-0040", {1: ("VDD_GPU_SOC", 19000, 400), 2: ("VDD_CPU_CV", 19000, 200),
                                3: ("VIN_SYS_5V0", 5000, 600)})  # fmt: skip
    _hwmon(tmp_path, "1-0041", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 100),
                                3: ("NC", 0, 0)})  # fmt: skip
    meter = energy.ina3221_meter(tmp_path)
    assert meter is not None
    assert meter.domains == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    _constant_power(meter, 7.6 + 3.8 + 3.0 + 0.5)


def test_jetson_iio_layout_of_jetpack4(tmp_path: Path) -> None:
    dev = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for c, (name, mw) in enumerate(
        [("POM_5V_IN", 4000), ("POM_5V_GPU", 900), ("POM_5V_CPU", 1200)]
    ):
        _write(dev / f"rail_name_{c}", name)
        _write(dev / f"in_power{c}_input", mw)
        _write(dev / f"in_voltage{c}_input", 5000)
        _write(dev / f"in_current{c}_input", mw // 5)
    meter = energy.open_meter(tmp_path)  # no RAPL here: the Jetson's rails
    assert meter is not None and meter.source == "ina3221" and meter.domains == ["POM_5V_IN"]
    _constant_power(meter, 4.0)


def test_jetson_iio_rails_without_power_files_multiply_volts_by_amps(tmp_path: Path) -> None:
    # AGX Xavier on JetPack 4: GPU, CPU, SOC / CV, VDDRQ, SYS5V; no input rail
    for device, names in (("1-0040", ("GPU", "CPU", "SOC")), ("1-0041", ("CV", "VDDRQ", "SYS5V"))):
        dev = tmp_path / "sys/bus/i2c/drivers/ina3221x" / device / "iio:device0"
        for c, name in enumerate(names):
            _write(dev / f"rail_name_{c}", name)
            _write(dev / f"in_voltage{c}_input", 1000)  # 1 V x 1 A = 1 W each
            _write(dev / f"in_current{c}_input", 1000)
    meter = energy.ina3221_meter(tmp_path)
    assert meter is not None and len(meter.domains) == 6
    _constant_power(meter, 6.0)


# --- Raspberry Pi 5 --------------------------------------------------------------------------

# `vcgencmd pmic_read_adc` on a Pi 5 (shape as printed by the firmware; values made up)
PMIC = """\
 3V7_WL_SW_A current(0)=0.10000000A
   3V3_SYS_A current(1)=0.20000000A
  VDD_CORE_A current(7)=2.00000000A
      HDMI_A current(22)=0.02000000A
 3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.30000000V
  VDD_CORE_V volt(15)=0.80000000V
      HDMI_V volt(23)=5.00000000V
     EXT5V_V volt(24)=5.10000000V
      BATT_V volt(25)=nanV
"""
PMIC_WATTS = 0.1 * 3.7 + 0.2 * 3.3 + 2.0 * 0.8 + 0.02 * 5.0


def test_pmic_output_pairs_rails_by_name() -> None:
    rails = energy.parse_pmic(PMIC)
    assert sorted(rails) == ["3V3_SYS", "3V7_WL_SW", "HDMI", "VDD_CORE"]  # EXT5V, BATT: no current
    assert rails["VDD_CORE"] == pytest.approx(1.6)
    assert sum(rails.values()) == pytest.approx(PMIC_WATTS)
    assert energy.parse_pmic('error=1 error_msg="Command not registered"') == {}


def test_pi5_vcgencmd_through_the_run_parameter(tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []

    def run(cmd: Any) -> str:
        calls.append(tuple(cmd))
        return PMIC

    meter = energy.open_meter(tmp_path, run=run)  # an empty sysfs: no RAPL, no Jetson
    assert meter is not None and meter.source == "vcgencmd"
    assert meter.domains == ["3V3_SYS", "3V7_WL_SW", "HDMI", "VDD_CORE"]
    _constant_power(meter, PMIC_WATTS, seconds=0.35)
    assert (
        calls[0] == ("vcgencmd", "pmic_read_adc") and len(calls) >= 4
    )  # probe, start, poll(s), stop


def test_no_source_is_no_meter(tmp_path: Path) -> None:
    assert energy.open_meter(tmp_path) is None  # a fixture root: the real vcgencmd is not asked
    assert energy.open_meter(tmp_path, run=lambda cmd: None) is None  # not a Pi / no vcgencmd
    pi4 = 'error=1 error_msg="Command not registered"'  # a Pi before the 5
    assert energy.open_meter(tmp_path, run=lambda cmd: pi4) is None


def test_trapezoid_and_too_few_samples() -> None:
    assert energy.integrate([(0.0, 1.0), (1.0, 3.0), (3.0, 3.0)]) == pytest.approx(8.0)
    assert energy.integrate([(0.0, 5.0)]) == 0.0
    # a stop right after start: the start and stop samples still give an interval
    meter = energy.PowerMeter("test", ["x"], lambda: 2.0, interval=60)
    meter.start()
    time.sleep(0.02)
    assert meter.stop() == pytest.approx(2.0 * meter.seconds) and meter.seconds >= 0.02
    # only one reading succeeded: taken as constant over the interval
    readings = iter([3.0])
    meter = energy.PowerMeter("test", ["x"], lambda: next(readings, None), interval=60)
    meter.start()
    time.sleep(0.02)
    assert meter.stop() == pytest.approx(3.0 * meter.seconds) and meter.seconds >= 0.02
    # nothing read at all: no energy
    meter = energy.PowerMeter("test", ["x"], lambda: None, interval=60)
    meter.start()
    assert meter.stop() == 0.0


# --- the runner ------------------------------------------------------------------------------


class _SleepyModel:
    """Stands in for a runtime: a prompt pass and decode steps of known length."""

    vocab = 1000

    def prefill(self, ids: list[int]) -> int:
        time.sleep(0.06)
        return 1

    def step(self, tok: int) -> int:
        time.sleep(0.01)
        return tok


def test_measure_gives_each_phase_its_average_power() -> None:
    meter = energy.PowerMeter("test", ["x"], lambda: 7.0, interval=0.01)
    runs = [runner.measure(_SleepyModel(), 16, 4, meter) for _ in range(2)]
    for r in runs:
        assert r["prefill_w"] == pytest.approx(7.0) and r["gen_w"] == pytest.approx(7.0)
    rec = runner.energy_record(meter, runs, 16, 4)
    assert rec is not None and rec["source"] == "test" and rec["domains"] == ["x"]
    assert rec["watts"] == pytest.approx(7.0) and rec["prompt_watts"] == pytest.approx(7.0)
    per_token = sorted(7.0 * sum(r["step_s"]) / 4 for r in runs)
    assert rec["joules_per_token"]["min"] == pytest.approx(per_token[0])
    assert rec["joules_per_token"]["max"] == pytest.approx(per_token[1])
    prompt = sorted(7.0 * r["prefill_s"] / 16 for r in runs)
    assert rec["prompt_joules_per_token"]["min"] == pytest.approx(prompt[0])
    assert rec["prompt_joules_per_token"]["median"] == pytest.approx(sum(prompt) / 2)
    # no meter: the runs carry no power and there is no record
    plain = runner.measure(_SleepyModel(), 16, 2)
    assert "gen_w" not in plain and runner.energy_record(None, [plain], 16, 2) is None
    # a meter that read nothing: no record either
    dead = energy.PowerMeter("test", ["x"], lambda: None, interval=0.01)
    assert runner.energy_record(dead, [runner.measure(_SleepyModel(), 16, 2, dead)], 16, 2) is None


WATTS = 10.0


@pytest.fixture
def advancing_rapl(tmp_path: Path) -> Iterator[Path]:
    """A sysfs root with one RAPL package whose counter a thread advances as a steady
    10 W draw would (and a core subzone that must not count)."""
    counter = _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    _zone(tmp_path, "intel-rapl:0:0", "core", 0)
    done = threading.Event()
    t0 = time.perf_counter()

    def advance() -> None:
        while not done.wait(0.001):
            _write(counter, int((time.perf_counter() - t0) * WATTS * 1e6))

    thread = threading.Thread(target=advance, daemon=True)
    thread.start()
    try:
        yield tmp_path
    finally:
        done.set()
        thread.join()


def _bench_in_process(model: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import torch

    monkeypatch.setattr(runner, "copy_bandwidth", lambda: 1e9)  # not what these tests are about
    threads = torch.get_num_threads()
    try:
        return runner.bench(str(model), "torch", 2, prompt=8, gen=48, repeat=1, warmup=0)
    finally:
        torch.set_num_threads(threads)


def test_runner_record_has_no_energy_without_a_meter(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLLM_SYSFS_ROOT", str(tmp_path))  # a machine with no power meter
    rec = _bench_in_process(tiny_model, monkeypatch)
    assert rec["schema"] == "cllm.bench/1" and rec["tg_tps"]["median"] > 0
    assert "energy" not in rec


def test_runner_record_has_energy_from_rapl(
    tiny_model: Path, advancing_rapl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLLM_SYSFS_ROOT", str(advancing_rapl))
    rec = _bench_in_process(tiny_model, monkeypatch)
    e = rec["energy"]
    assert e["source"] == "rapl" and e["domains"] == ["package-0"]
    # the counter thread shares this process's GIL with the model: steps of a few ms
    assert 0.5 * WATTS < e["watts"] < 2 * WATTS
    # one run: joules per token is that run's power over its tokens per second
    assert e["joules_per_token"]["median"] == pytest.approx(e["watts"] / rec["tg_tps"]["median"])
    assert json.loads(json.dumps(rec))["energy"] == e


@pytest.mark.slow  # the real child runner (about 20 s); CI runs the slow suite
def test_cli_json_has_energy_and_the_input_hash(
    tiny_model: Path, advancing_rapl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cllm bench` runs the runner as a child: the meter reads the fixture root it is given,
    while this process advances the counter (no GIL shared, so the power comes out close)."""
    from cllm.formats.inputs import resolve_input

    monkeypatch.setenv("CLLM_SYSFS_ROOT", str(advancing_rapl))
    p = cli_in_process("bench", str(tiny_model), "--prompt", "8", "--gen", "32", "--repeat",
                       "1", "--warmup", "0", "--threads", "2", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["sha256"] == resolve_input(str(tiny_model)).sha256
    assert rec["energy"]["source"] == "rapl"
    assert rec["energy"]["watts"] == pytest.approx(WATTS, rel=0.3)


def _record(name: str, spent: dict[str, Any] | None) -> dict[str, Any]:
    s = {"median": 10.0, "min": 9.0, "max": 11.0}
    rec = {
        "name": name, "backend": "llama.cpp", "file_bytes": 2_000_000, "threads": 2,
        "prompt": 8, "gen": 4, "repeat": 1, "load_s": 0.1, "pp_tps": s, "tg_tps": s,
        "ttft_ms": s, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "peak_rss_bytes": 50_000_000, "device": {"cpu": "test cpu"}, "sha256": "ab" * 32,
        "bandwidth": {"achieved_bytes_per_s": 1e9, "machine_copy_bytes_per_s": 4e9,
                      "fraction_of_copy": 0.25},
        "vs_first": {"tg_tps": 1.0},
    }  # fmt: skip
    if spent is not None:
        rec["energy"] = spent
    return rec


def test_table_and_csv_show_joules_per_token_or_na(capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import io

    from cllm.cli import bench as bench_cli

    spent = {"source": "rapl", "domains": ["package-0"], "watts": 12.3,
             "joules_per_token": {"median": 0.0123, "min": 0.012, "max": 0.013}}  # fmt: skip
    records = [_record("metered", spent), _record("unmetered", None)]
    bench_cli._print_table(records)
    lines = capsys.readouterr().out.splitlines()
    assert any("J/token" in ln for ln in lines)
    assert "0.0123" in next(ln for ln in lines if "metered" in ln and "unmetered" not in ln)
    assert "n/a" in next(ln for ln in lines if "unmetered" in ln)
    bench_cli._print_csv(records)
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(rows[0]["j_per_token"]) == pytest.approx(0.0123)
    assert rows[0]["energy_source"] == "rapl" and rows[0]["sha256"] == "ab" * 32
    assert rows[1]["j_per_token"] == "" and rows[1]["energy_source"] == ""
