"""The hand-applicable manifest: parses, least privilege, the Service shape the tunnel needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MANIFEST = Path(__file__).parent.parent / "manifests" / "svctunnel.yaml"


def _docs() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_manifest_has_secret_deployment_and_service() -> None:
    assert set(_docs()) == {"Secret", "Deployment", "Service"}


def test_agent_runs_with_net_admin_and_net_raw_only() -> None:
    (container,) = _docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    assert security.get("privileged") is not True
    assert sorted(security["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert container["args"] == ["agent"]


def test_service_keeps_the_source_address_and_publishes_unready_pods() -> None:
    spec = _docs()["Service"]["spec"]
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["publishNotReadyAddresses"] is True
    (port,) = spec["ports"]
    assert port["protocol"] == "UDP" and port["port"] == port["targetPort"] == 5533
