"""Startup order and exit codes: real processes for the port check and signals, an injected Core for the NPU
fail-closed logic (no NPU exists on any machine this runs on: see SPEC.md, "What was verified where")."""

import signal
import socket
import threading

import openvino as ov
import pytest
from support.engines import FakeCore
from support.http import request
from support.servers import RunningServer, run_server, spawn_ready_server
from support.waiting import wait_until

from openvino_reranker.engine import check_device_available
from openvino_reranker.errors import EXIT_CONFIG, EXIT_DEVICE, EXIT_MODEL, EXIT_PORT, EXIT_STARTUP_CHECK, StartupError
from openvino_reranker.startup import main


def npu_args(model, counter):
    return ["--device", "NPU", "--model-dir", str(model.path), "--npu-busy-path", str(counter), "--cache-dir", ""]


def test_npu_proof_passes_when_the_counter_grows_on_the_npu(tiny_model, tmp_path):
    counter = tmp_path / "npu_busy_time_us"
    counter.write_text("1000\n")
    core = FakeCore(claim=["NPU"], counter=counter)
    srv = RunningServer(npu_args(tiny_model, counter), core=core).wait_ready()
    try:
        status, ready, _ = request(srv.port, "GET", "/readyz")
        assert status == 200 and ready["execution_devices"] == ["NPU.4000"]
        assert ready["shape_mode"] == "static" and ready["buckets"] == ["8x64", "8x128"]
        assert ready["startup_check"]["npu_busy_delta_us"] > 0
        # every compiled variant had a static shape (to_shape() raised otherwise) matching the buckets
        assert sorted(s[0] for s in core.shapes) == [[8, 64], [8, 128]]
        status, body, _ = request(srv.port, "POST", "/rerank", {"query": "solar power", "documents": ["sun", "cat"]})
        assert status == 200 and body["device"] == "NPU" and body["npu_busy_delta_us"] == 250
    finally:
        srv.close()
    assert srv.exit_code == 0


@pytest.mark.parametrize("case, needle", [
    ("counter_static", "did not grow"),
    ("counter_missing", "cannot read the NPU busy counter"),
    ("runs_on_cpu", "OpenVINO executes on CPU"),
])
def test_npu_fails_closed(tiny_model, tmp_path, capsys, case, needle):
    counter = tmp_path / "npu_busy_time_us"
    if case != "counter_missing":
        counter.write_text("1000\n")
    core = FakeCore(claim=["NPU"], counter=counter, bump=case != "counter_static",
                    execution_devices=("CPU",) if case == "runs_on_cpu" else ("NPU.3720",))
    # main() on its own thread: it must fail closed (were the check to pass, wait_exit stops it and fails)
    srv = RunningServer(npu_args(tiny_model, counter), core=core)
    port = srv.port
    code = srv.wait_exit()
    assert code == EXIT_STARTUP_CHECK
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("openvino-reranker: error:") and needle in err
    with socket.socket() as s:  # the port was released on the way out
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("device, available, ok", [
    ("NPU", ["CPU"], False), ("NPU", ["CPU", "NPU"], True), ("GPU", ["CPU", "GPU.0", "GPU.1"], True),
    ("GPU.1", ["CPU", "GPU.0"], False), ("AUTO:NPU,CPU", ["CPU"], True), ("AUTO:NPU,GPU", ["CPU"], False),
    ("AUTO", ["CPU"], True), ("CPU", ["CPU"], True),
])
def test_device_availability(device, available, ok):
    if ok:
        check_device_available(device, available)
    else:
        with pytest.raises(StartupError) as info:
            check_device_available(device, available)
        assert info.value.exit_code == EXIT_DEVICE
        assert f"OpenVINO sees: {', '.join(available)}" in str(info.value) and "--device" in str(info.value)


# ---- real processes


def test_port_in_use_exits_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a model dir that does not exist proves the port is checked first
        result = run_server(["--port", str(port), "--device", "CPU", "--model-dir", str(tmp_path / "none")])
    assert result.returncode == EXIT_PORT
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr and "does not exist" not in result.stderr


def test_bad_config_value_exit_code():
    result = run_server([], {"OPENVINO_RERANKER_PORT": "http"})
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip() == "openvino-reranker: error: bad value for OPENVINO_RERANKER_PORT: 'http' is not " \
                                    "an integer"


