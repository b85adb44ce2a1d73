"""Energy used over an interval, from whatever power meter this machine exposes.

Standalone on purpose, like `runner.py`: standard library only, because edge bundles and
`cllm bench --remote` ship it beside the runner to boards that have only Python, numpy and a
runtime. Every reader takes the filesystem root as a parameter (default "/") so tests can
point it at a folder that mimics a board's sysfs.

    meter = open_meter()            # None: this machine reports no power we can read
    meter.start(); work(); joules = meter.stop()   # meter.seconds: the interval covered

Sources, tried in this order:

1. `rapl`: x86 RAPL energy counters through the powercap interface,
   `/sys/class/powercap/intel-rapl:<N>/energy_uj` (microjoules, wrapping at
   `max_energy_range_uj`). AMD processors expose the same interface under the same
   `intel-rapl` names. The top-level package zones are summed (`intel-rapl:0`,
   `intel-rapl:1`, one per socket); their children (`intel-rapl:0:0` core, uncore, dram) are
   parts of the package and never added. `psys` (platform) is used only when there is no
   package zone, as it contains the packages. `intel-rapl-mmio:*` repeats the package
   through another interface and is not read. Multi-die AMD parts list one zone per die
   (`package-0-die-0`, `package-0-die-1`) that all mirror one socket counter: zones of one
   package whose counters read the same (within 1 J) count once. Since Linux 5.10
   `energy_uj` is readable only by root (CVE-2020-8694): permission denied means
   "no meter", not an error.
2. `ina3221`: the INA3221 monitors on NVIDIA Jetson modules, read as instantaneous power and
   integrated over time (trapezoid rule) from a background thread, every 50 ms.
   - JetPack 5 and 6 (Jetson Linux r34 and later; Orin, and Xavier on JetPack 5): the
     mainline hwmon driver, `/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/`
     with `in<c>_label` (rail name, "NC" when unconnected), `in<c>_input` (bus voltage, mV)
     and `curr<c>_input` (mA) for channels c = 1..3. (`in4`-`in6` are shunt voltages and
     `in7`/`curr4` sums; they are not rails.)
   - JetPack 4 (Jetson Linux r32; Nano, TX1, TX2, Xavier): NVIDIA's own IIO driver,
     `/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device<N>/` with `rail_name_<c>` and
     `in_power<c>_input` (mW; or `in_voltage<c>_input` mV x `in_current<c>_input` mA) for
     channels c = 0..2.
   The module's input rail (`VDD_IN`; `POM_5V_IN` on the Nano) is used when there is one,
   since the other rails are parts of it; otherwise (AGX Xavier, AGX Orin) the rails are
   summed. Carrier-board rails are not included.
3. `vcgencmd`: the Raspberry Pi 5's PMIC through `vcgencmd pmic_read_adc`, which prints one
   line per reading, e.g. `  VDD_CORE_A current(7)=2.12345678A` and
   `  VDD_CORE_V volt(15)=0.72000000V` (the numbers in brackets are ADC channels and differ
   between a rail's current and its voltage). Power is the sum over rails of volts x amps,
   rails matched by name; readings without a partner (`EXT5V_V`, the 5 V input, has no
   current) are left out, so this is the power of the PMIC's rails (SoC, DRAM, IO), not what
   the board draws at its USB-C input. Sampled every 100 ms in a background thread (each
   sample runs the command once) and integrated.

A meter measures the whole machine's (or module's) power, not this process's: other work on
the machine counts too, and idle power is not subtracted.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

Run = Callable[[Sequence[str]], "str | None"]

SYSFS_SAMPLE_S = 0.05  # INA3221: sysfs reads are cheap
VCGENCMD_SAMPLE_S = 0.1  # each sample starts a process
RAPL_POLL_S = 1.0  # counters need reading only often enough to see every wrap-around
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "5V_IN")  # a Jetson module's input: the others are parts
MIRROR_UJ = 1_000_000  # die zones of one package closer than this (1 J) mirror one counter
PMIC_COMMAND = ("vcgencmd", "pmic_read_adc")

_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>\S+?)[AV]\s*$"
)


def _read_text(path: Path) -> str | None:
    """A sysfs file's content, or None when it is absent or unreadable (permission denied)."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def integrate(samples: Sequence[tuple[float, float]]) -> float:
    """Joules from (seconds, watts) samples, by the trapezoid rule."""
    return sum(
        (t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:], strict=False)
    )


