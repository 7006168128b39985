"""The error tree: Status -> exception class, messages that name verb/resource/reason."""

from __future__ import annotations

from typing import Any

import pytest

from atlasd.kube import errors as e
from atlasd.kube.resources import (
    LEASES,
    NAMESPACES,
    SECRETS,
    SERVICES,
    ApiResource,
    resource_for,
)


def _status(code: int, reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
        **extra,
    }


@pytest.mark.parametrize(
    ("code", "body", "cls"),
    [
        (400, _status(400, "BadRequest"), e.BadRequest),
        (401, _status(401, "Unauthorized"), e.Unauthorized),
        (403, _status(403, "Forbidden"), e.Forbidden),
        (404, _status(404, "NotFound"), e.NotFound),
        (409, _status(409, "Conflict"), e.Conflict),
        (409, _status(409, "AlreadyExists"), e.AlreadyExists),
        (410, _status(410, "Expired"), e.Gone),
        (410, _status(410, "Gone"), e.Gone),
        (422, _status(422, "Invalid"), e.Invalid),
        (429, _status(429, "TooManyRequests"), e.TooManyRequests),
        (500, _status(500, "InternalError"), e.ServerError),
        (503, None, e.ServerError),
        (504, "not json", e.ServerError),
        (418, None, e.ApiError),
        # A 200 watch stream can carry an ERROR Status: its code decides.
        (200, _status(410, "Expired"), e.Gone),
    ],
)
def test_status_maps_to_class(code: int, body: object, cls: type[e.ApiError]) -> None:
    err = e.api_error(
        status_code=code, body=body, verb="get", resource="services", name="x", namespace="ns"
    )
    assert type(err) is cls
    assert isinstance(err, e.KubeError)


def test_message_names_verb_resource_object_and_reason() -> None:
    err = e.api_error(
        status_code=403,
        body=_status(403, "Forbidden", 'services "web" is forbidden: User "u" cannot patch'),
        verb="apply",
        resource="services",
        name="web",
        namespace="monitoring",
    )
    assert str(err).startswith("apply services monitoring/web: Forbidden (403): ")
    assert err.reason == "Forbidden" and err.status == 403 and err.verb == "apply"
    listed = e.api_error(status_code=403, body=None, verb="list", resource="secrets", namespace="m")
    assert str(listed).startswith("list secrets in namespace m: Forbidden (403)")


def test_secret_status_messages_are_withheld() -> None:
    body = _status(
        422,
        "Invalid",
        'Secret "s" is invalid: data[x]: Invalid value: "LEAKED-VALUE"',
        details={"causes": [{"field": "data[x]", "message": "Invalid value: LEAKED-VALUE"}]},
    )
    err = e.api_error(status_code=422, body=body, verb="apply", resource="secrets", name="s")
    assert "LEAKED-VALUE" not in str(err)
    assert "data[x]" in str(err) and "Invalid (422)" in str(err)
    bare = e.api_error(
        status_code=422,
        body=_status(422, "Invalid", "LEAKED-VALUE"),
        verb="apply",
        resource="secrets",
        name="s",
    )
    assert "LEAKED-VALUE" not in str(bare)


def test_retry_after_is_kept() -> None:
    err = e.api_error(status_code=429, body=None, verb="list", resource="services", retry_after=3.0)
    assert isinstance(err, e.TooManyRequests) and err.retry_after == 3.0


def test_resource_paths() -> None:
    assert SERVICES.path(namespace="m") == "/api/v1/namespaces/m/services"
    assert SERVICES.path(namespace="m", name="a") == "/api/v1/namespaces/m/services/a"
    assert LEASES.path(namespace="m", name="l") == (
        "/apis/coordination.k8s.io/v1/namespaces/m/leases/l"
    )
    assert NAMESPACES.path(name="m") == "/api/v1/namespaces/m"
    assert str(LEASES) == "leases.coordination.k8s.io" and str(SECRETS) == "secrets"
    with pytest.raises(ValueError, match="namespaced"):
        SERVICES.path()


@pytest.mark.parametrize(
    ("api_version", "kind", "expected"),
    [
        ("v1", "Secret", SECRETS),
        ("coordination.k8s.io/v1", "Lease", LEASES),
        (
            "helm.cattle.io/v1",
            "HelmChart",
            ApiResource("helm.cattle.io/v1", "HelmChart", "helmcharts"),
        ),
        (
            "helm.toolkit.fluxcd.io/v2",
            "HelmRelease",
            ApiResource("helm.toolkit.fluxcd.io/v2", "HelmRelease", "helmreleases"),
        ),
        ("x/v1", "Policy", ApiResource("x/v1", "Policy", "policies")),
        ("x/v1", "Ingress", ApiResource("x/v1", "Ingress", "ingresses")),
    ],
)
def test_resource_for(api_version: str, kind: str, expected: ApiResource) -> None:
    assert resource_for(api_version, kind) == expected


def test_retry_after_from_status_details() -> None:
    body = _status(429, "TooManyRequests", details={"retryAfterSeconds": 4})
    err = e.api_error(status_code=429, body=body, verb="list", resource="services")
    assert err.retry_after == 4.0
    header_wins = e.api_error(
        status_code=429, body=body, verb="list", resource="services", retry_after=1.0
    )
    assert header_wins.retry_after == 1.0


@pytest.mark.parametrize(
    ("code", "reason", "retriable"),
    [
        (400, "BadRequest", False),
        (401, "Unauthorized", False),
        (403, "Forbidden", False),
        (404, "NotFound", False),
        (409, "Conflict", True),
        (409, "AlreadyExists", True),
        (410, "Expired", False),
        (422, "Invalid", False),
        (429, "TooManyRequests", True),
        (503, "ServiceUnavailable", True),
    ],
)
def test_the_tree_says_what_is_worth_retrying(code: int, reason: str, retriable: bool) -> None:
    exc = e.api_error(status_code=code, body={"reason": reason}, verb="get", resource="configmaps")
    assert exc.retriable is retriable
    assert e.TransportError("connect").retriable
    assert not e.ConfigError("no kubeconfig").retriable
    assert e.TransportError("connect").retry_after is None
