"""``atlasd check``: each check on a /status document, the exit code, the output forms."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from atlasd.cli import check as check_mod
from atlasd.cli.app import cli
from atlasd.cli.check import checks, parse_duration

NOW = 1_800_000_000.0
DAY = 86400.0


def good() -> dict[str, Any]:
    return {
        "ready": True,
        "unhealthy": [],
        "certificates": [{"name": "ca", "not_after": NOW + 900 * DAY}],
        "envoys": [{"node": "atlas", "kind": "delta"}, {"node": "east", "kind": "sotw"}],
        "clusters": [{"name": "east"}],
        "zone": {"serial": 1, "records": 1, "too_large": []},
        "problems": [],
        "query": {
            "up": True,
            "error": None,
            "clusters": {"east": {"seen": True, "duplicate_of": []}},
        },
    }


def failing(doc: dict[str, Any]) -> list[str]:
    return [c.name for c in checks(doc, fail_within=30 * DAY, now=NOW) if not c.ok]


def test_all_well() -> None:
    assert failing(good()) == []


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"ready": False, "not_ready": ["cache"]}, "atlasd is ready"),
        ({"unhealthy": ["zone: failed 5 times"]}, "no subsystem keeps failing"),
        (
            {"certificates": [{"name": "east", "not_after": NOW + 10 * DAY}]},
            "certificates are not about to expire",
        ),
        (
            {"envoys": [{"node": "atlas"}, {"node": "east", "last_nack": {"message": "x"}}]},
            "no Envoy rejects its configuration",
        ),
        ({"envoys": [{"node": "atlas"}]}, "every Envoy is connected"),
        (
            {"zone": {"too_large": [{"name": "_thanos._tcp.sidecars.thanos.atlas."}]}},
            "every SRV answer fits one DNS message",
        ),
        ({"problems": [{"object": "Service/bad"}]}, "no cluster Service is invalid"),
        (
            {"query": {"up": True, "clusters": {"east": {"seen": False}}}},
            "Thanos Query sees every cluster",
        ),
        (
            {"query": {"up": False, "error": "refused", "clusters": {}}},
            "Thanos Query sees every cluster",
        ),
        (
            {"query": {"up": True, "clusters": {"east": {"seen": True, "duplicate_of": ["x"]}}}},
            "no two clusters announce the same external labels",
        ),
    ],
)
def test_each_problem_fails_its_check(change: dict[str, Any], name: str) -> None:
    assert failing({**good(), **change}) == [name]


def test_durations() -> None:
    assert parse_duration("30d") == 30 * DAY and parse_duration("90m") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("30 days")


def test_exit_codes_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [good()]
    monkeypatch.setattr(check_mod, "fetch_status", lambda url: docs[0])
    monkeypatch.setattr(check_mod.time, "time", lambda: NOW)
    runner = CliRunner()
    ok = runner.invoke(cli, ["check"])
    assert ok.exit_code == 0 and "FAIL" not in ok.output
    docs[0] = {**good(), "envoys": [{"node": "atlas"}]}
    bad = runner.invoke(cli, ["check"])
    assert bad.exit_code == 1
    assert "FAIL every Envoy is connected: not connected: east" in bad.output
    out = runner.invoke(cli, ["check", "-o", "json"])
    doc = json.loads(out.output)
    assert out.exit_code == 1 and doc["ok"] is False
    usage = runner.invoke(cli, ["check", "--fail-within", "soon"])
    assert usage.exit_code == 1 and "--fail-within" in usage.output


def test_a_cluster_query_does_not_see_is_named_with_its_broken_hop() -> None:
    doc = {
        **good(),
        "query": {
            "up": True,
            "clusters": {
                "east": {"seen": False, "probe": {"hop": "upstream-down"}},
                "west": {"seen": False, "probe": None},
            },
        },
    }
    [c] = [c for c in checks(doc, fail_within=30 * DAY, now=NOW) if not c.ok]
    assert c.detail == "not seen: east (upstream-down), west"
    assert "atlasd probe" in c.hint
