"""systemd readiness notification (sd_notify)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("openvino_reranker")



COMPILE_BUDGET_US = 300_000_000  # start-timeout extension granted per compile (a first NPU compile is slow)


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify(3) datagram to $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace).
    Without the variable nothing happens; a failure is logged, never raised: readiness is advisory."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; systemd notification skipped", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("systemd notification failed: %s", exc)
        return False
