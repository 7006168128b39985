"""Hostile enrollment input, generated: whatever an agent sends as a CSR or a token, the
checks either accept exactly what atlasd would issue or refuse it (``Refused``, a 4xx,
a message that never echoes the input); no other exception escapes.

- CSRs: arbitrary text; a valid request with bytes of its DER flipped; requests built
  with generated common names, DNS names (other clusters', duplicates, case, the
  ``atlas`` node) and IP addresses: accepted iff the names are exactly the cluster leaf's.
- Tokens: arbitrary text, and mutations of a real token: parsed iff well formed, and
  then it reads back as given.
"""

from __future__ import annotations

import ipaddress

import hypothesis.strategies as st
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings

from atlasd.enroll import agent, csr
from atlasd.enroll import token as tokens
from atlasd.enroll.token import Refused
from atlasd.model import Settings
from tests.property.profile import examples
from tests.unit.xds import helpers

S = Settings()
LEAF = csr.specs("east", S)["server"]
KEY = ec.generate_private_key(ec.SECP256R1())
_, GOOD = agent.new_request("east", S)
GOOD_DER = x509.load_pem_x509_csr(GOOD["server"].encode()).public_bytes(serialization.Encoding.DER)
TOKEN = str(tokens.mint(helpers.make_ca().cert))

NAMES = st.sampled_from(
    ["east", "east.monitoring.atlas", "west", "west.monitoring.atlas", "atlas", "EAST", "east."]
)


def _refused_or_key(pem: object) -> bool:
    try:
        csr.check_csr(pem, LEAF, kind="server")
    except Refused as exc:
        assert 400 <= exc.status < 500
        assert not isinstance(pem, str) or len(pem) < 8 or pem not in str(exc)
        return False
    return True


@settings(max_examples=examples(1000))
@given(
    text=st.one_of(
        st.text(max_size=3000), st.binary(max_size=3000).map(lambda b: b.decode("latin-1"))
    )
)
@example(text="-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n")
def test_arbitrary_text_is_refused(text: str) -> None:
    assert not _refused_or_key(text)


@settings(max_examples=examples(1000))
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(GOOD_DER) - 1), st.integers(1, 255)), min_size=1, max_size=4
    )
)
@example(flips=[(42, 1)])  # an unknown signature algorithm (UnsupportedAlgorithm escaped)
@example(flips=[(9, 1)])  # CSR version 1 (InvalidVersion, not a ValueError, escaped)
def test_a_corrupted_request_is_refused_or_still_exactly_the_leaf(
    flips: list[tuple[int, int]],
) -> None:
    der = bytearray(GOOD_DER)
    for i, x in flips:
        der[i] ^= x
    import base64

    pem = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    if _refused_or_key(pem):  # a flip that changes nothing checked (e.g. an unused bit)
        parsed = x509.load_pem_x509_csr(pem.encode())
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(LEAF.dns)


@settings(max_examples=examples(300))
@given(
    cn=st.one_of(NAMES, st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s)),
    dns=st.lists(NAMES, max_size=4),
    ips=st.lists(st.ip_addresses(v=4), max_size=2),
)
@example(cn="east", dns=["east.monitoring.atlas", "east"], ips=[])
def test_a_request_is_accepted_iff_it_names_exactly_the_leaf(
    cn: str, dns: list[str], ips: list[ipaddress.IPv4Address]
) -> None:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(i) for i in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    pem = builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    exact = cn == "east" and sorted(dns) == sorted(LEAF.dns) and not ips
    assert _refused_or_key(pem) == exact


@settings(max_examples=examples(2000))
@given(
    text=st.one_of(
        st.text(max_size=120),
        st.tuples(st.integers(0, len(TOKEN) - 1), st.characters()).map(
            lambda t: TOKEN[: t[0]] + t[1] + TOKEN[t[0] + 1 :]
        ),
    )
)
@example(text=TOKEN)
def test_a_token_parses_iff_well_formed(text: str) -> None:
    try:
        token = tokens.parse(text)
    except Refused as exc:
        assert exc.status == 401 and str(exc) == "malformed join token"
        return
    assert str(token) == text.strip()
