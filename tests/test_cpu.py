"""cpu.py: reading /proc/cpuinfo, the ISA class, peak FLOP/s and the per-ISA defaults applied to options left at
auto. No speed is measured or asserted here."""

import re

import pytest

from openvino_reranker import cpu
from openvino_reranker.config import load_config
from openvino_reranker.errors import EXIT_CONFIG, StartupError
from openvino_reranker.parity import serving_properties

AMX_FLAGS = ("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni amx_bf16 "
             "amx_tile amx_int8")


def cpuinfo_text(blocks):
    """A /proc/cpuinfo with one block per (processor, physical id, core id, flags)."""
    out = []
    for processor, physical, core, flags in blocks:
        lines = [f"processor\t: {processor}", "model name\t: Test CPU", "cpu MHz\t\t: 2100.000"]
        if physical is not None:
            lines += [f"physical id\t: {physical}", f"core id\t\t: {core}"]
        lines.append(f"flags\t\t: {flags}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


@pytest.mark.parametrize("flags, expected", [
    (AMX_FLAGS, "amx"),
    ("avx2 fma avx512f avx512bw avx512_bf16", "avx512"),
    ("avx2 fma avx512f", "avx2"),  # AVX-512 F without BW is not the AVX-512 class
    ("avx avx2 fma", "avx2"),
    ("avx avx2", "baseline"),  # no FMA
    ("sse2 sse4_2", "baseline"),
    ("amx_tile avx2 fma", "avx2"),  # tiles without BF16
])
def test_isa_class(flags, expected):
    assert cpu.isa_class(flags.split()) == expected


def test_parse_counts_physical_cores_and_the_allowed_cpus():
    # two sockets of two cores with two threads each: 8 logical CPUs, 4 cores
    blocks = [(n, n // 4, (n // 2) % 2, AMX_FLAGS) for n in range(8)]
    info = cpu.parse_cpuinfo(cpuinfo_text(blocks))
    assert (info.model, info.mhz, info.cores, info.isa) == ("Test CPU", 2100.0, 4, "amx")
    assert cpu.parse_cpuinfo(cpuinfo_text(blocks), allowed={0, 1}).cores == 1  # two threads of one core
    assert cpu.parse_cpuinfo(cpuinfo_text(blocks), allowed={0, 2, 4}).cores == 3


def test_parse_without_topology_counts_each_processor():
    info = cpu.parse_cpuinfo(cpuinfo_text([(0, None, None, "avx2 fma"), (1, None, None, "avx2 fma")]))
    assert (info.cores, info.isa) == (2, "avx2")


def test_read_cpu_of_a_missing_file_is_none(tmp_path):
    assert cpu.read_cpu(str(tmp_path / "absent")) is None


def test_read_cpu_reads_a_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo_text([(0, 0, 0, "avx2 fma")]))
    info = cpu.read_cpu(str(path))
    assert info is not None and info.isa == "avx2" and info.cores == 1


@pytest.mark.parametrize("flags, precision, per_cycle", [
    (AMX_FLAGS, "bf16", 1024),  # one 16x32x16 BF16 tile product (8,192 multiply-adds) per 16 cycles
    (AMX_FLAGS, "int8", 2048),
    (AMX_FLAGS, "f32", 64),  # two AVX-512 FMA ports of 16 lanes
    ("avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni", "bf16", 128),
    ("avx2 fma avx512f avx512bw avx512_vnni", "int8", 256),
    ("avx2 fma avx512f avx512bw", "bf16", 64),  # no BF16 instructions: computed at the f32 rate
    ("avx2 fma", "f32", 32),
    ("avx2 fma avx_vnni", "int8", 128),
    ("avx2 fma", "int8", 64),
])
def test_flops_per_cycle(flags, precision, per_cycle):
    assert cpu.flops_per_cycle(flags.split(), precision) == per_cycle


def test_peak_flops_is_cores_times_clock_times_rate():
    info = cpu.CpuInfo("x", frozenset(AMX_FLAGS.split()), 2, 2100.0)
    assert cpu.peak_flops(info, "bf16") == pytest.approx(2 * 2.1e9 * 1024)
    with pytest.raises(ValueError):
        cpu.peak_flops(info, "fp8")


def test_every_tuned_row_is_a_valid_configuration():
    for isa, row in cpu.TUNED.items():
        assert isa in ("amx", "avx512", "avx2", "baseline")
        config = load_config(["--device", "CPU", "--batch-size", str(row.batch_size), "--pad-multiple",
                              str(row.pad_multiple), "--performance-hint", row.performance_hint, "--replicas",
                              str(row.replicas)], {})
        assert (config.batch_size, config.pad_multiple, config.performance_hint, config.replicas) == (
            row.batch_size, row.pad_multiple, row.performance_hint, row.replicas)


AMX_CPU = cpu.CpuInfo("Test AMX", frozenset(AMX_FLAGS.split()), 2, 2100.0)
AVX2_CPU = cpu.CpuInfo("Test AVX2", frozenset({"avx2", "fma"}), 2, 2100.0)


def test_auto_options_take_the_cpu_row(monkeypatch):
    monkeypatch.setitem(cpu.TUNED, "amx", cpu.Tuning(batch_size=24, pad_multiple=32, performance_hint="throughput"))
    config, tuned = cpu.apply_tuning(load_config(["--device", "CPU"], {}), AMX_CPU)
    assert (config.batch_size, config.pad_multiple, config.performance_hint) == (24, 32, "throughput")
    assert tuned.describe() == {"cpu": "Test AMX", "isa": "amx", "row": "amx",
                                "chosen": {"batch_size": 24, "pad_multiple": 32, "performance_hint": "throughput",
                                           "replicas": 1},
                                "given": []}
    assert not cpu.needs_tuning(config)
    assert serving_properties(config)["PERFORMANCE_HINT"] == "THROUGHPUT"


def test_options_given_win_over_the_row(monkeypatch):
    monkeypatch.setitem(cpu.TUNED, "amx", cpu.Tuning(batch_size=24, pad_multiple=32, performance_hint="throughput"))
    given = load_config(["--device", "CPU", "--batch-size", "4"], {"OPENVINO_RERANKER_PERFORMANCE_HINT": "latency"})
    config, tuned = cpu.apply_tuning(given, AMX_CPU)
    assert (config.batch_size, config.pad_multiple, config.performance_hint) == (4, 32, "latency")
    assert tuned.given == ("batch_size", "performance_hint") and dict(tuned.chosen) == {"pad_multiple": 32,
                                                                                          "replicas": 1}


def test_the_amx_row_runs_two_replicas_unless_streams_are_asked_for():
    config, tuned = cpu.apply_tuning(load_config(["--device", "CPU"], {}), AMX_CPU)
    assert (config.replicas, config.performance_hint) == (2, "latency") and tuned.chosen["replicas"] == 2
    for streams in (["--performance-hint", "throughput"], ["--num-streams", "2"]):
        config, tuned = cpu.apply_tuning(load_config(["--device", "CPU", *streams], {}), AMX_CPU)
        assert config.replicas == 1 and tuned.chosen["replicas"] == 1
    config, tuned = cpu.apply_tuning(load_config(["--device", "CPU", "--replicas", "3"], {}), AMX_CPU)
    assert config.replicas == 3 and "replicas" in tuned.given
    config, _ = cpu.apply_tuning(load_config(["--device", "CPU"], {}), AVX2_CPU)
    assert config.replicas == 1


@pytest.mark.parametrize("argv, message", [
    (["--device", "NPU", "--replicas", "2"], "replicas above 1 are for the CPU device only (device NPU)"),
    (["--device", "CPU", "--replicas", "2", "--performance-hint", "throughput"], "run one stream each"),
    (["--device", "CPU", "--replicas", "2", "--num-streams", "2"], "run one stream each"),
])
def test_replicas_refuse_other_devices_and_streams(argv, message):
    with pytest.raises(StartupError, match=re.escape(message)) as caught:
        load_config(argv, {})
    assert caught.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("device, info", [("CPU", AVX2_CPU), ("CPU", None), ("NPU", AMX_CPU), ("GPU", AMX_CPU)])
def test_without_a_row_the_untuned_defaults_apply(device, info, monkeypatch):
    monkeypatch.setattr(cpu, "TUNED", {"amx": cpu.Tuning(24, 32, "throughput")})
    config, tuned = cpu.apply_tuning(load_config(["--device", device], {}), info)
    assert (config.batch_size, config.pad_multiple, config.performance_hint) == (8, 8, "latency")
    assert tuned.row == "untuned"
    assert tuned.isa == ("avx2" if device == "CPU" and info is not None else "")


def test_an_unresolved_hint_compiles_as_latency():
    assert serving_properties(load_config([], {}))["PERFORMANCE_HINT"] == "LATENCY"
