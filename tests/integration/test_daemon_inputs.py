"""The daemon with bad input and with the forwarder token, against real components."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.objects import cluster_service
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd, cli

pytestmark = pytest.mark.integration


def _cluster(name: str, ip: str, **labels: str) -> dict[str, Any]:
    return cluster_service(name, ip, labels=labels)


def _merge_patch(apiserver: ApiServer, namespace: str, name: str, patch: dict[str, Any]) -> None:
    with apiserver.admin() as c:
        c.patch(
            f"/api/v1/namespaces/{namespace}/services/{name}",
            content=json.dumps(patch),
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()


def _gauge(daemon: Atlasd, name: str) -> float | None:
    for line in httpx2.get(f"{daemon.url}/metrics", timeout=5).text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    return None


@pytest.fixture
def token_daemon(apiserver: ApiServer, namespace: str, tmp_path: Path) -> Iterator[Atlasd]:
    token = tmp_path / "token"
    token.write_text("forwarder-s3cret\n")
    atlasd = Atlasd(
        tmp_path,
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--no-leader-election",
        f"--forwarder-token-file={token}",
    ).start()
    try:
        yield atlasd
    finally:
        atlasd.proc.stop()


def test_bad_cluster_gets_an_event_and_the_good_one_keeps_working(
    apiserver: ApiServer, namespace: str, token_daemon: Atlasd
) -> None:
    with apiserver.admin() as c:
        for svc in (
            _cluster("good", "192.0.2.20"),
            _cluster("bad", "192.0.2.21", **{"goatlas.io/replicas": "abc"}),
        ):
            assert c.post(f"/api/v1/namespaces/{namespace}/services", json=svc).status_code == 201

    def events() -> list[dict[str, Any]]:
        with apiserver.admin() as c:
            items: list[dict[str, Any]] = c.get(f"/api/v1/namespaces/{namespace}/events").json()[
                "items"
            ]
        return [e for e in items if e["involvedObject"]["name"] == "bad"]

    found = wait_until(events, timeout=30, what="a Warning Event on the bad cluster Service")
    assert found[0]["type"] == "Warning"
    assert 'metadata.labels["goatlas.io/replicas"]' in found[0]["message"]
    assert found[0]["involvedObject"]["kind"] == "Service"
    status = wait_until(
        lambda: (s := token_daemon.status()) and s.get("clusters") and s,
        timeout=30,
        what="the good cluster served",
    )
    assert [c["name"] for c in status["clusters"]] == ["good"]
    assert any(p["object"] == "Service/bad" for p in status["problems"])
    assert token_daemon.proc.running()
    # The log says it once (it is not only in Events and /status) ...
    line = f'rejected: Service {namespace}/bad: metadata.labels["goatlas.io/replicas"]'
    assert token_daemon.log_text().count(line) == 1, token_daemon.log_text()
    # ... and not again when the Service is written with the same mistake. A second
    # Service with two mistakes, created after that write, marks when it was seen.
    _merge_patch(apiserver, namespace, "bad", {"metadata": {"annotations": {"edited": "1"}}})
    worse = _cluster("worse", "192.0.2.22", **{"goatlas.io/replicas": "0"})
    worse["metadata"]["annotations"] = {"goatlas.io/prometheus-service-port": "0"}
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=worse).status_code == 201
    wait_until(
        lambda: (
            f"rejected: Service {namespace}/worse: metadata.annotations" in token_daemon.log_text()
        ),
        timeout=30,
        what="the second Service's problems logged",
    )
    assert token_daemon.log_text().count(line) == 1, token_daemon.log_text()
    # Three Problems, two Services: the gauge counts Services.
    wait_until(
        lambda: len(token_daemon.status()["problems"]) == 3, timeout=30, what="three problems"
    )
    assert _gauge(token_daemon, "atlasd_invalid_clusters") == 2


def test_a_cluster_label_that_is_not_exactly_true_is_said_and_what_was_served_goes(
    apiserver: ApiServer, namespace: str, token_daemon: Atlasd
) -> None:
    """docs/interface.md, "The label value must be exactly "true"": a served cluster
    whose label becomes "True" is removed like a deleted one, and the Service gets a
    Warning Event saying why; so does a Service that was never served ("false")."""
    ns_path = f"/api/v1/namespaces/{namespace}"
    with apiserver.admin() as c:
        assert c.post(f"{ns_path}/services", json=_cluster("east", "192.0.2.40")).status_code == 201
        off = _cluster("west", "192.0.2.41")
        off["metadata"]["labels"]["goatlas.io/cluster"] = "false"
        assert c.post(f"{ns_path}/services", json=off).status_code == 201
    made = (
        "secrets/east-envoy-values",
        "secrets/east-atlas-identity",
        "services/east-thanos-sidecar0",
    )

    def present() -> set[str]:
        with apiserver.admin() as c:
            return {p for p in made if c.get(f"{ns_path}/{p}").status_code == 200}

    wait_until(lambda: present() == set(made), timeout=60, what="east onboarded")

    def label_events(name: str) -> list[dict[str, Any]]:
        with apiserver.admin() as c:
            items = c.get(f"{ns_path}/events").json()["items"]
        return [
            e
            for e in items
            if e["involvedObject"]["name"] == name and e["reason"] == "InvalidClusterLabel"
        ]

    [never] = wait_until(lambda: label_events("west"), timeout=30, what="west's Event")
    assert never["type"] == "Warning" and never["involvedObject"]["kind"] == "Service"
    assert "is 'false'" in never["message"] and 'labelled exactly "true"' in never["message"]

    _merge_patch(
        apiserver, namespace, "east", {"metadata": {"labels": {"goatlas.io/cluster": "True"}}}
    )
    [event] = wait_until(lambda: label_events("east"), timeout=30, what="east's Event")
    assert "is 'True'" in event["message"]
    wait_until(lambda: not present(), timeout=60, what="what atlasd made for east removed")
    doc = token_daemon.status()
    assert doc["clusters"] == [] and "east" not in json.dumps(doc["certificates"])
    assert {(p["object"], p["reason"]) for p in doc["problems"]} == {
        ("Service/east", "InvalidClusterLabel"),
        ("Service/west", "InvalidClusterLabel"),
    }
    assert _gauge(token_daemon, "atlasd_invalid_clusters") == 2
    assert _gauge(token_daemon, "atlasd_clusters") == 0
    assert token_daemon.log_text().count(f"rejected: Service {namespace}/east:") == 1

    # Set back to "true": onboarded afresh.
    _merge_patch(
        apiserver, namespace, "east", {"metadata": {"labels": {"goatlas.io/cluster": "true"}}}
    )
    wait_until(lambda: present() == set(made), timeout=60, what="east onboarded again")
    wait_until(
        lambda: [c["name"] for c in token_daemon.status()["clusters"]] == ["east"],
        timeout=30,
        what="east served again",
    )


def test_observability_envoy_presents_the_forwarder_token(
    apiserver: ApiServer,
    namespace: str,
    token_daemon: Atlasd,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
) -> None:
    def values() -> dict[str, Any] | None:
        with apiserver.admin() as c:
            r = c.get(f"/api/v1/namespaces/{namespace}/secrets/atlas-envoy-values")
        if r.status_code != 200:
            return None
        loaded: dict[str, Any] = yaml.safe_load(base64.b64decode(r.json()["data"]["values.yaml"]))
        return loaded

    bootstrap = yaml.safe_load(
        wait_until(values, timeout=30, what="atlas values")["files"]["envoy.yaml"]
    )
    assert "forwarder-s3cret" not in token_daemon.log_text()
    envoy_factory(bootstrap, "atlas-with-token")

    def atlas_acked() -> bool:
        return any(
            e["node"] == "atlas" and e["acked"] for e in token_daemon.status().get("envoys") or []
        )

    # Its values dial atlasd over mTLS with the atlas certificate, and carry the token.
    (xds,) = bootstrap["static_resources"]["clusters"]
    assert "transport_socket" in xds
    wait_until(atlas_acked, timeout=30, what="the observability Envoy ACKs")

    # The token is the fallback for a plaintext connection: served.
    plaintext = yaml.safe_load(yaml.safe_dump(bootstrap))
    for cluster in plaintext["static_resources"]["clusters"]:
        cluster.pop("transport_socket")
    envoy_factory(plaintext, "atlas-plaintext-with-token")
    wait_until(
        lambda: len(_atlas_streams(token_daemon)) == 2 and all(_atlas_streams(token_daemon)),
        timeout=30,
        what="the plaintext stream with the token served",
    )
    # Plaintext without the token (an old, token-less bootstrap) is refused.
    for svc in plaintext["dynamic_resources"]["ads_config"]["grpc_services"]:
        svc.pop("initial_metadata", None)
    intruder = envoy_factory(plaintext, "atlas-without-token")
    # gRPC status 7 = PERMISSION_DENIED, with atlasd's reason.
    wait_until(
        lambda: (
            "closed: 7, node 'atlas' must present its client certificate" in intruder.log_text()
        ),
        timeout=30,
        what="the stream without the token refused",
    )
    assert len(_atlas_streams(token_daemon)) == 2


def _atlas_streams(daemon: Atlasd) -> list[bool]:
    """Whether each open stream of node ``atlas`` has ACKed something."""
    return [bool(e["acked"]) for e in daemon.status().get("envoys") or [] if e["node"] == "atlas"]


# IPv4 carried in an IPv6 spelling is judged as that IPv4 (atlasd.addresses).
MAPPED_BYPASSES = ["::ffff:127.0.0.1", "::ffff:169.254.169.254"]


@pytest.mark.parametrize("ip", MAPPED_BYPASSES)
def test_cluster_add_to_a_store_refuses_ipv4_mapped_addresses(ip: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = cli("cluster", "add", "east", "--external-ip", ip, f"--store={store}", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "spec.externalIPs[0]" in out.stderr and "IPv4-mapped" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not list((store / "clusters").glob("*.yaml"))
    # The same command with the plain IPv4 spelling is refused the same way.
    plain = ip.removeprefix("::ffff:")
    out = cli("cluster", "add", "east", "--external-ip", plain, f"--store={store}", check=False)
    assert out.returncode == 1 and "spec.externalIPs[0]" in out.stderr, out.stderr


def test_standalone_daemon_reports_ipv4_mapped_addresses(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "clusters").mkdir(parents=True)
    docs = [_cluster("good", "192.0.2.30")] + [
        _cluster(f"bad{i}", ip) for i, ip in enumerate(MAPPED_BYPASSES)
    ]
    (store / "clusters" / "fleet.yaml").write_text(yaml.safe_dump_all(docs))
    atlasd = Atlasd(tmp_path, f"--store={store}").start()
    try:

        def problems() -> list[dict[str, str]]:
            found: list[dict[str, str]] = atlasd.status().get("problems") or []
            return found if len(found) == len(MAPPED_BYPASSES) else []

        found = wait_until(problems, timeout=30, what="both mapped addresses reported")
        by_object = {p["object"]: p for p in found}
        for i, ip in enumerate(MAPPED_BYPASSES):
            p = by_object[f"Service/bad{i}"]
            assert p["field"] == "spec.externalIPs[0]"
            assert f"{ip} is IPv4-mapped {ip.removeprefix('::ffff:')}" in p["message"]
        served = wait_until(
            lambda: atlasd.status().get("clusters"), timeout=30, what="the good cluster served"
        )
        assert [c["name"] for c in served] == ["good"]
        wait_until(
            lambda: "good-thanos-sidecar0" in atlasd.zone_file.read_text(),
            timeout=30,
            what="the zone lists the good cluster",
        )
        assert "bad" not in atlasd.zone_file.read_text()
        events = (store / "events.log").read_text()
        assert "IPv4-mapped 127.0.0.1" in events
    finally:
        atlasd.proc.stop()


def test_the_run_process_settles_its_heap_and_times_its_collector(
    apiserver: ApiServer, namespace: str, token_daemon: Atlasd
) -> None:
    """atlasd.heap: `atlasd run` freezes what survives its first served fleet, and
    /metrics says how long the collector stood the event loop still."""
    with apiserver.admin() as c:
        svc = _cluster("east", "192.0.2.50")
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=svc).status_code == 201
    wait_until(
        lambda: [c["name"] for c in token_daemon.status().get("clusters", ())] == ["east"],
        timeout=30,
        what="the cluster served",
    )
    full = _gauge(token_daemon, 'atlasd_gc_pause_seconds_count{cause="settle",generation="2"}')
    assert full is not None and full >= 1
    longest = _gauge(token_daemon, 'atlasd_gc_pause_max_seconds{cause="settle",generation="2"}')
    assert longest is not None and longest > 0


def test_the_run_process_measures_its_event_loop(token_daemon: Atlasd) -> None:
    """atlasd.watchdog: `atlasd run` times its event loop's batches (the time between two
    looks at I/O) and serves them (the stalls, each logged with the code that held the
    loop, are shown at scale by bench_e2e's `loop` figures)."""
    first = wait_until(
        lambda: _gauge(token_daemon, "atlasd_event_loop_busy_seconds_count"),
        timeout=30,
        what="a first batch timed",
    )
    wait_until(
        lambda: (_gauge(token_daemon, "atlasd_event_loop_busy_seconds_count") or 0) >= first + 5,
        timeout=30,
        what="batches timed again and again",
    )
    # A stall is counted, then published: status first, then the counter.
    published = "loop" in token_daemon.status()
    stalls = _gauge(token_daemon, "atlasd_event_loop_stalls_total")
    assert stalls is not None
    if published:
        assert stalls > 0
    if stalls > 0:
        wait_until(lambda: "loop" in token_daemon.status(), timeout=10, what="the stall shown")
