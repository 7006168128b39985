"""`atlasd run --thanos-query-url` and `atlasd check`: the observer is one subsystem of the daemon; a Query it
cannot read is reported in /status and `atlasd status`, the daemon keeps serving; a URL
that is not one is a one-line CLI error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import yaml

from tests.harness.net import free_port
from tests.harness.objects import cluster_service
from tests.harness.thanos import start_query
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


def test_a_cluster_query_does_not_see_is_probed_and_its_broken_hop_shown(
    tmp_path: Path,
) -> None:
    """A real Thanos Query with no stores: east is not seen, atlasd probes east's path
    (here the observability Envoy's Thanos listener is not there) and shows the hop in
    /status, `atlasd status` and the metrics."""
    store = tmp_path / "store"
    (store / "clusters").mkdir(parents=True)
    (store / "clusters" / "east.yaml").write_text(yaml.safe_dump(_cluster("east", "192.0.2.5")))
    query, query_url = start_query(tmp_path)
    via = f"127.0.0.1:{free_port()}"  # no observability Envoy listens there
    atlasd = Atlasd(
        tmp_path,
        f"--store={store}",
        f"--thanos-query-url={query_url}",
        "--thanos-query-interval=1",
        f"--probe-via={via}",
    ).start()
    try:

        def probed() -> dict[str, Any] | None:
            east = ((atlasd.status().get("query") or {}).get("clusters") or {}).get("east")
            return east.get("probe") if east and not east["seen"] else None

        found = wait_until(probed, timeout=60, what="east probed")
        assert found["hop"] == "envoy-unreachable", found
        assert via in str(found["detail"]) and found["fix"]
        out = cli("status", f"--url={atlasd.url}").stdout
        assert "NOT SEEN [path: envoy-unreachable]" in out, out
        metrics = httpx2.get(f"{atlasd.url}/metrics", timeout=10).text
        assert 'atlasd_query_probe_clusters{hop="envoy-unreachable"} 1.0' in metrics
        assert 'atlasd_query_probe_clusters{hop="ok"} 0.0' in metrics
    finally:
        atlasd.proc.stop()
        query.stop()
