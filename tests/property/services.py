"""Hypothesis strategies for cluster Services as an operator — or an attacker — writes them.

A drawn Service is the raw Kubernetes JSON shape (``metadata.name/labels/annotations``,
``spec.externalIPs``, ``spec.ports``; every ``goatlas.io`` label and annotation of
docs/interface.md and of ``atlasd.fleet.validate``), each field either valid or hostile: unicode,
control characters, zone-file metacharacters, huge strings, wrong types, boundary
numbers. The generator records which field paths it made hostile (``Drawn.tainted``),
written the way a ``Problem.field`` names them, so a test can require that the Problems
name exactly those fields.

"Valid" and "hostile" follow docs/interface.md and the validate module's docstring, with the
limits the outputs impose (a port name must fit ``_<name>`` in one DNS label, so 62
characters). A value whose verdict depends on another field (a name near the derived-
name limit, whose sidecar names grow with the replica count) is judged by
``expected_problem_fields``, the one place such a rule is restated.
"""

from __future__ import annotations

import functools
import ipaddress
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import strategies as st

from atlasd import labels

T = TypeVar("T")

MISSING: Any = object()  # a sentinel: leave the key out
HUGE = 100_000  # characters: far beyond any limit, cheap to draw

_LOWER = string.ascii_lowercase + string.digits
_LOWER_DASH = _LOWER + "-"
_HOST_CHARS = string.ascii_letters + string.digits
_LABEL_CHARS = string.ascii_letters + string.digits + "-_."

SIDECAR_INFIX = "-thanos-sidecar"
IDENTITY_SUFFIX = "-atlas-identity"
VALUES_SUFFIX = "-envoy-values"


def ann(key: str) -> str:
    return f'metadata.annotations["{key}"]'


def lbl(key: str) -> str:
    return f'metadata.labels["{key}"]'


@dataclass
class Drawn:
    """One generated Service and the field paths made hostile on purpose."""

    service: dict[str, Any]
    tainted: set[str] = field(default_factory=set)
    # The replica count validation must use (1 when the label is absent or hostile).
    replicas: int = 1
    # metadata/spec/labels made the wrong type: validation may stop at that field.
    structural: str | None = None

    @property
    def name(self) -> Any:
        meta = self.service.get("metadata")
        return meta.get("name", MISSING) if isinstance(meta, dict) else MISSING


# ---------------------------------------------------------------------------------------
# building blocks

# Wrong types where a string belongs (YAML in a standalone store gives all of these).
WRONG_TYPES: st.SearchStrategy[Any] = st.sampled_from(
    [None, 0, 1, -1, 3, 65535, 10**30, 1.5, float("nan"), True, False, [], ["x"], {}, {"a": 1}]
)

# Characters that have a meaning somewhere downstream: zone files, YAML, Envoy
# configuration, format strings, shells, terminals.
NASTY_CHARS = list(
    ";$()@*\\\"' \t\n\r\x00\x07\x1b\x7f{}[]%/:=,#&|<>`~!?^+"
    "\u00e9\u0430\u0435\u043e\u200b\u200d\u202e\ufeff\u2028\uff11\u0661\U0001f600"
)


