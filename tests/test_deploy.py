"""The deploy files: valid against their schemas, carrying valid kvroute configs,
agreeing with each other, and charting or scaling on real metric names.

No container engine or cluster runs here, so these are static checks: the
Kubernetes manifests, the ServiceMonitor and the compose file against the JSON
schemas vendored in tests/fixtures/schemas/ (README there), and the Dockerfile
read as text.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft201909Validator, Draft202012Validator, ValidationError
from referencing import Registry, Resource

from router.config import Config, ConfigError, parse_config
from router.consul import instance_endpoint
from router.metrics import Kind
from router.metrics_doc import app_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "schemas"
SECRETS = {"KVROUTE_ADMIN_TOKEN": "t0ken", "REDIS_PASSWORD": "pw"}
TOKEN = {"KVROUTE_ADMIN_TOKEN": "t0ken"}

#: (apiVersion, kind) -> the vendored schema that validates it.
SCHEMA_OF = {
    ("v1", "ConfigMap"): "kubernetes/configmap-v1.json",
    ("v1", "Service"): "kubernetes/service-v1.json",
    ("apps/v1", "Deployment"): "kubernetes/deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "kubernetes/statefulset-apps-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "kubernetes/poddisruptionbudget-policy-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): (
        "kubernetes/horizontalpodautoscaler-autoscaling-v2.json"
    ),
    ("networking.k8s.io/v1", "NetworkPolicy"): "kubernetes/networkpolicy-networking-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
#: deploy/kubernetes/ files that are not manifests (Helm values).
NOT_MANIFESTS = {"prometheus-adapter-values.yaml"}
MANIFESTS = sorted(p.name for p in KUBE.glob("*.yaml") if p.name not in NOT_MANIFESTS)


@cache
def registry() -> Registry:
    resources = []
    for path in [*SCHEMAS.glob("kubernetes/*.json"), *SCHEMAS.glob("*.json")]:
        schema = json.loads(path.read_text())
        if "$id" in schema:
            resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """What the strict schema of the doc's kind says is wrong with it."""
    name = SCHEMA_OF.get((doc.get("apiVersion"), doc.get("kind")))
    assert name is not None, f"no vendored schema for {doc.get('apiVersion')} {doc.get('kind')}"
    schema = json.loads((SCHEMAS / name).read_text())
    return described(Draft202012Validator(schema, registry=registry()).iter_errors(doc))


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return described(Draft201909Validator(schema).iter_errors(doc))