def test_missing_model_dir_exit_code(tmp_path):
    result = run_server(["--port", "0", "--device", "CPU", "--model-dir", str(tmp_path / "none")])
    assert result.returncode == EXIT_MODEL and "optimum-cli export openvino" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("typed, args, env", [
    ("./models//missing/", ["--model", "./models//missing/"], {}),
    ("~/missing", ["--model-dir", "~/missing"], {}),
    ("~/missing", [], {"OPENVINO_RERANKER_MODEL_DIR": "~/missing"}),
])
def test_a_missing_model_dir_is_named_as_typed_and_points_to_the_hub_first(tmp_path, monkeypatch, capsys, typed, args,
                                                                           env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    stop = threading.Event()
    stop.set()
    assert main(["--port", "0", "--device", "CPU", *args], env, stop=stop) == EXIT_MODEL
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"openvino-reranker: error: model directory {typed} does not exist")
    looked = tmp_path / ("models/missing" if typed.startswith(".") else "missing")
    assert f"(looked for {looked})" in line  # where that is, for a relative path or ~
    assert line.index("--model ORG/NAME") < line.index("optimum-cli export openvino")  # the Hub first, then export


def test_a_misspelled_variable_is_named_with_the_closest_option(tiny_model):
    """The issue's case: OPENVINO_RERANKER_DEVIC=CPU was silently ignored, and the start failed on the NPU."""
    result = run_server(["--port", "0", "--model-dir", str(tiny_model.path), "--cache-dir", ""],
                        {"OPENVINO_RERANKER_DEVIC": "CPU", "OPENVINO_RERANKER_LOG_LEVL": "DEBUG"})
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line and "is not an option" in line]
    assert len(warnings) == 2, result.stderr  # one line each
    assert "OPENVINO_RERANKER_DEVIC is not an option (did you mean OPENVINO_RERANKER_DEVICE?); ignored" in warnings[0]
    assert "OPENVINO_RERANKER_LOG_LEVL is not an option (did you mean OPENVINO_RERANKER_LOG_LEVEL?)" in warnings[1]


def test_strict_env_makes_an_unknown_variable_a_configuration_error():
    with socket.socket() as taken:  # nothing is bound: the configuration fails first
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_server(["--port", str(taken.getsockname()[1]), "--strict-env"],
                            {"OPENVINO_RERANKER_DEVIC": "CPU"})
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip() == "openvino-reranker: error: OPENVINO_RERANKER_DEVIC is not an option (did you " \
                                    "mean OPENVINO_RERANKER_DEVICE?); --strict-env refuses unknown " \
                                    "OPENVINO_RERANKER_* variables"


def test_npu_on_a_machine_without_one_names_the_available_devices(tiny_model):
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    result = run_server(["--port", "0", "--model-dir", str(tiny_model.path), "--cache-dir", ""])
    assert result.returncode == EXIT_DEVICE
    assert "device NPU is not available" in result.stderr and "CPU" in result.stderr
    assert "OPENVINO_RERANKER_DEVICE" in result.stderr


def test_sigterm_stops_the_server_with_exit_0(tiny_model):
    proc, _ = spawn_ready_server(tiny_model)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_second_sigterm_ends_the_drain_grace(tiny_model):
    proc, port = spawn_ready_server(tiny_model, ("--drain-grace-s", "600"))
    try:
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: request(port, "GET", "/readyz")[0] == 503, 10, "/readyz turning 503")
        assert request(port, "GET", "/healthz")[0] == 200  # serving through the grace
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # not 600 s later
    finally:
        proc.kill()
        proc.wait()


# ---- log lines a person reads (issue 19, item 7)

def test_the_cache_use_is_said_in_words():
    from openvino_reranker.startup import describe_cache_use

    assert describe_cache_use((False,)) == "compiled anew"
    assert describe_cache_use((True,)) == "loaded from the compile cache"
    assert describe_cache_use((True, True, True)) == "all 3 loaded from the compile cache"
    assert describe_cache_use((False, False)) == "all 2 compiled anew"
    assert describe_cache_use((True, False, True)) == "2 of 3 loaded from the compile cache"


def test_the_log_says_port_claimed_then_ready_then_the_exit_status(tiny_model):
    from support.servers import spawn_ready_server

    proc, _ = spawn_ready_server(tiny_model)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    lines = [line for line in stderr.splitlines() if " INFO " in line or " WARNING " in line]
    claimed = next(i for i, line in enumerate(lines) if "port claimed: http://127.0.0.1:" in line)
    ready = next(i for i, line in enumerate(lines) if "ready: model" in line)
    assert claimed < ready and "loading the model" in lines[claimed] and "listening" not in stderr
    assert "compiled anew" in lines[ready] and "(False,)" not in stderr
    assert lines[-1].endswith("stopped; exit status 0")