class Meter:
    """Energy over the interval between `start()` and `stop()`; `seconds` is how long the
    last interval was, so `joules / seconds` is its average power."""

    source = "?"
    interval = SYSFS_SAMPLE_S

    def __init__(self, domains: list[str]) -> None:
        self.domains = domains  # what is measured: zone or rail names
        self.seconds = 0.0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("meter already started")
        self._halt.clear()
        self._begin()
        self._thread = threading.Thread(
            target=self._loop, name=f"energy-{self.source}", daemon=True
        )
        self._thread.start()

    def stop(self) -> float:
        """Joules since `start()` (0.0 when nothing could be read)."""
        if self._thread is None:
            raise RuntimeError("meter not started")
        self._halt.set()
        self._thread.join()
        self._thread = None
        return self._end()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            self._poll()

    def _begin(self) -> None:
        raise NotImplementedError

    def _poll(self) -> None:
        raise NotImplementedError

    def _end(self) -> float:
        raise NotImplementedError


class _Counter:
    """One RAPL zone's energy counter."""

    def __init__(self, name: str, path: Path, wrap: int) -> None:
        self.name, self.path, self.wrap = name, path, wrap

    def read(self) -> int | None:
        text = _read_text(self.path)
        return int(text) if text and text.isdigit() else None


class RaplMeter(Meter):
    """Sum of RAPL package counters, read at start and stop (and every second between, so a
    counter that wraps more than once in a long interval is still counted right)."""

    source = "rapl"
    interval = RAPL_POLL_S

    def __init__(self, counters: list[_Counter]) -> None:
        super().__init__([c.name for c in counters])
        self.counters = counters
        self._last: list[int | None] = []
        self._uj = 0
        self._t0 = 0.0

    def _begin(self) -> None:
        self._uj = 0
        self._t0 = time.perf_counter()
        self._last = [c.read() for c in self.counters]

    def _poll(self) -> None:
        for i, c in enumerate(self.counters):
            now, last = c.read(), self._last[i]
            if now is None:
                continue  # a failed read: the next one covers the gap
            if last is not None:
                delta = now - last
                if delta < 0:  # wrapped around (or, without a known range, nothing to add)
                    delta = delta + c.wrap if c.wrap > 0 else 0
                self._uj += max(delta, 0)
            self._last[i] = now

    def _end(self) -> float:
        self._poll()
        self.seconds = time.perf_counter() - self._t0
        return self._uj / 1e6


def _zone_index(path: Path) -> list[int]:
    try:
        return [int(p) for p in path.name.split(":")[1:]]
    except ValueError:
        return []


def rapl_meter(root: str | Path = "/") -> RaplMeter | None:
    """The RAPL package counters under `root`, or None when there are none we may read."""
    base = Path(root) / "sys" / "class" / "powercap"
    zones = []
    for d in sorted(base.glob("intel-rapl:*"), key=_zone_index):
        if len(_zone_index(d)) == 1:  # intel-rapl:0, not the subzone intel-rapl:0:0
            zones.append((_read_text(d / "name") or d.name, d))
    chosen = [z for z in zones if z[0].startswith("package")] or [
        z for z in zones if z[0].startswith("psys")
    ]
    counters: list[_Counter] = []
    seen: dict[str, int] = {}  # package ("package-0") -> a die's counter value
    for name, d in chosen:
        counter = _Counter(name, d / "energy_uj", int(_read_number(d / "max_energy_range_uj") or 0))
        value = counter.read()
        if value is None:  # absent, or readable only by root
            continue
        package = name.split("-die-")[0]
        if "-die-" in name and package in seen and abs(seen[package] - value) <= MIRROR_UJ:
            continue  # another die's view of the same socket counter
        seen.setdefault(package, value)
        counters.append(counter)
    return RaplMeter(counters) if counters else None


class PowerMeter(Meter):
    """Integrates instantaneous power (watts from `read_watts`) sampled by a thread."""

    def __init__(
        self,
        source: str,
        domains: list[str],
        read_watts: Callable[[], float | None],
        interval: float,
    ) -> None:
        super().__init__(domains)
        self.source = source
        self.interval = interval
        self.read_watts = read_watts
        self.samples: list[tuple[float, float]] = []
        self._t0 = 0.0

    def _sample(self) -> None:
        t = time.perf_counter()
        watts = self.read_watts()
        if watts is not None:  # stamped at the middle of the read (a command takes a while)
            self.samples.append(((t + time.perf_counter()) / 2, watts))

    def _begin(self) -> None:
        self.samples = []
        self._t0 = time.perf_counter()
        self._sample()

    def _poll(self) -> None:
        self._sample()

    def _end(self) -> float:
        self._sample()
        if len(self.samples) >= 2:
            self.seconds = self.samples[-1][0] - self.samples[0][0]
            return integrate(self.samples)
        self.seconds = time.perf_counter() - self._t0
        # one reading: take the power as constant over the interval; none: nothing known
        return self.samples[0][1] * self.seconds if self.samples else 0.0