def described(errors: Iterable[ValidationError]) -> list[str]:
    """Each error as "path/to/field: message"."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def load_all(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


@cache
def exported_metrics() -> frozenset[str]:
    """Every series name a kvroute router exports (as queried: counters' _total,
    histograms' _bucket/_sum/_count), from the metrics reference's families."""
    series = set()
    for family in app_families():
        series.add(family.exposed)
        if family.kind is Kind.HISTOGRAM:
            series |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
    return frozenset(series)


def kvroute_config() -> tuple[Config, str]:
    text = only(load_all("kvroute.yaml"), "ConfigMap")["data"]["kvroute.yaml"]
    return parse_config(text, SECRETS), text


# --- Kubernetes ----------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_kubernetes_manifest_validates_against_the_strict_schemas(name: str) -> None:
    docs = load_all(name)
    assert docs
    for doc in docs:
        assert k8s_errors(doc) == [], (name, doc["kind"])


def test_the_manifests_cover_the_kinds_the_deployment_needs() -> None:
    kinds = [(name, d["kind"]) for name in MANIFESTS for d in load_all(name)]
    assert kinds == [
        ("autoscaling.yaml", "HorizontalPodAutoscaler"),
        ("kvroute.yaml", "ConfigMap"),
        ("kvroute.yaml", "Deployment"),
        ("kvroute.yaml", "Service"),
        ("kvroute.yaml", "PodDisruptionBudget"),
        ("kvroute.yaml", "NetworkPolicy"),
        ("redis.yaml", "Service"),
        ("redis.yaml", "StatefulSet"),
        ("redis.yaml", "NetworkPolicy"),
        ("servicemonitor.yaml", "ServiceMonitor"),
    ]


def _set(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("name", "kind", "path", "value"),
    [
        # a typo'd field, deep in the pod template
        (
            "kvroute.yaml",
            "Deployment",
            ("spec", "template", "spec", "containers", 0, "imagePullPolicyy"),
            "Always",
        ),
        # a field at the wrong level (it belongs to the pod spec)
        ("kvroute.yaml", "Deployment", ("spec", "terminationGracePeriodSeconds"), 75),
        # a wrong type
        ("kvroute.yaml", "Deployment", ("spec", "minReadySeconds"), "3"),
        ("kvroute.yaml", "NetworkPolicy", ("spec", "ingress", 0, "port"), 8080),
        (
            "autoscaling.yaml",
            "HorizontalPodAutoscaler",
            ("spec", "metrics", 1, "pods", "target", "averageValu"),
            "1",
        ),
        ("redis.yaml", "StatefulSet", ("spec", "volumeClaimTemplate"), []),
        ("servicemonitor.yaml", "ServiceMonitor", ("spec", "endpoints", 0, "intervall"), "5s"),
        ("servicemonitor.yaml", "ServiceMonitor", ("metadata", "labelz"), {}),
    ],
)
def test_the_strict_schemas_reject_a_broken_manifest(
    name: str, kind: str, path: tuple[str | int, ...], value: Any
) -> None:
    doc = copy.deepcopy(only(load_all(name), kind))
    assert k8s_errors(doc) == []
    _set(doc, path, value)
    errors = k8s_errors(doc)
    assert errors, path
    assert any(e.startswith("/".join(map(str, path[:-1]))) for e in errors), errors


def test_a_kind_without_a_schema_is_not_waved_through() -> None:
    with pytest.raises(AssertionError, match="no vendored schema"):
        k8s_errors({"apiVersion": "v1", "kind": "Pod"})


def test_kubernetes_config_needs_its_secrets_and_uses_redis() -> None:
    text = only(load_all("kvroute.yaml"), "ConfigMap")["data"]["kvroute.yaml"]
    with pytest.raises(ConfigError, match="KVROUTE_ADMIN_TOKEN"):
        parse_config(text, {"REDIS_PASSWORD": "pw"})  # no token, no start: admin never open
    with pytest.raises(ConfigError, match="REDIS_PASSWORD"):
        parse_config(text, TOKEN)
    config, _ = kvroute_config()
    assert config.admin.token is not None and not config.admin.open
    assert config.models["llama-3-8b"].policy.name == "prefix_affinity"
    # quotas and the response cache share the Redis of redis.yaml
    redis = load_all("redis.yaml")
    service = only(redis, "Service", "redis")
    port = service["spec"]["ports"][0]["port"]
    statefulset = only(redis, "StatefulSet")["spec"]
    assert service["spec"]["selector"] == statefulset["selector"]["matchLabels"]
    assert statefulset["serviceName"] == service["metadata"]["name"]
    for url in (config.quotas.redis, config.cache.redis):
        assert url == f"redis://:pw@{service['metadata']['name']}:{port}/0"


def test_the_pods_get_their_secrets_from_required_secret_keys() -> None:
    pod = only(load_all("kvroute.yaml"), "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}
    assert env == {
        "KVROUTE_ADMIN_TOKEN": {"name": "kvroute-admin", "key": "token", "optional": False},
        "REDIS_PASSWORD": {"name": "kvroute-redis", "key": "password", "optional": False},
    }
    redis = only(load_all("redis.yaml"), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    redis_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert redis_env["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
    # The password reaches Redis through a file, never its command line.
    # (test_the_redis_pod_keeps_its_password_off_every_command_line runs it).
    assert redis["command"] == ["/bin/sh", "-c"] and len(redis["args"]) == 1
    assert "--requirepass" not in redis["args"][0] and "$(REDIS_PASSWORD)" not in redis["args"][0]


def test_the_redis_pod_keeps_its_password_off_every_command_line(tmp_path: Path) -> None:
    """Run the container's own command (its paths moved under tmp_path, a free
    port added) against Debian's redis-server: Redis asks for the password,
    takes it, and no process in the pod shows it in its arguments; the file
    holding it is readable by its owner only."""
    import secrets
    import socket
    import stat
    import subprocess
    import time

    assert shutil.which("redis-server"), "redis-server is not on PATH: ./dev test installs it"
    spec = only(load_all("redis.yaml"), "StatefulSet")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["auth"]["emptyDir"]["medium"] == "Memory"  # never written to a disk
    auth_dir, data_dir = tmp_path / "auth", tmp_path / "data"
    auth_dir.mkdir()
    data_dir.mkdir()
    script = container["args"][0].replace(mounts["auth"], str(auth_dir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # set-proc-title no: Redis would overwrite its arguments with a title,
    # hiding from this check a password passed on its command line.
    script += f" --port {port} --bind 127.0.0.1 --dir {data_dir} --save '' --set-proc-title no"
    password = secrets.token_hex(16)
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    proc = subprocess.Popen(
        [*container["command"], script], env=env, cwd=data_dir, stdout=subprocess.DEVNULL
    )
    try:

        def ask(*words: str) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"".join(f"{w}\r\n".encode() for w in words))
                time.sleep(0.05)
                return conn.recv(4096)

        deadline = time.monotonic() + 30
        while True:
            try:
                answer = ask("PING")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.startswith(b"-NOAUTH")
        assert ask(f"AUTH {password}", "PING") == b"+OK\r\n+PONG\r\n"
        # exec: the shell became redis-server, whose arguments hold no secret
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        mode = (auth_dir / "auth.conf").stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prestop_and_termination_grace_agree_with_the_shutdown_config() -> None:
    config, _ = kvroute_config()
    pod = only(load_all("kvroute.yaml"), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # The preStop sleep is kvroute's grace: served while the endpoints update.
    assert pre_stop == config.shutdown.grace > 0
    # The kubelet counts preStop inside the termination grace: the pod must
    # outlive preStop, then kvroute's own grace and drain.
    grace_period = pod["terminationGracePeriodSeconds"]
    assert grace_period > pre_stop + config.shutdown.grace + config.shutdown.timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_the_pods_have_requests_limits_and_run_as_non_root() -> None:
    for name, kind in (("kvroute.yaml", "Deployment"), ("redis.yaml", "StatefulSet")):
        pod = only(load_all(name), kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), name
            assert "memory" in resources["limits"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_network_policy_admits_only_the_api_port() -> None:
    docs = load_all("kvroute.yaml")
    config, _ = kvroute_config()
    deployment = only(docs, "Deployment")
    policy = only(docs, "NetworkPolicy")["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"] == pod_labels
    assert policy["policyTypes"] == ["Ingress"]
    ports = [port for rule in policy["ingress"] for port in rule["ports"]]
    # every rule names its ports (a rule without ports would admit them all)
    assert all(rule.get("ports") for rule in policy["ingress"])
    assert ports == [{"protocol": "TCP", "port": config.server.port}]
    container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [p["containerPort"] for p in container_ports] == [config.server.port]
    # Redis takes connections from the kvroute pods only, on its own port.
    redis = only(load_all("redis.yaml"), "NetworkPolicy")["spec"]
    (rule,) = redis["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_hpa_scales_the_deployment_on_cpu_and_the_adapters_metric() -> None:
    hpa = only(load_all("autoscaling.yaml"), "HorizontalPodAutoscaler")["spec"]
    deployment = only(load_all("kvroute.yaml"), "Deployment")
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods_metric = by_type["Pods"]["pods"]["metric"]["name"]
    # the adapter serves that name, from a series kvroute really exports
    values = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric
    series = re.fullmatch(r"([a-z_]+)\{.*\}", rule["seriesQuery"])
    assert series is not None
    assert series.group(1) in exported_metrics()
    assert re.search(rule["name"]["matches"], series.group(1))
    assert f"{series.group(1)}{{<<.LabelMatchers>>}}" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["minReplicas"] >= 2


def test_the_service_monitor_scrapes_the_service_port_serving_metrics() -> None:
    monitor = only(load_all("servicemonitor.yaml"), "ServiceMonitor")["spec"]
    service = only(load_all("kvroute.yaml"), "Service")
    # kvroute labels series by "endpoint" (the backend): the operator's own
    # target label of that name must not rename it.
    assert all(e.get("honorLabels") is True for e in monitor["endpoints"])
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- compose, Consul, Prometheus, Grafana -------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert compose_errors(compose()) == []


def test_the_compose_schema_rejects_a_broken_file() -> None:
    broken = compose()
    broken["services"]["router-a"]["healthchek"] = broken["services"]["router-a"].pop("healthcheck")
    assert any(e.startswith("services/router-a") for e in compose_errors(broken))
    broken = compose()
    broken["services"]["redis"]["depends_on"] = {"consul": {"condition": "service_happy"}}
    assert compose_errors(broken)


def test_compose_runs_the_fleet_with_healthchecks() -> None:
    services = compose()["services"]
    assert {
        "consul", "redis", "router-a", "router-b", "vllm-sim", "tgi-sim", "triton-sim",
        "prometheus", "grafana",
    } <= services.keys()  # fmt: skip
    assert services["consul"]["image"].startswith("hashicorp/consul")
    for router in ("router-a", "router-b"):
        svc = services[router]
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert "KVROUTE_ADMIN_TOKEN:?" in svc["environment"]["KVROUTE_ADMIN_TOKEN"]
    for name in ("redis", "consul", "vllm-sim", "tgi-sim", "triton-sim"):
        assert services[name]["healthcheck"]["test"], name
    # every published port is on loopback only
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_compose_router_config_and_image_config() -> None:
    text = (DEPLOY / "kvroute-consul.yaml").read_text()
    with pytest.raises(ConfigError, match="KVROUTE_ADMIN_TOKEN"):
        parse_config(text, {})
    config = parse_config(text, TOKEN)
    assert config.discovery.consul is not None
    assert config.discovery.consul.url == "http://consul:8500"
    # the replicas share their limits through the compose file's Redis
    assert config.quotas.redis == "redis://redis:6379/0" and "redis" in compose()["services"]
    for router in ("router-a", "router-b"):
        volumes = compose()["services"][router]["volumes"]
        assert "./kvroute-consul.yaml:/etc/kvroute/kvroute.yaml:ro" in volumes
    # docker stops a router after stop_grace_period: more than its own shutdown
    period = compose()["services"]["router-a"]["stop_grace_period"]
    assert float(period.removesuffix("s")) > config.shutdown.grace + config.shutdown.timeout
    image = parse_config((DEPLOY / "kvroute-image.yaml").read_text(), TOKEN)
    assert image.admin.token is not None and image.server.host == "0.0.0.0"


def _simulator(service: dict[str, Any]) -> tuple[str, int]:
    """The kind and port a compose service's ``kvroute simulate`` command runs."""
    command = service["command"]
    assert command[0] == "simulate"
    return command[command.index("--kind") + 1], int(command[command.index("--port") + 1])


