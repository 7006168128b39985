"""``atlasd agent``: the downstream side of enrollment. Its keys never leave the pod.

1. Makes a fresh ECDSA P-256 key per leaf (``server``, ``client``) and a CSR for the
   names of the cluster's leaves (``atlasd.enroll.csr.specs``).
2. First contact: fetches the trust bundle (``GET /v1/ca``) without trusting the server,
   and accepts it only if a CA in it has the public key pinned in the join token. Every
   request after that verifies atlasd's certificate against that bundle (name
   ``model.ADS_SERVER_NAME``).
3. ``POST /v1/enroll`` with the token; ``POST /v1/renew`` later with the current client
   certificate (mTLS), once ``renew_fraction`` (2/3) of its life has passed; and every
   ``bundle_interval`` it reads the bundle again: a changed bundle (a CA rotation) is
   written and the leaves renewed at once.
4. Writes key, certificates and bundle into ``directory`` atomically, the way the kubelet
   updates a Secret volume: a new ``..<time>`` directory, then the ``..data`` symlink
   replaced by a rename; the names Envoy reads (``server.pem``, ``server-key.pem``,
   ``client.pem``, ``client-key.pem``, ``ca.pem``) are symlinks through ``..data``. Envoy
   reads them through SDS from files with ``watched_directory`` on ``directory``
   (``sds_files``: ``sds-server.yaml``, ``sds-client.yaml``, ``sds-validation.yaml``), so
   the rename reloads all of them together, with no restart.
5. With ``state`` (``--state-secret``), saves every write into a Secret of its own cluster
   and, started with an empty directory, restores from it instead of enrolling
   (``atlasd.enroll.state``): a replaced pod needs no new token. A pod that restored renews
   at once, so each pod holds keys of its own. A pod whose token was spent by another
   replica's enrollment (409) waits for that replica's save and restores it.

Errors::

    Exception
     └── AgentError   (message safe to log: never the token, a key or a certificate)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import shutil
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atlasd.certdir import sds_config as sds_config
from atlasd.certdir import sds_files as sds_files
from atlasd.certpolicy import load_cert, not_after, public_der, renewal_time
from atlasd.enroll import csr as csrs
from atlasd.enroll import state
from atlasd.enroll import token as tokens
from atlasd.enroll.state import Saved, StateSecret
from atlasd.enroll.token import JoinToken
from atlasd.enroll.wire import CA_PATH, ENROLL_PATH, RENEW_PATH, WireError, call
from atlasd.files import write_atomic
from atlasd.kube.errors import KubeError
from atlasd.model import ADS_SERVER_NAME, Settings
from atlasd.reconcile.certs import LeafSpec, key_pem

log = logging.getLogger(__name__)

FILES = ("server.pem", "server-key.pem", "client.pem", "client-key.pem", "ca.pem")
DATA_LINK = "..data"
# How long one request may take, answer included: atlasd answers a burst of enrollments
# late rather than drop them (bench_enroll: 1,000 at once).
CALL_SECONDS = 60.0
# How long an enrollment is tried again when no answer comes.
ENROLL_SECONDS = 300.0
# How often a replica whose token another one used looks for that one's saved credentials.
RESTORE_POLL = 2.0
# In the directory while it holds restored credentials (shared with the pod that saved
# them): the next agent process, the sidecar after the init container, renews at once.
RESTORED_MARK = "..restored"


class AgentError(Exception):
    """Enrollment or renewal failed (message safe to log). ``retry``: the request may be
    sent again as it is (no answer came, or atlasd said to retry later); ``status``:
    atlasd's refusal (HTTP status), if it answered one."""

    def __init__(self, message: str, *, retry: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    server_name: str = ADS_SERVER_NAME
    # The address to connect from (None: the system's choice; a benchmark gives each
    # simulated cluster its own, as distinct clusters have).
    local_address: str | None = None


@dataclass(frozen=True)
class Credentials:
    """What the agent writes (PEM): leaves followed by their chain, keys, bundle."""

    files: Mapping[str, bytes]

    def __repr__(self) -> str:
        return "Credentials(...)"


def _csr(key: ec.EllipticCurvePrivateKey, spec: LeafSpec) -> str:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in spec.dns]), critical=False
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def new_request(
    cluster: str, settings: Settings
) -> tuple[dict[str, ec.EllipticCurvePrivateKey], dict[str, str]]:
    """Fresh keys and their CSRs, by leaf kind."""
    specs = csrs.specs(cluster, settings)
    keys = {kind: ec.generate_private_key(ec.SECP256R1()) for kind in csrs.KINDS}
    return keys, {kind: _csr(keys[kind], specs[kind]) for kind in csrs.KINDS}


