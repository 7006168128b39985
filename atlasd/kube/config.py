"""How atlasd finds and authenticates to the Kubernetes API server.

Owns: reading kubeconfig files the way kubectl does, the in-cluster service account,
credentials that change at run time (a ``tokenFile`` or the service-account token
re-read, an exec credential plugin's output cached until it expires and re-run on a
401), and the ``ssl.SSLContext`` built from all of that.

Loading order (controller-runtime's): an explicit ``--kubeconfig``; else every file
of ``$KUBECONFIG`` (missing ones ignored), merged; else the in-cluster service
account; else ``~/.kube/config``.

Merging (clientcmd): for clusters, users and contexts the first file that defines a
name wins; ``current-context`` comes from the first file that sets it. Relative paths
(certificate-authority, client-certificate, client-key, tokenFile, an exec command with
a path separator) resolve against the directory of the file that holds them. Inline
``*-data`` beats the matching file.

Errors: everything here raises ``atlasd.kube.errors.ConfigError``; messages name the
file, context and field, never a token, key or certificate.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import yaml

from atlasd.kube.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
# client-go re-reads a tokenFile (and the in-cluster token) after a minute.
TOKEN_REREAD_SECONDS = 60.0


@dataclass(frozen=True)
class ExecConfig:
    """A ``users[].user.exec`` credential plugin."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    api_version: str = "client.authentication.k8s.io/v1"
    provide_cluster_info: bool = False
    install_hint: str = ""
    # Never | IfAvailable | Always. atlasd runs plugins without a terminal, so a plugin
    # that insists on one ("Always") fails with a clear error, as kubectl does without a TTY.
    interactive_mode: str = "IfAvailable"


@dataclass(frozen=True)
class KubeConfig:
    """Everything needed to reach and authenticate to one API server.

    ``client_key_data`` and ``token`` never appear in ``repr``.
    """

    server: str
    namespace: str = "default"
    ca_data: bytes | None = None
    client_cert_data: bytes | None = field(default=None, repr=False)
    client_key_data: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    exec: ExecConfig | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    # clusters[].cluster.proxy-url (http, https or socks5); None = the environment's
    # HTTPS_PROXY/NO_PROXY, as kubectl.
    proxy_url: str | None = None
    context: str | None = None
    source: str = "kubeconfig"
    token_reread_seconds: float = TOKEN_REREAD_SECONDS


@dataclass(frozen=True)
class Credential:
    """What is presented to the API server right now (bearer token and/or client cert)."""

    token: str | None = field(default=None, repr=False)
    client_cert: bytes | None = field(default=None, repr=False)
    client_key: bytes | None = field(default=None, repr=False)
    # Wall-clock expiry (exec plugins); None = does not expire.
    expires_at: float | None = None


# ---------------------------------------------------------------------------------------
# Loading


def load_config(kubeconfig: str | None = None, context: str | None = None) -> KubeConfig:
    """Load the configuration the way atlasd's ``--kubeconfig``/``--context`` mean it."""
    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise ConfigError(f"kubeconfig {kubeconfig} does not exist")
        return load_kubeconfig([kubeconfig], context=context)
    env = os.environ.get("KUBECONFIG", "")
    paths = [p for p in env.split(os.pathsep) if p]
    if paths:
        existing = [p for p in paths if Path(p).is_file()]
        if not existing:
            raise ConfigError(f"none of the KUBECONFIG files exist: {env}")
        return load_kubeconfig(existing, context=context)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").is_file():
        return load_in_cluster()
    default = Path.home() / ".kube" / "config"
    if default.is_file():
        return load_kubeconfig([str(default)], context=context)
    raise ConfigError(
        "no kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config) and not in a cluster"
    )


def load_in_cluster(
    *, sa_dir: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] | None = None
) -> KubeConfig:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT and the mounted token."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError("not in a cluster: KUBERNETES_SERVICE_HOST is unset")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    token_path = sa_dir / "token"
    if not token_path.is_file():
        raise ConfigError(f"not in a cluster: {token_path} is missing")
    ca_path = sa_dir / "ca.crt"
    ns_path = sa_dir / "namespace"
    namespace = ns_path.read_text().strip() if ns_path.is_file() else "default"
    return KubeConfig(
        server=f"https://{host}:{port}",
        namespace=namespace or "default",
        ca_data=ca_path.read_bytes() if ca_path.is_file() else None,
        token_file=str(token_path),
        source="in-cluster",
    )