def test_consul_registers_the_simulators_compose_starts() -> None:
    services = compose()["services"]
    consul = json.loads((DEPLOY / "consul" / "llm-services.json").read_text())["services"]
    # mounted read-only outside /consul/config (the image's entrypoint chowns that)
    assert "./consul:/consul/kvroute:ro" in services["consul"]["volumes"]
    assert "-config-dir=/consul/kvroute" in services["consul"]["command"]
    config = parse_config((DEPLOY / "kvroute-consul.yaml").read_text(), TOKEN)
    assert config.discovery.consul is not None
    wanted = {s.name for s in config.discovery.consul.services}
    registered = set()
    for svc in consul:
        assert svc["name"] in wanted
        kind, port = _simulator(services[svc["address"]])
        assert (kind, port) == (svc["meta"]["kvroute-kind"], svc["port"])
        assert all(f"//{svc['address']}:{port}/" in check["http"] for check in svc["checks"])
        assert set(svc["meta"]["kvroute-models"].split(",")) <= set(config.models)
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
        assert instance_endpoint(svc["name"], entry).kind == kind
        registered.add(svc["address"])
    simulators = {n for n, s in services.items() if s.get("command", [None])[0] == "simulate"}
    assert registered == simulators == {"vllm-sim", "tgi-sim", "triton-sim"}


