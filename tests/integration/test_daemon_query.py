"""`atlasd run --thanos-query-url` and `atlasd check`: the observer is one subsystem of the daemon; a Query it
cannot read is reported in /status and `atlasd status`, the daemon keeps serving; a URL
that is not one is a one-line CLI error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.harness.net import free_port
from tests.harness.objects import cluster_service
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd, cli


def _cluster(name: str, ip: str) -> dict[str, Any]:
    return cluster_service(name, ip)


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
        # `atlasd check` judges the same daemon: no Envoy connected, Query not read.
        checked = cli("check", f"--url={atlasd.url}", check=False)
        assert checked.returncode == 1, checked.stdout
        assert "FAIL every Envoy is connected: not connected: atlas, east" in checked.stdout
        assert "FAIL Thanos Query sees every cluster: Query not read" in checked.stdout
        assert "ok   no cluster Service is invalid" in checked.stdout
        assert atlasd.proc.running()
    finally:
        atlasd.proc.stop()


def test_check_says_when_atlasd_cannot_be_reached() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = cli("check", f"--url={url}", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "cannot reach" in out.stderr


def test_a_query_url_that_is_not_one_is_a_one_line_error(tmp_path: Path) -> None:
    out = cli("run", f"--store={tmp_path}", "--thanos-query-url=query:10902", check=False)
    assert out.returncode != 0
    assert "--thanos-query-url" in out.stderr and "is not an http(s) URL" in out.stderr
    assert "Traceback" not in out.stderr
