"""pytest fixtures that start the real components (registered by tests/conftest.py).

Every process a fixture starts is stopped at the fixture's teardown; when a test
fails, the tail of each of its processes' logs is attached to the report.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from tests.harness import components
from tests.harness.coredns import CoreDNS
from tests.harness.envoy import Envoy
from tests.harness.images import Image
from tests.harness.images import build as build_images
from tests.harness.kube import ApiServer
from tests.harness.node import Node
from tests.harness.prom import WebProc, alertmanager, prometheus


class _HasLog(Protocol):
    name: str

    def log_text(self) -> str: ...


LOGS_KEY = pytest.StashKey[list[_HasLog]]()


def _attach(request: pytest.FixtureRequest, proc: _HasLog) -> None:
    node = request.node
    if LOGS_KEY not in node.stash:
        node.stash[LOGS_KEY] = []
    node.stash[LOGS_KEY].append(proc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and call.when in ("setup", "call"):
        procs = list(item.stash.get(LOGS_KEY, []))
        api = _SESSION_API.get("api")
        if isinstance(api, ApiServer) and "apiserver" in getattr(item, "fixturenames", ()):
            procs.append(_Named("kube-apiserver", api.proc.log_text))
        node = _SESSION_API.get("node")
        if isinstance(node, Node) and "node" in getattr(item, "fixturenames", ()):
            procs += [_Text(name, text) for name, text in node.log_sections()]
        for proc in procs:
            # kube-apiserver's log is chatty and rarely the culprit: keep its tail short.
            n = 30 if proc.name == "kube-apiserver" else 80
            tail = "\n".join(proc.log_text().splitlines()[-n:])
            report.sections.append((f"log of {proc.name} (last {n} lines)", tail))


class _Named:
    def __init__(self, name: str, fn: Callable[[], str]) -> None:
        self.name = name
        self._fn = fn

    def log_text(self) -> str:
        return self._fn()


class _Text:
    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text

    def log_text(self) -> str:
        return self.text


_SESSION_API: dict[str, ApiServer | Node] = {}


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real etcd + kube-apiserver shared by the session's tests."""
    api = ApiServer(tmp_path_factory.mktemp("apiserver")).start()
    _SESSION_API["api"] = api
    try:
        yield api
    finally:
        _SESSION_API.pop("api", None)
        api.stop()


@pytest.fixture
def namespace(apiserver: ApiServer) -> str:
    """A fresh namespace (never deleted: a bare apiserver does not finalize namespaces)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    apiserver.create_namespace(name)
    return name


@pytest.fixture
def envoy_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[dict[str, Any], str], Envoy]]:
    started: list[Envoy] = []

    def start(bootstrap: dict[str, Any], name: str) -> Envoy:
        envoy = Envoy(bootstrap, name, workdir=tmp_path)
        started.append(envoy)
        _attach(request, envoy)
        return envoy.start()

    yield start
    for envoy in started:
        envoy.stop()


@pytest.fixture
def coredns_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., CoreDNS]]:
    started: list[CoreDNS] = []

    def start(zone_file: Path, origin: str = "atlas.", reload: str = "1s") -> CoreDNS:
        server = CoreDNS(zone_file, origin=origin, workdir=tmp_path, reload=reload)
        started.append(server)
        _attach(request, server.proc)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _web_factory(
    make: Callable[..., WebProc], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], WebProc]]:
    started: list[WebProc] = []

    def start(config_yaml: str) -> WebProc:
        proc = make(config_yaml, workdir=tmp_path)
        started.append(proc)
        _attach(request, proc.proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def prometheus_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], WebProc]]:
    yield from _web_factory(prometheus, tmp_path, request)


@pytest.fixture
def alertmanager_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], WebProc]]:
    yield from _web_factory(alertmanager, tmp_path, request)


@pytest.fixture
def helm(apiserver: ApiServer, tmp_path: Path) -> Callable[..., str]:
    """Run helm against the harness apiserver; returns stdout, raises on failure."""
    return helm_runner(apiserver.admin_kubeconfig, tmp_path)


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    """The images the charts run (tests/harness/images.py; built by `make test` first,
    so this only checks they are in podman's storage)."""
    return build_images()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Image]) -> Iterator[Node]:
    """A real single-node cluster that runs pods (tests/harness/node.py), one per test
    module; its teardown fails if it could not give back what it changed."""
    n = Node(tmp_path_factory.mktemp("node"), list(images.values()))
    _SESSION_API["node"] = n
    try:
        n.start()
    except BaseException:
        n.stop()
        _SESSION_API.pop("node", None)
        raise
    try:
        yield n
    finally:
        _SESSION_API.pop("node", None)
        problems = n.stop()
    assert not problems, f"node teardown: {problems}"


@pytest.fixture(scope="module")
def node_helm(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """helm against the node's cluster."""
    return helm_runner(node.admin_kubeconfig, tmp_path_factory.mktemp("node-helm"))


def helm_runner(kubeconfig: Path, home: Path) -> Callable[..., str]:
    """Run helm with ``kubeconfig`` and its state under ``home``; returns stdout."""
    binary = str(components.helm())
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "HELM_CACHE_HOME": str(home / "helm-cache"),
            "HELM_CONFIG_HOME": str(home / "helm-config"),
            "HELM_DATA_HOME": str(home / "helm-data"),
        }
    )

    def run(*args: str, check: bool = True) -> str:
        proc = subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    return run


@pytest.fixture
def unreachable_kubeconfig(tmp_path: Path) -> Path:
    """A valid kubeconfig whose API server is not there (127.0.0.1:1): for what a command
    says when it cannot reach Kubernetes, or for commands that never dial it."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path
