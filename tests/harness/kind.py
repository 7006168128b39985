"""A kind node image built here, and kind clusters from it, without a registry.

Usage: ``python tests/harness/kind.py image|up|down|kubeconfig [--name NAME]``
(``make kind`` runs ``up``; see docs/operations.md, "Develop against kind").

kind's own ``kind build node-image`` pulls a base image from docker.io, runs docker and
fetches kindnetd and local-path images: none of that is reachable here. This builds the
equivalent from what the machine has:

- rootfs: Debian (``mmdebstrap``) with systemd, containerd, runc, the CNI plugins,
  iptables and the tools kind's node scripts call; imported into podman.
- kube-base: a small Debian (iptables, conntrack) under every control-plane image.
- the control-plane images kubeadm runs, named ``localhost/atlasd-kind/<name>:<tag>``:
  kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy (the release
  binaries of ``components.kube_release``), etcd, coredns (the harness's builds) and
  pause. kind's cluster config (``cluster_config``) points kubeadm's ``imageRepository``
  and tags at them; containerd's ``sandbox_image`` names the pause image.
- the node image: kind's own ``images/base/files`` (entrypoint, systemd units,
  containerd config) from the ``sigs.k8s.io/kind`` module, with the changes this
  machine needs (``restrict_oom_score_adj``: no CAP_SYS_RESOURCE; ``SystemdCgroup =
  false``: kubelet runs with the cgroupfs driver on the host's cgroup v1), kubelet,
  kubeadm and kubectl, a ptp CNI config (kindnetd's shape, one node: kind's default CNI
  is disabled), and the control-plane images as one docker-archive that a oneshot unit
  imports into containerd at boot, before kubelet starts.

Cached like images.py: ``$ATLASD_COMPONENTS_DIR/image-kind-node-<key>/``, ``<key>``
hashing every input. Clusters run under kind's podman provider with their own
``containers.conf`` (no default ulimits: runc cannot set them without
CAP_SYS_RESOURCE). Standard library only, like images.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import components, images
from tests.harness.images import Image
from tests.harness.machine import read_sysctls, write_sysctls

RECIPE = "1"  # bump to rebuild the kind images after a change to how they are made
SUITE = images.BASE_SUITE
NODE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "nftables",
    "ebtables",
    "conntrack",
    "ethtool",
    "socat",
    "kmod",
    "procps",
    "util-linux",
    "mount",
    "iproute2",
    "libseccomp2",
    "ca-certificates",
    # kind's createContainer hook (mount-product-files.sh) edits the OCI spec with jq.
    "jq",
)
KUBE_BASE_PACKAGES = ("iptables", "conntrack", "ca-certificates")
REPOSITORY = "localhost/atlasd-kind"
DEFAULT_NAME = "atlasd-dev"
# kind's default pod subnet is 10.244.0.0/16; its one node gets the first /24.
POD_SUBNET = "10.244.0.0/24"

KIND_CONTAINERS_CONF = """\
# podman for kind's nodes (tests/harness/kind.py): privileged systemd containers.
[containers]
# runc cannot set rlimits here (no CAP_SYS_RESOURCE): none at all.
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

PRELOAD_UNIT = """\
[Unit]
Description=Import the control-plane images into containerd (atlasd's kind node)
After=containerd.service
Requires=containerd.service
Before=kubelet.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/kind/bin/atlasd-preload.sh

[Install]
WantedBy=multi-user.target
"""

# Into the snapshotter the entrypoint chose for this node's filesystem (as `kind load`).
PRELOAD_SCRIPT = """\
#!/bin/sh
set -eu
snapshotter=$(sed -n 's/^ *snapshotter = "\\(.*\\)"/\\1/p' /etc/containerd/config.toml | head -n1)
exec ctr --namespace=k8s.io images import --all-platforms --snapshotter="${snapshotter:-overlayfs}" \\
  /kind/images/control-plane.tar
"""

KUBELET_AFTER_PRELOAD = """\
[Unit]
After=atlasd-preload.service
Wants=atlasd-preload.service
"""

