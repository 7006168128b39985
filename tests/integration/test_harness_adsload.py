"""The benchmarks' ADS load process (``tests/harness/adsload``): its Go tests (it reconnects
as a real Envoy does, neither faster nor slower; it fingerprints the leaf it was sent), and
the process itself: it loads its streams' TLS contexts, holds until told to dial, keeps
redialing a server that is not there, and reports what it holds on SIGUSR1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

from tests.harness import ads_load, components
from tests.harness.certs import CA
from tests.harness.wait import wait_until


def test_go_tests_pass() -> None:
    proc = subprocess.run(
        ["go", "test", "./..."],
        cwd=components.ADS_LOAD_SOURCE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_it_holds_then_redials_a_missing_server_and_reports(tmp_path: Path) -> None:
    ca = CA("ca")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.cert_pem)
    streams = []
    for i, kind in enumerate(("delta", "sotw")):
        cert, key = ca.issue(f"c{i}", client=True).write(tmp_path, f"c{i}")
        streams.append({"node": f"c{i}", "kind": kind, "ca": str(bundle), "cert": str(cert), "key": str(key)})  # fmt: skip
    spec = tmp_path / "load.json"
    spec.write_text(json.dumps({"host": "127.0.0.1", "port": _closed_port(), "streams": streams}))
    proc = subprocess.Popen(ads_load.command(spec, duration=60, hold=True))
    try:
        ads_load.wait_ready([spec], timeout=60)
        state = Path(f"{spec}.state")

        def held() -> list[dict[str, object]]:
            state.unlink(missing_ok=True)
            proc.send_signal(signal.SIGUSR1)
            wait_until(state.exists, timeout=30, what="the state file")
            got: list[dict[str, object]] = json.loads(state.read_text())["streams"]
            return got

        assert [(s["node"], s["opened"]) for s in held()] == [("c0", 0), ("c1", 0)]
        ads_load.release([proc.pid])
        wait_until(
            lambda: all(int(str(s["opened"])) >= 2 for s in held()),
            timeout=30,
            what="both streams redialed",
        )
        for s in held():
            assert s["live"] is False and s["acked"] == {} and s["certs"] == {}
            assert "connection refused" in str(s["last_error"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
