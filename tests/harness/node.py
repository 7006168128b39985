"""A real single-node Kubernetes cluster that runs pods, without a registry.

etcd + kube-apiserver (as ``kube.ApiServer``, bound to the node's address so pods reach
it through the in-cluster ``kubernetes`` Service) + kube-controller-manager +
kube-scheduler + kube-proxy (iptables) + kubelet (cgroupfs driver) on containerd + runc,
with a CNI bridge (Debian's containernetworking-plugins, host-local IPAM) and a cluster
DNS (the harness's CoreDNS with its ``kubernetes`` plugin, run beside the node like the
control plane). The images the charts need (``images.py``) are imported into containerd,
so pods start with ``imagePullPolicy: IfNotPresent`` and no registry.

What the node changes on the machine, and gives back at ``stop()``:

- kernel tunables kubelet, kube-proxy and the bridge plugin set (``machine.SYSCTLS``):
  recorded before anything starts and written back;
- the bridge ``BRIDGE`` and the iptables chains kube-proxy, kubelet and the bridge
  plugin add (``kube-proxy --cleanup``, then any ``KUBE-``/``CNI-`` chain left);
- the cgroups under ``/<CGROUP_ROOT>`` (kubelet's cgroupRoot), every mount under the
  node's directory and the network namespaces its pods had.

Only one node runs on a machine at a time (a lock file): the bridge, its addresses and
the cgroup root are fixed. Every program runs in its own process group (``procs.Proc``);
containerd's shims, which leave containerd's group by design, are found by the socket
address they were given (unique to this node) and stopped by pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx2
import yaml

from tests.harness import components
from tests.harness.images import Image
from tests.harness.kube import ApiServer
from tests.harness.machine import (
    cgroup_hierarchies,
    clean_cgroups,
    drop_chains,
    iptables_chains,
    kill_mentioning,
    read_sysctls,
    sh,
    unmount_under,
    write_sysctls,
)
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

NODE_NAME = "atlasd-node"
BRIDGE = "atlasd-cni0"
# The pod network: the node's own address is the bridge's gateway, so pods reach the
# API server (and the cluster DNS) there. Pods get addresses of the lower half
# (POD_SUBNET, their interface's prefix); the upper half is never handed to pods: tests
# use it as Services' externalIPs, which pods then reach through their default route
# (the node, where kube-proxy rewrites them), not on the bridge where no one answers
# (with the whole /24 on their interface a pod's connection to such an address failed
# with "No route to host").
POD_CIDR = "10.244.0.0/24"
POD_SUBNET = "10.244.0.0/25"
NODE_IP = "10.244.0.1"
RANGE_START = "10.244.0.10"
RANGE_END = "10.244.0.120"
SERVICE_CIDR = "10.96.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "atlasd-node"
LOCK_FILE = Path("/run/lock/atlasd-node.lock")
# Written while a node is up (what it changed), removed by its teardown: a node that
# finds it was left by one that died (killed test run) gives those changes back first.
STATE_FILE = Path("/run/lock/atlasd-node.json")
LOCK_WAIT = 1200.0  # another run's node: wait for it rather than fail

# What the node needs set (bridged pod-to-Service-to-pod traffic must see iptables).
REQUIRED_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"}


def containerd_root() -> Path:
    """containerd's root (content, snapshots, metadata), kept in the components cache
    across runs so the images are unpacked once; its state (tasks, sockets, mounts)
    lives in the node's directory. A torn-down node leaves no container in it."""
    return components.cache_root() / "node-containerd"


