"""What a node (tests/harness/node.py) changes on the machine, and how it gives it back.

Kernel tunables (not per-namespace: kubelet sets ``kernel.panic_on_oops``,
``vm.overcommit_memory``, ...), iptables chains, cgroups, mounts and processes that
outlive their process group. Everything here acts only on what is named by the caller
(a cgroup root, a directory, a socket path) or on the chain prefixes kube-proxy, kubelet
and the CNI bridge plugin use.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

# Kernel tunables the node's programs may set (kubelet's setupKernelTunables, kube-proxy,
# the bridge plugin's ip_forward): a node records them at start and restores them.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
)


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def write_sysctls(values: dict[str, str]) -> list[str]:
    """Write ``values``; return the names whose value then still differs."""
    for name, value in values.items():
        with contextlib.suppress(OSError):
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value + "\n")
    now = read_sysctls()
    return [n for n, v in values.items() if now.get(n) != v]


def sh(*cmd: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, the named systemd one, v2)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            found.append(Path(left.split()[4]))
    return found


def kill_mentioning(needle: str) -> list[int]:
    """SIGKILL every process whose command line mentions ``needle`` (a path unique to
    one node: its containerd socket, its directory); return their pids."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def clean_cgroups(name: str) -> list[str]:
    """Kill every process in the cgroups under ``/<name>`` of each hierarchy; remove them."""
    problems = []
    killed = 0
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, root]:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                        killed += 1
        for d in [*dirs, root]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append(f"cgroup {d} not removed")
    if killed:
        problems.append(f"killed {killed} container process(es) left behind")
    return problems


def unmount_under(workdir: Path, netns_before: set[str]) -> list[str]:
    """Unmount everything under ``workdir`` and the pods' new network namespaces."""
    problems = []
    ours = [str(workdir)]
    netns_dir = Path("/run/netns")
    # containerd's CRI names its pods' namespaces cni-<uuid>; others are not ours.
    new_netns = (
        sorted(n for n in set(os.listdir(netns_dir)) - netns_before if n.startswith("cni-"))
        if netns_dir.is_dir()
        else []
    )
    ours += [str(netns_dir / n) for n in new_netns]
    for _ in range(3):
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        targets = [m for m in mounts if any(m == o or m.startswith(o + "/") for o in ours)]
        if not targets:
            break
        for m in sorted(set(targets), key=lambda m: -len(m)):
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], capture_output=True)
    else:
        problems.append(f"mounts left: {targets}")
    for n in new_netns:
        with contextlib.suppress(OSError):
            (netns_dir / n).unlink()
    if new_netns:
        problems.append(f"network namespaces left by pods: {new_netns}")
    return problems


IPTABLES_TABLES = ("filter", "nat", "mangle")
# Chains kube-proxy, kubelet (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT) and
# the bridge plugin's ipMasq (CNI-...) add.
CHAIN_PREFIXES = ("KUBE-", "CNI-")


def iptables_chains() -> set[tuple[str, str, str]]:
    """(command, table, chain) of every chain with a CHAIN_PREFIXES name."""
    found: set[tuple[str, str, str]] = set()
    for cmd in ("iptables", "ip6tables"):
        for table in IPTABLES_TABLES:
            saved = sh(f"{cmd}-save", "-t", table, check=False)
            for line in saved.splitlines():
                if line.startswith(":") and line[1:].startswith(CHAIN_PREFIXES):
                    found.add((cmd, table, line[1:].split()[0]))
    return found


def drop_chains(keep: set[tuple[str, str, str]]) -> list[str]:
    """Remove the CHAIN_PREFIXES chains not in ``keep`` and every jump to them: what
    ``kube-proxy --cleanup`` leaves (kubelet's chains, a pod's whose CNI DEL never ran)."""
    doomed = iptables_chains() - keep
    for cmd, table in {(c, t) for c, t, _ in doomed}:
        names = {n for c, t, n in doomed if (c, t) == (cmd, table)}
        for line in sh(f"{cmd}-save", "-t", table, check=False).splitlines():
            words = shlex.split(line)
            if (
                len(words) > 3
                and words[0] == "-A"
                and "-j" in words
                and words[words.index("-j") + 1] in names
                and words[1] not in names
            ):
                sh(cmd, "-t", table, "-D", *words[1:], check=False)
        for name in names:
            sh(cmd, "-t", table, "-F", name, check=False)
        for name in names:
            sh(cmd, "-t", table, "-X", name, check=False)
    left = iptables_chains() - keep
    return [f"iptables chains not removed: {sorted(left)}"] if left else []
