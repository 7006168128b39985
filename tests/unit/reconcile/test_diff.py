"""diff: ``differs``, ``plan_writes`` and ``observed_from_caches`` (pure, no API server)."""

from __future__ import annotations

import base64
import copy
import datetime as dt
from typing import Any

import pytest

from atlasd import labels
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import DownstreamCluster, ObjectRef, ServicePort, Settings
from atlasd.reconcile.desired import desired_state
from atlasd.reconcile.diff import Observed, differs, observed_from_caches, plan_writes
from atlasd.reconcile.pki import plan_pki
from tests.unit.reconcile.pkitools import CountingKeys, plan_secrets, with_annotation

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()


def _stored(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns for an applied object: defaults and metadata added."""
    out = copy.deepcopy(obj)
    meta = out["metadata"]
    meta.update(uid="u", resourceVersion="7", creationTimestamp="2026-01-01T00:00:00Z")
    meta["managedFields"] = [{"manager": "atlasd"}]
    if out["kind"] == "Service":
        spec = out["spec"]
        spec.update(clusterIPs=["None"], type="ClusterIP", sessionAffinity="None")
        spec.setdefault("ipFamilies", ["IPv4"])
    return out


SVC = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "a", "namespace": "monitoring", "labels": {"x": "1"}},
    "spec": {
        "clusterIP": "None",
        "selector": {"app": "envoy"},
        "ports": [{"name": "t", "port": 1, "protocol": "TCP", "targetPort": 1}],
    },
}
SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "s", "namespace": "monitoring", "labels": {"x": "1"}},
    "type": "Opaque",
    "data": {"k": base64.b64encode(b"v").decode()},
}


def _mut(obj: dict[str, Any], fn: Any) -> dict[str, Any]:
    out = _stored(obj)
    fn(out)
    return out


@pytest.mark.parametrize(
    ("desired", "observed", "expected"),
    [
        (SVC, None, True),
        (SVC, _stored(SVC), False),
        (SVC, _mut(SVC, lambda o: o["metadata"]["labels"].update(other="y")), False),
        (SVC, _mut(SVC, lambda o: o["metadata"]["labels"].update(x="2")), True),
        (SVC, _mut(SVC, lambda o: o["spec"]["selector"].update(extra="y")), True),
        (SVC, _mut(SVC, lambda o: o["spec"]["ports"].append({"name": "u", "port": 2})), True),
        (SVC, _mut(SVC, lambda o: o["spec"]["ports"][0].update(port=2)), True),
        (SECRET, _stored(SECRET), False),
        (SECRET, _mut(SECRET, lambda o: o["data"].update(k=base64.b64encode(b"w").decode())), True),
        (SECRET, _mut(SECRET, lambda o: o["data"].update(extra="")), True),
        (SECRET, _mut(SECRET, lambda o: o.update(type="kubernetes.io/tls")), True),
    ],
    ids=[
        "absent",
        "same",
        "foreign-label",
        "label-changed",
        "selector-extra-key",
        "extra-port",
        "port-changed",
        "secret-same",
        "secret-data-changed",
        "secret-extra-key",
        "secret-type",
    ],
)
def test_differs(desired: dict[str, Any], observed: dict[str, Any] | None, expected: bool) -> None:
    assert differs(desired, observed) is expected


CLUSTERS = (
    DownstreamCluster(
        name="east",
        external_ip="203.0.113.1",
        ports=(ServicePort("thanos", 10901),),
        replicas=2,
        source=ObjectRef("Service", "east", "monitoring", uid="e"),
    ),
    DownstreamCluster(
        name="west", external_ip="203.0.113.2", ports=(ServicePort("thanos", 10901),)
    ),
)


def _desired(clusters: Any = CLUSTERS, secrets: Any = None) -> Any:
    plan = plan_pki(
        secrets=secrets or {}, clusters=clusters, settings=S, now=NOW, keys=CountingKeys()
    )
    return plan, desired_state(clusters=clusters, alertmanagers=(), plan=plan, settings=S)


def _observed_from(state: Any, plan: Any) -> Observed:
    secrets = {n: _stored(dict(s)) for n, s in state.secrets.items()}
    secrets["atlas-ca"] = _stored(dict(plan.ca_secret))
    return Observed(
        cluster_services=[],
        alertmanager_services=[],
        owned_services={n: _stored(dict(s)) for n, s in state.services.items()},
        secrets=secrets,
    )


def test_first_pass_creates_everything() -> None:
    plan, state = _desired()
    writes = plan_writes(state, Observed([], [], {}, {}), protected=frozenset())
    assert writes.ca_create is plan.ca_secret and writes.ca_replace is None
    assert len(writes.apply) == len(state.secrets) + len(state.services) == 8 + 3
    assert writes.delete == ()


def test_steady_state_writes_nothing() -> None:
    plan, state = _desired()
    writes = plan_writes(state, _observed_from(state, plan), protected=frozenset())
    assert (writes.ca_create, writes.ca_replace, writes.apply, writes.delete) == (
        None,
        None,
        (),
        (),
    )


def test_prune_gone_cluster_but_not_protected_or_cluster_wide() -> None:
    plan, state = _desired()
    observed = _observed_from(state, plan)
    _plan2, state2 = _desired(clusters=CLUSTERS[:1], secrets=plan_secrets(plan))
    writes = plan_writes(state2, observed, protected=frozenset())
    assert writes.apply == ()
    assert sorted(writes.delete, key=lambda d: (d[0].plural, d[1])) == [
        (SECRETS, "west-atlas-identity"),
        (SECRETS, "west-envoy-values"),
        (SERVICES, "west-thanos-sidecar0"),
    ]
    # west still exists but is invalid now: protected, its objects stay.
    writes = plan_writes(state2, observed, protected=frozenset({"west"}))
    assert writes.delete == ()


def test_ca_rotate_annotation_forces_a_replace_that_drops_it() -> None:
    plan, state = _desired()
    observed = _observed_from(state, plan)
    ann = with_annotation(plan.ca_secret, labels.CA_ROTATE_ANNOTATION, "x")
    observed.secrets["atlas-ca"] = _stored(ann)  # type: ignore[index]
    writes = plan_writes(state, observed, protected=frozenset())
    assert writes.ca_replace is not None
    meta = writes.ca_replace["metadata"]
    assert "annotations" not in meta and "managedFields" not in meta
    assert meta["resourceVersion"] == "7"


def test_existing_secret_type_is_kept() -> None:
    plan, state = _desired()
    observed = _observed_from(state, plan)
    observed.secrets["atlas-server"]["type"] = "Opaque"  # type: ignore[index]
    writes = plan_writes(state, observed, protected=frozenset())
    assert writes.apply == ()


def test_a_cluster_service_is_never_overwritten_by_a_sidecar_service() -> None:
    plan, state = _desired()
    observed = _observed_from(state, plan)
    clash = {"metadata": {"name": "east-thanos-sidecar1", "labels": {labels.CLUSTER_LABEL: "true"}}}
    observed = Observed([clash], [], {}, observed.secrets)
    writes = plan_writes(state, observed, protected=frozenset())
    assert [s["metadata"]["name"] for s in writes.clashes] == ["east-thanos-sidecar1"]
    applied = {s["metadata"]["name"] for s in writes.apply}
    assert applied == {"east-thanos-sidecar0", "west-thanos-sidecar0"}


def test_observed_from_caches_filters_what_a_pass_needs() -> None:
    def obj(name: str, **lbls: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": dict(lbls)}, "spec": {}}

    managed = {labels.MANAGED_BY_LABEL: "atlasd"}
    services = {
        "east": obj("east", **{labels.CLUSTER_LABEL: "true"}),
        "am": obj("am", app="kube-prometheus-stack-alertmanager"),
        "east-thanos-sidecar0": obj("east-thanos-sidecar0", **managed),
        "grafana": obj("grafana", app="grafana"),
    }
    secrets = {
        "atlas-ca": obj("atlas-ca"),
        "east-envoy-values": obj("east-envoy-values", **managed),
        "helm-release": obj("helm-release"),
    }
    observed = observed_from_caches(services=services, secrets=secrets, settings=S)
    assert [s["metadata"]["name"] for s in observed.cluster_services] == ["east"]
    assert [s["metadata"]["name"] for s in observed.alertmanager_services] == ["am"]
    assert set(observed.owned_services) == {"east-thanos-sidecar0"}
    assert set(observed.secrets) == {"atlas-ca", "east-envoy-values"}


def _applied_labels(obj: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out = _stored(obj)
    out["metadata"]["managedFields"] = [
        {
            "manager": "atlasd",
            "operation": "Apply",
            "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in keys}}},
        }
    ]
    return out


def test_a_label_atlasd_applied_and_no_longer_sends_is_a_difference() -> None:
    stale = _applied_labels(SVC, ["x", "old"])
    stale["metadata"]["labels"]["old"] = "y"
    assert differs(SVC, stale)
    assert not differs(SVC, _applied_labels(SVC, ["x"]))
    # Someone else's label is no reason to write.
    foreign = _applied_labels(SVC, ["x"])
    foreign["metadata"]["labels"]["theirs"] = "z"
    assert not differs(SVC, foreign)
