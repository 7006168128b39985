"""Real Prometheus and Alertmanager (Debian packages), run directly with small configs."""

from __future__ import annotations

from pathlib import Path

import httpx2

from tests.harness import components
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until


class WebProc:
    """A process with an HTTP API that reports readiness on ``/-/ready``."""

    def __init__(
        self, name: str, argv: list[str], *, port: int, workdir: Path, host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.proc = Proc(name, argv, log_dir=workdir)

    def start(self) -> WebProc:
        self.proc.start()
        wait_until(self._ready, timeout=60, what=f"{self.name} /-/ready")
        return self

    def _ready(self) -> bool:
        self.proc.check_running()
        return httpx2.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self) -> None:
        self.proc.stop()


def prometheus(
    config_yaml: str, *, workdir: Path, name: str = "prometheus", host: str = "127.0.0.1"
) -> WebProc:
    """A Prometheus listening on ``host`` (e.g. a node's address, for its pods)."""
    port = free_port()
    d = workdir / f"{name}-{port}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "prometheus.yml").write_text(config_yaml)
    return WebProc(
        f"{name}-{port}",
        [
            str(components.apt("prometheus")),
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address={host}:{port}",
            "--web.enable-lifecycle",
        ],
        port=port,
        workdir=d,
        host=host,
    )


def alertmanager(config_yaml: str, *, workdir: Path, name: str = "alertmanager") -> WebProc:
    port = free_port()
    d = workdir / f"{name}-{port}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "alertmanager.yml").write_text(config_yaml)
    return WebProc(
        f"{name}-{port}",
        [
            str(components.apt("alertmanager")),
            f"--config.file={d / 'alertmanager.yml'}",
            f"--storage.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        port=port,
        workdir=d,
    )


DEFAULT_ALERTMANAGER_CONFIG = """\
route:
  receiver: "null"
  group_wait: 1s
receivers:
  - name: "null"
"""
