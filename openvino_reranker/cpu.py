"""The CPU this process runs on, from /proc/cpuinfo: its ISA class (AMX, AVX-512, AVX2), cores and clock; the
micro-batch and stream defaults measured for each ISA class (`TUNED`, applied by `tune`), and the peak FLOP/s per
precision that bench/bench.py compares achieved FLOP/s with.

Why a table: micro-batch size, padding multiple and stream count were first tuned on an AVX2 EPYC; an AMX Xeon
scores fastest with other values (docs/performance.md, "Micro-batch size, padding and streams", has the sweep each
row comes from). A row changes only the defaults: an option given on the command line or in the environment wins,
and every compile still goes through the parity guard (parity.py), which falls back to one stream when two score
wrongly (INT8 weight-only IRs on AMX do) and checks every replica.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .config import Config

CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int  # physical cores this process may run on (a VM's vCPU counts as one unless it reports siblings)
    mhz: float  # the clock /proc/cpuinfo reports (nominal on most VMs; turbo is not counted)

    @property
    def isa(self) -> str:
        return isa_class(self.flags)


def isa_class(flags: Iterable[str]) -> str:
    """`amx` (AMX tiles with BF16), `avx512` (AVX-512 F and BW), `avx2` (AVX2 with FMA) or `baseline`."""
    flags = set(flags)
    if {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


def parse_cpuinfo(text: str, allowed: Iterable[int] | None = None) -> CpuInfo:
    """The CpuInfo of /proc/cpuinfo's `text`, counting only the logical CPUs in `allowed` (None: all). Physical
    cores are the distinct (physical id, core id) pairs; a processor block without them counts as a core."""
    allowed_set = None if allowed is None else set(allowed)
    model, flags, mhz = "unknown CPU", frozenset(), 0.0
    cores: set[tuple[str, str] | int] = set()
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        try:
            number = int(fields["processor"])
        except ValueError:
            continue
        if allowed_set is not None and number not in allowed_set:
            continue
        if model == "unknown CPU":
            model = fields.get("model name", model)
            flags = frozenset(fields.get("flags", "").split())
            try:
                mhz = float(fields.get("cpu MHz", "0"))
            except ValueError:
                mhz = 0.0
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
        else:
            cores.add(number)
    return CpuInfo(model, flags, max(1, len(cores)), mhz)


def read_cpu(path: str = CPUINFO) -> CpuInfo | None:
    """This machine's CPU (the CPUs this process may run on), or None where /proc/cpuinfo cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    return parse_cpuinfo(text, allowed)


# ------------------------------------------------------------------------------------------------ peak FLOP/s

# Dense multiply-add work per core and cycle (a multiply-add counts 2), by the widest unit the ISA has for the
# precision: AMX TMUL does a 16x32 by 32x16 BF16 tile product (8,192 multiply-adds) every 16 cycles and twice that
# in INT8; AVX-512 and AVX2 assume two FMA ports (16 or 8 f32 lanes), VDPBF16PS doubles f32 and VNNI quadruples it.
def flops_per_cycle(flags: Iterable[str], precision: str) -> int:
    """Peak multiply-add operations x 2 per core and cycle for `precision` (f32, bf16, f16 or int8)."""
    flags = set(flags)
    isa = isa_class(flags)
    lanes = {"amx": 16, "avx512": 16, "avx2": 8}.get(isa, 4)
    f32 = 2 * 2 * lanes  # two FMA ports
    if precision == "f32":
        return f32
    if precision == "bf16":
        if isa == "amx":
            return 1024
        return 2 * f32 if "avx512_bf16" in flags else f32
    if precision == "f16":
        if "amx_fp16" in flags:
            return 1024
        return 2 * f32 if "avx512_fp16" in flags else f32
    if precision == "int8":
        if "amx_int8" in flags:
            return 2048
        return 4 * f32 if {"avx512_vnni", "avx_vnni"} & flags else 2 * f32
    raise ValueError(f"unknown precision {precision!r}")


def peak_flops(cpu: CpuInfo, precision: str) -> float:
    """The CPU's peak dense FLOP/s (OP/s for int8) for `precision`: cores x clock x `flops_per_cycle`."""
    return cpu.cores * cpu.mhz * 1e6 * flops_per_cycle(cpu.flags, precision)


# ------------------------------------------------------------------------------------------------ defaults per ISA


