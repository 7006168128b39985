"""A real Thanos Query (the version ``components.thanos`` builds) on loopback."""

from __future__ import annotations

from pathlib import Path

from tests.harness import components
from tests.harness.net import free_port
from tests.harness.procs import Proc


def start_query(workdir: Path, *args: str) -> tuple[Proc, str]:
    """Thanos Query with ``args`` (none: no stores at all), started; it and its HTTP URL."""
    port = free_port()
    proc = Proc(
        "thanos-query",
        [
            str(components.thanos()),
            "query",
            f"--http-address=127.0.0.1:{port}",
            f"--grpc-address=127.0.0.1:{free_port()}",
            *args,
        ],
        log_dir=workdir,
    )
    proc.start()
    return proc, f"http://127.0.0.1:{port}"