@dataclass
class _Merged:
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_context: str = ""


def _named(
    doc: Mapping[str, Any], key: str, inner: str, path: str
) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    entries = doc.get(key) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: {key} is not a list")
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry.get("name"):
            raise ConfigError(f"{path}: an entry of {key} has no name")
        body = entry.get(inner) or {}
        if not isinstance(body, Mapping):
            raise ConfigError(f"{path}: {key} {entry['name']}: {inner} is not a mapping")
        out.append((str(entry["name"]), dict(body)))
    return out


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return str(base / value)
    return value


def _read_file(base: Path, doc_path: str) -> dict[str, Any]:
    try:
        text = Path(doc_path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read kubeconfig {doc_path}: {why}") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # Where, never what: the text around a mistake may be a token or a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"kubeconfig {doc_path} is not valid YAML{where}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {doc_path} is not a mapping")
    return doc


def merge_kubeconfigs(paths: Sequence[str]) -> _Merged:
    """Merge kubeconfig files as clientcmd does (first to set a value wins)."""
    merged = _Merged()
    for p in paths:
        base = Path(p).resolve().parent
        doc = _read_file(base, p)
        for name, cluster in _named(doc, "clusters", "cluster", p):
            if name in merged.clusters:
                continue
            if "certificate-authority" in cluster:
                cluster["certificate-authority"] = _resolve(base, cluster["certificate-authority"])
            merged.clusters[name] = cluster
        for name, user in _named(doc, "users", "user", p):
            if name in merged.users:
                continue
            for key in ("client-certificate", "client-key", "tokenFile"):
                if key in user:
                    user[key] = _resolve(base, user[key])
            exec_ = user.get("exec")
            if isinstance(exec_, Mapping):
                exec_ = dict(exec_)
                cmd = exec_.get("command")
                if isinstance(cmd, str) and os.sep in cmd:
                    exec_["command"] = _resolve(base, cmd)
                user["exec"] = exec_
            merged.users[name] = user
        for name, ctx in _named(doc, "contexts", "context", p):
            merged.contexts.setdefault(name, ctx)
        if not merged.current_context and doc.get("current-context"):
            merged.current_context = str(doc["current-context"])
    return merged


def _data_or_file(entry: Mapping[str, Any], key: str, where: str) -> bytes | None:
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{where}: {key}-data is not valid base64") from exc
    path = entry.get(key)
    if path:
        try:
            return Path(str(path)).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {key} {path}: {exc.strerror}") from exc
    return None


def _interactive_mode(raw: Mapping[str, Any], where: str) -> str:
    mode = str(raw.get("interactiveMode") or "IfAvailable")
    if mode not in ("Never", "IfAvailable", "Always"):
        raise ConfigError(f"{where}: exec interactiveMode {mode!r} is not valid")
    return mode


def _exec_config(raw: Mapping[str, Any], where: str) -> ExecConfig:
    cmd = raw.get("command")
    if not cmd:
        raise ConfigError(f"{where}: exec has no command")
    api_version = str(raw.get("apiVersion") or "")
    if api_version not in EXEC_API_VERSIONS:
        raise ConfigError(f"{where}: exec apiVersion {api_version!r} is not supported")
    env: list[tuple[str, str]] = []
    for item in raw.get("env") or []:
        if isinstance(item, Mapping) and "name" in item:
            env.append((str(item["name"]), str(item.get("value", ""))))
    return ExecConfig(
        command=str(cmd),
        args=tuple(str(a) for a in raw.get("args") or ()),
        env=tuple(env),
        api_version=api_version,
        provide_cluster_info=bool(raw.get("provideClusterInfo", False)),
        install_hint=str(raw.get("installHint") or ""),
        interactive_mode=_interactive_mode(raw, where),
    )


def load_kubeconfig(paths: Sequence[str], *, context: str | None = None) -> KubeConfig:
    """Build a KubeConfig from merged kubeconfig files and a context (default: current)."""
    merged = merge_kubeconfigs(paths)
    where_files = ", ".join(paths)
    ctx_name = context or merged.current_context
    if not ctx_name:
        raise ConfigError(f"{where_files}: no current-context and no --context given")
    ctx = merged.contexts.get(ctx_name)
    if ctx is None:
        raise ConfigError(f"{where_files}: context {ctx_name!r} not found")
    cluster_name = str(ctx.get("cluster") or "")
    cluster = merged.clusters.get(cluster_name)
    if cluster is None:
        raise ConfigError(f"context {ctx_name!r}: cluster {cluster_name!r} not found")
    user_name = str(ctx.get("user") or "")
    user: Mapping[str, Any] = {}
    if user_name:
        found = merged.users.get(user_name)
        if found is None:
            raise ConfigError(f"context {ctx_name!r}: user {user_name!r} not found")
        user = found
    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise ConfigError(f"cluster {cluster_name!r}: no server")
    where_c = f"cluster {cluster_name!r}"
    where_u = f"user {user_name!r}"
    exec_raw = user.get("exec")
    token_file = user.get("tokenFile")
    if token_file and not Path(str(token_file)).is_file():
        raise ConfigError(f"{where_u}: tokenFile {token_file} does not exist")
    return KubeConfig(
        server=server,
        namespace=str(ctx.get("namespace") or "default"),
        ca_data=_data_or_file(cluster, "certificate-authority", where_c),
        client_cert_data=_data_or_file(user, "client-certificate", where_u),
        client_key_data=_data_or_file(user, "client-key", where_u),
        token=str(user["token"]) if user.get("token") else None,
        token_file=str(token_file) if token_file else None,
        exec=_exec_config(exec_raw, where_u) if isinstance(exec_raw, Mapping) else None,
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        tls_server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
        proxy_url=str(cluster["proxy-url"]) if cluster.get("proxy-url") else None,
        context=ctx_name,
    )


# ---------------------------------------------------------------------------------------
# Credentials that change at run time


def _parse_time(value: str) -> float:
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ConfigError(f"exec plugin: bad expirationTimestamp {value!r}") from exc


class Credentials:
    """The current credential of a KubeConfig; refreshed from tokenFile or an exec plugin.

    Invariants: ``_cached`` is what requests present; it is replaced (never mutated)
    when a tokenFile is re-read (at most every ``token_reread_seconds`` of trio time, or
    forced after a 401) or when the exec plugin is re-run (its output expired, or
    forced after a 401). ``_lock`` keeps concurrent requests from running the plugin
    twice.
    """

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._cached: Credential | None = None
        self._read_at: float = -float("inf")
        self._lock = trio.Lock()
        # How many times the exec plugin ran (observable by tests and metrics).
        self.exec_runs = 0

    @property
    def refreshable(self) -> bool:
        return self.config.exec is not None or self.config.token_file is not None

    async def get(self) -> Credential:
        cached = self._cached
        if cached is not None and not self._stale(cached):
            return cached
        async with self._lock:
            if self._cached is None or self._stale(self._cached):
                self._cached = await self._load()
            return self._cached

    async def refresh(self, rejected: Credential | None = None) -> bool:
        """Reload the credential after a 401 (``rejected`` = the one the server refused).
        False if nothing could change. Many requests failing at once reload only once:
        if the cache already moved past ``rejected``, that newer credential is kept."""
        if not self.refreshable:
            return False
        async with self._lock:
            if rejected is None or self._cached is rejected:
                self._cached = await self._load()
        return True

    def _stale(self, cred: Credential) -> bool:
        cfg = self.config
        if cfg.exec is not None:
            return cred.expires_at is not None and time.time() >= cred.expires_at
        if cfg.token_file is not None:
            return trio.current_time() - self._read_at >= cfg.token_reread_seconds
        return False

    async def _load(self) -> Credential:
        cfg = self.config
        if cfg.exec is not None:
            cred = await self._run_exec(cfg.exec)
            # A plugin that returns no cert keeps the kubeconfig's cert (client-go).
            if cred.client_cert is None and cfg.client_cert_data and cfg.client_key_data:
                cred = Credential(
                    token=cred.token,
                    client_cert=cfg.client_cert_data,
                    client_key=cfg.client_key_data,
                    expires_at=cred.expires_at,
                )
            return cred
        token = cfg.token
        if cfg.token_file is not None:
            try:
                text = await trio.Path(cfg.token_file).read_text()
            except OSError as exc:
                if self._cached is not None:
                    log.warning("cannot re-read token file %s: %s", cfg.token_file, exc.strerror)
                    self._read_at = trio.current_time()
                    return self._cached
                raise ConfigError(
                    f"cannot read token file {cfg.token_file}: {exc.strerror}"
                ) from exc
            token = text.strip() or token
            self._read_at = trio.current_time()
        return Credential(
            token=token, client_cert=cfg.client_cert_data, client_key=cfg.client_key_data
        )

    async def _run_exec(self, ex: ExecConfig) -> Credential:
        spec: dict[str, Any] = {"interactive": False}
        if ex.provide_cluster_info:
            cluster: dict[str, Any] = {"server": self.config.server}
            if self.config.ca_data:
                cluster["certificate-authority-data"] = base64.b64encode(
                    self.config.ca_data
                ).decode()
            if self.config.tls_server_name:
                cluster["tls-server-name"] = self.config.tls_server_name
            if self.config.insecure_skip_tls_verify:
                cluster["insecure-skip-tls-verify"] = True
            spec["cluster"] = cluster
        info = {"apiVersion": ex.api_version, "kind": "ExecCredential", "spec": spec}
        env = dict(os.environ)
        env.update(dict(ex.env))
        env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        hint = f" ({ex.install_hint})" if ex.install_hint else ""
        if ex.interactive_mode == "Always":
            raise ConfigError(
                f"exec plugin {ex.command} needs an interactive terminal (interactiveMode "
                f"Always); atlasd runs credential plugins without one{hint}"
            )
        self.exec_runs += 1
        try:
            proc = await trio.run_process(
                [ex.command, *ex.args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as exc:
            raise ConfigError(
                f"exec plugin {ex.command}: cannot run: {exc.strerror}{hint}"
            ) from exc
        if proc.returncode != 0:
            raise ConfigError(
                f"exec plugin {ex.command} exited with status {proc.returncode}{hint}"
            )
        return parse_exec_credential(proc.stdout, api_version=ex.api_version, command=ex.command)


def parse_exec_credential(stdout: bytes, *, api_version: str, command: str) -> Credential:
    """Read an ExecCredential from a plugin's stdout (never echoing its content)."""
    try:
        doc = json.loads(stdout)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"exec plugin {command}: output is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
        raise ConfigError(f"exec plugin {command}: output is not an ExecCredential")
    if doc.get("apiVersion") != api_version:
        raise ConfigError(
            f"exec plugin {command}: apiVersion {doc.get('apiVersion')!r}, expected {api_version!r}"
        )
    status = doc.get("status")
    if not isinstance(status, dict):
        raise ConfigError(f"exec plugin {command}: ExecCredential has no status")
    token = status.get("token")
    cert = status.get("clientCertificateData")
    key = status.get("clientKeyData")
    if bool(cert) != bool(key):
        raise ConfigError(
            f"exec plugin {command}: clientCertificateData and clientKeyData go together"
        )
    if not token and not cert:
        raise ConfigError(f"exec plugin {command}: ExecCredential has neither token nor cert")
    expires = status.get("expirationTimestamp")
    return Credential(
        token=str(token) if token else None,
        client_cert=str(cert).encode() if cert else None,
        client_key=str(key).encode() if key else None,
        expires_at=_parse_time(str(expires)) if expires else None,
    )


# ---------------------------------------------------------------------------------------
# TLS


def ssl_context(config: KubeConfig, credential: Credential) -> ssl.SSLContext:
    """The TLS context for ``config``, presenting ``credential``'s client certificate.

    ``load_cert_chain`` only takes file names, so the certificate and key are written to
    a private temporary directory (0700, files 0600), loaded, and removed at once.
    """
    if config.insecure_skip_tls_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            cadata = config.ca_data.decode() if config.ca_data else None
            ctx = ssl.create_default_context(cadata=cadata)
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError("certificate-authority is not a valid PEM bundle") from exc
    if credential.client_cert and credential.client_key:
        with tempfile.TemporaryDirectory(prefix="atlasd-kube-") as tmp:
            cert_path = os.path.join(tmp, "client.crt")
            key_path = os.path.join(tmp, "client.key")
            pairs = ((cert_path, credential.client_cert), (key_path, credential.client_key))
            for path, data in pairs:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise ConfigError("client certificate and key do not load") from exc
    return ctx
