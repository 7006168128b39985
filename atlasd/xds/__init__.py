"""The Envoy xDS control plane: pure builders, an immutable snapshot cache, and the ADS server.

Layout (data flows top to bottom):

- ``plan``: where each Envoy listens and how local services are addressed (``ListenPlan``).
- ``builders``: ``model.Fleet`` -> one ``Snapshot`` per Envoy node (pure, memoized per resource);
  ``messages``: the Envoy message constructors they use.
- ``snapshot``: immutable, content-versioned, consistency-checked resource sets.
- ``cache``: the published snapshots and change notification; ``status``: per-Envoy status
  and the Prometheus metrics.
- ``protocol``: the SotW and Delta ADS state machines (pure, no I/O).
- ``authz``: who may fetch which node's resources.
- ``server``: the grpclib service, run inside Trio through trio-asyncio.

Only this package imports grpclib and the Envoy protobufs (see ``.importlinter``).
"""
