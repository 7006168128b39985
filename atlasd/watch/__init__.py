"""Observing Kubernetes: informers (list + watch caches), their reconnect backoff, and a
keyed coalescing work queue that turns bursts of changes into single passes.

``informer.Informer`` keeps one resource's cache; ``informer.run_informers`` reports
ready once every cache has listed; ``workqueue.WorkQueue`` has client-go semantics.
"""
