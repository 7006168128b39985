"""Reconcile against a real kube-apiserver, by the daemon's reconcile loop (its clock pinned):
onboarding, deletion, steady state, restart, and malformed cluster Services that must never
disturb the healthy ones."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml
from cryptography import x509

from atlasd import labels
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import fleet_of
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import NotFound
from atlasd.kube.events import post_event
from atlasd.kube.resources import EVENTS, SECRETS, SERVICES
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from atlasd.reconcile.applier import Reconciler
from tests.harness.kube import ApiServer
from tests.harness.reconcile import leader
from tests.unit.reconcile.builders import cluster_service

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def _client(apiserver: ApiServer) -> KubeClient:
    return KubeClient(load_config(str(apiserver.admin_kubeconfig)))


def _settings(namespace: str) -> Settings:
    return Settings(namespace=namespace, envoy_ads_address="198.51.100.7")


async def _names(kube: KubeClient, namespace: str, res: Any, selector: str) -> set[str]:
    items, _ = await kube.list(res, namespace=namespace, label_selector=selector)
    return {i["metadata"]["name"] for i in items}


async def _owned_by(kube: KubeClient, namespace: str, cluster: str) -> set[str]:
    sel = f"{labels.OWNER_CLUSTER_LABEL}={cluster}"
    return await _names(kube, namespace, SERVICES, sel) | await _names(
        kube, namespace, SECRETS, sel
    )


async def test_onboard_three_clusters_then_steady_then_delete(
    apiserver: ApiServer, namespace: str
) -> None:
    settings = _settings(namespace)
    async with _client(apiserver) as kube:
        specs = {
            "east": cluster_service("east", "203.0.113.1", namespace=namespace),
            "west": cluster_service(
                "west",
                "203.0.113.2",
                namespace=namespace,
                replicas="3",
                annotations={labels.ENVOY_SELECTORS_ANNOTATION: "app=proxy,tier=edge"},
            ),
            "north": cluster_service("north", "2001:db8::5", namespace=namespace, replicas="2"),
        }
        uids = {}
        for name, svc in specs.items():
            created = await kube.create(svc)
            uids[name] = created["metadata"]["uid"]
        # One local Alertmanager Service on the observability cluster.
        await kube.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "alertmanager-main",
                    "namespace": namespace,
                    "labels": {"app": "kube-prometheus-stack-alertmanager"},
                },
                "spec": {
                    "clusterIP": "None",
                    "selector": {"app": "alertmanager"},
                    "ports": [{"name": "web", "port": 9093}],
                },
            }
        )

        async with leader(kube, settings, now=NOW, post_event=post_event) as run:
            first = await run.settle()
            first_fleet = run.fleet
            # Steady state: zero writes.
            run.now = NOW + dt.timedelta(minutes=1)
            second = await run.settle()
            assert (second.writes, second.issued, second.events) == (0, (), 0)
        assert first.problems == ()
        assert first.ca_action == "created"
        # CA + 4 cluster-wide TLS + obs values + 3x(values + identity) + 6 sidecars
        assert first.created == 1
        assert first.applied == 4 + 1 + 6 + 6
        assert sorted(first_fleet.clusters) == ["east", "north", "west"]
        assert len(first_fleet.alertmanagers) == 1

        # Sidecar Services
        sidecars = await _names(kube, namespace, SERVICES, labels.THANOS_SIDECAR_LABEL)
        assert sidecars == {
            "east-thanos-sidecar0",
            "west-thanos-sidecar0",
            "west-thanos-sidecar1",
            "west-thanos-sidecar2",
            "north-thanos-sidecar0",
            "north-thanos-sidecar1",
        }
        w1 = await kube.get(SERVICES, "west-thanos-sidecar1", namespace=namespace)
        assert w1["spec"]["clusterIP"] == "None"
        assert w1["spec"]["selector"] == {"app": "proxy", "tier": "edge"}
        assert [(p["name"], p["port"]) for p in w1["spec"]["ports"]] == [
            ("prometheus", 9090),
            ("thanos", 10901),
            ("alertmanager", 9093),
        ]
        assert w1["metadata"]["labels"][labels.THANOS_SIDECAR_LABEL] == "1"
        assert w1["metadata"]["labels"][labels.MANAGED_BY_LABEL] == "atlasd"
        assert w1["metadata"]["labels"][labels.OWNER_CLUSTER_LABEL] == "west"
        (ref,) = w1["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("Service", "west", uids["west"])
        e0 = await kube.get(SERVICES, "east-thanos-sidecar0", namespace=namespace)
        assert e0["spec"]["selector"] == {"app": "envoy", "release": "atlas"}

        # CA and cluster-wide TLS Secrets
        ca = await kube.get(SECRETS, labels.CA_SECRET, namespace=namespace)
        ca_data = secret_data(ca)
        ca_cert = x509.load_pem_x509_certificate(ca_data["ca.pem"])
        assert ca["metadata"]["labels"][labels.CA_REVISION_LABEL] == "1"
        assert ca["metadata"]["labels"][labels.CA_SERIAL_LABEL] == str(ca_cert.serial_number)
        assert ca["metadata"]["labels"][labels.CA_LABEL] == "true"
        serials = set()
        for name in (labels.SERVER_SECRET, labels.CLIENT_SECRET, labels.TLS_SECRET):
            s = await kube.get(SECRETS, name, namespace=namespace)
            d = secret_data(s)
            assert set(d) == {"ca.crt", "tls.crt", "tls.key"}
            assert s["metadata"]["labels"][labels.CERT_LABEL] == "true"
            assert s["metadata"]["labels"][labels.CA_SIGNED_LABEL] == str(ca_cert.serial_number)
            leaf = x509.load_pem_x509_certificate(d["tls.crt"])
            leaf.verify_directly_issued_by(ca_cert)
            serials.add(leaf.serial_number)

        # Per-cluster values and identities
        for name in specs:
            values_secret = await kube.get(
                SECRETS, labels.values_secret_name(name), namespace=namespace
            )
            values = yaml.safe_load(secret_data(values_secret)["values.yaml"])
            assert values["atlas"]["alertmanagerCount"] == 1
            boot = yaml.safe_load(values["files"]["envoy.yaml"])
            assert boot["node"]["id"] == name
            (xds,) = boot["static_resources"]["clusters"]
            sock = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            assert sock["address"]["socket_address"] == {
                "address": "198.51.100.7",
                "port_value": 10900,
            }
            client = x509.load_pem_x509_certificate(values["files"]["client.pem"].encode())
            san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert name in san.get_values_for_type(x509.DNSName)
            client.verify_directly_issued_by(ca_cert)
            ident = secret_data(
                await kube.get(SECRETS, f"{name}-atlas-identity", namespace=namespace)
            )
            assert ident["client.crt"].decode() == values["files"]["client.pem"]
            for cert_key in ("server.crt", "client.crt"):
                serials.add(x509.load_pem_x509_certificate(ident[cert_key]).serial_number)
        assert len(serials) == 3 + 6, "every leaf has its own serial"
        obs = yaml.safe_load(
            secret_data(await kube.get(SECRETS, labels.OBS_VALUES_SECRET, namespace=namespace))[
                "values.yaml"
            ]
        )
        assert yaml.safe_load(obs["files"]["envoy.yaml"])["node"]["id"] == "atlas"

        # A restart issues nothing.
        later = NOW + dt.timedelta(hours=1)
        async with leader(kube, settings, now=later, post_event=post_event) as run:
            third = await run.settle()
            assert (third.writes, third.issued) == (0, ())
            assert first_fleet.pki == run.fleet.pki
            # The same keys reconciled one by one, by a reconciler that knows nothing, from a
            # plain LIST of all Services and Secrets: nothing to write either.
            all_svcs, _ = await kube.list(SERVICES, namespace=namespace)
            all_secrets, _ = await kube.list(SECRETS, namespace=namespace)
            cached = fleet_of(services=all_svcs, secrets=all_secrets, settings=settings, now=later)
            fresh = Reconciler(settings=settings, post_event=post_event)
            keyed = [
                await fresh.reconcile_key(kube, cached, key, now=later)
                for key in (FLEET_KEY, *sorted(cached.members))
            ]
            assert sum(r.writes for r in keyed) == 0 and all(r.issued == () for r in keyed)
            assert dict(cached.model.clusters) == dict(run.fleet.clusters)
            assert cached.model.pki == run.fleet.pki

            # Scale west down to 1 replica: its extra sidecars go, nothing else changes.
            run.now = NOW + dt.timedelta(hours=2)
            west = await kube.get(SERVICES, "west", namespace=namespace)
            west["metadata"]["labels"][labels.REPLICAS_LABEL] = "1"
            await kube.replace(west)
            scaled = await run.settle()
            assert (scaled.applied, scaled.deleted, scaled.issued) == (0, 2, ())

            # Delete a cluster: nothing of it is left, others untouched.
            run.now = NOW + dt.timedelta(hours=3)
            before_east = await kube.get(SECRETS, "east-envoy-values", namespace=namespace)
            await kube.delete(SERVICES, "west", namespace=namespace)
            gone = await run.settle()
            assert gone.deleted == 3  # 1 sidecar + values + identity
            assert gone.applied == 0
            assert await _owned_by(kube, namespace, "west") == set()
            for name in ("west-thanos-sidecar0", "west-envoy-values", "west-atlas-identity"):
                with pytest.raises(NotFound):
                    await kube.get(
                        SECRETS if "sidecar" not in name else SERVICES, name, namespace=namespace
                    )
            after_east = await kube.get(SECRETS, "east-envoy-values", namespace=namespace)
            assert (
                after_east["metadata"]["resourceVersion"]
                == before_east["metadata"]["resourceVersion"]
            )
            assert run.fleet.pki is not None
            assert "west" not in run.fleet.identities
            run.now = NOW + dt.timedelta(hours=4)
            final = await run.settle()
            assert final.writes == 0
        events, _ = await kube.list(EVENTS, namespace=namespace)
        assert events == []
