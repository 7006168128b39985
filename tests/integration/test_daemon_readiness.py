"""Readiness that never lies, against the real kube-apiserver: a namespace that does not
exist, or a required resource atlasd may not list, is "not ready" with the reason in
/readyz, /status and the log — logged once per backoff step, not every two seconds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest

from atlasd.kube.resources import REQUIRED_PERMISSIONS
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

pytestmark = pytest.mark.integration


def _not_ready(atlasd: Atlasd) -> str:
    atlasd.proc.check_running()
    r = httpx2.get(f"{atlasd.url}/readyz", timeout=5)
    return r.text if r.status_code == 503 else ""


def test_a_missing_namespace_is_not_ready(apiserver: ApiServer, tmp_path: Path) -> None:
    atlasd = Atlasd(
        tmp_path, f"--kubeconfig={apiserver.admin_kubeconfig}", "--namespace=no-such-ns"
    )
    atlasd.proc.start()
    try:
        why = wait_until(lambda: _not_ready(atlasd), timeout=30, what="/readyz answers 503")
        wait_until(
            lambda: "no-such-ns" in _not_ready(atlasd), timeout=30, what="the reason in /readyz"
        )
        status = atlasd.status()
        assert status["ready"] is False
        assert any("namespace 'no-such-ns' does not exist" in p for p in status["not_ready"])
        time.sleep(12)  # an observation window: how often does it say so?
        said = atlasd.log_text().count("namespace 'no-such-ns' does not exist")
        assert 1 <= said <= 4, f"logged {said} times in ~15 s (backoff: 2, 4, 8 s)"
        assert _not_ready(atlasd), why
        # Created later: ready, without a restart.
        apiserver.create_namespace("no-such-ns")
        wait_until(lambda: not _not_ready(atlasd), timeout=90, what="ready once it exists")
    finally:
        atlasd.proc.stop()


def test_forbidden_on_a_required_resource_is_not_ready(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    # Everything the chart's Role grants except listing Secrets.
    rules = [
        {"apiGroups": [group], "resources": [plural], "verbs": [verb]}
        for group, plural, verb in sorted(REQUIRED_PERMISSIONS)
        if not (plural == "secrets" and verb in ("list", "watch"))
    ]
    kubeconfig = apiserver.service_account_kubeconfig("no-secrets", namespace, rules)
    atlasd = Atlasd(tmp_path, f"--kubeconfig={kubeconfig}", f"--namespace={namespace}")
    atlasd.proc.start()
    try:

        def forbidden() -> str:
            text = _not_ready(atlasd)
            return text if "Forbidden" in text else ""

        why = wait_until(forbidden, timeout=30, what="Forbidden in /readyz")
        assert "owned-secrets" in why and "secrets" in why
        assert atlasd.status()["ready"] is False
    finally:
        atlasd.proc.stop()