def take_node_lock() -> IO[str]:
    """The machine's one-node lock (a harness node or a kind cluster: kubelet sets kernel
    tunables of the whole machine), waited for up to LOCK_WAIT; held until closed."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held until the caller closes it

    def taken() -> bool:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    try:
        wait_until(taken, timeout=LOCK_WAIT, what=f"{LOCK_FILE} (one node per machine)",
                   interval=1)  # fmt: skip
    except BaseException:
        lock.close()
        raise
    return lock


class Node:
    """A single-node cluster; ``admin_kubeconfig`` reaches its API server."""

    def __init__(self, workdir: Path, images: list[Image]) -> None:
        self.workdir = workdir
        self.images = images
        workdir.mkdir(parents=True, exist_ok=True)
        self.logs = workdir / "logs"
        self.pod_logs = workdir / "pod-logs"
        self.api = ApiServer(
            workdir / "apiserver",
            address=NODE_IP,
            service_cidr=SERVICE_CIDR,
            disable_admission=(),
            authorization="Node,RBAC",
            extra_args=("--enable-admission-plugins=NodeRestriction",),
        )
        # kube-apiserver reaches kubelet (logs, exec) with the admin client certificate.
        self.api.proc.argv += [
            f"--kubelet-client-certificate={self.api.admin_cert}",
            f"--kubelet-client-key={self.api.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
        self.admin_kubeconfig = self.api.admin_kubeconfig
        self.procs: list[Proc] = []
        self._saved_sysctls: dict[str, str] = {}
        self._netns_before: set[str] = set()
        self._chains_before: set[tuple[str, str, str]] = set()
        self._lock: IO[str] | None = None
        self._bridge_made = False
        self.containerd_sock = workdir / "containerd" / "containerd.sock"
        self.kube_proxy_config = workdir / "kube-proxy.yaml"
        self.started = False

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> Node:
        self._take_lock()
        self.started = True
        recover_dead_node()
        self._saved_sysctls = read_sysctls()
        self._netns_before = set(os.listdir("/run/netns")) if Path("/run/netns").is_dir() else set()
        self._chains_before = iptables_chains()
        STATE_FILE.write_text(
            json.dumps(
                {
                    "workdir": str(self.workdir),
                    "sysctls": self._saved_sysctls,
                    "chains": sorted(self._chains_before),
                }
            )
        )
        steps: list[str] = []
        for name, fn in (
            ("sysctls", lambda: write_sysctls(REQUIRED_SYSCTLS)),
            ("bridge, cgroups", lambda: (self._make_bridge(), self._make_cgroup_root())),
            ("etcd, kube-apiserver", self.api.start),
            ("containerd", self._start_containerd),
            ("images imported", self._import_images),
            ("cluster DNS", self._start_cluster_dns),
            ("controller-manager, scheduler", self._start_controllers),
            ("kube-proxy", self._start_kube_proxy),
            ("kubelet", self._start_kubelet),
            ("node Ready, Service routed", self._wait_ready),
        ):
            t = time.monotonic()
            fn()
            steps.append(f"{time.monotonic() - t:6.1f}s {name}")
        (self.workdir / "startup.txt").write_text("\n".join(steps) + "\n")
        return self

    def stop(self) -> list[str]:
        """Tear everything down; return what could not be given back (for the report).
        The time of each step goes to ``teardown.txt`` in the node's directory."""
        if not self.started:
            return []
        problems: list[str] = []
        steps: list[str] = []
        by_name = {p.name: p for p in self.procs}

        def step(name: str, *fns: Callable[[], list[str] | None]) -> None:
            # Every step runs whatever an earlier one raised: give back all we can.
            t = time.monotonic()
            for fn in fns:
                try:
                    problems.extend(fn() or [])
                except Exception as exc:
                    problems.append(f"{name}: {exc}")
            steps.append(f"{time.monotonic() - t:6.1f}s {name}")

        def stop(*names: str, timeout: float) -> Callable[[], None]:
            def run() -> None:
                for name in names:
                    if name in by_name:
                        by_name[name].stop(timeout=timeout)

            return run

        # No new pods: stop the controllers and the scheduler first (stateless: a short
        # grace), then let kubelet stop every pod the way it does (CNI DEL, unmounts),
        # then stop the rest.
        step("controllers", stop("kube-controller-manager", "kube-scheduler", timeout=2))
        if "kubelet" in by_name and by_name["kubelet"].running():
            step("pods drained", self._drain)
        step("kubelet, kube-proxy, cluster DNS",
             stop("kubelet", "kube-proxy", "cluster-dns", timeout=5))  # fmt: skip
        step("containerd", self._kill_tasks, stop("containerd", timeout=10), self._kill_shims)
        step("cgroups, mounts", self._clean_cgroups, self._unmount)
        step("iptables, bridge", self._clean_network)
        step("apiserver, etcd", self.api.stop)

        def sysctls() -> list[str]:
            left = write_sysctls(self._saved_sysctls)
            return [f"sysctls not restored: {left}"] if left else []

        step("sysctls", sysctls)
        STATE_FILE.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.started = False
        (self.workdir / "teardown.txt").write_text("\n".join([*steps, *problems]) + "\n")
        return problems

    def _take_lock(self) -> None:
        self._lock = take_node_lock()

    # -- pieces -------------------------------------------------------------------
    def _proc(self, name: str, argv: list[str], **kw: Any) -> Proc:
        proc = Proc(name, argv, log_dir=self.logs, **kw)
        self.procs.append(proc)
        return proc.start()

    def _make_bridge(self) -> None:
        # The bridge plugin would make it at the first pod; the API server binds to its
        # address before that, so make it first (the plugin keeps an existing bridge).
        if sh("ip", "-o", "link", "show", BRIDGE, check=False):
            raise RuntimeError(f"{BRIDGE} exists: a node was not torn down (ip link del {BRIDGE})")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge_made = True
        # The gateway's address with the pods' prefix (the bridge plugin insists on it);
        # the node itself still reaches the whole POD_CIDR on the bridge (the upper half:
        # the externalIPs, rewritten by kube-proxy before they would go out).
        prefix = POD_SUBNET.split("/")[1]
        sh("ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        sh("ip", "route", "replace", POD_CIDR, "dev", BRIDGE)

    def _make_cgroup_root(self) -> None:
        for hierarchy in cgroup_hierarchies():
            (hierarchy / CGROUP_ROOT).mkdir(exist_ok=True)

    def _start_containerd(self) -> None:
        base = self.workdir / "containerd"
        cni_conf = base / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-atlasd.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        pause = next(i for i in self.images if i.name == "pause")
        config = f"""\
version = 2
root = "{containerd_root()}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause.ref}"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this machine withholds.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{components.apt("runc")}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{components.apt("cni-plugins").parent}"
    conf_dir = "{cni_conf}"
"""
        path = base / "config.toml"
        path.write_text(config)
        # The CRI plugin's per-sandbox/container directories of earlier runs (their
        # containers were deleted at teardown; the directories are not).
        for stale in ("sandboxes", "containers"):
            shutil.rmtree(containerd_root() / "io.containerd.grpc.v1.cri" / stale,
                          ignore_errors=True)  # fmt: skip
        proc = self._proc("containerd", [str(components.apt("containerd")), f"--config={path}"])

        def up() -> bool:
            proc.check_running()
            return self.ctr("version", check=False) != ""

        wait_until(up, timeout=60, what="containerd")

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "atlasd-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.workdir / "cni-ipam"),
                        "ranges": [
                            [
                                {
                                    "subnet": POD_SUBNET,
                                    "rangeStart": RANGE_START,
                                    "rangeEnd": RANGE_END,
                                    "gateway": NODE_IP,
                                }
                            ]
                        ],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }
            ],
        }

    def ctr(self, *args: str, check: bool = True) -> str:
        return sh(
            str(Path(components.apt("containerd")).parent / "ctr"),
            f"--address={self.containerd_sock}",
            "--namespace=k8s.io",
            *args,
            check=check,
        )

    def _import_images(self) -> None:
        """Import the images containerd lacks; drop the ones no longer built."""
        wanted = {i.ref for i in self.images}
        present = set(self.ctr("images", "ls", "-q").split())
        for image in self.images:
            if image.ref not in present:
                self.ctr("images", "import", str(image.archive))
        stale = sorted(present - wanted)
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    def _start_cluster_dns(self) -> None:
        kubeconfig = self.api.client_kubeconfig(
            "cluster-dns", "atlasd-test-admin-dns", orgs=("system:masters",)
        )
        corefile = self.workdir / "cluster-dns.Corefile"
        corefile.write_text(
            f"""\
{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {NODE_IP}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig} harness
        ttl 5
    }}
    errors
}}
"""
        )
        self._proc("cluster-dns", [str(components.coredns()), "-conf", str(corefile)])

    def _start_controllers(self) -> None:
        kcm = self.api.client_kubeconfig(
            "kube-controller-manager", "atlasd-test-admin-kcm", orgs=("system:masters",)
        )
        self._proc(
            "kube-controller-manager",
            [
                str(components.kube_node_binary("kube-controller-manager")),
                f"--kubeconfig={kcm}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--root-ca-file={self.api.serving_ca_path}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
        )
        sched = self.api.client_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self._proc(
            "kube-scheduler",
            [
                str(components.kube_node_binary("kube-scheduler")),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.api.client_kubeconfig("kube-proxy", "system:kube-proxy")
        self.kube_proxy_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "mode": "iptables",
                    "hostnameOverride": NODE_NAME,
                    "clusterCIDR": POD_CIDR,
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    "healthzBindAddress": f"127.0.0.1:{free_port()}",
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Leave the machine's conntrack tunables alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"localhostNodePorts": False, "syncPeriod": "10s"},
                }
            )
        )
        self._proc(
            "kube-proxy",
            [
                str(components.kube_node_binary("kube-proxy")),
                f"--config={self.kube_proxy_config}",
                "--v=1",
            ],
        )

    def _start_kubelet(self) -> None:
        kubeconfig = self.api.client_kubeconfig(
            "kubelet", f"system:node:{NODE_NAME}", orgs=("system:nodes",)
        )
        config = self.workdir / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{CGROUP_ROOT}",
                    "failCgroupV1": False,
                    "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
                    "address": NODE_IP,
                    "port": free_port(),
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": free_port(),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(self.api.client_ca_path)},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "clusterDNS": [NODE_IP],
                    "clusterDomain": CLUSTER_DOMAIN,
                    "resolvConf": "/etc/resolv.conf",
                    "failSwapOn": False,
                    "podLogsDir": str(self.pod_logs),
                    "maxPods": 30,
                    "serializeImagePulls": False,
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "10s",
                    "nodeStatusUpdateFrequency": "5s",
                }
            )
        )
        self._proc(
            "kubelet",
            [
                str(components.kube_node_binary("kubelet")),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.workdir / 'kubelet'}",
                f"--cert-dir={self.workdir / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _wait_ready(self) -> None:
        def node_ready() -> bool:
            for p in self.procs:
                p.check_running()
            with self.api.admin() as c:
                r = c.get(f"/api/v1/nodes/{NODE_NAME}")
                if r.status_code != 200:
                    return False
                conditions = r.json()["status"].get("conditions", [])
            return any(x["type"] == "Ready" and x["status"] == "True" for x in conditions)

        wait_until(node_ready, timeout=180, what=f"node {NODE_NAME} Ready", interval=0.5)

        def default_sa() -> bool:
            with self.api.admin() as c:
                return (
                    c.get("/api/v1/namespaces/default/serviceaccounts/default").status_code == 200
                )

        wait_until(default_sa, timeout=60, what="the default ServiceAccount (controller-manager)")

        def service_routed() -> bool:
            # The in-cluster `kubernetes` Service through kube-proxy's rules.
            with httpx2.Client(
                base_url=f"https://{self.api.kubernetes_service_ip}:443",
                verify=self.api.ssl_context(),
                timeout=3,
            ) as c:
                return c.get("/readyz").status_code == 200

        wait_until(service_routed, timeout=60, what="the kubernetes Service via kube-proxy")

    # -- helpers for tests ---------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.api.kubectl(*args, input=input, check=check)

    def pod_log_files(self) -> list[Path]:
        return sorted(self.pod_logs.rglob("*.log")) if self.pod_logs.exists() else []

    def log_sections(self) -> Iterator[tuple[str, str]]:
        """(name, text) of every log: the node's programs and every container."""
        yield "kube-apiserver", self.api.proc.log_text()
        yield "etcd", self.api.etcd.proc.log_text()
        for proc in self.procs:
            yield proc.name, proc.log_text()
        for f in self.pod_log_files():
            yield f"pod {f.relative_to(self.pod_logs)}", f.read_text(errors="replace")

    # -- teardown -----------------------------------------------------------------
    def _drain(self) -> None:
        """Delete every pod now and wait until kubelet has stopped all sandboxes."""
        self.kubectl(
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
            check=False,
        )

        def all_stopped() -> bool:
            # kubelet stops every container and sandbox (StopPodSandbox: CNI DEL, the
            # network namespace removed); it removes their records only at its next
            # container GC (each minute), so those are deleted below instead.
            return not self._running_tasks() and not self._pod_netns()

        wait_until(all_stopped, timeout=90, what="kubelet stopping every pod", interval=0.3)

    def _running_tasks(self) -> list[str]:
        rows = [line.split() for line in self.ctr("tasks", "ls", check=False).splitlines()[1:]]
        return [r[0] for r in rows if len(r) >= 3 and r[2] != "STOPPED"]

    def _pod_netns(self) -> list[str]:
        netns = Path("/run/netns")
        if not netns.is_dir():
            return []
        return [
            n for n in os.listdir(netns) if n.startswith("cni-") and n not in self._netns_before
        ]

    def _kill_tasks(self) -> list[str]:
        """Delete what kubelet stopped; SIGKILL (and report) whatever still runs."""
        if not self.containerd_sock.exists():
            return []
        running = self._running_tasks()
        for task in running:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        for task in self.ctr("tasks", "ls", "-q", check=False).split():
            while time.monotonic() < deadline:
                self.ctr("tasks", "delete", task, check=False)
                if task not in self.ctr("tasks", "ls", "-q", check=False).split():
                    break
                time.sleep(0.2)
        for c in self.ctr("containers", "ls", "-q", check=False).split():
            self.ctr("containers", "delete", c, check=False)
        return [f"containers still running after kubelet stopped: {running}"] if running else []

    def _kill_shims(self) -> list[str]:
        pids = kill_mentioning(f"-address {self.containerd_sock}".replace(" ", "\0"))
        return [f"killed {len(pids)} containerd shim(s) left behind"] if pids else []

    def _clean_cgroups(self) -> list[str]:
        return clean_cgroups(CGROUP_ROOT)

    def _unmount(self) -> list[str]:
        return unmount_under(self.workdir, self._netns_before)

    def _clean_network(self) -> list[str]:
        problems = []
        proxy = components.kube_node_binary("kube-proxy")
        out = subprocess.run(
            [str(proxy), "--cleanup", f"--config={self.kube_proxy_config}"],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            problems.append(f"kube-proxy --cleanup: {out.stderr.strip()[-500:]}")
        problems += drop_chains(self._chains_before)
        if self._bridge_made:
            sh("ip", "link", "del", BRIDGE, check=False)
            self._bridge_made = False
        return problems


def recover_dead_node() -> list[str]:
    """Give back what a node left when its test run died before its teardown (the
    caller holds the lock, so no node is running)."""
    if not STATE_FILE.exists():
        return []
    state = json.loads(STATE_FILE.read_text())
    workdir = Path(state["workdir"])
    done = [f"recovered a node left by a dead run ({workdir})"]
    kill_mentioning(f"{workdir}/")
    done += clean_cgroups(CGROUP_ROOT)
    done += unmount_under(workdir, set())
    done += drop_chains({(c[0], c[1], c[2]) for c in state["chains"]})
    sh("ip", "link", "del", BRIDGE, check=False)
    write_sysctls(state["sysctls"])
    # Its containers' records may outlive it there: start containerd from scratch.
    shutil.rmtree(containerd_root(), ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    return done
