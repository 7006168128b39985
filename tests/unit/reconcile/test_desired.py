"""desired: sidecar Services, values Secrets, bootstraps (validated by a real Envoy binary)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasd import labels
from atlasd.enroll.agent import write_sds_files
from atlasd.kube.secrets import secret_data
from atlasd.model import (
    ADS_SERVER_NAME,
    DownstreamCluster,
    LocalAlertmanager,
    ObjectRef,
    ServicePort,
    Settings,
)
from atlasd.reconcile import desired
from atlasd.reconcile.desired import (
    desired_state,
    dump_yaml,
    envoy_bootstrap,
    observability_values,
    sidecar_services,
)
from atlasd.reconcile.pki import plan_pki
from tests.unit.reconcile.pkitools import CountingKeys

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings(envoy_ads_address="198.51.100.7", envoy_ads_port=10950)
SRC = ObjectRef(kind="Service", name="west", namespace="monitoring", uid="uid-w")
EAST = DownstreamCluster(
    name="east",
    external_ip="203.0.113.1",
    ports=(ServicePort("thanos", 10901), ServicePort("prometheus", 9090)),
)
WEST = DownstreamCluster(
    name="west",
    external_ip="203.0.113.2",
    ports=(ServicePort("thanos", 10901),),
    replicas=3,
    envoy_selectors=(("app", "proxy"),),
    source=SRC,
)
AMS = (LocalAlertmanager("am-0", "monitoring", 9093), LocalAlertmanager("am-1", "monitoring", 9093))
# Enrolled: its agent makes its keys, atlasd stores none.
NORTH = DownstreamCluster(
    name="north",
    external_ip="203.0.113.3",
    ports=(ServicePort("prometheus", 9090),),
    enrolled=True,
    enrollment_annotation=True,
)
ENROLLING = dataclasses.replace(S, enroll_address="atlasd.example:6307")


def _state() -> Any:
    plan = plan_pki(secrets={}, clusters=(EAST, WEST), settings=S, now=NOW, keys=CountingKeys())
    return plan, desired_state(clusters=(WEST, EAST), alertmanagers=AMS, plan=plan, settings=S)


def test_sidecar_services_per_replica() -> None:
    svcs = sidecar_services(WEST, S)
    assert [s["metadata"]["name"] for s in svcs] == [
        "west-thanos-sidecar0",
        "west-thanos-sidecar1",
        "west-thanos-sidecar2",
    ]
    s1 = svcs[1]
    assert s1["metadata"]["labels"] == {
        labels.MANAGED_BY_LABEL: "atlasd",
        labels.OWNER_CLUSTER_LABEL: "west",
        labels.THANOS_SIDECAR_LABEL: "1",
    }
    assert labels.CLUSTER_LABEL not in s1["metadata"]["labels"]
    assert s1["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "west",
            "uid": "uid-w",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert s1["spec"] == {
        "clusterIP": "None",
        "selector": {"app": "proxy"},
        "ports": [{"name": "thanos", "port": 10901, "protocol": "TCP", "targetPort": 10901}],
    }
    # No uid known (standalone mode): no ownerReferences at all.
    (e0,) = sidecar_services(EAST, S)
    assert "ownerReferences" not in e0["metadata"]
    assert e0["spec"]["selector"] == {"app": "envoy", "release": "atlas"}


def test_desired_state_names_every_object() -> None:
    plan, state = _state()
    assert set(state.services) == {
        "east-thanos-sidecar0",
        "west-thanos-sidecar0",
        "west-thanos-sidecar1",
        "west-thanos-sidecar2",
    }
    assert set(state.secrets) == {
        "atlas-server",
        "atlas-client",
        "atlas-tls",
        "atlasd-ads",
        "atlas-envoy-values",
        "east-envoy-values",
        "east-atlas-identity",
        "west-envoy-values",
        "west-atlas-identity",
    }
    assert sorted(state.fleet.clusters) == ["east", "west"]
    assert state.fleet.alertmanagers == AMS
    assert state.fleet.pki is plan.pki
    assert state.ca_secret is plan.ca_secret


def _values(state: Any, name: str) -> dict[str, Any]:
    secret = state.secrets[name]
    assert set(secret_data(secret)) == {"values.yaml"}
    out: dict[str, Any] = yaml.safe_load(secret_data(secret)["values.yaml"])
    return out


def test_downstream_values_keep_the_chart_keys_and_carry_the_clusters_identity() -> None:
    plan, state = _state()
    secret = state.secrets["west-envoy-values"]
    assert secret["metadata"]["labels"][labels.OWNER_CLUSTER_LABEL] == "west"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-w"
    values = _values(state, "west-envoy-values")
    assert values["atlas"] == {"alertmanagerCount": 2}
    assert values["replicaCount"] == 1
    assert values["args"] == ["-l", "info", "-c", "/config/envoy.yaml"]
    assert values["service"]["enabled"] is True
    # 11901/11904 behind a LoadBalancer, no host ports (Pod Security baseline refuses
    # them); the plaintext alert relay is a container port only (local Prometheus).
    assert values["service"]["type"] == "LoadBalancer"
    assert {k: v and v["port"] for k, v in values["service"]["ports"].items()} == {
        "thanos": 11901,
        "alertmanager": None,  # null: removes the chart's default entry
        "prometheus": 11904,
    }
    assert {k: v["containerPort"] for k, v in values["ports"].items()} == {
        "admin": 9000,
        "thanos": 11901,
        "alertmanager": 11903,
        "prometheus": 11904,
    }
    assert not any("hostPort" in v for v in values["ports"].values())
    assert set(values["files"]) == {
        "envoy.yaml",
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "client.pem",
        "client-key.pem",
    }
    ident = plan.identities["west"]
    assert values["files"]["client.pem"].encode() == ident.client.cert_pem
    assert values["files"]["server-key.pem"].encode() == ident.server.key_pem
    assert values["files"]["ca.pem"].encode() == plan.pki.trust_bundle
    client = x509.load_pem_x509_certificate(ident.client.cert_pem)
    san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "west" in san.get_values_for_type(x509.DNSName)

    boot = yaml.safe_load(values["files"]["envoy.yaml"])
    assert boot["node"] == {"id": "west", "cluster": "west"}
    ads = boot["dynamic_resources"]["ads_config"]
    assert (ads["api_type"], ads["transport_api_version"]) == ("GRPC", "V3")
    assert ads["set_node_on_first_message_only"] is True
    (xds,) = boot["static_resources"]["clusters"]
    assert xds["name"] == "xds_cluster"
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "198.51.100.7", "port_value": 10950}
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert (
        tls["tls_certificates"][0]["certificate_chain"]["inline_string"]
        == values["files"]["client.pem"]
    )
    assert tls["validation_context"]["trusted_ca"]["inline_string"] == values["files"]["ca.pem"]
    assert tls["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "atlas"}}
    ]
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def _enrolled_state(settings: Settings = ENROLLING) -> Any:
    plan = plan_pki(
        secrets={}, clusters=(EAST, NORTH), settings=settings, now=NOW, keys=CountingKeys()
    )
    return plan, desired_state(
        clusters=(EAST, NORTH), alertmanagers=AMS, plan=plan, settings=settings
    )


def test_an_enrolled_clusters_values_hold_no_key_and_start_its_agent() -> None:
    plan, state = _enrolled_state()
    assert "north" not in plan.identities and "north" not in plan.identity_secrets
    assert "north-atlas-identity" not in state.secrets
    assert "east-atlas-identity" in state.secrets  # the compatible cluster beside it
    assert "north" not in state.fleet.identities and "north" in state.fleet.clusters
    secret = state.secrets["north-envoy-values"]
    assert labels.CA_SIGNED_LABEL not in secret["metadata"]["labels"]
    raw = secret_data(secret)["values.yaml"]
    assert b"-----BEGIN" not in raw and b"PRIVATE KEY" not in raw
    values = _values(state, "north-envoy-values")
    compatible = _values(state, "east-envoy-values")
    for key in ("atlas", "replicaCount", "args", "service", "ports"):
        assert values[key] == compatible[key], key
    assert values["agent"] == {
        "enabled": True,
        "cluster": "north",
        "namespace": "monitoring",
        "server": "atlasd.example:6307",
        "certDir": "/etc/atlas/certs",
    }
    assert set(values["files"]) == {"envoy.yaml"}
    boot = yaml.safe_load(values["files"]["envoy.yaml"])
    assert boot["node"] == {"id": "north", "cluster": "north"}
    (xds,) = boot["static_resources"]["clusters"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "198.51.100.7", "port_value": 10950}
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    files = {
        "path_config_source": {
            "path": "/etc/atlas/certs/sds-client.yaml",
            "watched_directory": {"path": "/etc/atlas/certs"},
        }
    }
    assert tls["tls_certificate_sds_secret_configs"] == [{"name": "client", "sds_config": files}]
    combined = tls["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "atlas"}}
    ]
    validation = combined["validation_context_sds_secret_config"]
    assert validation["name"] == "validation"
    assert validation["sds_config"]["path_config_source"]["path"].endswith("sds-validation.yaml")


def test_an_enrolled_cluster_without_an_enroll_address_gets_an_empty_server() -> None:
    _, state = _enrolled_state(S)
    assert _values(state, "north-envoy-values")["agent"]["server"] == ""


def test_an_mtls_bootstrap_takes_its_certificates_one_way() -> None:
    plan, _ = _state()
    with pytest.raises(ValueError, match="not both"):
        envoy_bootstrap(
            "x",
            xds_host="h",
            xds_port=1,
            tls=plan.identities["east"],
            ca_bundle=plan.pki.trust_bundle,
            sds_dir="/d",
        )


def test_observability_values() -> None:
    plan, state = _state()
    values = _values(state, "atlas-envoy-values")
    assert state.secrets["atlas-envoy-values"]["metadata"]["labels"] == {
        labels.MANAGED_BY_LABEL: "atlasd",
        labels.CA_SIGNED_LABEL: plan.pki.ca_serial,
    }
    boot = yaml.safe_load(values["files"]["envoy.yaml"])
    assert boot["node"]["id"] == "atlas"
    (xds,) = boot["static_resources"]["clusters"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "atlasd.monitoring.svc.cluster.local",
        "port_value": 6305,
    }
    assert xds["type"] == "STRICT_DNS"
    # mTLS to atlasd with the atlas client certificate (the forwarder identity), atlasd's
    # server certificate pinned.
    tls = xds["transport_socket"]["typed_config"]
    assert tls["sni"] == ADS_SERVER_NAME
    common = tls["common_tls_context"]
    (pair,) = common["tls_certificates"]
    atlas = plan.identities["atlas"]
    assert pair["certificate_chain"]["inline_string"] == atlas.client.cert_pem.decode()
    assert pair["private_key"]["inline_string"] == atlas.client.key_pem.decode()
    assert common["validation_context"] == {
        "trusted_ca": {"inline_string": plan.pki.trust_bundle.decode()},
        "match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": ADS_SERVER_NAME}}
        ],
    }
    assert "initial_metadata" not in boot["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert set(values["service"]["ports"]) == {"xds", "thanos", "alertmanager", "prometheus"}
    assert observability_values(S, identity=atlas, pki=plan.pki) == values


def test_observability_values_carry_the_forwarder_token() -> None:
    plan, _ = _state()
    s = Settings(forwarder_token="tok")
    values = observability_values(s, identity=plan.identities["atlas"], pki=plan.pki)
    boot = yaml.safe_load(values["files"]["envoy.yaml"])
    (svc,) = boot["dynamic_resources"]["ads_config"]["grpc_services"]
    assert svc["initial_metadata"] == [{"key": labels.FORWARDER_TOKEN_HEADER, "value": "tok"}]


def test_values_are_stable_across_builds() -> None:
    _, a = _state()
    _, b = _state()
    assert a.secrets == b.secrets and a.services == b.services


def test_mtls_bootstrap_needs_a_bundle() -> None:
    plan, _ = _state()
    with pytest.raises(ValueError, match="bundle"):
        envoy_bootstrap("x", xds_host="h", xds_port=1, tls=plan.identities["east"], ca_bundle=None)


ENVOY = shutil.which("envoy") or str(Path(__file__).parents[3] / ".venv" / "bin" / "envoy")


@pytest.mark.parametrize("which", ["downstream", "observability", "delta", "enrolled"])
def test_bootstraps_pass_envoy_validation(which: str, tmp_path: Path) -> None:
    if not Path(ENVOY).exists():
        pytest.fail("the envoy binary is part of the dev install (.venv/bin/envoy)")
    plan, state = _state()
    if which == "enrolled":
        # The agent's directory as it leaves it: the SDS documents (and its files).
        certs = tmp_path / "certs"
        write_sds_files(certs)
        ident = plan.identities["east"]
        for kind, ck in (("server", ident.server), ("client", ident.client)):
            (certs / f"{kind}.pem").write_bytes(ck.cert_pem)
            (certs / f"{kind}-key.pem").write_bytes(ck.key_pem)
        (certs / "ca.pem").write_bytes(plan.pki.trust_bundle)
        _, state = _enrolled_state(dataclasses.replace(ENROLLING, agent_cert_dir=str(certs)))
        text = _values(state, "north-envoy-values")["files"]["envoy.yaml"]
    elif which == "downstream":
        text = _values(state, "east-envoy-values")["files"]["envoy.yaml"]
    elif which == "observability":
        text = _values(state, "atlas-envoy-values")["files"]["envoy.yaml"]
    else:
        text = yaml.safe_dump(
            envoy_bootstrap(
                "east",
                xds_host="127.0.0.1",
                xds_port=10900,
                tls=plan.identities["east"],
                ca_bundle=plan.pki.trust_bundle,
                admin_port=0,
                api_type="DELTA_GRPC",
            )
        )
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


# JSON-like documents as the values hold them: maps of maps, lists, strings (one-line,
# multi-line, ones YAML would read as another type), numbers, booleans, nulls.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from(["", "yes", "null", "1e3", "0x1", "@type", "- a", "a: b", "x\ny\n", "z\n"])
    | st.text(max_size=20)
)
_docs = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    doc=st.dictionaries(st.text(min_size=1, max_size=8), _docs, min_size=1, max_size=6),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_shared_entries_dump_to_the_same_text(doc: dict[str, Any], data: st.DataObject) -> None:
    """Entries dumped once and reused give the text of one plain dump, the first time and
    from the memo."""
    shared = data.draw(st.sets(st.sampled_from(sorted(doc))))
    plain = dump_yaml(doc)
    assert dump_yaml(doc, shared=shared) == plain
    assert dump_yaml(doc, shared=shared) == plain


def test_values_dumped_with_shared_entries_are_one_plain_dump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every kind of cluster (keys held here, several replicas, enrolled): the values and
    the bootstrap in them are the text of one plain dump, byte for byte."""
    plan = plan_pki(secrets={}, clusters=(EAST, WEST), settings=S, now=NOW, keys=CountingKeys())
    eplan = plan_pki(
        secrets={}, clusters=(EAST, NORTH), settings=ENROLLING, now=NOW, keys=CountingKeys()
    )

    def texts() -> dict[str, bytes]:
        state = desired_state(clusters=(WEST, EAST), alertmanagers=AMS, plan=plan, settings=S)
        enrolled = desired_state(
            clusters=(EAST, NORTH), alertmanagers=AMS, plan=eplan, settings=ENROLLING
        )
        return {
            name: secret_data(st_.secrets[name])["values.yaml"]
            for st_, name in (
                (state, "east-envoy-values"),
                (state, "west-envoy-values"),
                (enrolled, "north-envoy-values"),
            )
        }

    shared = texts()
    monkeypatch.setattr(desired, "_VALUES_SHARED", frozenset())
    monkeypatch.setattr(desired, "_BOOTSTRAP_SHARED", frozenset())
    plain = texts()
    # Compared as booleans: the texts hold private keys, never shown in a failure.
    differ = sorted(name for name in plain if shared[name] != plain[name])
    assert differ == []
