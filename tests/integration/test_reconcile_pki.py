"""The PKI against a real kube-apiserver, written by the daemon's reconcile loop (its clock
pinned): CA rotation (checked with cryptography and ``openssl verify``), adoption of a CA
made the way the original made it, restarts that re-issue nothing, and an unusable CA that
is reported, never replaced."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from atlasd import labels
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.events import post_event
from atlasd.kube.resources import EVENTS, SECRETS
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from tests.harness.kube import ApiServer
from tests.harness.reconcile import leader
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import original_ca

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
OPENSSL = shutil.which("openssl")


def _client(apiserver: ApiServer) -> KubeClient:
    return KubeClient(load_config(str(apiserver.admin_kubeconfig)))


async def _leaves(kube: KubeClient, namespace: str, clusters: list[str]) -> dict[str, bytes]:
    """Every leaf certificate atlasd stored, by '<secret>/<key>'."""
    out = {}
    for name in (labels.SERVER_SECRET, labels.CLIENT_SECRET, labels.TLS_SECRET, labels.ADS_SECRET):
        out[f"{name}/tls.crt"] = secret_data(await kube.get(SECRETS, name, namespace=namespace))[
            "tls.crt"
        ]
    for c in clusters:
        ident = secret_data(await kube.get(SECRETS, f"{c}-atlas-identity", namespace=namespace))
        out[f"{c}/server.crt"] = ident["server.crt"]
        out[f"{c}/client.crt"] = ident["client.crt"]
        values = yaml.safe_load(
            secret_data(await kube.get(SECRETS, f"{c}-envoy-values", namespace=namespace))[
                "values.yaml"
            ]
        )
        out[f"{c}/values client.pem"] = values["files"]["client.pem"].encode()
        out[f"{c}/values server.pem"] = values["files"]["server.pem"].encode()
    return out


def _openssl_verify(
    tmp: Path, bundle: bytes, leaf: bytes, purpose: str, untrusted: bytes = b""
) -> None:
    assert OPENSSL, "openssl is on the machine"
    (tmp / "bundle.pem").write_bytes(bundle)
    (tmp / "leaf.pem").write_bytes(leaf)
    extra: list[str] = []
    if untrusted:
        (tmp / "untrusted.pem").write_bytes(untrusted)
        extra = ["-untrusted", str(tmp / "untrusted.pem")]
    proc = subprocess.run(
        [
            OPENSSL,
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            str(tmp / "bundle.pem"),
            *extra,
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def _purpose(key: str) -> str:
    return "sslclient" if "client" in key else "sslserver"


def _check_chain(tmp: Path, ca_pem: bytes, bundle: bytes, leaves: dict[str, bytes]) -> None:
    ca = x509.load_pem_x509_certificate(ca_pem)
    for key, pem in leaves.items():
        x509.load_pem_x509_certificate(pem).verify_directly_issued_by(ca)
        _openssl_verify(tmp, bundle, pem, _purpose(key))
        _openssl_verify(tmp, ca_pem, pem, _purpose(key))


async def test_rotation_overlaps_cas_and_reissues_every_leaf(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    settings = Settings(namespace=namespace)
    clusters = ["east", "west"]
    async with _client(apiserver) as kube:
        for i, c in enumerate(clusters):
            await kube.create(cluster_service(c, f"203.0.113.{i + 1}", namespace=namespace))
        async with leader(kube, settings, now=NOW, post_event=post_event) as run:
            first = await run.settle()
            assert first.ca_action == "created" and len(first.issued) == 4 + 4
            ca0 = await kube.get(SECRETS, labels.CA_SECRET, namespace=namespace)
            ca0_pem = secret_data(ca0)["ca.pem"]
            serial0 = ca0["metadata"]["labels"][labels.CA_SERIAL_LABEL]
            before = await _leaves(kube, namespace, clusters)
            _check_chain(tmp_path, ca0_pem, ca0_pem, before)

            # An operator asks for a rotation (another field manager owns the annotation).
            run.now = NOW + dt.timedelta(days=1)
            apiserver.kubectl(
                "-n",
                namespace,
                "annotate",
                "secret",
                labels.CA_SECRET,
                f"{labels.CA_ROTATE_ANNOTATION}=please",
            )
            rotated = await run.settle()
            assert rotated.ca_action == "rotated" and rotated.replaced == 1
            assert len(rotated.issued) == 4 + 4

            ca1 = await kube.get(SECRETS, labels.CA_SECRET, namespace=namespace)
            meta = ca1["metadata"]
            assert labels.CA_ROTATE_ANNOTATION not in (meta.get("annotations") or {})
            assert meta["labels"][labels.CA_REVISION_LABEL] == "2"
            serial1 = meta["labels"][labels.CA_SERIAL_LABEL]
            assert serial1 != serial0
            data = secret_data(ca1)
            assert set(data) == {
                "ca.pem",
                "ca-key.pem",
                f"ca-{serial0}.pem",
                f"ca-cross-{serial0}.pem",
            }
            assert data[f"ca-{serial0}.pem"] == ca0_pem
            link = data[f"ca-cross-{serial0}.pem"]
            ca1_pem = data["ca.pem"]
            assert str(x509.load_pem_x509_certificate(ca1_pem).serial_number) == serial1

            after = await _leaves(kube, namespace, clusters)
            bundle = secret_data(
                await kube.get(SECRETS, labels.SERVER_SECRET, namespace=namespace)
            )["ca.crt"]
            assert bundle == ca1_pem + ca0_pem
            for key in before:
                assert after[key] != before[key], f"{key} was not re-issued"
            _check_chain(tmp_path, ca1_pem, bundle, after)
            # The overlap: a leaf still deployed from before the rotation verifies against
            # the new bundle, so downstream Envoys keep working until their values are updated.
            for key, pem in before.items():
                _openssl_verify(tmp_path, bundle, pem, _purpose(key))
            # And the other way round: a peer that trusts only the old CA (a bootstrap rendered
            # before the rotation) verifies every new leaf through the link served with it.
            for key, pem in after.items():
                _openssl_verify(tmp_path, ca0_pem, pem, _purpose(key), untrusted=link)
                if "values" in key:  # the values' certificate files carry the link themselves
                    assert pem.endswith(link), key
            for name in (labels.SERVER_SECRET, labels.CLIENT_SECRET, labels.TLS_SECRET):
                s = await kube.get(SECRETS, name, namespace=namespace)
                assert s["metadata"]["labels"][labels.CA_SIGNED_LABEL] == serial1

            run.now = NOW + dt.timedelta(days=2)
            steady = await run.settle()
            assert (steady.writes, steady.issued) == (0, ())
        later = NOW + dt.timedelta(days=3)
        async with leader(kube, settings, now=later, post_event=post_event) as run:
            restarted = await run.settle()
        assert (restarted.writes, restarted.issued) == (0, ())


async def test_adopts_the_originals_rsa_ca(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    settings = Settings(namespace=namespace)
    secret, cert_pem, key_pem = original_ca(NOW, namespace=namespace)
    async with _client(apiserver) as kube:
        await kube.create(secret)
        await kube.create(cluster_service("east", "203.0.113.1", namespace=namespace))
        async with leader(kube, settings, now=NOW, post_event=post_event) as run:
            first = await run.settle()
        assert first.ca_action == "adopted"
        assert first.created == 0 and first.replaced == 1  # labels added, material kept
        stored = await kube.get(SECRETS, labels.CA_SECRET, namespace=namespace)
        data = secret_data(stored)
        assert data["ca.pem"] == cert_pem and data["ca-key.pem"] == key_pem
        assert data["ca-key.pem"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
        assert stored["metadata"]["labels"][labels.CA_SERIAL_LABEL] == "1"
        assert stored["metadata"]["annotations"] == {"objectset.rio.cattle.io/id": "atlas-ca"}
        leaves = await _leaves(kube, namespace, ["east"])
        _check_chain(tmp_path, cert_pem, cert_pem, leaves)

        later = NOW + dt.timedelta(hours=1)
        async with leader(kube, settings, now=later, post_event=post_event) as run:
            again = await run.settle()
        assert (again.writes, again.issued, again.ca_action) == (0, (), "kept")


async def test_unusable_ca_is_reported_and_left_alone(apiserver: ApiServer, namespace: str) -> None:
    settings = Settings(namespace=namespace)
    async with _client(apiserver) as kube:
        broken = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": labels.CA_SECRET, "namespace": namespace},
            "type": "Opaque",
            "stringData": {"ca.pem": "garbage", "ca-key.pem": "more garbage"},
        }
        created = await kube.create(broken)
        await kube.create(cluster_service("east", "203.0.113.1", namespace=namespace))
        async with leader(kube, settings, now=NOW, post_event=post_event) as run:
            result = await run.settle()
            fleet = run.fleet
        assert fleet.pki is None and result.writes == 0
        assert dict(fleet.clusters) == {}
        (problem,) = result.problems
        assert problem.source.name == labels.CA_SECRET and problem.reason == "InvalidCA"
        stored = await kube.get(SECRETS, labels.CA_SECRET, namespace=namespace)
        assert stored["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        events, _ = await kube.list(EVENTS, namespace=namespace)
        assert [(e["involvedObject"]["name"], e["reason"]) for e in events] == [
            (labels.CA_SECRET, "InvalidCA")
        ]
        assert "garbage" not in events[0]["message"]
