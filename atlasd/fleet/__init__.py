"""The fleet: what the watch caches say, validated and versioned.

``validate`` turns cluster Services into ``DownstreamCluster``s and Problems (pure);
``trust`` reads the stored PKI (pure); ``keys`` says which key an object belongs to;
``state`` keeps the fleet per key and publishes immutable versions; ``feed`` hands the
newest version to its readers; ``run`` drives it from the informers.
"""