def test_prometheus_scrapes_both_router_replicas() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    config = parse_config((DEPLOY / "kvroute-consul.yaml").read_text(), TOKEN)
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "kvroute"]
    targets = [t for s in job["static_configs"] for t in s["targets"]]
    routers = [n for n, s in services.items() if s.get("command", [None])[0] == "serve"]
    assert sorted(routers) == ["router-a", "router-b"]
    assert sorted(targets) == [f"{r}:{config.server.port}" for r in sorted(routers)]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        mounts[container] = (DEPLOY / host).resolve()
    return mounts


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = yaml.safe_load((provisioning / "dashboards" / "kvroute.yaml").read_text())
    (provider,) = providers["providers"]
    folder = provider["options"]["path"]
    dashboards = [host for path, host in mounts.items() if path.startswith(folder + "/")]
    assert dashboards == [(DEPLOY / "grafana" / "kvroute-dashboard.json").resolve()]
    dashboard = json.loads(dashboards[0].read_text())
    variable = dashboard["templating"]["list"][0]
    assert (variable["type"], variable["query"]) == ("datasource", source["type"])


def test_deploy_files_name_only_metrics_kvroute_exports() -> None:
    """Every kvroute_* name in the dashboard and the deploy YAML is in the
    metrics reference (docs/metrics.md, generated from the same families)."""
    series = exported_metrics()
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


