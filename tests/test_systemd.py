"""Readiness notification over a real AF_UNIX datagram socket, and the user unit file."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from support import ROOT
from support.http import request
from support.servers import free_port

from openvino_reranker.systemd import sd_notify

UNIT = ROOT / "openvino-reranker.service"


def notify_socket(tmp_path, abstract=False):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"openvino-reranker-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(60)
    return sock, address


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_one_datagram(tmp_path, abstract):
    sock, address = notify_socket(tmp_path, abstract)
    with sock:
        assert sd_notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": address}) is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_sd_notify_without_a_socket_does_nothing(tmp_path):
    assert sd_notify("READY=1", {}) is False
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False  # logged, not raised
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def start(args, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENVINO_RERANKER_")}
    env.update(env_extra)
    return subprocess.Popen([sys.executable, str(ROOT / "server.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_server_notifies_ready_only_when_ready_and_stopping_on_sigterm(tiny_model, tmp_path):
    sock, address = notify_socket(tmp_path)
    port = free_port()
    proc = start(["--port", str(port), "--device", "CPU", "--shape-mode", "static", "--buckets", "4x64,4x128",
                  "--model-dir", str(tiny_model.path), "--cache-dir", "", "--replicas", "1"],
                 {"NOTIFY_SOCKET": address})
    try:
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        # at READY=1 the service must already answer ready
        assert request(port, "GET", "/readyz")[0] == 200
        extends = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
        assert len(extends) == 3 and "shape 4x64" in extends[0] and "shape 4x128" in extends[1]
        assert "f32 CPU reference" in extends[2]  # the startup parity check
        assert messages.index(extends[-1]) < len(messages) - 1
        assert f"STATUS=serving on 127.0.0.1:{port}, device CPU" in messages[-1]
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
        sock.close()


def test_failed_startup_never_notifies_ready(tmp_path):
    sock, address = notify_socket(tmp_path)
    with sock:
        proc = start(["--port", "0", "--device", "CPU", "--model-dir", str(tmp_path / "missing")],
                     {"NOTIFY_SOCKET": address})
        assert proc.wait(60) == 4
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(4096)


def unit_directives() -> dict[str, list[str]]:
    section, out = None, {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_unit_directives_that_matter():
    d = unit_directives()
    assert d["Service.Type"] == ["notify"] and d["Service.NotifyAccess"] == ["main"]
    assert d["Service.Restart"] == ["on-failure"] and int(d["Service.RestartSec"][0]) >= 1
    assert d["Service.EnvironmentFile"][0].startswith("-")
    assert d["Service.CacheDirectory"] == ["openvino-reranker"]
    assert "OPENVINO_RERANKER_CACHE_DIR=%C/openvino-reranker" in d["Service.Environment"]
    assert d["Service.ExecStart"][0].split()[-1].endswith("/server.py")
    assert d["Service.RestartPreventExitStatus"] == ["2 4 9"]
    assert d["Install.WantedBy"] == ["default.target"]
    # hardening that works in user units, and none of the options that break OpenVINO or hide the NPU
    assert d["Service.NoNewPrivileges"] == ["yes"]
    for forbidden in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateNetwork", "ProtectHome", "ProtectSystem",
                      "PrivateTmp", "ProcSubset"):
        assert f"Service.{forbidden}" not in d, forbidden


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    # lay out the documented install (repo in ~/.local/share/openvino-reranker with its .venv) under a fake home
    venv_bin = tmp_path / ".local/share/openvino-reranker/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    shutil.copy(ROOT / "server.py", tmp_path / ".local/share/openvino-reranker/server.py")
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_typo(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    bad = tmp_path / "bad.service"
    bad.write_text(UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    result = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in result.stderr


def test_deploy_guide_install_steps_match_the_unit():
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert "~/.local/share/openvino-reranker" in guide and "systemctl --user" in guide
    assert "loginctl enable-linger" in guide and "journalctl --user -u openvino-reranker" in guide
