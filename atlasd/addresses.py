"""IP addresses: one parser and one judgement of what atlasd may tell an Envoy to dial.

Pure (standard library only). Every place that decides whether a text is an IP literal,
or whether an address may be used as a downstream cluster's Envoy address, asks here, so
a spelling of an address cannot pass one check and fail another.

Parsing (``parse_ip``, ``is_ip_literal``) takes the literals Envoy takes in a
``SocketAddress`` of a STATIC cluster: a ``str`` only, ASCII, no surrounding space,
dotted-quad IPv4 without leading zeros, RFC 4291 §2.2 IPv6 text, with or without a zone
index (``fe80::1%eth0``). A remote address never has a zone index: a zone names an
interface of one host (RFC 4007 §11), so ``check_remote_address`` refuses one.

Judging (``check_remote_address``). Many IPv6 addresses carry an IPv4 address, and a
packet sent to them ends up at (or is sent on by a relay to) that IPv4 address. Each
such form is unwrapped first (``embedded_ipv4``), and the embedded address is judged
by the same rules as a plain IPv4 address:

=====================  ======================  ==============================================
form                   where the IPv4 sits     why the embedded IPv4 decides
=====================  ======================  ==============================================
IPv4-mapped            ``::ffff:0:0/96``       RFC 4291 §2.5.5.2: it *is* the IPv4 host; a
                       (last 32 bits)          dual-stack socket dials it over IPv4 (RFC 3493
                                               §3.7). Also written back as plain IPv4, so
                                               ``::ffff:192.0.2.1`` and ``192.0.2.1`` are one
                                               address (duplicate detection sees that).
IPv4-compatible        ``::/96`` except ``::``  RFC 4291 §2.5.5.1 (deprecated): automatic
                       and ``::1``             tunnels send it to the IPv4 host.
IPv4-translated        ``::ffff:0:0:0/96``     RFC 2765 §2.1 (SIIT): a translator turns it
                                               into the IPv4 address.
NAT64 well-known       ``64:ff9b::/96``        RFC 6052 §2.1: the NAT64 translator dials the
prefix                                         IPv4 address. RFC 6052 §3.1 also forbids
                                               non-global IPv4 behind this prefix (translators
                                               drop it), so it must be global as well.
6to4                   ``2002::/16``           RFC 3056 §2: ``2002:V4ADDR::/48``; the packet is
                       (bits 16-47)            encapsulated to V4ADDR, which RFC 3056 §2 and
                                               RFC 3964 §5.3.1 require to be global.
Teredo                 ``2001::/32``           RFC 4380 §4: the server (bits 32-63) and the
                                               client's mapped address (bits 96-127, inverted)
                                               both receive packets (§5.2, bubbles go through
                                               the server); both are public addresses.
ISATAP                 IID ``0:5efe:V4``       RFC 5214 §6.1: the link encapsulates to V4
                       or ``200:5efe:V4``      (an intra-site address, so private is fine).
=====================  ======================  ==============================================

The NAT64 local-use prefix ``64:ff9b:1::/48`` (RFC 8215) is refused outright: where the
IPv4 address sits depends on the prefix length the operator chose (RFC 6052 §2.2), so
no judgement of it can be sound; dial the IPv4 address, or the well-known prefix, instead.
Network-specific NAT64 prefixes (RFC 6052 §2.3) and 6rd prefixes (RFC 5969) are chosen
by an operator and cannot be recognised from the address: that is a limit of any check
done without the network's configuration.

The rules, for a plain address and for every embedded IPv4 address alike:

- unspecified (``0.0.0.0``, ``::``) and the rest of ``0.0.0.0/8`` ("this network",
  RFC 1122 §3.2.1.3: a source, never a destination): refused;
- loopback (``127.0.0.0/8``, ``::1``): refused unless ``allow_loopback`` (the standalone
  demo runs every Envoy on one host);
- link-local (``169.254.0.0/16``, ``fe80::/10``; RFC 3927, RFC 4291 §2.5.6): refused.
  This is where the cloud metadata service lives (``169.254.169.254``);
- cloud metadata services outside link-local (``fd00:ec2::254``, AWS over IPv6;
  ``100.100.100.200``, Alibaba Cloud): refused;
- multicast (``224.0.0.0/4``, ``ff00::/8``): refused;
- reserved (``240.0.0.0/4`` with the limited broadcast ``255.255.255.255``, RFC 1112 §4 and
  RFC 919; IPv6 blocks the IETF keeps unassigned, RFC 4291 §2.4): refused;
- private-use (RFC 1918, ``100.64.0.0/10`` RFC 6598, ``fc00::/7`` RFC 4193, the
  documentation ranges): allowed. Downstream clusters are often reached over private
  networks, and atlasd cannot tell which private networks are the operator's own.

Errors::

    ValueError
     +-- AddressError     not an IP literal, or an address atlasd will not dial (the
                          message says which rule, for the form given)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = ipaddress.IPv4Address
_V6 = ipaddress.IPv6Address
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_ISATAP_IIDS = (0x00005EFE, 0x02005EFE)
_METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OCI, ... (link-local too)
        ipaddress.ip_address("fd00:ec2::254"),  # AWS instance metadata over IPv6 (a ULA)
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud (shared address space)
    }
)


class AddressError(ValueError):
    """Not an IP literal, or an address atlasd refuses to dial; the message is for users."""


@dataclass(frozen=True)
class Embedded:
    """An IPv4 address carried inside an IPv6 one, and the form that carries it."""

    form: str  # "IPv4-mapped", "6to4", ...: how messages name the form
    rfc: str  # where the form is defined
    ipv4: ipaddress.IPv4Address
    # The RFC section that requires a global IPv4 address here (relays and translators
    # drop anything else), or None.
    global_rfc: str | None = None
    # The IPv6 text only spells the IPv4 address (mapped, compatible, translated, NAT64):
    # the IPv6 address itself is not judged (it lies in reserved ::/8 space by design).
    only_a_spelling: bool = True


def parse_ip(value: object) -> IPAddress:
    """The address a literal names; ``AddressError`` for anything that is not one."""
    if not isinstance(value, str):
        raise AddressError(f"must be a string, not {type(value).__name__}")
    if not value.isascii() or value != value.strip():
        raise AddressError(f"{value!r} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise AddressError(f"{value!r} is not an IP address") from None


def is_ip_literal(value: object) -> bool:
    """Whether ``value`` is an IP literal, i.e. a STATIC Envoy endpoint rather than a name
    to resolve (Envoy reads a zone index too: ``fe80::1%eth0`` is a literal)."""
    try:
        parse_ip(value)
    except AddressError:
        return False
    return True


def embedded_ipv4(ip: IPAddress) -> tuple[Embedded, ...]:
    """Every IPv4 address ``ip`` carries (see the module docstring's table)."""
    if isinstance(ip, _V4):
        return ()
    n = int(ip)
    low = _V4(n & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return (Embedded("IPv4-mapped", "RFC 4291 §2.5.5.2", ip.ipv4_mapped),)
    if ip in _COMPATIBLE and n > 1:
        return (Embedded("IPv4-compatible", "RFC 4291 §2.5.5.1", low),)
    if ip in _TRANSLATED:
        return (Embedded("IPv4-translated", "RFC 2765 §2.1", low),)
    if ip in _NAT64_WKP:
        return (Embedded("NAT64", "RFC 6052 §2.1", low, "RFC 6052 §3.1"),)
    if ip.sixtofour is not None:
        return (Embedded("6to4", "RFC 3056 §2", ip.sixtofour, "RFC 3056 §2", False),)
    if ip.teredo is not None:
        server, client = ip.teredo
        return (
            Embedded("Teredo server", "RFC 4380 §4", server, "RFC 4380 §4", False),
            Embedded("Teredo client", "RFC 4380 §4", client, "RFC 4380 §4", False),
        )
    if (n >> 32) & 0xFFFFFFFF in _ISATAP_IIDS:
        return (Embedded("ISATAP", "RFC 5214 §6.1", low, only_a_spelling=False),)
    return ()


def _refusal(ip: IPAddress, *, allow_loopback: bool) -> str | None:
    """Which rule refuses ``ip`` itself (no unwrapping), as "is a ... address"; or None."""
    if ip.is_unspecified:
        return "is the unspecified address"
    if isinstance(ip, _V4) and ip in _THIS_NETWORK:
        return "is in 0.0.0.0/8 ('this network', a source address only; RFC 1122)"
    if ip.is_loopback:
        return None if allow_loopback else "is a loopback address"
    if ip.is_link_local:
        if ip in _METADATA:
            return "is a link-local address (the cloud metadata service)"
        return "is a link-local address"
    if ip in _METADATA:
        return "is a cloud metadata service address"
    if ip.is_multicast:
        return "is a multicast address"
    if ip.is_reserved:
        if isinstance(ip, _V4) and int(ip) == 0xFFFFFFFF:
            return "is the limited broadcast address"
        return "is in reserved address space"
    return None


def canonical_text(ip: IPAddress) -> str:
    """The text atlasd writes for ``ip``: an IPv4-mapped address as the IPv4 it is."""
    if isinstance(ip, _V6) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def check_remote_address(value: object, *, allow_loopback: bool = False) -> str:
    """``value`` checked as an address an Envoy may be sent to dial; its canonical text.

    Raises ``AddressError`` naming the rule (and the embedded IPv4 address, if that is
    what the rule refused).
    """
    ip = parse_ip(value)
    if isinstance(ip, _V6) and ip.scope_id is not None:
        raise AddressError(
            f"{value} has a zone index: it names an interface of one host (RFC 4007 §11)"
        )
    if isinstance(ip, _V6) and ip in _NAT64_LOCAL:
        raise AddressError(
            f"{value} uses the local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215): which IPv4 "
            "address it reaches depends on the translator's prefix length, so it cannot be "
            "checked; give the IPv4 address or the 64:ff9b::/96 form"
        )
    inner = embedded_ipv4(ip)
    # A mere spelling of an IPv4 address is judged by that address alone; any other
    # address is judged itself and by whatever it carries.
    if not inner or not all(e.only_a_spelling for e in inner):
        why = _refusal(ip, allow_loopback=allow_loopback)
        if why is not None:
            raise AddressError(f"{value} {why}")
    for e in inner:
        why = _refusal(e.ipv4, allow_loopback=allow_loopback)
        if why is None and e.global_rfc is not None and not e.ipv4.is_global:
            why = f"is not a global address ({e.global_rfc} allows only global ones there)"
        if why is not None:
            raise AddressError(f"{value} is {e.form} {e.ipv4} ({e.rfc}), which {why}")
    return canonical_text(ip)
