"""A real CoreDNS serving one zone file with the ``file`` plugin and a short reload."""

from __future__ import annotations

from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import dns.resolver

from tests.harness import components
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until


class CoreDNS:
    def __init__(
        self, zone_file: Path, *, origin: str = "atlas.", workdir: Path, reload: str = "1s"
    ) -> None:
        self.zone_file = zone_file
        self.origin = origin
        self.port = free_port(udp_too=True)
        self.workdir = workdir / f"coredns-{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.corefile = self.workdir / "Corefile"
        self.corefile.write_text(
            f"{origin}:{self.port} {{\n"
            f"    bind 127.0.0.1\n"
            f"    file {zone_file} {origin} {{\n"
            f"        reload {reload}\n"
            f"    }}\n"
            f"    errors\n"
            f"}}\n"
        )
        self.proc = Proc(
            f"coredns-{self.port}",
            [str(components.coredns()), "-conf", str(self.corefile)],
            log_dir=self.workdir,
        )

    def start(self) -> CoreDNS:
        self.proc.start()
        wait_until(self._answers, timeout=30, what="CoreDNS answering the SOA")
        return self

    def _answers(self) -> bool:
        self.proc.check_running()
        return bool(self.query(self.origin, "SOA"))

    def query(self, name: str, rdtype: str, *, tcp: bool = False) -> list[str]:
        """The answer's records as text (empty on NXDOMAIN/NODATA)."""
        q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        send = dns.query.tcp if tcp else dns.query.udp
        resp = send(q, "127.0.0.1", port=self.port, timeout=2)
        return sorted(rd.to_text() for rrset in resp.answer for rd in rrset)

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self) -> None:
        self.proc.stop()
