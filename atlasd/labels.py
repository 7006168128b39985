"""The labels and annotations that are atlasd's public interface (docs/interface.md)."""

CLUSTER_LABEL = "goatlas.io/cluster"
REPLICAS_LABEL = "goatlas.io/replicas"
THANOS_SIDECAR_LABEL = "goatlas.io/thanos-sidecar"
ENVOY_SELECTORS_ANNOTATION = "goatlas.io/envoy-selectors"
THANOS_SERVICE_ANNOTATION = "goatlas.io/thanos-service"
THANOS_SERVICE_PORT_ANNOTATION = "goatlas.io/thanos-service-port"
PROMETHEUS_SERVICE_ANNOTATION = "goatlas.io/prometheus-service"
PROMETHEUS_SERVICE_PORT_ANNOTATION = "goatlas.io/prometheus-service-port"
ALERTMANAGER_SERVICE_ANNOTATION = "goatlas.io/alertmanager-service"
ALERTMANAGER_SERVICE_PORT_ANNOTATION = "goatlas.io/alertmanager-service-port"
DNS_GROUP_ANNOTATION = "goatlas.io/dns-group"
REPLICA_HOST_TEMPLATE_ANNOTATION = "goatlas.io/replica-host-template"
# "true": the cluster enrolls (its keys stay home, atlasd stores none); "false": the
# compatible mode (atlasd makes its keys, the values carry them). Absent: atlasd run
# --enrollment-default, unless the cluster's identity Secret exists (docs/security.md).
ENROLLMENT_ANNOTATION = "goatlas.io/enrollment"

CA_LABEL = "goatlas.io/ca"
CA_REVISION_LABEL = "goatlas.io/ca-revision"
CA_SERIAL_LABEL = "goatlas.io/ca-serial"
CA_ROTATE_ANNOTATION = "goatlas.io/ca-rotate"
CERT_LABEL = "goatlas.io/cert"
CA_SIGNED_LABEL = "goatlas.io/ca-signed"

# Everything atlasd creates carries this label, so it can list and prune what it owns.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "atlasd"
# Which downstream cluster an owned object belongs to (pruned when the cluster goes).
OWNER_CLUSTER_LABEL = "goatlas.io/owner-cluster"

CA_SECRET = "atlas-ca"
SERVER_SECRET = "atlas-server"
CLIENT_SECRET = "atlas-client"
TLS_SECRET = "atlas-tls"
# atlasd's own ADS server certificate (the observability Envoy dials it over TLS).
ADS_SECRET = "atlasd-ads"
OBS_VALUES_SECRET = "atlas-envoy-values"
# Revoked certificates (``atlasd.revocation``): written by `atlasd cluster revoke`.
REVOCATIONS_SECRET = "atlas-revocations"
FIELD_MANAGER = "atlasd"
# Header carrying the forwarder token on ADS streams (the observability Envoy sends it on
# its own stream and adds it to the downstream streams it forwards; see
# docs/xds-authorization.md).
FORWARDER_TOKEN_HEADER = "x-atlasd-forwarder-token"
# Set by a downstream Envoy on every Thanos answer through it, its own replies included
# (the cluster's name): `atlasd probe` tells "the downstream Envoy answered, its sidecar
# did not" from "the observability Envoy could not reach the cluster" by it.
CLUSTER_HEADER = "x-atlas-cluster"
# Set by the observability Envoy on its own reply to a Thanos or Prometheus call whose
# connection to the downstream Envoy failed: the transport's failure reason (a refused
# TCP connection, a TLS handshake refused by either side and why), read by `atlasd probe`.
UPSTREAM_FAILURE_HEADER = "x-atlas-upstream-failure"

# The Secrets atlasd writes per downstream cluster are named <cluster><suffix>.
VALUES_SECRET_SUFFIX = "-envoy-values"
IDENTITY_SECRET_SUFFIX = "-atlas-identity"


def values_secret_name(cluster: str) -> str:
    """The Secret holding the downstream Envoy chart's values for ``cluster``."""
    return f"{cluster}{VALUES_SECRET_SUFFIX}"


def identity_secret_name(cluster: str) -> str:
    """The Secret holding a cluster's own server and client certificates (reloaded on
    restart)."""
    return f"{cluster}{IDENTITY_SECRET_SUFFIX}"


# The Secrets of enrollment (atlasd.enroll, atlasd.reconcile.enrolled): part of atlasd but
# not of any cluster's desired state (no managed-by label: the reconciler neither watches
# nor prunes them), and the cluster each belongs to.
PART_OF_LABEL = "app.kubernetes.io/part-of"
ENROLLMENT_CLUSTER_LABEL = "goatlas.io/join-token-cluster"