def _client_context(bundle: bytes | None) -> ssl.SSLContext:
    if bundle is None:  # first contact: the bundle is checked against the pin instead
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cadata=bundle.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _call(
    server: Server,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    doc: dict[str, Any] | None,
) -> dict[str, Any]:
    try:
        with trio.fail_after(CALL_SECONDS):
            tcp = await trio.open_tcp_stream(
                server.host, server.port, local_address=server.local_address
            )
            stream = trio.SSLStream(tcp, ctx, server_hostname=server.server_name)
            try:
                status, answer = await call(stream, method, path, doc, host=server.server_name)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError as exc:
        where = f"{server.host}:{server.port}"
        raise AgentError(f"atlasd at {where} did not answer in time", retry=True) from exc
    except (OSError, trio.BrokenResourceError, ssl.SSLError, WireError) as exc:
        where = f"{server.host}:{server.port}"
        raise AgentError(f"cannot talk to atlasd at {where}: {exc}", retry=True) from exc
    if status != 200:
        said = answer.get("error", "no reason given")
        raise AgentError(
            f"atlasd refused ({status}): {said}", retry=status in (429, 503), status=status
        )
    return answer


async def fetch_bundle(server: Server, *, pin: str | None, bundle: bytes | None) -> bytes:
    """The trust bundle: with ``pin`` (first contact), any server's answer checked against
    it; with ``bundle``, from a server verified by it."""
    answer = await _call(server, _client_context(bundle), "GET", CA_PATH, None)
    ca = answer.get("ca")
    if not isinstance(ca, str):
        raise AgentError("atlasd's answer holds no trust bundle")
    if pin is not None and not tokens.bundle_matches(ca.encode(), pin):
        raise AgentError(
            "the server's trust bundle does not hold the CA pinned in the join token: "
            "not the atlasd that minted it"
        )
    return ca.encode()


def _credentials(
    keys: Mapping[str, ec.EllipticCurvePrivateKey], answer: dict[str, Any]
) -> Credentials:
    certs, chain, ca = answer.get("certificates"), answer.get("chain", ""), answer.get("ca")
    if not isinstance(certs, dict) or not isinstance(chain, str) or not isinstance(ca, str):
        raise AgentError("atlasd's answer is not a certificate answer")
    files: dict[str, bytes] = {"ca.pem": ca.encode()}
    for kind, key in keys.items():
        pem = certs.get(kind)
        cert = load_cert(pem.encode()) if isinstance(pem, str) else None
        if cert is None or public_der(cert.public_key()) != public_der(key.public_key()):
            raise AgentError(f"atlasd's {kind} certificate is not for the key sent")
        files[f"{kind}.pem"] = pem.encode() + chain.encode()  # type: ignore[union-attr]
        files[f"{kind}-key.pem"] = key_pem(key)
    return Credentials(files)


async def enroll(
    server: Server,
    token: JoinToken,
    *,
    cluster: str,
    settings: Settings,
    within: float = ENROLL_SECONDS,
) -> Credentials:
    """Enroll with ``token``; a request that got no answer (or a 429/503) is sent again,
    the same keys and requests, for up to ``within`` seconds: atlasd answers a token
    asked again for the keys it was used for with the same certificates."""
    keys, requests = new_request(cluster, settings)
    doc = {"cluster": cluster, "token": str(token), "csrs": requests}
    delay = 0.5
    with trio.move_on_after(within):
        while True:
            try:
                bundle = await fetch_bundle(server, pin=token.pin, bundle=None)
                answer = await _call(server, _client_context(bundle), "POST", ENROLL_PATH, doc)
                return _credentials(keys, answer)
            except AgentError as exc:
                if not exc.retry:
                    raise
                log.info("agent: %s; trying again in %.1f s", exc, delay)
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)
    raise AgentError(f"no answer from atlasd at {server.host}:{server.port} within {within:g} s")


