"""The one error tree of the Kubernetes boundary.

Every failure that crosses ``atlasd.kube`` is one of these; lower-level errors
(httpx2, ssl, subprocess, yaml) are translated here or in ``client``/``config`` and
chained with ``raise ... from``::

    KubeError
     ├── ConfigError            kubeconfig / in-cluster / exec plugin unusable
     ├── TransportError         could not talk to the API server (connect, TLS, read, timeout)
     └── ApiError               the API server answered with a failure Status
          ├── BadRequest        400
          ├── Unauthorized      401
          ├── Forbidden         403
          ├── NotFound          404
          ├── Conflict          409 (stale resourceVersion, reason Conflict)
          │    └── AlreadyExists 409 reason AlreadyExists (create of an existing object)
          ├── Gone              410 (reason Expired or Gone: the watch RV is too old)
          ├── Invalid           422
          ├── TooManyRequests   429 (``retry_after`` seconds, if the server said)
          └── ServerError       5xx

``retriable`` answers "may the same request succeed if simply sent again later?" (as
httpx2 classifies on its exceptions): yes for TransportError, Conflict (AlreadyExists
included: re-read, then write), TooManyRequests and ServerError; no for the rest, which a
retry of the same request would only repeat. A loop that reads again from scratch (a
watch, a supervised subsystem, a reconcile worker's rate-limited requeue) retries any
KubeError with backoff (``atlasd.watch.backoff``): RBAC may be granted, a namespace
created. ``retry_after`` is the server's Retry-After, when it gave one.

Messages name the verb, the resource, the object and the Status reason. They carry the
Status message too, except for Secrets, whose Status messages are replaced by the
reason and the field paths of the causes: an echoed value could be key material.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class KubeError(Exception):
    """Anything that went wrong talking to Kubernetes."""

    # Whether the same request may succeed when sent again later (module docstring).
    retriable: ClassVar[bool] = False
    # Seconds the API server asked to wait (Retry-After), if it said.
    retry_after: float | None = None


class ConfigError(KubeError):
    """The kubeconfig, in-cluster configuration or credential plugin is unusable."""


class TransportError(KubeError):
    """The API server could not be reached or the connection broke."""

    retriable = True


class ApiError(KubeError):
    """The API server answered with a failure ``Status``."""

    def __init__(
        self,
        *,
        status: int,
        reason: str,
        message: str,
        verb: str,
        resource: str,
        name: str | None = None,
        namespace: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.verb = verb
        self.resource = resource
        self.name = name
        self.namespace = namespace
        self.retry_after = retry_after
        target = resource
        if name:
            target += f" {namespace + '/' if namespace else ''}{name}"
        elif namespace:
            target += f" in namespace {namespace}"
        text = f"{verb} {target}: {reason} ({status})"
        if message:
            text += f": {message}"
        super().__init__(text)


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    retriable = True


class AlreadyExists(Conflict):
    pass


class Gone(ApiError):
    pass


class Invalid(ApiError):
    pass


class TooManyRequests(ApiError):
    retriable = True


class ServerError(ApiError):
    retriable = True


_BY_CODE: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
    429: TooManyRequests,
}


def _safe_message(status: Mapping[str, Any], *, redact: bool) -> str:
    message = status.get("message")
    if not redact:
        return str(message) if message else ""
    # Secrets: keep only the field paths of the causes, never text that may echo a value.
    details = status.get("details")
    fields: list[str] = []
    if isinstance(details, Mapping):
        for cause in details.get("causes") or ():
            if isinstance(cause, Mapping) and cause.get("field"):
                fields.append(str(cause["field"]))
    return ("fields: " + ", ".join(fields)) if fields else "(message withheld for Secrets)"


def api_error(
    *,
    status_code: int,
    body: object,
    verb: str,
    resource: str,
    name: str | None = None,
    namespace: str | None = None,
    retry_after: float | None = None,
) -> ApiError:
    """Translate an HTTP failure and its (possibly absent) ``Status`` body into an ApiError."""
    status: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    code = status.get("code")
    if not isinstance(code, int) or code == 0:
        code = status_code
    reason = str(status.get("reason") or _default_reason(code))
    message = _safe_message(status, redact=resource.split(".")[0] == "secrets")
    details = status.get("details")
    if retry_after is None and isinstance(details, Mapping):
        seconds = details.get("retryAfterSeconds")
        if isinstance(seconds, int) and seconds > 0:
            retry_after = float(seconds)
    cls: type[ApiError]
    if code == 409 and reason == "AlreadyExists":
        cls = AlreadyExists
    elif code >= 500:
        cls = ServerError
    else:
        cls = _BY_CODE.get(code, ApiError)
    return cls(
        status=code,
        reason=reason,
        message=message,
        verb=verb,
        resource=resource,
        name=name,
        namespace=namespace,
        retry_after=retry_after,
    )


def _default_reason(code: int) -> str:
    return {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        409: "Conflict",
        410: "Expired",
        415: "UnsupportedMediaType",
        422: "Invalid",
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
        504: "Timeout",
    }.get(code, "Unknown")
