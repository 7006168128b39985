"""``KeyedGauge``: a family whose series are kept as text by key serves what a labelled
prometheus_client Gauge with the same series serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from atlasd.metrics import KeyedGauge, exposition


def _samples(text: bytes) -> dict[str, float]:
    return {
        s.labels["name"]: s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_keyed_series_are_replaced_per_key_and_served_as_a_gauge_serves_them() -> None:
    keyed = KeyedGauge("atlasd_t_seconds", "A test family.", "name")
    registry = CollectorRegistry()
    gauge = Gauge("atlasd_t_seconds", "A test family.", ["name"], registry=registry)
    odd = 'we"ird\\name\n'
    keyed.set_key("east", {"east/server": 1.5, "east/client": 2e10, odd: float("inf")})
    keyed.set_key("west", {"west/server": 3.0})
    for name, value in (("east/server", 1.5), ("east/client", 2e10), (odd, float("inf"))):
        gauge.labels(name).set(value)
    gauge.labels("west/server").set(3.0)
    assert _samples(keyed.text()) == _samples(generate_latest(registry))
    assert sorted(keyed.text().splitlines()) == sorted(generate_latest(registry).splitlines())

    # A key's series are replaced together; another key's stay.
    keyed.set_key("east", {"east/server": 4.0})
    assert _samples(keyed.text()) == {"east/server": 4.0, "west/server": 3.0}
    assert keyed.samples() == {"east/server": 4.0, "west/server": 3.0}
    # A series another key took over is that key's: the first key's removal leaves it.
    keyed.set_key("north", {"east/server": 5.0})
    keyed.set_key("east", {})
    assert _samples(keyed.text()) == {"east/server": 5.0, "west/server": 3.0}
    keyed.set_key("north", {})
    keyed.set_key("west", {})
    assert _samples(keyed.text()) == {}
    assert b"# TYPE atlasd_t_seconds gauge" in keyed.text()
    assert [f.samples for f in keyed.collect()] == [[]]


def test_exposition_serves_the_registry_and_the_keyed_families() -> None:
    registry = CollectorRegistry()
    Gauge("atlasd_other", "Another family.", registry=registry).set(7)
    keyed = KeyedGauge("atlasd_t_seconds", "A test family.", "name")
    keyed.set_key("east", {"east/server": 1.0})
    families = {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(exposition(registry, [keyed]).decode())
    }
    assert families == {
        "atlasd_other": [({}, 7.0)],
        "atlasd_t_seconds": [({"name": "east/server"}, 1.0)],
    }
