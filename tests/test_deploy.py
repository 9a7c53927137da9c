"""The deploy files: parse, carry valid kvroute configs, and chart real metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from router.config import ConfigError, parse_config
from router.metrics import Kind
from router.metrics_doc import app_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOKEN = {"KVROUTE_ADMIN_TOKEN": "t0ken"}


def test_kubernetes_manifest_and_its_config() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "kvroute.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    pod = docs[1]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    text = docs[0]["data"]["kvroute.yaml"]
    with pytest.raises(ConfigError, match="KVROUTE_ADMIN_TOKEN"):
        parse_config(text, {})  # no token, no start: the admin API is never open
    config = parse_config(text, TOKEN)
    assert config.admin.token is not None and not config.admin.open
    env = container["env"][0]
    assert env["valueFrom"]["secretKeyRef"]["optional"] is False
    assert config.models["llama-3-8b"].policy.name == "prefix_affinity"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # The pod must outlive kvroute's own graceful shutdown.
    assert pod["terminationGracePeriodSeconds"] > config.shutdown.grace + config.shutdown.timeout


def test_compose_and_consul_files() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["consul"]["image"].startswith("hashicorp/consul")
    text = (DEPLOY / "kvroute-consul.yaml").read_text()
    with pytest.raises(ConfigError, match="KVROUTE_ADMIN_TOKEN"):
        parse_config(text, {})
    config = parse_config(text, TOKEN)
    assert "KVROUTE_ADMIN_TOKEN:?" in (DEPLOY / "docker-compose.yml").read_text()
    image = parse_config((DEPLOY / "kvroute-image.yaml").read_text(), TOKEN)
    assert image.admin.token is not None and image.server.host == "0.0.0.0"
    assert config.discovery.consul is not None
    # the replicas share their limits through the compose file's Redis
    assert config.quotas.redis == "redis://redis:6379/0" and "redis" in compose["services"]
    services = json.loads((DEPLOY / "consul" / "llm-services.json").read_text())["services"]
    from router.consul import instance_endpoint

    for svc in services:
        entry = {
            "Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {
                "ID": svc["id"],
                "Address": svc["address"],
                "Port": svc["port"],
                "Meta": svc["meta"],
                "Tags": [],
            },
        }
        assert instance_endpoint("llm", entry).kind == svc["meta"]["kvroute-kind"]


def test_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / source).exists(), source


def test_deploy_files_name_only_metrics_kvroute_exports() -> None:
    """Every kvroute_* name in the dashboard and the deploy YAML is in the
    metrics reference (docs/metrics.md, generated from the same families)."""
    series = set()
    for family in app_families():
        series.add(family.exposed)
        if family.kind is Kind.HISTOGRAM:
            series |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
    files = [*DEPLOY.glob("grafana/*.json"), *DEPLOY.glob("**/*.yaml"), *DEPLOY.glob("**/*.yml")]
    used = {
        name: path.relative_to(ROOT)
        for path in files
        for name in re.findall(r"kvroute_[a-z_]+", path.read_text())
    }
    dashboard = json.loads((DEPLOY / "grafana" / "kvroute-dashboard.json").read_text())
    assert dashboard["panels"] and used
    unknown = {name: str(path) for name, path in used.items() if name not in series}
    assert not unknown, unknown
