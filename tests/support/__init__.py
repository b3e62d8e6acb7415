"""What the tests share, imported as `from support.<module> import name` (tests/ is on sys.path, put there by
pytest for conftest.py). conftest.py holds only the fixtures, built from these:

- `support.models`: the tiny model with its independent numpy reference scorer, the score tolerance, f32 settings
- `support.engines`: stand-ins for the engine (`FakeEngine`) and for OpenVINO's Core (`FakeCore`), the real
  scoring path on the CPU (`real_reranker`), closing a Reranker (`close_reranker`)
- `support.imagefiles`: small PNG, JPEG and GIF files, data: URLs, vLLM content parts, and `ImageServer`, a loopback
  HTTP server for image URLs
- `support.http`: one request (`request`), raw bytes on a socket (`http_bytes`, `send_raw`, `RawResponse`)
- `support.servers`: servers on loopback: main() on a thread (`RunningServer`), a RerankServer over a FakeEngine
  (`FakeServer`), `python server.py` processes (`spawn_ready_server`, `run_server`), `free_port`, `server_env`
- `support.waiting`: bounded waits (`wait_until`) and the check that a test's Batcher threads have ended

`ROOT` is the repository's root.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