async def renew(
    server: Server, directory: Path, *, cluster: str, settings: Settings, bundle: bytes
) -> Credentials:
    """New leaves, authenticated by the client certificate in ``directory``."""
    ctx = _client_context(bundle)
    ctx.load_cert_chain(directory / "client.pem", directory / "client-key.pem")
    keys, requests = new_request(cluster, settings)
    answer = await _call(server, ctx, "POST", RENEW_PATH, {"cluster": cluster, "csrs": requests})
    return _credentials(keys, answer)


def write(directory: Path, creds: Credentials) -> None:
    """Replace the credentials in ``directory`` at once (module docstring, 4)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
    new = directory / stamp
    new.mkdir(mode=0o750)
    for name, data in creds.files.items():
        mode = 0o640 if name.endswith("-key.pem") else 0o644
        fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    link = directory / DATA_LINK
    old = os.readlink(link) if link.is_symlink() else None
    tmp = directory / f"{DATA_LINK}_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp, tmp)
    os.replace(tmp, link)  # the one atomic step
    for name in FILES:
        path = directory / name
        if not path.is_symlink():
            os.symlink(f"{DATA_LINK}/{name}", path)
    if old and old != stamp:
        shutil.rmtree(directory / old, ignore_errors=True)


def write_sds_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sds_files(directory).items():
        write_atomic(directory / name, text)


def read(directory: Path) -> dict[str, bytes]:
    """The credentials in ``directory`` (the files of ``FILES`` that are there)."""
    out = {}
    for name in FILES:
        try:
            out[name] = (directory / name).read_bytes()
        except OSError:
            continue
    return out


def current(directory: Path, now: dt.datetime) -> bool:
    """Whether ``directory`` holds credentials still valid now (a restarted agent uses
    them instead of a token)."""
    return state.valid(read(directory), FILES, now)


@dataclass(frozen=True)
class AgentOptions:
    server: Server
    cluster: str
    directory: Path
    settings: Settings
    token: JoinToken | None = None
    once: bool = False
    bundle_interval: float = 60.0
    retry_max: float = 60.0
    # Where the credentials are saved and restored from (None: the directory only).
    state: StateSecret | None = None


@dataclass
class _Progress:
    """What the agent's one task still owes (only ``run_agent``'s task touches it)."""

    # The token id the credentials in the directory came from ("" when unknown).
    token_id: str
    # Renew at the next turn whatever the certificate's age (restored credentials).
    renew_now: bool = False
    # The directory holds credentials the state Secret does not (a save failed).
    unsaved: bool = False


def _where(s: StateSecret) -> str:
    return f"Secret {s.namespace}/{s.name}"


async def _load(s: StateSecret) -> Saved | None:
    try:
        return await s.load()
    except KubeError as exc:
        raise AgentError(f"cannot read the saved credentials ({_where(s)}): {exc}") from exc


async def _save(o: AgentOptions, p: _Progress) -> None:
    if o.state is None:
        return
    try:
        await o.state.save(Saved(files=read(o.directory), token_id=p.token_id))
    except KubeError as exc:
        p.unsaved = True
        raise AgentError(
            f"cannot save the credentials ({_where(o.state)}): {exc}", retry=True
        ) from exc
    p.unsaved = False
    log.info("agent: credentials saved in %s", _where(o.state))


async def _enroll_or_restore(o: AgentOptions, token: JoinToken) -> tuple[Credentials, bool]:
    """Enroll with ``token``; if another replica has used it already (409) and saves its
    credentials, restore those instead (they are this cluster's too). Returns the
    credentials and whether they were restored."""
    try:
        return await enroll(o.server, token, cluster=o.cluster, settings=o.settings), False
    except AgentError as exc:
        if exc.status != 409 or o.state is None:
            raise
        log.info("agent: the token is used; waiting for the replica that used it to save")
        with trio.move_on_after(ENROLL_SECONDS):
            while True:
                saved = await _load(o.state)
                if (
                    saved is not None
                    and saved.token_id == token.id
                    and state.valid(saved.files, FILES, dt.datetime.now(dt.UTC))
                ):
                    return Credentials(saved.files), True
                await trio.sleep(RESTORE_POLL)
        raise


async def _start(o: AgentOptions) -> _Progress:
    """Credentials in the directory: kept (a restarted container of this pod), restored
    from the state Secret (a new pod), or enrolled with the token."""
    now = dt.datetime.now(dt.UTC)
    saved = await _load(o.state) if o.state is not None else None
    saved_ok = saved is not None and state.valid(saved.files, FILES, now)
    if current(o.directory, now):
        token_id = saved.token_id if saved is not None and saved_ok else ""
        progress = _Progress(
            token_id or (o.token.id if o.token else ""),
            renew_now=(o.directory / RESTORED_MARK).exists(),
        )
    elif saved is not None and saved_ok and (o.token is None or o.token.id == saved.token_id):
        write(o.directory, Credentials(saved.files))
        write_atomic(o.directory / RESTORED_MARK, saved.token_id)
        log.info("agent: cluster %s restored its credentials from the state Secret", o.cluster)
        return _Progress(saved.token_id, renew_now=True)
    elif o.token is not None:
        creds, restored = await _enroll_or_restore(o, o.token)
        write(o.directory, creds)
        if restored:
            write_atomic(o.directory / RESTORED_MARK, o.token.id)
        verb = "restored the credentials another replica enrolled" if restored else "enrolled"
        log.info("agent: cluster %s %s; credentials in %s", o.cluster, verb, o.directory)
        progress = _Progress(o.token.id, renew_now=restored)
        saved_ok = restored
    else:
        where = " nor in the state Secret" if o.state is not None else ""
        raise AgentError(
            f"no valid credentials in {o.directory}{where} and no join token to enroll with"
        )
    progress.unsaved = o.state is not None and not saved_ok
    return progress


async def run_agent(
    options: AgentOptions, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Enroll (unless the directory or the state Secret holds valid credentials), then
    with ``once`` return, else renew and follow the bundle until cancelled."""
    o = options
    write_sds_files(o.directory)
    progress = await _start(o)
    if progress.unsaved and o.once:
        # An init container fails here (and, restarted, saves from the directory); a
        # sidecar saves in its loop below, retrying.
        await _save(o, progress)
    task_status.started()
    if o.once:
        return
    delay = 1.0
    while True:
        try:
            if progress.unsaved:
                await _save(o, progress)
            await _follow(o, progress)
            delay = 1.0
        except AgentError as exc:
            wait = retry_wait(delay, left=_time_left(o.directory))
            log.warning("agent: %s; retrying in %.0f s", exc, wait)
            await trio.sleep(wait)
            delay = min(delay * 2, o.retry_max)


def retry_wait(delay: float, *, left: float | None) -> float:
    """How long to wait after a failed turn: the back-off ``delay``, but never more than a
    quarter of the time the current client certificate has ``left`` (at least 1 s). A
    renewal failing through an outage (atlasd restarting, the API server down) is so tried
    again before the certificate expires: once it has, the agent cannot authenticate a
    renewal and needs a new join token."""
    if left is None:
        return delay
    return max(1.0, min(delay, left / 4))


def _time_left(directory: Path) -> float | None:
    try:
        ends = not_after((directory / "client.pem").read_bytes())
    except OSError:
        return None
    return None if ends is None else ends - time.time()


async def _follow(o: AgentOptions, p: _Progress) -> None:
    """One wait: until the renewal time or the next bundle check, whichever is first."""
    bundle = (o.directory / "ca.pem").read_bytes()
    due = renewal_time((o.directory / "client.pem").read_bytes(), o.settings.renew_fraction) or 0.0
    if p.renew_now:
        due = time.time()
    wait = max(0.0, min(due - time.time(), o.bundle_interval))
    await trio.sleep(wait)
    renew_now = time.time() >= due
    if not renew_now:
        fresh = await fetch_bundle(o.server, pin=None, bundle=bundle)
        if fresh != bundle:
            log.info("agent: the trust bundle changed (a CA rotation): renewing now")
            renew_now = True
            bundle = fresh
    if renew_now:
        creds = await renew(
            o.server, o.directory, cluster=o.cluster, settings=o.settings, bundle=bundle
        )
        write(o.directory, creds)
        p.renew_now = False
        (o.directory / RESTORED_MARK).unlink(missing_ok=True)
        log.info("agent: cluster %s renewed its certificates", o.cluster)
        p.unsaved = o.state is not None
        await _save(o, p)
