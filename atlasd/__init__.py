"""atlasd: run Thanos securely across many Kubernetes clusters.

One Trio process that watches Kubernetes, issues and rotates the PKI, serves every
Envoy its configuration over xDS (ADS) and writes the DNS zone Thanos Query
discovers its sidecars from.
"""

__version__ = "0.1.0"