CONTAINERFILE = """\
FROM {rootfs}
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY bin/ /usr/bin/
COPY images/ /kind/images/
RUN chmod 755 /usr/local/bin/* /kind/bin/* /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl \\
 && sed -i 's#/usr/local/bin/containerd#/usr/bin/containerd#' /etc/systemd/system/containerd.service \\
 && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
    /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
    /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service atlasd-preload.service \\
 && systemctl mask systemd-binfmt.service \\
 && mkdir -p /etc/kubernetes/manifests /opt/cni/bin && ln -sf /usr/lib/cni/* /opt/cni/bin/ \\
 && echo {version} > /kind/version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
"""


def _log(msg: str) -> None:
    print(f"[kind] {msg}", file=sys.stderr, flush=True)


def image_tags() -> dict[str, str]:
    """The tag of each control-plane image (kube-* carry the release's version)."""
    v = components.KUBERNETES_VERSION
    tags = {n: v for n in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")}
    tags |= {"kube-proxy": v, "pause": v}
    tags |= {"etcd": components.ETCD_VERSION, "coredns": components.COREDNS_VERSION}
    return tags


def kind_files() -> Path:
    """``images/base/files`` of the ``sigs.k8s.io/kind`` module (from the module proxy)."""
    with tempfile.TemporaryDirectory(prefix="atlasd-gomod-") as tmp:
        (Path(tmp) / "go.mod").write_text("module probe\n")
        out = components._run(
            ["go", "mod", "download", "-json", f"sigs.k8s.io/kind@{components.KIND_VERSION}"],
            cwd=Path(tmp),
        )
    return Path(json.loads(out)["Dir"]) / "images" / "base" / "files"


def _debian(name: str, packages: tuple[str, ...]) -> Image:
    """A Debian root filesystem with ``packages`` (mmdebstrap), imported into podman."""
    key = images._hash(RECIPE, SUITE, *packages)

    def make(image: Image, tmp: Path) -> None:
        images.debian_rootfs(image.ref, tmp, suite=SUITE, packages=packages)

    return images._cached(name, f"localhost/atlasd-{name}", key, make)


def node_rootfs() -> Image:
    return _debian("kind-rootfs", NODE_PACKAGES)


def kube_base() -> Image:
    return _debian("kind-kube-base", KUBE_BASE_PACKAGES)


def _control_plane_images(ctx: Path) -> tuple[list[str], list[Path]]:
    """Build the control-plane images in podman; return their refs and the inputs."""
    release = components.kube_release()
    tags = image_tags()
    binaries = {
        **{n: release / n for n in ("kube-apiserver", "kube-controller-manager")},
        **{n: release / n for n in ("kube-scheduler", "kube-proxy")},
        "etcd": components.etcd(),
        "coredns": components.coredns(),
    }
    base = kube_base()
    refs = []
    for name, binary in binaries.items():
        ref = f"{REPOSITORY}/{name}:{tags[name]}"
        sub = ctx / name
        sub.mkdir()
        shutil.copy2(binary, sub / name)
        # kubeadm's manifests run the binary by name (on PATH); CoreDNS's Deployment
        # gives only arguments, so its entrypoint is the binary, as upstream's /coredns.
        target = "/coredns" if name == "coredns" else f"/usr/local/bin/{name}"
        entry = f'ENTRYPOINT ["{target}"]\n' if name in ("coredns", "kube-proxy") else ""
        (sub / "Dockerfile").write_text(f"FROM {base.ref}\nCOPY {name} {target}\n{entry}")
        images._build(ref, sub, base_ref=base.ref)
        refs.append(ref)
    pause = images.pause()
    pause_ref = f"{REPOSITORY}/pause:{tags['pause']}"
    images.podman("tag", pause.ref, pause_ref)
    refs.append(pause_ref)
    return refs, [*binaries.values(), pause.archive]


def _containerd_config(text: str) -> str:
    """kind's containerd config with what this machine needs (see the module doc)."""
    pause = f"{REPOSITORY}/pause:{image_tags()['pause']}"
    for old, new in (
        ("restrict_oom_score_adj = false", "restrict_oom_score_adj = true"),
        ("SystemdCgroup = true", "SystemdCgroup = false"),
        ('sandbox_image = "registry.k8s.io/pause:3.10"', f'sandbox_image = "{pause}"'),
    ):
        if old not in text:
            raise SystemExit(f"[kind] kind's containerd config has no {old!r}")
        text = text.replace(old, new)
    return text


def _cri_base_spec() -> str:
    """``ctr oci spec`` with kind's createContainer hook and no rlimits, as kind's base
    image makes ``/etc/containerd/cri-base.json`` (the host's ctr: the node's version)."""
    out = subprocess.run(["ctr", "oci", "spec"], capture_output=True, text=True, check=True)
    spec = json.loads(out.stdout)
    hooks = spec.setdefault("hooks", {}).setdefault("createContainer", [])
    hooks.append({"path": "/kind/bin/mount-product-files.sh"})
    spec["process"].pop("rlimits", None)
    return json.dumps(spec, indent=2)


def _cni_config() -> str:
    """kindnetd's CNI shape (ptp + host-local + portmap) for the one node's pod subnet."""
    ptp = {
        "type": "ptp",
        "ipMasq": True,
        "mtu": 1500,
        "ipam": {
            "type": "host-local",
            "dataDir": "/run/cni-ipam-state",
            "routes": [{"dst": "0.0.0.0/0"}],
            "ranges": [[{"subnet": POD_SUBNET}]],
        },
    }
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
    return json.dumps({"cniVersion": "0.4.0", "name": "kindnet", "plugins": [ptp, portmap]})


def node_image() -> Image:
    """The kind node image, ``localhost/atlasd-kind-node:<key>``."""
    components.apt_many(["podman", "mmdebstrap", "containerd"])
    rootfs = node_rootfs()
    base = kube_base()
    release = components.kube_release()
    files = kind_files()
    inputs: list[str | Path] = [
        RECIPE,
        rootfs.ref,
        base.ref,
        CONTAINERFILE,
        PRELOAD_UNIT,
        PRELOAD_SCRIPT,
        KUBELET_AFTER_PRELOAD,
        _cni_config(),
        _cri_base_spec(),
        json.dumps(image_tags(), sort_keys=True),
        files,
        release,
        components.etcd(),
        components.coredns(),
        components.pause(),
    ]

    def make(image: Image, ctx: Path) -> None:
        shutil.copytree(files, ctx / "files")
        for d in ctx.joinpath("files").rglob("*"):  # the module cache is read-only
            d.chmod(0o755 if d.is_dir() else 0o644)
        etc = ctx / "files" / "etc"
        config = etc / "containerd" / "config.toml"
        config.write_text(_containerd_config(config.read_text()))
        (etc / "containerd" / "cri-base.json").write_text(_cri_base_spec())
        (etc / "cni" / "net.d").mkdir(parents=True)
        (etc / "cni" / "net.d" / "10-kindnet.conflist").write_text(_cni_config())
        (etc / "systemd" / "system" / "atlasd-preload.service").write_text(PRELOAD_UNIT)
        dropin = etc / "systemd" / "system" / "kubelet.service.d" / "20-atlasd-preload.conf"
        dropin.write_text(KUBELET_AFTER_PRELOAD)
        (ctx / "files" / "kind" / "bin" / "atlasd-preload.sh").write_text(PRELOAD_SCRIPT)
        (ctx / "bin").mkdir()
        for name in ("kubeadm", "kubelet", "kubectl"):
            shutil.copy2(release / name, ctx / "bin" / name)
        (ctx / "images").mkdir()
        with tempfile.TemporaryDirectory(prefix="atlasd-kind-cp-") as tmp:
            refs, _ = _control_plane_images(Path(tmp))
        images.podman(
            "save", "-q", "--multi-image-archive", "--format", "docker-archive",
            "-o", str(ctx / "images" / "control-plane.tar"), *refs,
        )  # fmt: skip
        for ref in refs:
            images.podman("rmi", ref, check=False)
        (ctx / "Dockerfile").write_text(
            CONTAINERFILE.format(rootfs=rootfs.ref, version=components.KUBERNETES_VERSION)
        )
        images._build(image.ref, ctx, base_ref=rootfs.ref)

    key = images._hash(*inputs)
    image = images._cached("kind-node", "localhost/atlasd-kind-node", key, make)
    images._prune("kind-node", image)  # about 1.3 GB each: keep the last few
    return image


def cluster_config() -> str:
    """kind's cluster config: the local images, kubelet on the host's cgroup v1, no
    default CNI (the node image has its own)."""
    tags = image_tags()
    return f"""\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
kubeadmConfigPatches:
- |
  kind: ClusterConfiguration
  imageRepository: {REPOSITORY}
  etcd:
    local:
      imageTag: {tags["etcd"]}
  dns:
    imageTag: {tags["coredns"]}
- |
  kind: KubeletConfiguration
  failCgroupV1: false
  cgroupDriver: cgroupfs
"""


def kind_env() -> dict[str, str]:
    env = images.podman_env("kind-containers.conf", KIND_CONTAINERS_CONF)
    env["KIND_EXPERIMENTAL_PROVIDER"] = "podman"
    return env


def kind(*args: str, check: bool = True, timeout: float = 900) -> str:
    cmd = [str(components.kind()), *args]
    _log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=kind_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


def clusters() -> list[str]:
    return kind("get", "clusters").split()


def create(name: str, kubeconfig: Path, *, wait: str = "5m") -> None:
    """``kind create cluster`` from the node image; kubeconfig written to ``kubeconfig``."""
    image = node_image()
    # kind's podman provider bind-mounts the host's /lib/modules (read-only); a
    # machine without kernel modules installed has none.
    Path("/lib/modules").mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="atlasd-kind-") as cfg:
        cfg.write(cluster_config())
        cfg.flush()
        kind(
            "create", "cluster", "--name", name, "--image", image.ref, "--config", cfg.name,
            "--kubeconfig", str(kubeconfig), "--wait", wait, "--retain",
        )  # fmt: skip


