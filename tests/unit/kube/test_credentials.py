"""Credentials that change at run time: tokenFile re-read, exec plugins, TLS contexts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import ssl
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atlasd.kube.config import (
    Credential,
    Credentials,
    ExecConfig,
    KubeConfig,
    parse_exec_credential,
    ssl_context,
)
from atlasd.kube.errors import ConfigError

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


async def test_token_file_is_reread_after_the_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    creds = Credentials(
        KubeConfig(
            server="https://x", token="static", token_file=str(token), token_reread_seconds=60
        )
    )
    assert (await creds.get()).token == "one"  # the file beats the static token
    token.write_text("two")
    assert (await creds.get()).token == "one"  # cached within the period
    await trio.sleep(61)
    assert (await creds.get()).token == "two"
    token.write_text("three")
    assert await creds.refresh()  # a 401 forces a re-read at once
    assert (await creds.get()).token == "three"


async def test_token_file_vanishing_keeps_the_last_token(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    creds = Credentials(KubeConfig(server="https://x", token_file=str(token)))
    assert (await creds.get()).token == "one"
    token.unlink()
    await trio.sleep(120)
    assert (await creds.get()).token == "one"


async def test_static_credentials_are_not_refreshable() -> None:
    creds = Credentials(KubeConfig(server="https://x", token="t"))
    assert not creds.refreshable
    assert not await creds.refresh()
    assert (await creds.get()).token == "t"


def _plugin(
    tmp_path: Path, *, api_version: str, expires_in: float | None, exit_code: int = 0
) -> Path:
    """A plugin that counts its runs and returns token-<n> (and echoes the exec info)."""
    counter = tmp_path / "count"
    info = tmp_path / "info.json"
    expiry = (
        "None"
        if expires_in is None
        else repr(
            (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
        )
    )
    script = tmp_path / "plugin.py"
    script.write_text(
        f"""
import json, os, pathlib, sys
c = pathlib.Path({str(counter)!r})
n = int(c.read_text()) + 1 if c.exists() else 1
c.write_text(str(n))
pathlib.Path({str(info)!r}).write_text(os.environ["KUBERNETES_EXEC_INFO"])
if {exit_code}:
    print("boom: the secret is hunter2", file=sys.stderr)
    sys.exit({exit_code})
status = {{"token": "token-%d" % n}}
if {expiry} is not None:
    status["expirationTimestamp"] = {expiry}