# --- Dockerfile ---------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), with
    comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def dockerignored(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore keeps ``path`` out of the build context
    (the last pattern that matches the path or a parent of it decides)."""
    ignored = False
    parts = path.strip("/").split("/")
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            if fnmatch.fnmatchcase("/".join(parts[:i]), pattern):
                ignored = not negate
    return ignored


def test_dockerfile_is_multi_stage_and_small() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    name = builder[0][1].split()[-1]
    assert builder[0][1].lower().endswith(f" as {name.lower()}")
    # the final stage takes the built environment from the builder, nothing else
    copies_from = [a for i, a in final if i == "COPY" and a.startswith("--from=")]
    assert copies_from and all(a.startswith(f"--from={name} ") for a in copies_from)
    # the image can trace: the builder installs the otel extra (tracing is config only)
    installs = [a for i, a in builder if i == "RUN" and "pip install" in a]
    assert any('".[otel]"' in a for a in installs), installs
    # ... and has no build step: no compiler, no package installs
    for instruction, args in final:
        if instruction == "RUN":
            assert not re.search(r"\b(pip|apt-get|apk|gcc|build-essential|make)\b", args), args
    assert final[0][1].split()[0].endswith("-slim")


def test_dockerfile_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    final = dockerfile_stages()[-1]
    instructions = [i for i, _ in final]
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can verify it
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    assert "USER" not in instructions[instructions.index("USER") + 1 :]
    (healthcheck,) = [a for i, a in final if i == "HEALTHCHECK"]
    assert "/health" in healthcheck
    assert healthcheck.split("CMD", 1)[0].strip()  # it sets its interval/timeout
    # the Kubernetes pod runs as the image's user
    pod = only(load_all("kvroute.yaml"), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    # kvroute's port: the one the HEALTHCHECK asks and EXPOSE names
    (exposed,) = [a for i, a in final if i == "EXPOSE"]
    assert f":{exposed}/health" in healthcheck


def test_dockerfile_copies_what_exists_and_the_context_keeps() -> None:
    sources = [
        source
        for stage in dockerfile_stages()
        for instruction, args in stage
        if instruction == "COPY" and not args.startswith("--from=")
        for source in args.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), source
    assert dockerignored(".venv") and dockerignored("tests/test_deploy.py")
    assert dockerignored("router/__pycache__/app.cpython-311.pyc")
