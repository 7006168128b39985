"""`atlasd run --thanos-query-url`: the observer is one subsystem of the daemon; a Query it
cannot read is reported in /status and `atlasd status`, the daemon keeps serving; a URL
that is not one is a one-line CLI error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.harness.net import free_port
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd, cli


def _cluster(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"goatlas.io/cluster": "true"}},
        "spec": {
            "clusterIP": "None",
            "externalIPs": [ip],
            "ports": [{"name": "thanos", "port": 10901}],
        },
    }


def test_an_unreadable_query_is_reported_and_the_fleet_is_served(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "clusters").mkdir(parents=True)
    (store / "clusters" / "east.yaml").write_text(yaml.safe_dump(_cluster("east", "192.0.2.5")))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    atlasd = Atlasd(
        tmp_path, f"--store={store}", f"--thanos-query-url={url}", "--thanos-query-interval=1"
    ).start()
    try:
        doc = wait_until(lambda: atlasd.status().get("query"), timeout=30, what="the query section")
        assert doc["url"] == url and doc["up"] is False
        assert f"{url}/api/v1/stores" in doc["error"]
        wait_until(
            lambda: [c["name"] for c in atlasd.status().get("clusters") or []] == ["east"],
            timeout=30,
            what="east served",
        )
        out = cli("status", f"--url={atlasd.url}").stdout
        assert f"THANOS QUERY {url}: NOT READ" in out
        assert "NOT SEEN: no store in Thanos Query" not in out  # no view yet, none invented
        assert "not observed yet" in out  # the QUERY column, before a first read worked
        assert atlasd.proc.running()
    finally:
        atlasd.proc.stop()


def test_a_query_url_that_is_not_one_is_a_one_line_error(tmp_path: Path) -> None:
    out = cli("run", f"--store={tmp_path}", "--thanos-query-url=query:10902", check=False)
    assert out.returncode != 0
    assert "--thanos-query-url" in out.stderr and "is not an http(s) URL" in out.stderr
    assert "Traceback" not in out.stderr