def _ina3221_rails(root: Path) -> list[tuple[str, Callable[[], float | None]]]:
    """(rail name, reader of its watts) for every connected INA3221 channel under `root`."""
    drivers = root / "sys" / "bus" / "i2c" / "drivers"
    rails: list[tuple[str, Callable[[], float | None]]] = []

    def product(volts: Path, amps: Path) -> Callable[[], float | None]:
        def read() -> float | None:
            mv, ma = _read_number(volts), _read_number(amps)
            return None if mv is None or ma is None else mv * ma / 1e6

        return read

    def milliwatts(path: Path) -> Callable[[], float | None]:
        def read() -> float | None:
            mw = _read_number(path)
            return None if mw is None else mw / 1e3

        return read

    # JetPack 5 and later: hwmon, channels 1..3
    for hw in sorted(drivers.glob("ina3221/*/hwmon/hwmon*")):
        for c in (1, 2, 3):
            label = _read_text(hw / f"in{c}_label")
            if label and label.upper() != "NC":
                rails.append((label, product(hw / f"in{c}_input", hw / f"curr{c}_input")))
    # JetPack 4: NVIDIA's IIO driver, channels 0..2
    for dev in sorted(drivers.glob("ina3221x/*/iio:device*")):
        for c in (0, 1, 2):
            name = _read_text(dev / f"rail_name_{c}")
            if not name or name.upper() == "NC":
                continue
            if (dev / f"in_power{c}_input").exists():
                rails.append((name, milliwatts(dev / f"in_power{c}_input")))
            else:
                rails.append(
                    (name, product(dev / f"in_voltage{c}_input", dev / f"in_current{c}_input"))
                )
    return [(n, r) for n, r in rails if r() is not None]  # only rails we can actually read


def ina3221_meter(root: str | Path = "/", interval: float = SYSFS_SAMPLE_S) -> PowerMeter | None:
    """A Jetson's INA3221 power: the module input rail if there is one, else all rails."""
    rails = _ina3221_rails(Path(root))
    total = [r for r in rails if r[0].upper() in TOTAL_RAILS][:1]
    chosen = total or rails
    if not chosen:
        return None
    readers = [r for _, r in chosen]

    def read_watts() -> float | None:
        values = [r() for r in readers]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    return PowerMeter("ina3221", [n for n, _ in chosen], read_watts, interval)


def parse_pmic(text: str) -> dict[str, float]:
    """Watts per rail from `vcgencmd pmic_read_adc` output: volts x amps, paired by name."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        if value != value:  # "nan" (e.g. BATT_V without a battery)
            continue
        (amps if m["unit"] == "A" else volts)[m["rail"]] = value
    return {rail: volts[rail] * amps[rail] for rail in sorted(amps) if rail in volts}


def run_command(cmd: Sequence[str]) -> str | None:
    """A command's stdout, or None if it is missing, fails or takes over 5 s."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 and out.stdout.strip() else None


def vcgencmd_meter(
    run: Run | None = None, interval: float = VCGENCMD_SAMPLE_S
) -> PowerMeter | None:
    """A Raspberry Pi 5's PMIC rails through `vcgencmd pmic_read_adc` (`run` gives a
    command's output; tests pass fixture text), or None where the command gives no rails."""
    runner = run or run_command

    def rails() -> dict[str, float]:
        text = runner(PMIC_COMMAND)
        return parse_pmic(text) if text else {}

    first = rails()
    if not first:
        return None

    def read_watts() -> float | None:
        watts = rails()
        return sum(watts.values()) if watts else None

    return PowerMeter("vcgencmd", sorted(first), read_watts, interval)


def open_meter(root: str | Path = "/", run: Run | None = None) -> Meter | None:
    """The first power source this machine has (RAPL, INA3221, vcgencmd), or None.

    With a `root` other than "/" (a folder that stands in for a machine's filesystem) the
    real `vcgencmd` is not asked, since it would describe this machine; pass `run` to give
    its output."""
    root = Path(root)
    meter: Meter | None = rapl_meter(root) or ina3221_meter(root)
    if meter is None and (run is not None or root == Path("/")):
        meter = vcgencmd_meter(run)
    return meter
