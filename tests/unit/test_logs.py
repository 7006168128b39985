"""Log lines as a shipper reads them (JSON) and as a person reads them (text, as before)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from click.testing import CliRunner

import atlasd.daemon
from atlasd import cli, logs
from atlasd.cli import process
from atlasd.daemon import DaemonOptions


class _Lines(logging.Handler):
    def __init__(self, fmt: logs.LogFormat) -> None:
        super().__init__()
        self.setFormatter(logs.formatter(fmt))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[_Lines]:
    yield from _attached("json")


@pytest.fixture
def text_lines() -> Iterator[_Lines]:
    yield from _attached("text")


def _attached(fmt: logs.LogFormat) -> Iterator[_Lines]:
    handler = _Lines(fmt)
    logger = logging.getLogger("atlasd.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


log = logging.getLogger("atlasd.test")


def _docs(handler: _Lines) -> list[dict[str, Any]]:
    for line in handler.lines:
        assert "\n" not in line  # one object per line
    return [json.loads(line) for line in handler.lines]


def test_a_json_line_has_time_level_logger_message(json_lines: _Lines) -> None:
    before = dt.datetime.now(dt.UTC)
    log.warning("reconcile %s: %s; retrying", "east", "the API server said no")
    (doc,) = _docs(json_lines)
    assert doc["level"] == "warning"
    assert doc["logger"] == "atlasd.test"
    assert doc["message"] == "reconcile east: the API server said no; retrying"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), doc["time"]
    when = dt.datetime.fromisoformat(doc["time"])
    assert when.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= when <= dt.datetime.now(dt.UTC)
    assert set(doc) == {"time", "level", "logger", "message"}


def test_the_key_is_a_field_of_its_own(json_lines: _Lines) -> None:
    log.info("rejected: %s", "bad IP", extra={"key": "east"})
    with logs.bound(key="west"):
        log.info("from a bound task")
        log.info("the call's own key wins", extra={"key": "north"})
    log.info("after the block")
    docs = _docs(json_lines)
    assert [d.get("key") for d in docs] == ["east", "west", "north", None]
    assert docs[0]["message"] == "rejected: bad IP"


def test_a_field_named_like_a_core_one_does_not_replace_it(json_lines: _Lines) -> None:
    with logs.bound(level="cluster"):
        log.error("boom", extra={"logger": "someone else"})
    (doc,) = _docs(json_lines)
    assert doc["level"] == "error" and doc["logger"] == "atlasd.test"
    assert doc["fields.level"] == "cluster" and doc["fields.logger"] == "someone else"


async def test_bindings_belong_to_one_task(json_lines: _Lines) -> None:
    """Each trio task has its own context: a worker's key never labels another's lines."""
    a_bound = trio.Event()

    async def worker(key: str, go: trio.Event) -> None:
        logs.bind(key=key)
        if key == "a":
            a_bound.set()
        await go.wait()
        log.info("working")
        logs.bind(key=None)
        log.info("idle")

    go = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, "a", go)
        await a_bound.wait()
        nursery.start_soon(worker, "b", go)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    pairs = sorted((d["message"], d.get("key", "")) for d in _docs(json_lines))
    assert pairs == [("idle", ""), ("idle", ""), ("working", "a"), ("working", "b")]
    assert logs.bound_fields() == {}


def test_an_exception_is_a_field_on_the_same_line(json_lines: _Lines) -> None:
    try:
        raise ValueError("the certificate's SAN does not match east")
    except ValueError:
        log.exception("signing failed", extra={"key": "east"})
    (doc,) = _docs(json_lines)
    assert doc["message"] == "signing failed" and doc["key"] == "east"
    assert doc["level"] == "error"
    exc = doc["exception"]
    assert exc.startswith("Traceback (most recent call last):")
    assert exc.rstrip().endswith("ValueError: the certificate's SAN does not match east")


def test_secret_values_never_reach_a_line(json_lines: _Lines) -> None:
    pem = b"-----BEGIN PRIVATE KEY-----\nMIIEv...\n-----END PRIVATE KEY-----\n"
    log.info("stored", extra={"data": pem, "token": "s3cr3t", "Private-Key": "k"})
    (line,) = json_lines.lines
    assert "PRIVATE KEY" not in line and "s3cr3t" not in line
    doc = json.loads(line)
    assert doc["data"] == f"<{len(pem)} bytes>"
    assert doc["token"] == logs.REDACTED and doc["Private-Key"] == logs.REDACTED


def test_text_lines_are_as_before(text_lines: _Lines) -> None:
    with logs.bound(key="west"):
        log.warning("reconcile %s: %s; retrying", "east", "no", extra={"key": "east"})
    (line,) = text_lines.lines
    # TIME LEVEL LOGGER: MESSAGE, nothing appended.
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING atlasd\.test: "
        r"reconcile east: no; retrying",
        line,
    ), line


# -- the option --------------------------------------------------------------------------


@pytest.fixture
def kubeconfig(unreachable_kubeconfig: Path) -> Path:
    return unreachable_kubeconfig


@pytest.fixture
def daemon_logs_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` stops where the daemon would start; the stand-in logs one keyed line."""

    class Stand:
        def __init__(self, options: DaemonOptions) -> None:
            pass

        def run(self) -> None:
            logging.getLogger("atlasd.daemon").warning("hello", extra={"key": "east"})

    monkeypatch.setattr(atlasd.daemon, "Daemon", Stand)
    monkeypatch.setattr(process, "serve_until_signalled", lambda main, grace: main())


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ("run", ["--log-format", "json"]),
        ("run", {"ATLAS_LOG_FORMAT": "json"}),
        ("controller", {"ATLAS_LOG_FORMAT": "json", "LOGLEVEL": "info"}),
        ("run", []),
    ],
)
def test_log_format_option_and_variable(
    command: str,
    how: list[str] | dict[str, str],
    kubeconfig: Path,
    tmp_path: Path,
    daemon_logs_a_line: None,
) -> None:
    args = [
        command,
        "--kubeconfig",
        str(kubeconfig),
        f"--zone-file={tmp_path / 'z'}",
        "--http-listen=127.0.0.1:0",
        "--ads-listen=127.0.0.1:0",
    ]
    env = how if isinstance(how, dict) else {}
    if isinstance(how, list):
        args += how
    try:
        result = CliRunner().invoke(cli.cli, args, env=env, catch_exceptions=False)
    finally:
        logs.use_format("text")  # the next test's handlers are the text ones again
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if "hello" in ln]
    if how:
        doc = json.loads(line)
        assert (doc["level"], doc["logger"], doc["message"], doc["key"]) == (
            "warning",
            "atlasd.daemon",
            "hello",
            "east",
        )
    else:
        assert line.endswith(" WARNING atlasd.daemon: hello")


def test_an_unknown_log_format_is_refused_naming_the_variable(kubeconfig: Path) -> None:
    bad = CliRunner().invoke(
        cli.cli, ["run", "--kubeconfig", str(kubeconfig)], env={"ATLAS_LOG_FORMAT": "xml"}
    )
    assert bad.exit_code == 2 and "ATLAS_LOG_FORMAT" in bad.output and "'xml'" in bad.output
