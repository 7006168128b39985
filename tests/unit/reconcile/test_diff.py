"""diff: ``differs``, ``plan_key_writes`` and ``ca_write`` (pure, no API server)."""

from __future__ import annotations

import base64
import copy
import datetime as dt
from typing import Any

import pytest

from atlasd import labels
from atlasd.kube import bodies
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import DownstreamCluster, ObjectRef, ServicePort, Settings
from atlasd.reconcile.desired import desired_state
from atlasd.reconcile.diff import KeyWrites, ca_write, differs, plan_key_writes
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


Objs = dict[str, dict[str, Any]]


def _observed_from(state: Any, plan: Any) -> tuple[Objs, Objs]:
    """(Services, Secrets) as stored after ``state`` was applied."""
    secrets = {n: _stored(dict(o)) for n, o in state.secrets.items()}
    secrets["atlas-ca"] = _stored(dict(plan.ca_secret))
    return {n: _stored(dict(o)) for n, o in state.services.items()}, secrets


def _by_owner(objs: Any) -> dict[str | None, Objs]:
    out: dict[str | None, Objs] = {}
    for n, o in objs.items():
        out.setdefault(bodies.label(o, labels.OWNER_CLUSTER_LABEL), {})[n] = o
    return out


def _plan_all(
    state: Any,
    services: Objs,
    secrets: Objs,
    *,
    protected: frozenset[str] = frozenset(),
    cluster_services: frozenset[str] = frozenset(),
) -> KeyWrites:
    """``plan_key_writes`` for every key (what the Reconciler does key by key), merged;
    ``atlas-ca`` left out (``ca_write``)."""
    want_svc, want_sec = _by_owner(state.services), _by_owner(state.secrets)
    have_svc, have_sec = _by_owner(services), _by_owner(secrets)
    apply: list[Any] = []
    delete: list[Any] = []
    clashes: list[Any] = []
    for key in sorted(set(want_svc) | set(want_sec) | set(have_svc) | set(have_sec), key=str):
        if key in protected:
            continue
        w = plan_key_writes(
            services=want_svc.get(key, {}),
            secrets=want_sec.get(key, {}),
            observed_services=have_svc.get(key, {}),
            observed_secrets={
                n: o for n, o in have_sec.get(key, {}).items() if n != labels.CA_SECRET
            },
            is_cluster_service=lambda n: n in cluster_services,
            prune=key is not None,
        )
        apply += w.apply
        delete += w.delete
        clashes += w.clashes
    return KeyWrites(tuple(apply), tuple(delete), tuple(clashes))


def test_first_pass_creates_everything() -> None:
    plan, state = _desired()
    assert ca_write(plan.ca_secret, None) == ("create", plan.ca_secret)
    writes = _plan_all(state, {}, {})
    assert len(writes.apply) == len(state.secrets) + len(state.services) == 9 + 3
    assert writes.delete == ()


def test_steady_state_writes_nothing() -> None:
    plan, state = _desired()
    services, secrets = _observed_from(state, plan)
    assert ca_write(plan.ca_secret, secrets["atlas-ca"]) is None
    writes = _plan_all(state, services, secrets)
    assert (writes.apply, writes.delete) == ((), ())


def test_prune_gone_cluster_but_not_protected_or_cluster_wide() -> None:
    plan, state = _desired()
    services, secrets = _observed_from(state, plan)
    _plan2, state2 = _desired(clusters=CLUSTERS[:1], secrets=plan_secrets(plan))
    writes = _plan_all(state2, services, secrets)
    assert writes.apply == ()
    assert sorted(writes.delete, key=lambda d: (d[0].plural, d[1])) == [
        (SECRETS, "west-atlas-identity"),
        (SECRETS, "west-envoy-values"),
        (SERVICES, "west-thanos-sidecar0"),
    ]
    # west still exists but is invalid now: protected, its objects stay.
    writes = _plan_all(state2, services, secrets, protected=frozenset({"west"}))
    assert writes.delete == ()


def test_ca_rotate_annotation_forces_a_replace_that_drops_it() -> None:
    plan, _state = _desired()
    ann = with_annotation(plan.ca_secret, labels.CA_ROTATE_ANNOTATION, "x")
    step = ca_write(plan.ca_secret, _stored(ann))
    assert step is not None and step[0] == "replace"
    meta = step[1]["metadata"]
    assert "annotations" not in meta and "managedFields" not in meta
    assert meta["resourceVersion"] == "7"


def test_existing_secret_type_is_kept() -> None:
    plan, state = _desired()
    services, secrets = _observed_from(state, plan)
    secrets["atlas-server"]["type"] = "Opaque"
    assert _plan_all(state, services, secrets).apply == ()


def test_a_cluster_service_is_never_overwritten_by_a_sidecar_service() -> None:
    plan, state = _desired()
    _services, secrets = _observed_from(state, plan)
    writes = _plan_all(state, {}, secrets, cluster_services=frozenset({"east-thanos-sidecar1"}))
    assert [s["metadata"]["name"] for s in writes.clashes] == ["east-thanos-sidecar1"]
    applied = {s["metadata"]["name"] for s in writes.apply}
    assert applied == {"east-thanos-sidecar0", "west-thanos-sidecar0"}


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
