"""Smoke-test a running openvino-reranker: liveness, readiness, ranking fixtures, both routes, documented errors,
image documents (scored by a vision-language model, refused by a text-only one) and, on the NPU, proof that the NPU
did the work. Standard library only.

    python smoke.py --url http://127.0.0.1:18818 --expect-device CPU [--json]
    python smoke.py --url http://127.0.0.1:18818 --expect-device NPU --require-npu [--json]

Without --fixtures, the fixture set is the one of tests/fixtures/smoke-*.json whose "models" names the model
/readyz reports; when none does, the default set still runs but its expected top results are skipped, saying why.
Exit status 0 only when every required check passed; each failure is one line.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import math
import socket
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
FIXTURES_DIR = ROOT / "tests" / "fixtures"
DEFAULT_FIXTURES = FIXTURES_DIR / "smoke-ms-marco.json"  # for a model no set names: everything but the top results
DEFAULT_NPU_BUSY_PATH = "/sys/class/accel/accel0/device/npu_busy_time_us"


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str = ""


@dataclass
class Report:
    url: str
    device: str | None = None
    model: str | None = None  # as /readyz names it
    fixtures: str | None = None  # the fixture file used
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, failure: str = "") -> bool:
        """A check that passed or failed; `failure` says why it failed and is kept only then."""
        self.checks.append(Check(name, "pass", "") if ok else Check(name, "fail", failure))
        return ok

    def skip(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "skip", detail))

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


class Client:
    """One keep-alive connection; reconnects when the server closes it (as it does after some errors)."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must look like http://HOST:PORT, not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body=None, content_type: str = "application/json"):
        """Returns (status, parsed JSON or None, raw text)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Content-Type": content_type} if data is not None else {}
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read().decode("utf-8", "replace")
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        return resp.status, payload, raw

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @property
    def is_local(self) -> bool:
        try:
            return ipaddress.ip_address(socket.gethostbyname(self.host)).is_loopback
        except (OSError, ValueError):
            return False


def png_page(width: int = 96, height: int = 128) -> bytes:
    """A small RGB PNG (a made-up page: stripes and a gradient), written with zlib alone."""
    rows = b"".join(b"\x00" + bytes(((x * 5 + y) % 256 if (y // 8) % 2 else 255, (y * 2) % 256, (x * 3) % 256)[c]
                                     for x in range(width) for c in range(3)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def read_counter(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class FixtureSet:
    path: Path
    models: tuple[str, ...]  # the models whose ranking its expected_top values were written for; () = any model
    fixtures: list[dict]

    @property
    def label(self) -> str:
        """The file as a person would type it: relative to the repository when inside it."""
        return str(self.path.relative_to(ROOT)) if self.path.is_relative_to(ROOT) else str(self.path)


def load_fixture_set(path: Path) -> FixtureSet:
    data = json.loads(path.read_text(encoding="utf-8"))
    fixtures = data["fixtures"] if isinstance(data, dict) else data
    for f in fixtures:
        ids = [d["id"] for d in f["documents"]]
        if f["expected_top"] not in ids:
            raise ValueError(f"fixture {f['name']}: expected_top {f['expected_top']!r} is not a document id")
    models = data.get("models", []) if isinstance(data, dict) else []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{path}: \"models\" must be a list of model names")
    return FixtureSet(path, tuple(models), fixtures)


def load_fixtures(path: Path) -> list[dict]:
    return load_fixture_set(path).fixtures


def shipped_fixture_sets() -> list[FixtureSet]:
    """tests/fixtures/smoke-*.json, the default set first."""
    paths = sorted(FIXTURES_DIR.glob("smoke-*.json"), key=lambda p: (p != DEFAULT_FIXTURES, p.name))
    return [load_fixture_set(path) for path in paths]


def choose_fixtures(model: str | None, sets: list[FixtureSet]) -> tuple[FixtureSet, str]:
    """The set written for `model` and '', or, when none names it, the first (default) set and why its expected
    top results cannot be checked: the shape, order and error checks hold for any model, which document comes
    first does not."""
    for fixture_set in sets:
        if model in fixture_set.models:
            return fixture_set, ""
    written_for = "; ".join(f"{s.path.name}: {', '.join(s.models)}" for s in sets if s.models)
    return sets[0], (f"skipped: no fixture set is written for {model or 'a server that names no model'} "
                     f"({written_for}); --fixtures FILE checks your own expected results")


def is_sorted_ranking(results: list[dict], key: str) -> bool:
    """Descending score; equal scores in ascending index (SPEC.md, "Scores")."""
    pairs = [(r[key], r["index"]) for r in results]
    return all(a[0] > b[0] or (a[0] == b[0] and a[1] < b[1]) for a, b in pairwise(pairs))


def check_ranking(report: Report, name: str, fixture: dict, status: int, body, n: int, skip_top: str = "") -> None:
    if not report.add(f"{name}: status", status == 200 and isinstance(body, dict) and body.get("ok") is True,
                      f"HTTP {status}: {str(body)[:200]}"):
        return
    results = body.get("results")
    complete = isinstance(results, list) and sorted(r.get("index") for r in results) == list(range(n))
    if not report.add(f"{name}: complete", complete, f"expected indices 0..{n - 1}, got {results!r:.200}"):
        return
    finite = all(isinstance(r.get("score"), (int, float)) and math.isfinite(r["score"]) for r in results)
    report.add(f"{name}: sorted", finite and is_sorted_ranking(results, "score"),
               "scores not finite or not in descending order (ties by ascending index)")
    if skip_top:
        report.skip(f"{name}: top result", skip_top)
        return
    ids = [d["id"] for d in fixture["documents"]]
    top = results[0].get("id")
    report.add(f"{name}: top result", top == fixture["expected_top"] and top == ids[results[0]["index"]],
               f"expected {fixture['expected_top']!r}, got {top!r}")


def run(url: str, fixtures: list[dict] | None, expect_device: str | None, require_npu: bool, npu_busy_path: str,
        timeout_s: float, fixture_sets: list[FixtureSet] | None = None) -> Report:
    """Every check against the server at `url`. `fixtures` given: each is checked in full. None: the set of
    `fixture_sets` (default: the shipped ones) written for the model /readyz names (see choose_fixtures)."""
    report = Report(url)
    client = Client(url, timeout_s)
    try:
        status, _, _ = client.call("GET", "/healthz")
        report.add("healthz", status == 200, f"HTTP {status}")
        status, ready, raw = client.call("GET", "/readyz")
        if not report.add("readyz", status == 200 and isinstance(ready, dict) and ready.get("ready") is True,
                          f"HTTP {status}: {raw[:200]}"):
            return report
        report.device, report.model = ready.get("device"), ready.get("model")
        skip_top = ""
        if fixtures is None:
            chosen, skip_top = choose_fixtures(report.model, fixture_sets or shipped_fixture_sets())
            fixtures, report.fixtures = chosen.fixtures, chosen.label
        executes = ready.get("execution_devices") or []
        if expect_device:
            want = expect_device.upper()
            report.add("device", report.device == want or any(d.split(".")[0] == want for d in executes),
                       f"expected {want}, server reports device {report.device} executing on {executes}")

        on_npu = (report.device or "").split(".")[0] == "NPU"
        native_scores = None
        for fixture in fixtures:
            name = f"fixture {fixture['name']}"
            n = len(fixture["documents"])
            before = read_counter(npu_busy_path) if on_npu and client.is_local else None
            status, body, _ = client.call("POST", "/rerank", {"query": fixture["query"],
                                                              "documents": fixture["documents"]})
            after = read_counter(npu_busy_path) if before is not None else None
            check_ranking(report, name, fixture, status, body, n, skip_top)
            if native_scores is None and status == 200 and isinstance(body, dict):
                native_scores = (fixture, {r["index"]: r["score"] for r in body.get("results", [])})
            if on_npu or require_npu:
                delta = body.get("npu_busy_delta_us") if isinstance(body, dict) else None
                report.add(f"{name}: npu_busy_delta_us", isinstance(delta, int) and delta > 0,
                           f"the response's npu_busy_delta_us is {delta!r}")
                if client.is_local:
                    local = after - before if before is not None and after is not None else None
                    report.add(f"{name}: sysfs counter", local is not None and local > 0,
                               f"{npu_busy_path} moved by {local!r} us" if local is not None
                               else f"{npu_busy_path} is not readable")
        if require_npu and not on_npu:
            report.add("npu", False, f"--require-npu, but the server runs on {report.device}")
        elif not on_npu:
            report.skip("npu proof", f"skipped: device is {report.device}")

        if native_scores:
            check_cohere(report, client, *native_scores)
        check_images(report, client, ready, on_npu, npu_busy_path)
        check_errors(report, client)
    except (OSError, http.client.HTTPException) as exc:
        report.add("connection", False, f"{type(exc).__name__}: {exc}")
    finally:
        client.close()
    return report


def check_cohere(report: Report, client: Client, fixture: dict, native: dict) -> None:
    texts = [d["text"] for d in fixture["documents"]]
    top_n = min(2, len(texts))
    status, body, raw = client.call("POST", "/v1/rerank", {"model": "smoke", "query": fixture["query"],
                                                           "documents": texts, "top_n": top_n})
    shape_ok = (status == 200 and isinstance(body, dict) and isinstance(body.get("id"), str)
                and isinstance(body.get("results"), list) and isinstance(body.get("meta"), dict))
    if not report.add("cohere: shape", shape_ok, f"HTTP {status}: {raw[:200]}"):
        return
    results = body["results"]
    keys_ok = all(set(r) == {"index", "relevance_score"} for r in results)
    report.add("cohere: results", len(results) == top_n and keys_ok and is_sorted_ranking(results, "relevance_score"),
               f"expected {top_n} sorted results with index and relevance_score only, got {results!r:.200}")
    same = all(abs(r["relevance_score"] - native.get(r["index"], math.inf)) < 1e-6 for r in results)
    report.add("cohere: same scores as /rerank", same, "relevance_score differs from the native score")


def check_images(report: Report, client: Client, ready: dict, on_npu: bool, npu_busy_path: str) -> None:
    """A page image as Jina sends it and as vLLM's content parts, the image with text, and a text document: a
    vision-language model (/readyz head kind) scores all four, the image the same in both shapes, and on the NPU
    moves its busy counter; a text-only model refuses the image with a 400 naming the document."""
    image = "data:image/png;base64," + base64.b64encode(png_page()).decode("ascii")
    documents = [{"image": image}, {"content": [{"type": "image_url", "image_url": {"url": image}}]},
                 {"image": image, "text": "Quarterly revenue by region, page 7"}, "Revenue grew in every region."]
    head = ready.get("head") if isinstance(ready.get("head"), dict) else {}
    before = read_counter(npu_busy_path) if on_npu and client.is_local else None
    status, payload, raw = client.call("POST", "/rerank", {"query": "quarterly revenue by region",
                                                           "documents": documents})
    after = read_counter(npu_busy_path) if before is not None else None
    if head.get("kind") != "vision-language":
        error = payload.get("error") if isinstance(payload, dict) else None
        report.add("images: a text-only model refuses them",
                   status == 400 and isinstance(error, dict) and error.get("field") == "documents[0]"
                   and "text only" in str(error.get("message")),
                   f"expected 400 naming documents[0] and the model's text-only input, got {status}: {raw[:200]}")
        return
    results = payload.get("results") if status == 200 and isinstance(payload, dict) else None
    scores = {r.get("index"): r.get("score") for r in results} if isinstance(results, list) else {}
    in_range = sorted(scores) == [0, 1, 2, 3] and all(isinstance(v, float) and 0.0 <= v <= 1.0
                                                      for v in scores.values())
    if not report.add("images: scored", in_range, f"expected 4 scores in [0, 1], got {status}: {raw[:200]}"):
        return
    report.add("images: the same image in both shapes", abs(scores[0] - scores[1]) < 1e-6,
               f"Jina's shape scored {scores[0]}, vLLM's content parts {scores[1]}")
    if on_npu:
        delta = payload.get("npu_busy_delta_us")
        report.add("images: npu_busy_delta_us", isinstance(delta, int) and delta > 0,
                   f"the response's npu_busy_delta_us is {delta!r}")
        if client.is_local:
            local = after - before if before is not None and after is not None else None
            report.add("images: sysfs counter", local is not None and local > 0,
                       f"{npu_busy_path} moved by {local!r} us" if local is not None
                       else f"{npu_busy_path} is not readable")


ERROR_PROBES = (
    ("error: empty documents", "POST", "/rerank", {"query": "q", "documents": []}, 400, "invalid_request",
     "documents"),
    ("error: missing query", "POST", "/rerank", {"documents": ["a"]}, 400, "invalid_request", "query"),
    ("error: empty document text", "POST", "/rerank", {"query": "q", "documents": ["a", " "]}, 400,
     "invalid_request", "documents[1]"),
    ("error: unknown route", "GET", "/no-such-route", None, 404, "not_found", None),
    ("error: wrong method", "GET", "/rerank", None, 405, "method_not_allowed", None),
    ("error: not JSON", "POST", "/rerank", b"query=q", 415, "unsupported_media_type", None),
    ("error: cohere unsupported field", "POST", "/v1/rerank", {"query": "q", "documents": ["a"],
                                                              "rank_fields": ["text"]}, 400, "invalid_request",
     "rank_fields"),
)


def check_errors(report: Report, client: Client) -> None:
    for name, method, path, body, want_status, want_type, want_field in ERROR_PROBES:
        content_type = "application/x-www-form-urlencoded" if isinstance(body, bytes) else "application/json"
        status, payload, raw = client.call(method, path, body, content_type)
        error = payload if path == "/v1/rerank" else (payload or {}).get("error") if isinstance(payload, dict) else None
        ok = (status == want_status and isinstance(error, dict) and error.get("type") == want_type
              and error.get("field") == want_field)
        report.add(name, ok, f"expected {want_status} {want_type} field {want_field!r}, got {status}: {raw[:160]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Smoke-test a running openvino-reranker.")
    parser.add_argument("--url", default="http://127.0.0.1:18818")
    parser.add_argument("--fixtures", type=Path,
                        help="JSON file of ranking fixtures, each checked in full (default: the set in "
                             "tests/fixtures/smoke-*.json written for the model the server reports)")
    parser.add_argument("--expect-device", help="fail unless the server reports this device (NPU, CPU, ...)")
    parser.add_argument("--require-npu", action="store_true", help="fail unless NPU use is proven")
    parser.add_argument("--npu-busy-path", default=DEFAULT_NPU_BUSY_PATH)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for /readyz before checking")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary as the last line")
    args = parser.parse_args(argv)
    try:
        explicit = load_fixture_set(args.fixtures) if args.fixtures else None
        shipped = [] if explicit else shipped_fixture_sets()
        client = Client(args.url, args.timeout)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"smoke: cannot start: {exc}", file=sys.stderr)
        return 2
    wait_ready(client, args.wait)
    report = run(args.url, explicit.fixtures if explicit else None, args.expect_device, args.require_npu,
                 args.npu_busy_path, args.timeout, shipped)
    if explicit:
        report.fixtures = explicit.label
    for c in report.checks:
        if c.status == "fail":
            print(f"FAIL {c.name}: {c.detail}")
        elif c.status == "skip":
            print(f"SKIP {c.name}: {c.detail}")
    counts = {status: sum(c.status == status for c in report.checks) for status in ("pass", "fail", "skip")}
    written_for = next((f" (written for {', '.join(s.models)})" for s in [explicit, *shipped]
                        if s is not None and s.label == report.fixtures and s.models), "")
    print(f"server {args.url}, device {report.device}, model {report.model}, fixtures {report.fixtures}{written_for}")
    print(f"smoke: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    if args.json:
        print(json.dumps({"ok": report.ok, "url": report.url, "device": report.device, "model": report.model,
                          "fixtures": report.fixtures, "checks": [asdict(c) for c in report.checks]}))
    return 0 if report.ok else 1


def wait_ready(client: Client, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if client.call("GET", "/readyz")[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            client.close()
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