print(json.dumps({{"apiVersion": {api_version!r}, "kind": "ExecCredential", "status": status}}))
"""
    )
    return script


def _exec_config(script: Path, api_version: str, **kw: object) -> KubeConfig:
    return KubeConfig(
        server="https://127.0.0.1:6443",
        ca_data=b"CA",
        exec=ExecConfig(
            command=sys.executable,
            args=(str(script),),
            env=(("PLUGIN_ENV", "1"),),
            api_version=api_version,
            provide_cluster_info=True,
        ),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("api_version", [V1, V1BETA1])
async def test_exec_plugin_cached_until_expiry(tmp_path: Path, api_version: str) -> None:
    script = _plugin(tmp_path, api_version=api_version, expires_in=3600)
    creds = Credentials(_exec_config(script, api_version))
    assert (await creds.get()).token == "token-1"
    assert (await creds.get()).token == "token-1"
    assert creds.exec_runs == 1
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["apiVersion"] == api_version and info["kind"] == "ExecCredential"
    assert info["spec"]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert info["spec"]["interactive"] is False
    # A 401 re-runs the plugin.
    assert await creds.refresh()
    assert (await creds.get()).token == "token-2"
    assert creds.exec_runs == 2


async def test_exec_plugin_rerun_once_expired(tmp_path: Path) -> None:
    script = _plugin(tmp_path, api_version=V1, expires_in=-10)
    creds = Credentials(_exec_config(script, V1))
    assert (await creds.get()).token == "token-1"
    assert (await creds.get()).token == "token-2"


async def test_exec_plugin_failure_does_not_echo_its_output(tmp_path: Path) -> None:
    script = _plugin(tmp_path, api_version=V1, expires_in=None, exit_code=3)
    creds = Credentials(_exec_config(script, V1))
    with pytest.raises(ConfigError, match="exited with status 3") as exc_info:
        await creds.get()
    assert "hunter2" not in str(exc_info.value)


async def test_exec_plugin_that_cannot_run(tmp_path: Path) -> None:
    cfg = KubeConfig(
        server="https://x",
        exec=ExecConfig(command=str(tmp_path / "missing"), install_hint="install it"),
    )
    with pytest.raises(ConfigError, match=r"cannot run.*install it"):
        await Credentials(cfg).get()


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ("not json", "not JSON"),
        (json.dumps({"kind": "Other", "apiVersion": V1}), "not an ExecCredential"),
        (
            json.dumps({"kind": "ExecCredential", "apiVersion": V1BETA1, "status": {"token": "x"}}),
            "expected",
        ),
        (json.dumps({"kind": "ExecCredential", "apiVersion": V1}), "no status"),
        (json.dumps({"kind": "ExecCredential", "apiVersion": V1, "status": {}}), "neither"),
        (
            json.dumps(
                {"kind": "ExecCredential", "apiVersion": V1, "status": {"clientKeyData": "k"}}
            ),
            "go together",
        ),
        (
            json.dumps(
                {
                    "kind": "ExecCredential",
                    "apiVersion": V1,
                    "status": {"token": "topsecret", "expirationTimestamp": "yesterday"},
                }
            ),
            "bad expirationTimestamp",
        ),
    ],
)
def test_bad_exec_credentials(doc: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as exc_info:
        parse_exec_credential(doc.encode(), api_version=V1, command="plug")
    assert "topsecret" not in str(exc_info.value)


def test_exec_credential_with_client_certificate() -> None:
    doc = {
        "kind": "ExecCredential",
        "apiVersion": V1,
        "status": {
            "clientCertificateData": "CERT",
            "clientKeyData": "KEY",
            "expirationTimestamp": "2030-01-02T03:04:05Z",
        },
    }
    cred = parse_exec_credential(json.dumps(doc).encode(), api_version=V1, command="p")
    assert cred.client_cert == b"CERT" and cred.client_key == b"KEY" and cred.token is None
    assert cred.expires_at == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()
    assert "KEY" not in repr(cred)


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "me")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_ssl_context_loads_client_cert_and_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    cert, key = _self_signed()
    ctx = ssl_context(
        KubeConfig(server="https://x", ca_data=cert), Credential(client_cert=cert, client_key=key)
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert list(tmp_path.iterdir()) == []
    insecure = ssl_context(
        KubeConfig(server="https://x", insecure_skip_tls_verify=True), Credential()
    )
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname


def test_ssl_context_errors() -> None:
    with pytest.raises(ConfigError, match="certificate-authority"):
        ssl_context(KubeConfig(server="https://x", ca_data=b"junk"), Credential())
    cert, _ = _self_signed()
    _, other_key = _self_signed()
    with pytest.raises(ConfigError, match="do not load"):
        ssl_context(
            KubeConfig(server="https://x"), Credential(client_cert=cert, client_key=other_key)
        )


async def test_exec_plugin_that_needs_a_terminal(tmp_path: Path) -> None:
    script = _plugin(tmp_path, api_version=V1, expires_in=None)
    cfg = KubeConfig(
        server="https://x",
        exec=ExecConfig(command=sys.executable, args=(str(script),), interactive_mode="Always"),
    )
    with pytest.raises(ConfigError, match="interactive terminal"):
        await Credentials(cfg).get()
    assert not (tmp_path / "count").exists()  # never started


async def test_many_concurrent_401s_rerun_the_plugin_once(tmp_path: Path) -> None:
    import httpx2

    from atlasd.kube.client import KubeClient
    from atlasd.kube.resources import SERVICES

    script = _plugin(tmp_path, api_version=V1, expires_in=3600)

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.headers["authorization"] == "Bearer token-1":
            return httpx2.Response(
                401, json={"kind": "Status", "code": 401, "reason": "Unauthorized"}
            )
        return httpx2.Response(200, json={"metadata": {"name": "x"}})

    config = dataclasses.replace(_exec_config(script, V1), ca_data=None)
    async with KubeClient(config, transport=httpx2.MockTransport(handler)) as kube:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(kube.get, SERVICES, "x")
        assert kube.credentials.exec_runs == 2