def load(name: str, image: Image) -> None:
    """Import a cached image archive into the node's containerd (``kind load``)."""
    kind("load", "image-archive", str(image.archive), "--name", name)


def delete(name: str) -> None:
    kind("delete", "cluster", "--name", name, check=False)


def _kubeconfig_path(name: str) -> Path:
    return components.cache_root() / "kind" / f"{name}.kubeconfig"


def _sysctls_path(name: str) -> Path:
    return components.cache_root() / "kind" / f"{name}.sysctls.json"


def up(name: str) -> Path:
    """``make kind``: the cluster ``name`` (made if missing), with the atlasd and CoreDNS
    images loaded and the chart installed in ``monitoring``; returns the kubeconfig."""
    kubeconfig = _kubeconfig_path(name)
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    if name not in clusters():
        # kubelet in the node sets kernel tunables of the machine (they are not
        # per-namespace): recorded here, written back by `down`.
        _sysctls_path(name).write_text(json.dumps(read_sysctls()))
        create(name, kubeconfig)
    else:
        kubeconfig.write_text(kind("get", "kubeconfig", "--name", name))
    built = images.build(["atlasd", "coredns"])
    for image in built.values():
        load(name, image)
    atlasd_repo, atlasd_tag = built["atlasd"].ref.rsplit(":", 1)
    dns_repo, dns_tag = built["coredns"].ref.rsplit(":", 1)
    chart = Path(__file__).resolve().parents[2] / "charts" / "atlasd"
    helm = [
        str(components.helm()), "--kubeconfig", str(kubeconfig),
        "upgrade", "--install", "atlasd", str(chart), "-n", "monitoring", "--create-namespace",
        "--set", f"image.repository={atlasd_repo}", "--set", f"image.tag={atlasd_tag}",
        "--set", f"coredns.image.repository={dns_repo}", "--set", f"coredns.image.tag={dns_tag}",
        "--wait", "--timeout", "300s",
    ]  # fmt: skip
    _log("$ " + " ".join(helm))
    subprocess.run(helm, check=True)
    return kubeconfig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kind.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("image", "up", "down", "kubeconfig"))
    parser.add_argument("--name", default=DEFAULT_NAME)
    args = parser.parse_args(argv)
    if args.command == "image":
        _log(f"node image: {node_image().ref}")
    elif args.command == "up":
        kubeconfig = up(args.name)
        print(f"kind cluster {args.name!r} is up; atlasd runs in namespace monitoring.")
        print(f"  export KUBECONFIG={kubeconfig}")
        print("  atlasd run --kubeconfig $KUBECONFIG --namespace dev --zone-file ./atlas.zone")
        print(f"  make kind-down  (or: python tests/harness/kind.py down --name {args.name})")
    elif args.command == "down":
        delete(args.name)
        _kubeconfig_path(args.name).unlink(missing_ok=True)
        saved = _sysctls_path(args.name)
        if saved.exists():
            left = write_sysctls(json.loads(saved.read_text()))
            if left:
                _log(f"kernel tunables not given back: {left}")
            saved.unlink()
    else:
        print(_kubeconfig_path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
