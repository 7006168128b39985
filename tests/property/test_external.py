"""The sampled judges can say no: a broken zone and a broken Envoy configuration, each
made from a good one, are rejected (else a green property run would prove nothing)."""

from __future__ import annotations

from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2

from tests.property import pipeline
from tests.property.external import ExternalChecks, checkzone, envoy_validate, static_bootstrap
from tests.unit.reconcile.builders import cluster_service


def _outputs() -> pipeline.Outputs:
    s = pipeline.SETTINGS[0]
    clusters, problems = pipeline.validate_fleet([cluster_service("east", replicas="2")], s)
    assert not problems
    return pipeline.run(clusters, s)


def test_checkzone_accepts_a_zone_and_refuses_a_broken_one(tmp_path: Path) -> None:
    zone = tmp_path / "good.zone"
    zone.write_text(_outputs().zone)
    assert checkzone(zone) is None
    bad = tmp_path / "bad.zone"
    # A target that is no host name: -k fail makes named-checkzone refuse it.
    bad.write_text(zone.read_text().replace("east-thanos-sidecar0.", "east_thanos.", 1))
    said = checkzone(bad)
    assert said is not None and "east_thanos" in said


def test_envoy_accepts_each_snapshot_and_refuses_a_broken_one(tmp_path: Path) -> None:
    out = _outputs()
    assert set(out.snapshots) == {"atlas", "east"}
    for node, snap in out.snapshots.items():
        path = tmp_path / f"{node}.pb"
        path.write_bytes(static_bootstrap(snap))
        assert envoy_validate(path) is None, node
    boot = bootstrap_pb2.Bootstrap.FromString((tmp_path / "atlas.pb").read_bytes())
    up = next(c for c in boot.static_resources.clusters if c.name == "east-thanos")
    up.load_assignment.endpoints[0].lb_endpoints[
        0
    ].endpoint.address.socket_address.address = "203.0.113"
    broken = tmp_path / "broken.pb"
    broken.write_bytes(boot.SerializeToString())
    said = envoy_validate(broken)
    assert said is not None and "malformed IP address" in said


def test_rejections_name_the_input(tmp_path: Path) -> None:
    ext = ExternalChecks(tmp_path, zones=None, envoys=None)
    ext.offer_zone("$ORIGIN atlas.\nnot a zone\n", bucket=0, origin={"metadata": {"name": "x"}})
    [rejection] = ext.finish()
    assert rejection.what == "named-checkzone"
    assert '"name": "x"' in rejection.origin.read_text()
    assert rejection.output.read_text().startswith("$ORIGIN")