@dataclass(frozen=True)
class Tuning:
    """Micro-batch defaults for a CPU class: pairs per micro-batch, the padding multiple of its length, the
    PERFORMANCE_HINT (latency = one stream, throughput = the plugin's streams, two on two cores) and the number of
    replicas (independent one-stream compiles side by side, each with its share of the cores; parity.py serves more
    than one only for CLS-pooled encoders)."""

    batch_size: int
    pad_multiple: int
    performance_hint: str
    replicas: int = 1


# The values before this table (measured on an AVX2 EPYC, 2026-11): every device and CPU class not in TUNED.
UNTUNED = Tuning(batch_size=8, pad_multiple=8, performance_hint="latency", replicas=1)
# AMX: lengths padded to a multiple of 16 (AMX tiles have 16 rows) were 1.07x (middle half 1.03-1.15) the old
# defaults at 100 documents and 1.14x (1.04-1.27) at 20, in process, fp32 IR at bf16, interleaved over 10 blocks;
# two replicas of one thread each, with the pooled-row rewrite, about 1.3x at 100 documents and 1.2x at 20
# (docs/performance.md). Replicas rather than two streams of one compile: on AMX a two-stream compile of an INT8
# weight-only IR scores garbage, while two one-thread compiles of it score right, and each replica is checked by
# the parity guard. An INT8 weight-only IR was slower on two replicas: parity.replicas_for leaves it to one compile.
# Batches of 4, 16, 32 and 64, and multiples of 1, 32 and 64, were no faster.
TUNED: Mapping[str, Tuning] = {
    "amx": Tuning(batch_size=8, pad_multiple=16, performance_hint="latency", replicas=2),
}


@dataclass(frozen=True)
class Tuned:
    """What `tune` chose and why, for the log and /readyz."""

    cpu: str  # model name, or "" when the device is not the CPU or /proc/cpuinfo could not be read
    isa: str  # amx, avx512, avx2, baseline; "" when not the CPU
    row: str  # the TUNED row applied ("untuned" when none)
    chosen: Mapping[str, int | str]  # the values the row gave to options left at auto
    given: tuple[str, ...]  # options set explicitly, kept as given

    def describe(self) -> dict:
        return {"cpu": self.cpu or None, "isa": self.isa or None, "row": self.row, "chosen": dict(self.chosen),
                "given": list(self.given)}


def tuning_for(device: str, cpu: CpuInfo | None) -> tuple[str, Tuning]:
    """The TUNED row for `device` on `cpu`: only the CPU device has rows; anything else is UNTUNED."""
    if device != "CPU" or cpu is None or cpu.isa not in TUNED:
        return "untuned", UNTUNED
    return cpu.isa, TUNED[cpu.isa]


def tune(auto: Mapping[str, bool], device: str, cpu: CpuInfo | None) -> tuple[dict[str, int | str], Tuned]:
    """The values for the tunable options that are at auto (`auto[name]` True), from the row for `device` on
    `cpu`, and the record of the choice."""
    row, tuning = tuning_for(device, cpu)
    chosen = {name: getattr(tuning, name) for name, is_auto in auto.items() if is_auto}
    given = tuple(name for name, is_auto in auto.items() if not is_auto)
    on_cpu = device == "CPU" and cpu is not None
    return chosen, Tuned(cpu.model if on_cpu else "", cpu.isa if on_cpu else "", row, chosen, given)


# ------------------------------------------------------------------------------------------------ the options

# The options a TUNED row sets, and the value that leaves each to the row ("auto").
AUTO_VALUES: Mapping[str, int | str] = {"batch_size": 0, "pad_multiple": 0, "performance_hint": "auto",
                                        "replicas": 0}


def needs_tuning(config: Config) -> bool:
    return any(getattr(config, name) == value for name, value in AUTO_VALUES.items())


def apply_tuning(config: Config, cpu: CpuInfo | None) -> tuple[Config, Tuned]:
    """`config` with every tunable option left at auto set from the row for its device on `cpu` (read it with
    `read_cpu`; None: no row applies), and the record of what was chosen."""
    auto = {name: getattr(config, name) == value for name, value in AUTO_VALUES.items()}
    chosen, tuned = tune(auto, config.device, cpu)
    config = replace(config, **chosen)
    if auto["replicas"] and (config.performance_hint == "throughput" or config.num_streams > 1):
        config = replace(config, replicas=1)  # streams asked for: one compile runs them, not one per replica
        tuned = replace(tuned, chosen={**tuned.chosen, "replicas": 1})
    return config, tuned