@functools.cache  # building a strategy is costly; each is built once
def text_with_nasty(base: st.SearchStrategy[str], spare: str = "") -> st.SearchStrategy[str]:
    """``base`` with one nasty character inserted strictly inside it (after the last
    character only for a one-character base), so no parser's stripping can undo it.
    ``spare``: characters that would make some values valid again."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        s = draw(base)
        c = draw(st.sampled_from([c for c in NASTY_CHARS if c not in spare]))
        i = draw(st.integers(1, max(len(s) - 1, 1)))
        return s[:i] + c + s[i:]

    return build()


@functools.cache  # building a strategy is costly; each is built once
def huge(char: str = "a") -> st.SearchStrategy[str]:
    return st.integers(1_000, HUGE).map(lambda n: char * n)


def _alnum_ends(ends: str) -> Callable[[str], str]:
    """A map from a text to one whose first and last characters are in ``ends`` (an end
    outside it is replaced by a character chosen from its code point)."""

    def fix(text: str) -> str:
        if text[0] not in ends:
            text = ends[ord(text[0]) % len(ends)] + text[1:]
        if text[-1] not in ends:
            text = text[:-1] + ends[ord(text[-1]) % len(ends)]
        return text

    return fix


# One text draw each (a single choice for Hypothesis), mapped to a valid shape: far
# cheaper than drawing a length and the characters one by one.


@functools.cache  # building a strategy is costly; each is built once
def dns1123_label(min_size: int = 1, max_size: int = 20) -> st.SearchStrategy[str]:
    """Lower-case DNS-1123 labels (alphanumeric at both ends)."""
    text = st.text(_LOWER_DASH, min_size=min_size, max_size=max_size)
    return text.map(_alnum_ends(_LOWER))


@functools.cache  # building a strategy is costly; each is built once
def host_label(max_size: int = 12) -> st.SearchStrategy[str]:
    text = st.text(_HOST_CHARS + "-", min_size=1, max_size=max_size)
    return text.map(_alnum_ends(_HOST_CHARS))


@functools.cache  # building a strategy is costly; each is built once
def dns_name() -> st.SearchStrategy[str]:
    """Host names: 1-4 labels, plus the exact limits (63-character label, 253 in all)."""
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    return st.one_of(
        st.lists(host_label(), min_size=1, max_size=4).map(".".join),
        st.sampled_from(
            [
                longest,
                "x" * 63,
                "prometheus-operated.monitoring.svc.cluster.local",
                "localhost",
                "127.0.0.1",  # a local component on the downstream host is fine
                "10.1.2.3",
                "0",
            ]
        ),
    )


@functools.cache  # building a strategy is costly; each is built once
def label_name(max_size: int = 20) -> st.SearchStrategy[str]:
    """The name part of a label key, or a label value (``[A-Za-z0-9_.-]``, alnum ends)."""
    text = st.text(_LABEL_CHARS, min_size=1, max_size=max_size)
    return st.one_of(text.map(_alnum_ends(_HOST_CHARS)), st.just("v" * 63))


@functools.cache  # building a strategy is costly; each is built once
def label_key() -> st.SearchStrategy[str]:
    prefix = st.sampled_from(["", "app.kubernetes.io/", "example.com/", "a/", "x.y-z.io/"])
    return st.tuples(prefix, label_name()).map("".join)


# ---------------------------------------------------------------------------------------
# field values: (valid, hostile) strategies


@functools.cache  # building a strategy is costly; each is built once
def cluster_names() -> st.SearchStrategy[str]:
    """Valid alone; a name of 41..50 characters may be too long for its derived names."""
    return st.one_of(
        dns1123_label(1, 12),
        dns1123_label(41, 50),
        st.sampled_from(["a", "0", "east", "atlas-x", "xatlas", "a-thanos-sidecar", "a" * 47]),
    ).filter(lambda n: n != "atlas" and not _is_sidecar_name(n))


def _is_sidecar_name(name: str) -> bool:
    head, sep, tail = name.rpartition(SIDECAR_INFIX)
    return bool(sep and head and tail.isdigit() and tail.isascii())


HOSTILE_NAMES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "",
            "atlas",  # the observability node id
            "east-thanos-sidecar0",  # collides with east's sidecar Service
            "x-thanos-sidecar12",
            "East",
            "a_b",
            "-a",
            "a-",
            "a.b",
            "a..b",
            "$ORIGIN",
            "@",
            "*",
            "a" * 64,
            "a" * 48,  # its sidecar name is 64 characters
        ]
    ),
    text_with_nasty(dns1123_label(1, 10)),
    huge(),
    WRONG_TYPES,
)

HOSTILE_NAMES_OR_MISSING = st.one_of(HOSTILE_NAMES, st.just(MISSING))

VALID_REPLICAS = st.one_of(st.integers(1, 3), st.integers(1, 64), st.just(64)).map(str)
HOSTILE_REPLICAS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "0",
            "65",
            "100",
            "-1",
            "+1",
            " 2",
            "2 ",
            "02",
            "1.5",
            "1e1",
            "",
            "0x2",
            "\uff12",
            "\u0662",
        ]
    ),
    st.integers(65, 10**6).map(str),
    huge("9"),
    text_with_nasty(st.sampled_from(["1", "2"])),
    WRONG_TYPES,
)


@st.composite
def _valid_selectors(draw: st.DrawFn) -> str:
    keys = draw(st.lists(label_key(), min_size=1, max_size=3, unique=True))
    pairs = [f"{k}={draw(label_name())}" for k in keys]
    sep = draw(st.sampled_from([",", ", ", " , "]))
    return sep.join(pairs)


VALID_SELECTORS = _valid_selectors()


HOSTILE_SELECTORS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "",
            "  ",
            "app",
            "app=",
            "=envoy",
            "a=b,a=c",
            "a=b,",
            ",a=b",
            "a=b,,c=d",
            "a=b\nc=d",
            "a=b;c=d",
            'a="b"',
            "a=b=c",
            "-a=b",
            "a/b/c=d",
            "/a=b",
            "A.B/c=d",
            "app=" + "v" * 64,
            "k" * 64 + "=v",
            "x" * 254 + "/k=v",
            "app=\u00e9nvoy",
            "app in (a,b)",
            "!app",
            "app!=x",
        ]
    ),
    text_with_nasty(st.just("app=envoy"), spare="/"),  # "ap/p=envoy": prefix "ap"
    WRONG_TYPES,
)

HOSTILE_HOSTS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "",
            " a",
            "a b",
            "a;b",
            "a\nb",
            'a"b',
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a-.b",
            "a_b.svc",
            "a" * 64,
            ".".join(["a" * 63] * 4),  # 255 characters
            "a{b}",
            "\u00e4.svc",
            "::1",
            "1.2.3.4:80",
            "a/b",
            "*",
            "$INCLUDE",
            "localhost\x00.evil",
        ]
    ),
    text_with_nasty(st.just("prometheus-operated.monitoring.svc")),
    huge(),
    WRONG_TYPES,
)

VALID_PORT_TEXT = st.one_of(st.integers(1, 65535).map(str), st.sampled_from(["1", "65535"]))
HOSTILE_PORT_TEXT: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        ["0", "65536", "99999", "-1", "+80", " 80", "80 ", "080", "8o", "", "\u0668\u0660", "1e3"]
    ),
    st.integers(65536, 10**9).map(str),
    text_with_nasty(st.just("9090")),
    WRONG_TYPES,
)

HOSTILE_GROUPS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        ["", "Team", "a.b", "a_b", "-a", "a-", "a" * 64, "prod\nx", "$INCLUDE", "@", "*", "(", ";"]
    ),
    text_with_nasty(dns1123_label(1, 8)),
    WRONG_TYPES,
)


@st.composite
def _valid_templates(draw: st.DrawFn) -> str:
    prefix = draw(st.sampled_from(["", "p-", "prometheus-k8s-", "a", "r"]))
    suffix = draw(
        st.sampled_from(["", ".prometheus-operated.monitoring.svc.cluster.local", "-web.svc", ".x"])
    )
    if not prefix and not suffix:
        return "{replica}"
    return f"{prefix}{{replica}}{suffix}"


VALID_TEMPLATES = _valid_templates()


HOSTILE_TEMPLATES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            "a.svc",  # no {replica}
            "{replica}.{x}",
            "{}",
            "{0}",
            "{replica:>3}",
            "{replica!r}",
            "{replica.real}",
            "{replica[0]}",
            "{",
            "}",
            "{replica",
            "{{replica}}",
            "p-{replica} .svc",
            "p-{replica}\n.svc",
            "p-{replica};x",
            "{replica}." + "a" * 64,
            "a" * 250 + "{replica}.x",
            "-{replica}",
            "p_{replica}",
        ]
    ),
    # Inside the literal part only: "{replica:}" (an empty format spec) is harmless.
    st.sampled_from(NASTY_CHARS).map(lambda c: f"p{c}-{{replica}}.svc"),
    WRONG_TYPES,
)


# ---------------------------------------------------------------------------------------
# addresses

ALLOWED_V4_NETS = (
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "8.0.0.0/7",
)
GLOBAL_V4 = "8.0.0.0/7"
ALLOWED_V6_NETS = ("2001:db8::/32", "2600::/12", "fd00::/8")
REFUSED_V4_NETS = ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", "240.0.0.0/4")
REFUSED_V6_NETS = ("fe80::/10", "ff00::/8", "4000::/3", "64:ff9b:1::/48")
METADATA = {"169.254.169.254", "100.100.100.200", "fd00:ec2::254"}


@functools.cache  # building a strategy is costly; each is built once
def _v4(nets: tuple[str, ...]) -> st.SearchStrategy[ipaddress.IPv4Address]:
    return st.one_of(*(st.ip_addresses(network=n) for n in nets)).filter(
        lambda a: str(a) not in METADATA
    )


@functools.cache  # building a strategy is costly; each is built once
def _v6(nets: tuple[str, ...]) -> st.SearchStrategy[ipaddress.IPv6Address]:
    return st.one_of(*(st.ip_addresses(network=n) for n in nets)).filter(
        lambda a: str(a) not in METADATA
    )


def mapped(v4: ipaddress.IPv4Address) -> str:
    return f"::ffff:{v4}"


def carrying_forms(v4: ipaddress.IPv4Address) -> list[str]:
    """Every IPv6 spelling that carries ``v4`` (see atlasd.addresses)."""
    n = int(v4)
    six = ipaddress.IPv6Address
    # ::0.0.0.0 and ::0.0.0.1 are :: and ::1 themselves, not IPv4-compatible (RFC 4291).
    compatible = [f"::{v4}"] if n > 1 else []
    return [
        f"::ffff:{v4}",
        str(six((0xFFFF << 32) | n)),
        *compatible,
        f"::ffff:0:{v4}",
        f"64:ff9b::{v4}",
        str(six((0x2002 << 112) | (n << 80) | 1)),
        str(six((0x20010000 << 96) | (0x08080808 << 64) | (n ^ 0xFFFFFFFF))),  # Teredo client
        str(six((0x20010000 << 96) | (n << 64) | (0x08080808 ^ 0xFFFFFFFF))),  # Teredo server
        str(six((0x20010DB8 << 96) | (0x5EFE << 32) | n)),  # ISATAP
    ]


@st.composite
def _valid_ips(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        return str(draw(_v4(ALLOWED_V4_NETS)))
    if kind <= 6:
        v6 = draw(_v6(ALLOWED_V6_NETS))
        return draw(st.sampled_from([str(v6), str(v6).upper(), v6.exploded]))
    if kind == 7:
        return mapped(draw(_v4(ALLOWED_V4_NETS)))
    g = draw(_v4((GLOBAL_V4,)))
    n = int(g)
    return draw(
        st.sampled_from(
            [
                f"64:ff9b::{g}",
                str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),
                str(ipaddress.IPv6Address((0x20010000 << 96) | (n << 64) | (n ^ 0xFFFFFFFF))),
            ]
        )
    )


VALID_IPS = _valid_ips()


def _not_an_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return True
    return False


HOSTILE_IPS: st.SearchStrategy[Any] = st.one_of(
    _v4(REFUSED_V4_NETS).map(str),
    _v4(REFUSED_V4_NETS).flatmap(lambda v4: st.sampled_from(carrying_forms(v4))),
    st.sampled_from(sorted(METADATA)),
    st.sampled_from(["169.254.169.254", "255.255.255.255", "0.0.0.0", "::", "::1"]).flatmap(
        lambda a: (
            st.sampled_from([a, *carrying_forms(ipaddress.IPv4Address(a))])
            if "." in a
            else st.just(a)
        )
    ),
    _v6(REFUSED_V6_NETS).map(str),
    _v4((GLOBAL_V4,)).map(
        lambda g: f"64:ff9b::{ipaddress.IPv4Address(int(g) & 0xFFFFFF | 0x0A000000)}"
    ),
    _v6(ALLOWED_V6_NETS).map(lambda a: f"{a}%eth0"),
    st.sampled_from(
        [
            "",
            "localhost",
            "envoy.example.com",
            "300.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            " 192.0.2.1",
            "192.0.2.1 ",
            "192.0.2.1\n",
            "192.0.2.1/32",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "2001:db8::1::2",
            "\u0661\u0669\u0662.0.2.1",
            "192\uff0e0.2.1",
            "0x7f.0.0.1",
            "2130706433",
        ]
    ),
    st.text(max_size=40).filter(_not_an_ip),
    huge("1"),
    WRONG_TYPES,
    st.integers(0, 2**32 - 1),  # ipaddress.ip_address(int) would take these
)


# ---------------------------------------------------------------------------------------
# one Service


def _choose(
    draw: st.DrawFn,
    valid: st.SearchStrategy[T],
    hostile: st.SearchStrategy[Any],
    percent_hostile: int,
) -> tuple[Any, bool]:
    # Shrinks towards the valid branch (0).
    bad = draw(st.integers(0, 99)) >= 100 - percent_hostile
    return (draw(hostile), True) if bad else (draw(valid), False)


HOSTILE_ENROLLMENT: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["True", "TRUE", "yes", "1", "", " true", "true\n", "enrolled"]),
    st.text(max_size=10).filter(lambda v: v not in ("true", "false")),
    WRONG_TYPES,
)


ANNOTATION_VALUES: list[tuple[str, st.SearchStrategy[Any], st.SearchStrategy[Any]]] = [
    (labels.ENVOY_SELECTORS_ANNOTATION, VALID_SELECTORS, HOSTILE_SELECTORS),
    (labels.THANOS_SERVICE_ANNOTATION, dns_name(), HOSTILE_HOSTS),
    (labels.PROMETHEUS_SERVICE_ANNOTATION, dns_name(), HOSTILE_HOSTS),
    (labels.ALERTMANAGER_SERVICE_ANNOTATION, dns_name(), HOSTILE_HOSTS),
    (labels.THANOS_SERVICE_PORT_ANNOTATION, VALID_PORT_TEXT, HOSTILE_PORT_TEXT),
    (labels.PROMETHEUS_SERVICE_PORT_ANNOTATION, VALID_PORT_TEXT, HOSTILE_PORT_TEXT),
    (labels.ALERTMANAGER_SERVICE_PORT_ANNOTATION, VALID_PORT_TEXT, HOSTILE_PORT_TEXT),
    (labels.DNS_GROUP_ANNOTATION, dns1123_label(1, 63), HOSTILE_GROUPS),
    (labels.REPLICA_HOST_TEMPLATE_ANNOTATION, VALID_TEMPLATES, HOSTILE_TEMPLATES),
    (labels.ENROLLMENT_ANNOTATION, st.sampled_from(["true", "false"]), HOSTILE_ENROLLMENT),
]

# Keys atlasd ignores: anything goes in them. (Hypothesis also feeds st.text() string
# constants it finds in the code, such as the keys atlasd reads: those are left out.)
READ_KEYS = frozenset(
    {labels.CLUSTER_LABEL, labels.REPLICAS_LABEL} | {key for key, _, _ in ANNOTATION_VALUES}
)
IGNORED_KEYS = st.one_of(
    label_key(),
    st.sampled_from(["goatlas.io/unknown", "goatlas.io/ca-rotate", "kubectl.kubernetes.io/x"]),
    st.text(max_size=30),
).filter(lambda k: k not in READ_KEYS)
IGNORED_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.text(max_size=50), huge(), WRONG_TYPES, text_with_nasty(st.just("x"))
)


PORT_NAMES = st.one_of(
    st.sampled_from(["thanos", "prometheus", "alertmanager", "grpc", "http"]),
    dns1123_label(1, 15),
    dns1123_label(62, 62),
)
HOSTILE_PORT_NAMES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([MISSING, "", "Thanos", "_thanos", "thanos.x", "a" * 63, "thanos "]),
    text_with_nasty(st.just("thanos")),
    WRONG_TYPES,
)
HOSTILE_PORT_NUMBERS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([MISSING, 0, -1, 65536, 10**12, "9090", 9090.0, True]),
    WRONG_TYPES.filter(lambda v: not (type(v) is int and 1 <= v <= 65535)),
)


def _ports(draw: st.DrawFn, d: Drawn, hostile: bool) -> Any:
    """``spec.ports``: mostly valid named TCP ports; hostile entries taint their field."""
    if hostile and draw(st.integers(0, 99)) >= 96:
        bad = draw(st.sampled_from([MISSING, None, [], {}, "thanos", {"name": "x", "port": 1}, 5]))
        d.tainted.add("spec.ports")
        return bad
    n = draw(st.integers(1, 4))
    names = draw(st.lists(PORT_NAMES, min_size=n, max_size=n, unique=True))
    out: list[Any] = []
    valid_names: list[str] = []
    for i, name in enumerate(names):
        where = f"spec.ports[{i}]"
        port: dict[str, Any] = {"name": name, "port": draw(st.sampled_from([1, 65535, 9090]))}
        if draw(st.booleans()):
            port["port"] = draw(st.integers(1, 65535))
        if draw(st.booleans()):
            port["protocol"] = "TCP"
        if draw(st.integers(0, 9)) == 0:
            port["targetPort"] = draw(st.one_of(st.integers(), st.text(max_size=10)))
        if hostile and draw(st.integers(0, 99)) >= 93:
            what = draw(st.sampled_from(["entry", "name", "port", "protocol", "duplicate"]))
            if what == "entry":
                out.append(draw(st.sampled_from([None, "thanos", 10901, ["thanos", 10901]])))
                d.tainted.add(where)
                continue
            if what == "duplicate" and valid_names:
                port["name"] = draw(st.sampled_from(valid_names))
                d.tainted.add(f"{where}.name")
            elif what in ("name", "duplicate"):
                port["name"] = draw(HOSTILE_PORT_NAMES)
                if port["name"] is MISSING:
                    del port["name"]
                d.tainted.add(f"{where}.name")
            elif what == "port":
                port["port"] = draw(HOSTILE_PORT_NUMBERS)
                if port["port"] is MISSING:
                    del port["port"]
                d.tainted.add(f"{where}.port")
            else:
                port["protocol"] = draw(st.sampled_from(["UDP", "SCTP", "tcp", "", None, 6]))
                d.tainted.add(f"{where}.protocol")
            # A port rejected for another field never counts as a name for duplicates.
            if f"{where}.name" not in d.tainted:
                port["name"] = f"bad{i}-{name[-10:]}"
        else:
            valid_names.append(name)
        out.append(port)
    return out


def _external_ips(draw: st.DrawFn, d: Drawn, ip: str | None, hostile: bool) -> Any:
    if hostile and ip is None and draw(st.integers(0, 99)) >= 97:
        d.tainted.add("spec.externalIPs")
        return draw(st.sampled_from([MISSING, None, [], "192.0.2.1", {"0": "192.0.2.1"}, 7]))
    n = draw(st.integers(1, 3))
    out: list[Any] = []
    for i in range(n):
        if i == 0 and ip is not None:
            out.append(ip)
            continue
        pct = (12 if i == 0 else 8) if hostile else 0
        value, bad = _choose(draw, VALID_IPS, HOSTILE_IPS, pct)
        if bad:
            d.tainted.add(f"spec.externalIPs[{i}]")
        out.append(value)
    return out


@st.composite
def cluster_services(
    draw: st.DrawFn,
    *,
    name: str | None = None,
    ip: str | None = None,
    uid: str | None = None,
    hostile: bool = True,
) -> Drawn:
    """One cluster Service. ``name``/``ip`` force those values (valid ones) for fleets;
    ``hostile=False`` draws only valid values."""
    pct = 100 if hostile else 0  # scales every hostile percentage
    d = Drawn(service={})

    def choose(valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], p: int) -> Any:
        return _choose(draw, valid, bad, p * pct // 100)

    meta: dict[str, Any] = {"namespace": "monitoring"}
    if name is not None:
        meta["name"] = name
    else:
        value, bad = choose(cluster_names(), HOSTILE_NAMES_OR_MISSING, 10)
        if value is not MISSING:
            meta["name"] = value
        if bad:
            d.tainted.add("metadata.name")
    if uid is not None:
        meta["uid"] = uid
    if draw(st.integers(0, 3)) == 0:
        meta["creationTimestamp"] = draw(
            st.sampled_from(
                ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2025-12-31T23:59:59Z"]
            )
        )

    lbls: dict[str, Any] = {labels.CLUSTER_LABEL: "true"}
    if draw(st.integers(0, 2)) == 0:
        value, bad = choose(VALID_REPLICAS, HOSTILE_REPLICAS, 25)
        lbls[labels.REPLICAS_LABEL] = value
        if bad:
            d.tainted.add(lbl(labels.REPLICAS_LABEL))
        else:
            d.replicas = int(value)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(IGNORED_KEYS)
        if key not in lbls:
            lbls[key] = draw(IGNORED_VALUES)
    meta["labels"] = lbls

    anns: dict[str, Any] = {}
    for key, valid, bad_values in ANNOTATION_VALUES:
        if draw(st.integers(0, 9)) < 3:
            value, bad = choose(valid, bad_values, 12)
            anns[key] = value
            if bad:
                d.tainted.add(ann(key))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(IGNORED_KEYS)
        if key not in anns:
            anns[key] = draw(IGNORED_VALUES)
    if anns or draw(st.booleans()):
        meta["annotations"] = anns

    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["clusterIP"] = "None"
    ips = _external_ips(draw, d, ip, hostile)
    if ips is not MISSING:
        spec["externalIPs"] = ips
    ports = _ports(draw, d, hostile)
    if ports is not MISSING:
        spec["ports"] = ports
    if draw(st.integers(0, 9)) == 0:
        spec["selector"] = {"app": "whatever"}

    service: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": meta}
    service["spec"] = spec
    # Rarely: the whole metadata/spec/labels/annotations of the wrong type.
    if pct and draw(st.integers(0, 99)) >= 97:
        where = draw(
            st.sampled_from(["metadata", "spec", "metadata.annotations", "metadata.labels"])
        )
        bad_obj = draw(st.sampled_from([[], ["x"], "x", 5, True]))
        if where == "metadata":
            service["metadata"] = bad_obj
        elif where == "spec":
            service["spec"] = bad_obj
        elif where == "metadata.annotations":
            meta["annotations"] = bad_obj
        else:
            meta["labels"] = bad_obj
        d.structural = where
    d.service = service
    return d


def expected_problem_fields(d: Drawn) -> set[str] | None:
    """The exact set of Problem fields validation must report for ``d`` (empty: it must
    accept); None when ``d`` is not a cluster Service at all (validation ignores it)."""
    if d.structural in ("metadata", "metadata.labels"):
        return None  # no labels, so no cluster label: not a cluster Service
    fields = set(d.tainted)
    if d.structural == "spec":
        # Nothing in spec can be read; the metadata checks still run.
        fields = {f for f in fields if not f.startswith("spec.")} | {"spec"}
    if d.structural == "metadata.annotations":
        fields = {f for f in fields if not f.startswith("metadata.annotations[")}
        fields.add("metadata.annotations")
    name = d.name
    if "metadata.name" not in fields and isinstance(name, str):
        longest = max(
            len(name) + len(SIDECAR_INFIX) + len(str(d.replicas - 1)),
            len(name) + len(IDENTITY_SUFFIX),
            len(name) + len(VALUES_SUFFIX),
        )
        if longest > 63:
            fields.add("metadata.name")
    return fields
