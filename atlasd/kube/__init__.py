"""The Kubernetes access layer: the only code that speaks HTTP to the API server.

- ``config``: kubeconfig / in-cluster configuration and credentials (tokenFile, exec).
- ``client``: ``KubeClient``, the async verbs (get, list, apply, create, replace, delete,
  watch) on raw httpx2.
- ``errors``: the error tree every failure is translated into.
- ``resources``: the API resources atlasd uses and their URL paths.
- ``bodies``: typed reads of the object fields atlasd reads (name, labels, data, ...).
- ``apply``: ``needs_apply`` (no-op passes write nothing).
- ``secrets``: Secret data decoded and encoded.
- ``events``: core/v1 Events, best effort.
- ``lease``: leader election on a coordination.k8s.io/v1 Lease.
"""
