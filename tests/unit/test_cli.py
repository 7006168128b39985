"""The command line as a new user meets it: one line per mistake, never a traceback; the
original Atlas's commands, flags and environment map onto atlasd's options."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import atlasd.daemon
from atlasd import __version__, cli
from atlasd.cli import compat, process, status
from atlasd.daemon import DaemonOptions


def _invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.cli, list(args), env=env, catch_exceptions=False)


def _one_error_line(result: Result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def kubeconfig(unreachable_kubeconfig: Path) -> Path:
    return unreachable_kubeconfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[DaemonOptions]:
    """Stop `run` just before the daemon would start; keep the options it built."""
    seen: list[DaemonOptions] = []

    class Recorder:
        def __init__(self, options: DaemonOptions) -> None:
            seen.append(options)

        def run(self) -> None:
            return None

    monkeypatch.setattr(atlasd.daemon, "Daemon", Recorder)
    monkeypatch.setattr(process, "serve_until_signalled", lambda main, grace: main())
    return seen


def test_version_flag_and_subcommand() -> None:
    assert _invoke("--version").output.strip() == f"atlasd {__version__}"
    assert _invoke("version").output.strip() == f"atlasd {__version__}"


def test_run_with_a_missing_kubeconfig_or_context_is_one_line(kubeconfig: Path) -> None:
    missing = _invoke("run", "--kubeconfig", "/missing/kubeconfig")
    assert missing.exit_code == 1
    assert _one_error_line(missing) == "error: kubeconfig /missing/kubeconfig does not exist"
    nope = _invoke("run", "--kubeconfig", str(kubeconfig), "--context", "nope")
    assert nope.exit_code == 1
    assert "context 'nope' not found" in _one_error_line(nope)


def test_run_with_a_port_in_use_is_one_line(kubeconfig: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _invoke(
            "run",
            "--kubeconfig",
            str(kubeconfig),
            f"--zone-file={tmp_path / 'z'}",
            f"--http-listen=127.0.0.1:{port}",
        )
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert f"--http-listen 127.0.0.1:{port}" in line and "address already in use" in line


def test_run_with_the_same_port_twice_is_one_line(kubeconfig: Path, tmp_path: Path) -> None:
    result = _invoke(
        "run",
        "--kubeconfig",
        str(kubeconfig),
        f"--zone-file={tmp_path / 'z'}",
        "--http-listen=127.0.0.1:46309",
        "--ads-listen=127.0.0.1:46309",
    )
    assert result.exit_code == 1
    assert "--ads-listen 127.0.0.1:46309 is also --http-listen" in _one_error_line(result)


def test_run_with_a_zone_file_in_a_missing_directory_is_one_line(kubeconfig: Path) -> None:
    result = _invoke("run", "--kubeconfig", str(kubeconfig), "--zone-file=/no/such/dir/z")
    assert result.exit_code == 1
    assert "--zone-file /no/such/dir/z: directory /no/such/dir does not exist" in (
        _one_error_line(result)
    )


def test_run_with_an_empty_token_file_is_one_line(kubeconfig: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    result = _invoke(
        "run",
        "--kubeconfig",
        str(kubeconfig),
        f"--zone-file={tmp_path / 'z'}",
        f"--forwarder-token-file={token}",
    )
    assert result.exit_code == 1
    assert "--forwarder-token-file" in _one_error_line(result)


@pytest.mark.parametrize("value", ["..", ".", "Monitoring", "a/b", "x" * 64])
def test_namespace_names_are_validated(value: str) -> None:
    result = _invoke("cluster", "list", "-n", value)
    assert result.exit_code == 2
    assert "--namespace" in result.output and "not a namespace name" in result.output


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("trace", logging.DEBUG),
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        ("warn", logging.WARNING),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("fatal", logging.CRITICAL),
        ("panic", logging.CRITICAL),
    ],
)
def test_log_levels_take_the_originals_spelling(value: str, level: int) -> None:
    """The original logs with logrus: its LOGLEVEL may name any logrus level."""
    assert _invoke("--log-level", value, "version").exit_code == 0
    assert logging.getLogger().level == level
    assert _invoke("version", env={"LOGLEVEL": value}).exit_code == 0
    assert logging.getLogger().level == level


def test_an_unknown_log_level_is_refused_naming_the_variable() -> None:
    bad = _invoke("version", env={"LOGLEVEL": "loud"})
    assert bad.exit_code == 2 and "LOGLEVEL" in bad.output and "'loud'" in bad.output


def test_startup_errors_of_the_user_are_one_line_and_bugs_propagate() -> None:
    bind = OSError(98, "error while attempting to bind on address ('0.0.0.0', 6309)")
    group = BaseExceptionGroup("nursery", [BaseExceptionGroup("inner", [bind])])
    assert process.startup_error(group) == str(bind)
    bug = BaseExceptionGroup("nursery", [bind, KeyError("x")])
    with pytest.raises(BaseExceptionGroup):
        process.startup_error(bug)


def test_run_options_reach_the_daemon(
    captured: list[DaemonOptions], kubeconfig: Path, tmp_path: Path
) -> None:
    result = _invoke(
        "run",
        "--kubeconfig",
        str(kubeconfig),
        "-n",
        "obs",
        f"--zone-file={tmp_path / 'z'}",
        "--http-listen=127.0.0.1:0",
        "--ads-listen=127.0.0.1:0",
    )
    assert result.exit_code == 0, result.output
    (opts,) = captured
    assert opts.legacy_locks == ("atlas",) and not opts.serve_only
    assert opts.settings.atlasd_ads_host == "atlasd.obs.svc.cluster.local"
    off = _invoke(
        "run",
        "--kubeconfig",
        str(kubeconfig),
        f"--zone-file={tmp_path / 'z'}",
        "--http-listen=127.0.0.1:0",
        "--ads-listen=127.0.0.1:0",
        "--legacy-locks=",
    )
    assert off.exit_code == 0 and captured[-1].legacy_locks == ()
    # The same from the environment (what a chart sets): empty means none, not the default.
    for value, locks in (("", ()), ("atlas,atlas-old", ("atlas", "atlas-old"))):
        env = _invoke(
            "run",
            "--kubeconfig",
            str(kubeconfig),
            f"--zone-file={tmp_path / 'z'}",
            "--http-listen=127.0.0.1:0",
            "--ads-listen=127.0.0.1:0",
            env={"ATLAS_LEGACY_LOCKS": value},
        )
        assert env.exit_code == 0 and captured[-1].legacy_locks == locks, value


# The environment the original chart (charts/atlas) gives its two Deployments, plus the
# variables its commands read.
ORIGINAL_CONTROLLER_ENV = {
    "ATLAS_DNS_CM_NAME": "atlas-atlas-coredns",
    "ATLAS_ENVOY_ADS_ADDRESS": "envoyads.atlas.local",
    "ATLAS_ENVOY_ADDRESS": "envoy.atlas.local",
    "ATLAS_ALERTMANAGER_SELECTOR": "app=kube-prometheus-stack-alertmanager",
    "METRICS_PORT": "0",
    "NAMESPACE": "obs",
    "LOCKNAME": "atlas-ctl",
    "LOGLEVEL": "warn",
}


def test_the_originals_controller_command_and_env(
    captured: list[DaemonOptions], kubeconfig: Path
) -> None:
    env = {**ORIGINAL_CONTROLLER_ENV, "KUBECONFIG": str(kubeconfig)}
    result = _invoke("controller", env=env)
    assert result.exit_code == 0, result.output
    (opts,) = captured
    s = opts.settings
    assert (s.namespace, s.dns_configmap_name) == ("obs", "atlas-atlas-coredns")
    assert (s.envoy_ads_address, s.envoy_address) == ("envoyads.atlas.local", "envoy.atlas.local")
    assert s.atlasd_ads_host == "atlas-atlas-envoy-ads.obs.svc.cluster.local"
    assert opts.http_port == 0
    assert opts.legacy_locks == ("atlas-ctl", "atlas") and not opts.serve_only
    assert opts.zone_file.parent.is_dir()  # a writable default: not the working directory


def test_the_originals_envoy_ads_command_and_flags(
    captured: list[DaemonOptions], kubeconfig: Path
) -> None:
    env = {
        "ATLAS_ENVOY_ADDRESS": "envoy.atlas.local",
        "ALERTMANAGER_SELECTOR": "app=am",
        "NODE_ID": "7",
        "ENVOY_ADS_METRICS_PORT": "0",
        "KUBECONFIG": str(kubeconfig),
        "ATLAS_LEADER_ELECTION": "false",
    }
    result = _invoke("envoy-ads", "--grpc-port=0", env=env)
    assert result.exit_code == 0, result.output
    (opts,) = captured
    assert opts.ads_port == 0 and opts.http_port == 0
    assert opts.settings.alertmanager_selector == (("app", "am"),)
    # Never leads, whatever ATLAS_LEADER_ELECTION says (it would write otherwise).
    assert opts.serve_only and opts.leader_election
    bad = _invoke("envoy-ads", "--node-id=0", env=env)
    assert bad.exit_code == 2 and "--node-id" in bad.output


def test_the_originals_cluster_spellings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(compat, "add_cluster", lambda **kw: calls.append(kw))
    monkeypatch.setattr(compat, "print_cluster_values", lambda **kw: calls.append(kw))
    args = ["cluster-add", "--name", "east", "--external-ip", "192.0.2.1,192.0.2.2"]
    assert _invoke(*args, "--external-ip", "192.0.2.3", "--replicas", "2").exit_code == 0
    assert calls[0]["name"] == "east" and calls[0]["replicas"] == 2
    assert calls[0]["external_ips"] == ("192.0.2.1", "192.0.2.2", "192.0.2.3")
    assert _invoke("cluster-values", "--name", "east", "--format", "helm-chart").exit_code == 0
    assert calls[1]["name"] == "east" and calls[1]["fmt"] == "helm-chart"
    assert _invoke("cluster-add", "--external-ip", "192.0.2.1").exit_code == 2


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>hello</html>" if self.path == "/ok/status" else b"404 page not found"
        self.send_response(200 if self.path == "/ok/status" else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def web() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_status_says_what_answered_when_it_is_not_atlasd(web: str) -> None:
    not_found = _invoke("status", "--url", web)
    assert not_found.exit_code == 1
    line = _one_error_line(not_found)
    assert "answered 404 Not Found" in line and "server: BaseHTTP" in line
    assert "--http-listen" in line
    html = _invoke("status", "--url", f"{web}/ok")
    assert html.exit_code == 1 and "text/html, not JSON" in _one_error_line(html)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = _invoke("status", "--url", f"http://127.0.0.1:{closed}")
    assert refused.exit_code == 1 and "cannot reach" in _one_error_line(refused)


def test_status_shows_why_it_does_not_lead() -> None:
    text = status.render_status(
        {
            "version": "x",
            "leader": False,
            "ready": True,
            "leadership": {"blocked_by": "ConfigMap m/atlas", "reason": "the original holds it"},
        }
    )
    assert "NOT LEADING: the original holds it" in text


def test_status_names_where_the_event_loop_was_held() -> None:
    at = time.time() - 30
    where = "yaml/representer.py:33 represent_data < atlasd/reconcile/objects.py:90 dump_yaml"
    text = status.render_status({"version": "x", "leader": True, "ready": True, "loop": {
        "stalls": 3, "threshold_ms": 100.0, "last": {"at": at, "held_ms": 412.5, "where": where}}})  # fmt: skip
    [line] = [line for line in text.splitlines() if line.startswith("EVENT LOOP")]
    assert "3 times over 100.0 ms" in line and "412.5 ms" in line and "s ago" in line
    assert line.endswith(where)
    assert "EVENT LOOP" not in status.render_status({"version": "x", "leader": True, "ready": True})


def test_status_says_how_many_certificates_of_a_cluster_are_revoked() -> None:
    def cluster(name: str, revoked: int) -> dict[str, Any]:
        return {"name": name, "external_ip": "192.0.2.1", "replicas": 1, "dns_group": None,
                "sidecars": [], "mode": "compatible", "certificate_expiry": None,
                "revoked_certificates": revoked}  # fmt: skip

    text = status.render_status({"version": "x", "leader": True, "ready": True,
                                 "clusters": [cluster("east", 2), cluster("west", 0)]})  # fmt: skip
    [east] = [line for line in text.splitlines() if line.startswith("east")]
    [west] = [line for line in text.splitlines() if line.startswith("west")]
    assert "(2 revoked)" in east and "revoked" not in west


def test_every_command_has_help() -> None:
    def walk(group: click.Group, prefix: list[str]) -> Iterator[list[str]]:
        for name, cmd in group.commands.items():
            yield [*prefix, name]
            if isinstance(cmd, click.Group):
                yield from walk(cmd, [*prefix, name])

    for path in walk(cli.cli, []):
        result = _invoke(*path, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output, path


def test_a_demo_that_cannot_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import atlasd.demo

    async def refuse(options: Any) -> None:
        raise atlasd.demo.DemoError("127.0.0.1:10900 is in use (Address already in use)")

    monkeypatch.setattr(atlasd.demo, "run_demo", refuse)
    result = _invoke("demo", "--check")
    assert result.exit_code == 1
    assert _one_error_line(result) == ("error: 127.0.0.1:10900 is in use (Address already in use)")


def test_cluster_list_with_a_store_judges_loopback_addresses_as_the_daemon_does(
    tmp_path: Path,
) -> None:
    """The daemon refuses a loopback external IP unless run with --allow-loopback; so does
    `cluster list` against the same store (it used to accept any address with --store)."""
    store = str(tmp_path / "store")
    add = _invoke(
        "cluster", "add", "east", "--external-ip", "127.0.0.5", "--store", store,
        "--allow-loopback",
    )  # fmt: skip
    assert add.exit_code == 0, add.output
    rows = json.loads(_invoke("cluster", "list", "--store", store, "-o", "json").output)
    assert len(rows) == 1 and "loopback" in (rows[0]["problem"] or ""), rows
    allowed = _invoke("cluster", "list", "--store", store, "-o", "json", "--allow-loopback")
    assert not json.loads(allowed.output)[0]["problem"]


def test_the_agent_refuses_in_one_line_without_echoing_the_token(tmp_path: Path) -> None:
    args = ("agent", "--server=127.0.0.1:1", "--cluster=east", f"--dir={tmp_path}", "--once")
    garbage = "abcdef.not-a-secret.nope"
    result = _invoke(*args, env={"ATLAS_JOIN_TOKEN": garbage})
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "malformed join token" in line and "not-a-secret" not in line
    result = _invoke(*args, env={"ATLAS_JOIN_TOKEN": ""})
    assert result.exit_code == 1
    assert "no valid credentials" in _one_error_line(result)
    # The SDS files Envoy is pointed at exist before any certificate does.
    assert sorted(p.name for p in tmp_path.glob("sds-*.yaml")) == [
        "sds-client.yaml",
        "sds-server.yaml",
        "sds-validation.yaml",
    ]


def test_run_takes_the_enrollment_endpoint(kubeconfig: Path, captured: list[DaemonOptions]) -> None:
    result = _invoke("run", f"--kubeconfig={kubeconfig}", "--enroll-listen=127.0.0.1:6307",
                     "--enroll-cert-seconds=600")  # fmt: skip
    assert result.exit_code == 0, result.output
    [options] = captured
    assert (options.enroll_host, options.enroll_port) == ("127.0.0.1", 6307)
    assert options.enroll_lifetime.total_seconds() == 600
    captured.clear()
    assert _invoke("run", f"--kubeconfig={kubeconfig}").exit_code == 0
    assert captured[0].enroll_port is None  # off unless asked for


def test_run_watches_its_event_loop_unless_told_not_to(
    kubeconfig: Path, captured: list[DaemonOptions]
) -> None:
    from atlasd.watchdog import DEFAULT_THRESHOLD

    for args, threshold in [((), DEFAULT_THRESHOLD), (("--stall-threshold=0.25",), 0.25),
                            (("--stall-threshold=0",), None)]:  # fmt: skip
        captured.clear()
        result = _invoke("run", f"--kubeconfig={kubeconfig}", *args)
        assert result.exit_code == 0, result.output
        assert captured[0].stall_threshold == threshold, args
    bad = _invoke("run", f"--kubeconfig={kubeconfig}", "--stall-threshold=-1")
    assert bad.exit_code != 0 and "--stall-threshold" in bad.output


def test_every_command_starts_where_no_temporary_directory_is_writable() -> None:
    """A read-only root with no writable /tmp (the envoy chart's agent container): building
    the commands must not look for a temporary directory (the original's --zone-file
    default does, only when used)."""
    import subprocess
    import sys

    code = (
        "import tempfile\n"
        "def nowhere(): raise FileNotFoundError('no usable temporary directory')\n"
        "tempfile.gettempdir = nowhere\n"
        "from atlasd.cli import main\n"
        "import sys; sys.argv = ['atlasd', 'agent', '--help']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--state-secret" in proc.stdout
