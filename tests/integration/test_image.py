"""The images `make image` builds (tests/harness/images.py), run the way the charts run them.

Each container runs under podman exactly as the chart's pod spec says: the chart's uid,
a read-only root filesystem with the chart's emptyDirs as the only writable paths, every
capability dropped, no privilege escalation, the chart's command, args and environment
(rendered by helm). The only test-only changes: host networking with loopback listen
addresses and free ports (tests keep traffic on loopback), and, for atlasd, a state
directory (`--store`) instead of a Kubernetes API.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import httpx2
import pytest
import yaml

from atlasd.dns.zone import render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness import images as image_builds
from tests.harness.fixtures import helm_runner
from tests.harness.images import Image
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
ENVOY_CHART = ROOT / "charts" / "envoy"
# The pod's downward-API values, as the chart's fieldRefs would give them.
FIELD_REFS = {"metadata.namespace": "monitoring", "metadata.name": "atlasd-image-test"}


def _render(tmp_path: Path, chart: Path, *sets: str) -> dict[str, Any]:
    helm = helm_runner(tmp_path / "no-cluster.kubeconfig", tmp_path)
    args = ["template", "atlas", str(chart), "--namespace", "monitoring"]
    for s in sets:
        args += ["--set", s]
    docs = [d for d in yaml.safe_load_all(helm(*args)) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    return {"docs": docs, "pod": deploy["spec"]["template"]["spec"]}


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(c for c in pod["containers"] if c["name"] == name))


def _env(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
        else:
            out[e["name"]] = FIELD_REFS[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return out


def _as_the_chart_runs_it(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """podman run options for the pod's and container's security context and emptyDirs."""
    ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    opts = [f"--user={ctx['runAsUser']}:{ctx.get('runAsGroup', ctx['runAsUser'])}"]
    if ctx.get("readOnlyRootFilesystem"):
        opts += ["--read-only", "--read-only-tmpfs=false"]
    if "ALL" in ctx.get("capabilities", {}).get("drop", []):
        opts.append("--cap-drop=ALL")
    if ctx.get("allowPrivilegeEscalation") is False:
        opts.append("--security-opt=no-new-privileges")
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for mount in container.get("volumeMounts", []):
        if mount["name"] in empty_dirs:
            # kubelet makes an emptyDir mode 0777.
            opts.append(f"--tmpfs={mount['mountPath']}:rw,mode=0777")
    return opts


class Container:
    """`podman run` in the foreground (its log is the container's), removed at stop."""

    def __init__(self, image: Image, opts: list[str], argv: list[str], *, log_dir: Path):
        self.name = f"atlasd-test-{uuid.uuid4().hex[:8]}"
        cmd = ["podman", "run", "--rm", f"--name={self.name}", "--network=host", *opts]
        self.proc = Proc(self.name, [*cmd, image.ref, *argv], log_dir=log_dir,
                         env=image_builds.podman_env())  # fmt: skip

    def start(self) -> Container:
        self.proc.start()
        return self

    def stop(self) -> None:
        image_builds.podman("rm", "-f", "--time=3", self.name, check=False)
        self.proc.stop()


def _run(image: Image, opts: list[str], argv: list[str]) -> str:
    out = image_builds.podman("run", "--rm", "--network=none", *opts, image.ref, *argv)
    return out.stdout + out.stderr


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for c in started:
        c.stop()


def test_atlasd_image_runs_as_the_chart_runs_it(
    images: dict[str, Image], tmp_path: Path, containers: list[Container]
) -> None:
    rendered = _render(tmp_path, ATLASD_CHART)
    pod = rendered["pod"]
    atlasd = _container(pod, "atlasd")
    opts = _as_the_chart_runs_it(pod, atlasd)
    assert "--user=65532:65532" in opts and "--read-only" in opts
    entry = f"--entrypoint={atlasd['command'][0]}"

    out = _run(images["atlasd"], [*opts, entry], ["version"])
    assert out.startswith("atlasd "), out

    # The chart's args and environment, listening on loopback, state in the /tmp emptyDir.
    env = _env(atlasd)
    http_port, ads_port = free_port(), free_port()
    env |= {
        "ATLAS_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "ATLAS_ADS_LISTEN": f"127.0.0.1:{ads_port}",
    }
    env_opts = [f"--env={k}={v}" for k, v in sorted(env.items())]
    # The forwarder token the chart generates, mounted as the chart mounts it: the Secret's
    # file, root-owned, mode 0440, readable through the pod's fsGroup.
    secret = next(d for d in rendered["docs"] if d["kind"] == "Secret")
    volume = next(v for v in pod["volumes"] if v["name"] == "forwarder-token")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o440
    mount = next(m for m in atlasd["volumeMounts"] if m["name"] == "forwarder-token")
    token_dir = tmp_path / "forwarder-token"
    token_dir.mkdir()
    (token_dir / "token").write_bytes(base64.b64decode(secret["data"]["token"]))
    group = pod["securityContext"]["fsGroup"]
    os.chown(token_dir / "token", 0, group)
    (token_dir / "token").chmod(0o440)
    token_opts = [f"--volume={token_dir}:{mount['mountPath']}:ro", f"--group-add={group}"]
    c = Container(
        images["atlasd"],
        [*opts, *token_opts, *env_opts, entry],
        [*atlasd["args"], "--store", "/tmp/store"],
        log_dir=tmp_path,
    )
    containers.append(c.start())

    def ready() -> bool:
        c.proc.check_running()
        return httpx2.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200

    wait_until(ready, timeout=90, what="/readyz of atlasd in its image", interval=0.3)
    log = c.proc.log_text()
    assert "Traceback" not in log and "Read-only file system" not in log, log


def test_atlasd_image_runs_the_agent_as_the_envoy_chart_runs_it(
    images: dict[str, Image], tmp_path: Path
) -> None:
    """The envoy chart's agent containers (enrollment mode): the atlasd image as uid 65532
    with a read-only root filesystem and the chart's emptyDirs (its keys' directory, and
    the /tmp Python needs at start). The whole flow runs on the node
    (test_node_helm.py); this catches an image or mount the agent cannot start with."""
    rendered = _render(tmp_path, ENVOY_CHART, "agent.enabled=true", "agent.cluster=east",
                       "agent.server=atlasd.example:6307")  # fmt: skip
    pod = rendered["pod"]
    for c in [*pod["initContainers"], _container(pod, "agent")]:
        opts = _as_the_chart_runs_it(pod, c)
        assert "--user=65532:65532" in opts and "--read-only" in opts
        cert_dir = next(e["value"] for e in c["env"] if e["name"] == "ATLAS_CERT_DIR")
        assert f"--tmpfs={cert_dir}:rw,mode=0777" in opts
        out = _run(images["atlasd"], [*opts, f"--entrypoint={c['command'][0]}"],
                   [*c["args"], "--help"])  # fmt: skip
        assert "Usage: atlasd agent" in out and "Traceback" not in out, out


def test_coredns_image_serves_the_zone_as_the_sidecar(
    images: dict[str, Image], tmp_path: Path, containers: list[Container]
) -> None:
    rendered = _render(tmp_path, ATLASD_CHART)
    pod = rendered["pod"]
    coredns = _container(pod, "coredns")
    corefile_cm = next(
        d for d in rendered["docs"] if d["kind"] == "ConfigMap" and "Corefile" in d["data"]
    )
    opts = _as_the_chart_runs_it(pod, coredns)
    assert _run(images["coredns"], opts, ["-version"]).startswith("CoreDNS-")

    env = _env(coredns)
    port = free_port(udp_too=True)
    env["DNS_PORT"] = str(port)
    etc = tmp_path / "etc-coredns"
    etc.mkdir()
    # Loopback only (a test-only `bind`), as in test_charts_coredns.
    (etc / "Corefile").write_text(
        corefile_cm["data"]["Corefile"].replace("{\n", "{\n    bind 127.0.0.1\n", 1)
    )
    zone = tmp_path / "zone"
    zone.mkdir()
    fleet = Fleet.of(
        Settings(namespace="monitoring"),
        (
            DownstreamCluster(
                name="east", external_ip="203.0.113.1", ports=(ServicePort("thanos", 10901),)
            ),
        ),
    )
    (zone / Path(env["ZONE_FILE"]).name).write_text(render_zone(fleet, serial=1))
    zone.chmod(0o755)
    mounts = [
        f"--volume={zone}:{env['ZONE_FILE'].rsplit('/', 1)[0]}:ro",
        f"--volume={etc}:/etc/coredns:ro",
    ]
    # The chart's zone emptyDir is replaced by the directory holding the zone.
    opts = [o for o in opts if not o.startswith("--tmpfs=/zone")]
    args = [a if a != str(coredns["args"][-1]) else str(port) for a in coredns["args"]]
    env_opts = [f"--env={k}={v}" for k, v in sorted(env.items())]
    c = Container(images["coredns"], [*opts, *mounts, *env_opts], args, log_dir=tmp_path)
    containers.append(c.start())

    def srv() -> list[str]:
        c.proc.check_running()
        q = dns.message.make_query("_thanos._tcp.sidecars.thanos.atlas.", dns.rdatatype.SRV)
        resp = dns.query.udp(q, "127.0.0.1", port=port, timeout=2)
        return [rd.to_text() for rrset in resp.answer for rd in rrset]

    got = wait_until(srv, timeout=30, what="CoreDNS in its image answering SRV")
    assert got == ["10 100 10901 east-thanos-sidecar0.monitoring.svc.cluster.local."]


def test_envoy_image_runs_as_the_envoy_chart_runs_it(
    images: dict[str, Image], tmp_path: Path, containers: list[Container]
) -> None:
    # The chart's probe listener on free loopback ports (the test runs on the host's network).
    admin, probe = free_port(), free_port()
    rendered = _render(
        tmp_path,
        ENVOY_CHART,
        f"probes.adminPort={admin}",
        f"probes.port={probe}",
        "probes.address=127.0.0.1",
    )
    pod = rendered["pod"]
    envoy = _container(pod, "envoy")
    opts = _as_the_chart_runs_it(pod, envoy)
    # A uid no user of the image (nor, likely, of the node) has: Envoy needs no file of
    # its own, only the config (through fsGroup) and /tmp.
    assert "--user=65532:65532" in opts
    entry = f"--entrypoint={envoy['command'][0]}"
    assert "envoy" in _run(images["envoy"], [*opts, entry], ["--version"])

    config = tmp_path / "config"
    config.mkdir()
    (config / "envoy.yaml").write_text(
        yaml.safe_dump(
            {
                "node": {"id": "image-test", "cluster": "image-test"},
                "admin": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}
                },
            }
        )
    )
    # The chart mounts its Secret at configMountPath with mode 0440 and fsGroup.
    (config / "envoy.yaml").chmod(0o440)
    group = pod["securityContext"].get("fsGroup")
    assert group == 65532, "the config Secret is unreadable by uid 65532 without fsGroup"
    mounts = [
        f"--volume={config}:{envoy['volumeMounts'][0]['mountPath']}:ro",
        f"--group-add={group}",
    ]
    os.chown(config / "envoy.yaml", 0, group)
    c = Container(images["envoy"], [*opts, *mounts, entry], envoy["args"], log_dir=tmp_path)
    containers.append(c.start())

    def ready() -> bool:
        c.proc.check_running()
        return httpx2.get(f"http://127.0.0.1:{admin}/ready", timeout=2).status_code == 200

    wait_until(ready, timeout=60, what="Envoy in its image /ready")
    # What the kubelet's probes ask (the chart's probes: GET /ready on the probe port).
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert envoy[kind]["httpGet"] == {"path": "/ready", "port": "probe"}
    got = httpx2.get(f"http://127.0.0.1:{probe}/ready", timeout=5)
    assert (got.status_code, got.text.strip()) == (200, "LIVE")
