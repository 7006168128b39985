"""plan_pki: creation, steady state, renewal, SAN changes, rotation, adoption, bad CAs."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from atlasd import labels
from atlasd.fleet.trust import EARLIER_KEPT
from atlasd.kube.secrets import secret_data
from atlasd.model import DownstreamCluster, ServicePort, Settings
from atlasd.reconcile.objects import secret_object
from atlasd.reconcile.pki import PKIError, PKIPlan, plan_pki
from tests.unit.reconcile.pkitools import CountingKeys, original_ca, plan_secrets, with_annotation

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings(envoy_ads_address="198.51.100.7", envoy_address="envoy.example.com")
LIFE = S.leaf_lifetime


def _cluster(name: str, ip: str = "203.0.113.1") -> DownstreamCluster:
    return DownstreamCluster(name=name, external_ip=ip, ports=(ServicePort("thanos", 10901),))


CLUSTERS = (_cluster("east"), _cluster("west", "203.0.113.2"))


def _plan(secrets: dict[str, Any] | None = None, *, now: dt.datetime = NOW, **kw: Any) -> PKIPlan:
    return plan_pki(
        secrets=secrets or {},
        clusters=kw.pop("clusters", CLUSTERS),
        settings=kw.pop("settings", S),
        now=now,
        keys=kw.pop("keys", CountingKeys()),
    )


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _leaf_pems(plan: PKIPlan) -> dict[str, bytes]:
    out = {}
    for node, ident in plan.identities.items():
        out[f"{node}/server"] = ident.server.cert_pem
        out[f"{node}/client"] = ident.client.cert_pem
    for s in plan.tls_secrets:
        out[s["metadata"]["name"]] = secret_data(s)["tls.crt"]
    return out


def _sans(pem: bytes) -> tuple[set[str], set[str]]:
    san = _cert(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(i) for i in san.get_values_for_type(x509.IPAddress)
    }


def test_new_install_creates_p256_ca_and_every_leaf() -> None:
    plan = _plan()
    assert plan.ca_action == "created"
    ca = _cert(plan.pki.ca.cert_pem)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert plan.pki.ca_revision == 1 and plan.pki.ca_serial == str(ca.serial_number)
    assert plan.pki.trust_bundle == plan.pki.ca.cert_pem
    assert sorted(plan.issued) == sorted(
        [
            "atlas-server",
            "atlas-client",
            "atlas-tls",
            "atlasd-ads",
            "east/server",
            "east/client",
            "west/server",
            "west/client",
        ]
    )
    leaves = {k: _cert(v) for k, v in _leaf_pems(plan).items()}
    serials = {c.serial_number for c in leaves.values()} | {ca.serial_number}
    assert len(serials) == 9, "unique serials (atlas identity == atlas-server/client)"
    for cert in leaves.values():
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.not_valid_after_utc == NOW + LIFE
    labels_ = plan.ca_secret["metadata"]["labels"]
    assert labels_[labels.CA_REVISION_LABEL] == "1"
    assert labels_[labels.CA_SERIAL_LABEL] == plan.pki.ca_serial
    assert labels_[labels.CA_LABEL] == "true"
    assert set(secret_data(plan.ca_secret)) == {"ca.pem", "ca-key.pem"}


@pytest.mark.parametrize(
    ("leaf", "dns", "ips"),
    [
        (
            "atlas-server",
            {"atlas", "atlas.monitoring.atlas", "envoy.example.com"},
            {"198.51.100.7"},
        ),
        ("atlas-tls", {"atlas", "atlas.monitoring.atlas", "envoy.example.com"}, {"198.51.100.7"}),
        ("atlas-client", {"atlas", "atlas.monitoring.atlas"}, set()),
        ("atlasd-ads", {"atlasd-ads.atlas", "atlasd.monitoring.svc.cluster.local"}, set()),
        ("east/server", {"east", "east.monitoring.atlas"}, set()),
        ("east/client", {"east", "east.monitoring.atlas"}, set()),
        ("west/client", {"west", "west.monitoring.atlas"}, set()),
    ],
)
def test_san_scheme(leaf: str, dns: set[str], ips: set[str]) -> None:
    assert _sans(_leaf_pems(_plan())[leaf]) == (dns, ips)


def test_steady_state_reuses_everything_byte_for_byte() -> None:
    first = _plan()
    keys = CountingKeys(start=5000)
    second = _plan(plan_secrets(first), now=NOW + dt.timedelta(days=30), keys=keys)
    assert second.ca_action == "kept"
    assert second.issued == () and keys.issued == 0
    assert plan_secrets(second) == plan_secrets(first)
    assert second.pki == first.pki


def test_plan_is_deterministic_for_the_same_key_source() -> None:
    assert plan_secrets(_plan()) == plan_secrets(_plan())


@pytest.mark.parametrize(
    ("age", "renewed"),
    [
        (dt.timedelta(days=1), False),
        (LIFE * 0.66, False),
        (LIFE * (2 / 3) + dt.timedelta(days=1), True),
        (LIFE + dt.timedelta(days=1), True),
    ],
)
def test_leaves_renew_after_two_thirds_of_their_life(age: dt.timedelta, renewed: bool) -> None:
    first = _plan()
    later = _plan(plan_secrets(first), now=NOW + age)
    assert later.ca_action == "kept"
    assert (len(later.issued) == 8) is renewed
    assert (later.issued == ()) is not renewed


def test_renew_fraction_is_configurable() -> None:
    settings = Settings(renew_fraction=0.1)
    first = _plan(settings=settings)
    assert _plan(plan_secrets(first), settings=settings, now=NOW + LIFE * 0.05).issued == ()
    assert len(_plan(plan_secrets(first), settings=settings, now=NOW + LIFE * 0.2).issued) == 8


def test_san_change_reissues_only_the_affected_leaves() -> None:
    first = _plan()
    moved = Settings(envoy_ads_address="198.51.100.8", envoy_address="envoy.example.com")
    second = _plan(plan_secrets(first), settings=moved)
    assert sorted(second.issued) == ["atlas-server", "atlas-tls"]


def test_namespace_change_reissues_every_leaf() -> None:
    first = _plan()
    moved = Settings(namespace="obs", atlasd_ads_host="atlasd.obs.svc.cluster.local")
    second = _plan(plan_secrets(first), settings=moved)
    assert len(second.issued) == 8


def test_new_cluster_gets_an_identity_removed_cluster_drops_out() -> None:
    first = _plan()
    second = _plan(plan_secrets(first), clusters=(CLUSTERS[0], _cluster("south", "203.0.113.3")))
    assert sorted(second.issued) == ["south/client", "south/server"]
    assert "west" not in second.identities
    assert set(second.identity_secrets) == {"east", "south"}
    ident = second.identity_secrets["south"]
    assert ident["metadata"]["name"] == "south-atlas-identity"
    assert ident["metadata"]["labels"][labels.OWNER_CLUSTER_LABEL] == "south"
    assert set(secret_data(ident)) == {
        "ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    }


def test_leaf_from_another_ca_or_with_a_foreign_key_is_reissued() -> None:
    first = _plan()
    other = _plan(keys=CountingKeys(start=9000, pool=8))
    secrets = plan_secrets(first)
    secrets["east-atlas-identity"] = other.identity_secrets["east"]  # signed by another CA
    data = secret_data(secrets["west-atlas-identity"])
    data["client.key"] = secret_data(secrets["east-atlas-identity"])["client.key"]
    secrets["west-atlas-identity"] = secret_object(
        name="west-atlas-identity", namespace="monitoring", data=data, obj_labels={}
    )
    data = secret_data(secrets["atlas-client"])
    data["tls.crt"] = b"garbage"
    secrets["atlas-client"] = secret_object(
        name="atlas-client", namespace="monitoring", data=data, obj_labels={}
    )
    second = _plan(secrets)
    assert sorted(second.issued) == ["atlas-client", "east/client", "east/server", "west/client"]


def test_rotation_keeps_old_ca_in_bundle_bumps_revision_and_reissues_all() -> None:
    first = _plan()
    secrets = plan_secrets(first)
    old_serial = first.pki.ca_serial
    secrets["atlas-ca"] = with_annotation(first.ca_secret, labels.CA_ROTATE_ANNOTATION, "now")  # type: ignore[assignment]
    rotated = _plan(secrets, keys=CountingKeys(start=7000), now=NOW + dt.timedelta(days=1))
    assert rotated.ca_action == "rotated"
    assert rotated.pki.ca_revision == 2
    assert rotated.pki.ca_serial != old_serial
    assert len(rotated.issued) == 8
    meta = rotated.ca_secret["metadata"]
    assert labels.CA_ROTATE_ANNOTATION not in meta.get("annotations", {})
    assert meta["labels"][labels.CA_REVISION_LABEL] == "2"
    assert meta["labels"][labels.CA_SERIAL_LABEL] == rotated.pki.ca_serial
    data = secret_data(rotated.ca_secret)
    assert set(data) == {
        "ca.pem",
        "ca-key.pem",
        f"ca-{old_serial}.pem",
        f"ca-cross-{old_serial}.pem",
    }
    assert data[f"ca-{old_serial}.pem"] == first.pki.ca.cert_pem
    assert rotated.pki.chain == data[f"ca-cross-{old_serial}.pem"]
    assert rotated.pki.trust_bundle == rotated.pki.ca.cert_pem + first.pki.ca.cert_pem
    new_ca = _cert(rotated.pki.ca.cert_pem)
    for pem in _leaf_pems(rotated).values():
        _cert(pem).verify_directly_issued_by(new_ca)
    for s in rotated.tls_secrets:
        assert s["metadata"]["labels"][labels.CA_SIGNED_LABEL] == rotated.pki.ca_serial
        assert secret_data(s)["ca.crt"] == rotated.pki.trust_bundle

    # The pass after: stable, and a second rotation keeps both earlier CAs.
    after = _plan(plan_secrets(rotated), now=NOW + dt.timedelta(days=2))
    assert after.issued == () and after.ca_action == "kept"
    again = plan_secrets(rotated)
    again["atlas-ca"] = with_annotation(rotated.ca_secret, labels.CA_ROTATE_ANNOTATION, "")  # type: ignore[assignment]
    twice = _plan(again, keys=CountingKeys(start=8000), now=NOW + dt.timedelta(days=3))
    assert twice.pki.ca_revision == 3
    assert set(secret_data(twice.ca_secret)) == {
        "ca.pem",
        "ca-key.pem",
        f"ca-{old_serial}.pem",
        f"ca-{rotated.pki.ca_serial}.pem",
        f"ca-cross-{old_serial}.pem",
        f"ca-cross-{rotated.pki.ca_serial}.pem",
    }


def _rotated(times: int) -> list[PKIPlan]:
    """The first plan, then one per rotation of its CA, a day apart (``times`` of them)."""
    plans = [_plan()]  # each CA its own key (the pool of 64 keys is entered at start mod 64)
    for i in range(times):
        secrets = plan_secrets(plans[-1])
        secrets["atlas-ca"] = with_annotation(plans[-1].ca_secret, labels.CA_ROTATE_ANNOTATION, "")  # type: ignore[assignment]
        plans.append(
            _plan(
                secrets, keys=CountingKeys(start=7001 + 10 * i), now=NOW + dt.timedelta(days=i + 1)
            )
        )
        assert plans[-1].ca_action == "rotated"
    return plans


def test_rotations_keep_the_newest_earlier_cas_only() -> None:
    """Each rotation adds an earlier CA; past EARLIER_KEPT the oldest leaves the bundle,
    the Secret and the chain (its link with it), so neither grows with rotations."""
    plans = _rotated(EARLIER_KEPT + 2)
    last = plans[-1]
    kept = plans[-1 - EARLIER_KEPT : -1]  # the CAs rotated out most recently, oldest first
    assert last.pki.trust_bundle == last.pki.ca.cert_pem + b"".join(
        p.pki.ca.cert_pem for p in reversed(kept)
    )
    serials = [p.pki.ca_serial for p in kept]
    assert set(secret_data(last.ca_secret)) == {
        "ca.pem",
        "ca-key.pem",
        *(f"ca-{s}.pem" for s in serials),
        *(f"ca-cross-{s}.pem" for s in serials),
    }
    # The chain links the current CA back through every kept CA, and no further.
    assert last.pki.chain.count(b"BEGIN CERTIFICATE") == EARLIER_KEPT
    for dropped in plans[: -1 - EARLIER_KEPT]:
        assert dropped.pki.ca.cert_pem not in last.pki.trust_bundle


def test_a_secret_holding_more_earlier_cas_is_trimmed_and_its_leaves_reissued() -> None:
    """``atlas-ca`` written with more earlier CAs than kept (by an atlasd before the bound):
    the oldest stop being trusted at once, the next write drops them, and a leaf still
    signed by one is issued again."""
    plans = _rotated(EARLIER_KEPT + 1)
    oldest, last = plans[0], plans[-1]
    now = NOW + dt.timedelta(days=EARLIER_KEPT + 1)
    # The last Secret with the oldest CA put back as an earlier one, and east's identity
    # as the oldest CA signed it.
    ca: dict[str, Any] = {**last.ca_secret, "data": dict(last.ca_secret["data"])}
    ca["data"][f"ca-{oldest.pki.ca_serial}.pem"] = oldest.ca_secret["data"]["ca.pem"]
    secrets: dict[str, Any] = dict(plan_secrets(last))
    secrets["atlas-ca"] = ca
    secrets["east-atlas-identity"] = plan_secrets(oldest)["east-atlas-identity"]
    after = _plan(secrets, now=now)
    assert after.pki.trust_bundle == last.pki.trust_bundle
    assert after.ca_action == "kept"
    assert oldest.pki.ca.cert_pem not in after.pki.trust_bundle
    assert after.pki.trust_bundle.count(b"BEGIN CERTIFICATE") == 1 + EARLIER_KEPT
    assert set(secret_data(after.ca_secret)) == set(secret_data(last.ca_secret))
    assert set(after.issued) == {"east/server", "east/client"}


def test_expired_previous_ca_leaves_the_bundle() -> None:
    short = Settings(ca_lifetime=dt.timedelta(days=30), leaf_lifetime=dt.timedelta(days=10))
    first = _plan(settings=short)
    secrets = plan_secrets(first)
    secrets["atlas-ca"] = with_annotation(first.ca_secret, labels.CA_ROTATE_ANNOTATION, "1")  # type: ignore[assignment]
    rotated = _plan(secrets, keys=CountingKeys(start=7000), now=NOW + dt.timedelta(days=1))
    assert rotated.pki.trust_bundle == rotated.pki.ca.cert_pem + first.pki.ca.cert_pem
    later = _plan(plan_secrets(rotated), now=NOW + dt.timedelta(days=31))
    assert later.ca_action == "kept" and later.issued == ()
    assert set(secret_data(later.ca_secret)) == {"ca.pem", "ca-key.pem"}
    assert later.pki.trust_bundle == rotated.pki.ca.cert_pem


def test_ca_past_its_renew_fraction_rotates_itself() -> None:
    first = _plan()
    later = _plan(plan_secrets(first), now=NOW + S.ca_lifetime * 0.7)
    assert later.ca_action == "rotated" and later.pki.ca_revision == 2
    assert first.pki.ca.cert_pem in later.pki.trust_bundle


def test_leaf_validity_is_capped_at_the_ca() -> None:
    settings = Settings(ca_lifetime=dt.timedelta(days=100), leaf_lifetime=dt.timedelta(days=365))
    plan = _plan(settings=settings)
    ca = _cert(plan.pki.ca.cert_pem)
    for pem in _leaf_pems(plan).values():
        assert _cert(pem).not_valid_after_utc == ca.not_valid_after_utc


def test_adopts_the_originals_rsa_ca_and_signs_with_it() -> None:
    secret, cert_pem, key_pem = original_ca(NOW)
    plan = _plan({"atlas-ca": secret})
    assert plan.ca_action == "adopted"
    assert plan.pki.ca.cert_pem == cert_pem and plan.pki.ca.key_pem == key_pem
    assert plan.pki.ca_serial == "1" and plan.pki.ca_revision == 1
    data = secret_data(plan.ca_secret)
    assert data["ca.pem"] == cert_pem and data["ca-key.pem"] == key_pem
    assert data["ca-key.pem"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    meta = plan.ca_secret["metadata"]
    assert meta["annotations"] == {"objectset.rio.cattle.io/id": "atlas-ca"}
    assert meta["labels"][labels.MANAGED_BY_LABEL] == "atlasd"
    ca = _cert(cert_pem)
    assert isinstance(ca.public_key(), rsa.RSAPublicKey)
    for pem in _leaf_pems(plan).values():
        leaf = _cert(pem)
        leaf.verify_directly_issued_by(ca)
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    # Next pass: the adopted CA is now ours and nothing is re-issued.
    again = _plan(plan_secrets(plan))
    assert again.ca_action == "kept" and again.issued == ()


def test_leaves_name_the_key_identifier_their_ca_states() -> None:
    """A CA made by other tools may state a subject key identifier computed another way
    than atlasd's (RFC 7093: Go 1.25 truncates SHA-256): leaves name the one it states (a
    TLS peer compares the two), and are kept on the next pass, not issued again."""
    stated = bytes(range(20))
    secret, cert_pem, _ = original_ca(NOW, ski=stated)
    ca = _cert(cert_pem)
    computed = x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
    assert computed != stated
    plan = _plan({"atlas-ca": secret})
    for pem in _leaf_pems(plan).values():
        aki = _cert(pem).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        assert aki.value.key_identifier == stated
        _cert(pem).verify_directly_issued_by(ca)
    assert _plan(plan_secrets(plan)).issued == ()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"ca.pem": b"not a cert", "ca-key.pem": b"x"}, "ca.pem is not a PEM certificate"),
        (
            {
                "ca.pem": None,
                "ca-key.pem": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            },
            "ca-key.pem is not",
        ),
        ({"ca.pem": None, "ca-key.pem": "other"}, "does not belong"),
        ({"ca.pem": None}, "only one of"),
    ],
)
def test_unusable_ca_is_an_error_not_a_replacement(data: dict[str, Any], words: str) -> None:
    good = _plan()
    good_data = secret_data(good.ca_secret)
    other = secret_data(_plan(keys=CountingKeys(pool=3)).ca_secret)
    resolved = {}
    for k, v in data.items():
        if v is None:
            resolved[k] = good_data[k]
        elif v == "other":
            resolved[k] = other["ca-key.pem"]
        else:
            resolved[k] = v
    secret = secret_object(name="atlas-ca", namespace="monitoring", data=resolved, obj_labels={})
    with pytest.raises(PKIError) as info:
        _plan({"atlas-ca": secret})
    assert words in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)
    assert info.value.__cause__ is None


def test_keys_never_show_in_reprs() -> None:
    plan = _plan()
    text = repr(plan.pki)
    assert "PRIVATE KEY" not in text and "redacted" in text


def test_next_renewal_is_when_the_first_leaf_must_be_renewed() -> None:
    first = _plan()
    assert first.next_renewal is not None
    start = NOW - dt.timedelta(minutes=5)
    assert first.next_renewal == start + (NOW + LIFE - start) * S.renew_fraction
    just_before = _plan(plan_secrets(first), now=first.next_renewal - dt.timedelta(seconds=1))
    assert just_before.issued == ()
    at = _plan(plan_secrets(first), now=first.next_renewal)
    assert len(at.issued) == 8
    assert at.next_renewal is not None and at.next_renewal > first.next_renewal


def test_next_renewal_includes_an_earlier_cas_expiry() -> None:
    short = Settings(ca_lifetime=dt.timedelta(days=30))
    first = _plan(settings=short)
    secrets = plan_secrets(first)
    secrets["atlas-ca"] = with_annotation(first.ca_secret, labels.CA_ROTATE_ANNOTATION, "1")  # type: ignore[assignment]
    rotated = _plan(secrets, keys=CountingKeys(start=7000), now=NOW + dt.timedelta(days=1))
    old_ca = _cert(first.pki.ca.cert_pem)
    assert rotated.next_renewal == old_ca.not_valid_after_utc


@pytest.mark.parametrize(
    "settings",
    [
        Settings(renew_fraction=0),
        Settings(renew_fraction=1.5),
        Settings(leaf_lifetime=dt.timedelta(minutes=1)),
        Settings(ca_lifetime=dt.timedelta(minutes=2)),
    ],
)
def test_settings_that_would_reissue_every_pass_are_refused(settings: Settings) -> None:
    with pytest.raises(ValueError):
        _plan(settings=settings)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"renew_fraction": 0.0}, "renew_fraction must be in"),
        ({"renew_fraction": 1.5}, "renew_fraction must be in"),
        # Back-dated by 5 minutes, a 5-minute leaf renewed at half its life is due at once.
        ({"renew_fraction": 0.5, "leaf_lifetime": dt.timedelta(minutes=5)}, "leaf_lifetime"),
        ({"renew_fraction": 0.5, "ca_lifetime": dt.timedelta(minutes=5)}, "ca_lifetime"),
        ({"renew_fraction": 0.5, "leaf_lifetime": dt.timedelta(minutes=5, seconds=1)}, None),
    ],
)
def test_settings_that_would_reissue_on_every_pass_are_refused(
    kw: dict[str, Any], error: str | None
) -> None:
    settings = Settings(**kw)
    if error is None:
        plan = _plan(settings=settings)
        assert _plan(plan_secrets(plan), settings=settings).issued == ()
        return
    with pytest.raises(ValueError, match=error):
        _plan(settings=settings)


def test_a_leaf_is_checked_once_then_only_its_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping a leaf means parsing it, verifying its signature and its key: done once per
    (leaf, CA, spec), then only its age is looked at again (a fleet-wide change reconciles
    every cluster; bench/README.md). A due leaf is still renewed from the memo."""
    from atlasd.memo import Memo
    from atlasd.reconcile import certs

    checked: list[bytes] = []
    real = certs._validity_if_keepable

    def counting(material: Any, spec: Any, ca: Any) -> Any:
        checked.append(material.cert_pem)
        return real(material, spec, ca)

    monkeypatch.setattr(certs, "_validity_if_keepable", counting)
    monkeypatch.setattr(certs, "_KEPT", Memo(65_536))
    first = _plan()
    assert _plan(plan_secrets(first)).issued == ()
    once = len(checked)
    assert once == 8
    assert _plan(plan_secrets(first), now=NOW + dt.timedelta(days=30)).issued == ()
    assert len(checked) == once  # nothing parsed or verified again
    assert len(_plan(plan_secrets(first), now=NOW + LIFE).issued) == 8  # due: renewed
    assert len(checked) == once
