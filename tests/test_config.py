from __future__ import annotations

from pathlib import Path

import pytest

from router.cli import main
from router.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
endpoints:
  - id: vllm-0
    url: http://127.0.0.1:9001
    kind: vllm
    models: [tiny]
models:
  tiny:
    policy: round_robin
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env or {})
    return info.value.errors


def test_minimal_shape_from_design_is_accepted() -> None:
    config = parse_config(MINIMAL, {})
    (ep,) = config.endpoints
    assert (ep.id, ep.url, ep.kind) == ("vllm-0", "http://127.0.0.1:9001", "vllm")
    assert ep.models[0].name == "tiny" and ep.models[0].served_name is None
    assert config.models["tiny"].policy.name == "round_robin"


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, {})
    with pytest.raises(ValueError):
        config.seed = 3  # type: ignore[misc]


def test_served_name_and_policy_mapping_form() -> None:
    config = parse_config(
        """
endpoints:
  - id: a
    url: http://h:1/
    models: [{name: tiny, served_name: org/tiny-model}]
models:
  tiny: {policy: {name: least_load}, aliases: [small]}
""",
        {},
    )
    assert config.endpoints[0].url == "http://h:1"
    assert config.endpoints[0].models[0].served_name == "org/tiny-model"
    assert config.models["tiny"].aliases == ("small",)


def test_unknown_policy_names_path_and_known_list() -> None:
    text = MINIMAL.replace("policy: round_robin", "policy: foo")
    assert errors_of(text) == [
        "models.tiny.policy: unknown policy 'foo' (known: composite, consistent_hash, "
        "least_latency, least_load, power_of_two, prefix_affinity, random, round_robin, "
        "session_affinity, weighted, weighted_round_robin)"
    ]


def test_policy_params_are_checked() -> None:
    text = MINIMAL.replace("policy: round_robin", "policy: {name: round_robin, bogus: 1}")
    (error,) = errors_of(text)
    assert error.startswith("models.tiny.policy: bad parameters for policy 'round_robin': bogus")


def test_every_error_is_reported_with_its_path() -> None:
    text = """
server: {port: 70000, surprise: 1}
endpoints:
  - id: a
    url: ftp://nowhere
    kind: tgx
    models: []
"""
    assert errors_of(text) == [
        "server.port: Input should be less than or equal to 65535",
        "server.surprise: Extra inputs are not permitted",
        "endpoints[0].url: must be an http:// or https:// URL, got 'ftp://nowhere'",
        "endpoints[0].kind: unknown endpoint kind 'tgx' (known: openai, tgi, triton, vllm)",
        "endpoints[0].models: Tuple should have at least 1 item after validation, not 0",
    ]


def test_duplicate_endpoint_ids_and_alias_clash() -> None:
    text = """
endpoints:
  - {id: a, url: "http://h:1", models: [m]}
  - {id: a, url: "http://h:2", models: [m]}
"""
    assert errors_of(text) == ["(top level): endpoint id 'a' is used twice"]
    text = """
models:
  m: {aliases: [n]}
  n: {}
"""
    assert errors_of(text) == ["(top level): alias 'n' of model 'm' is already the name of 'n'"]


def test_environment_references() -> None:
    text = """
endpoints:
  - id: a
    url: ${BACKEND_URL}
    api_key: ${KEY:-fallback}
    models: [m]
"""
    config = parse_config(text, {"BACKEND_URL": "http://10.1.1.1:8000"})
    ep = config.endpoints[0]
    assert ep.url == "http://10.1.1.1:8000"
    assert ep.api_key is not None and ep.api_key.get_secret_value() == "fallback"
    assert "fallback" not in repr(config)  # secrets never print
    assert errors_of(text) == ["endpoints[0].url: environment variable 'BACKEND_URL' is not set"]


def test_empty_secrets_mean_none() -> None:
    config = parse_config(
        "admin_token: '${T:-}'\nendpoints: [{id: a, url: 'http://h:1', api_key: '${K:-}', "
        "models: [m]}]",
        {},
    )
    assert config.endpoints[0].api_key is None
    assert config.admin.token is None


def test_yaml_syntax_error_names_line() -> None:
    (error,) = errors_of("endpoints:\n  - id: [unclosed\n")
    assert error.startswith("line 3, column 1: invalid YAML")


def test_top_level_must_be_mapping() -> None:
    assert errors_of("- 1\n- 2\n") == ["(top level): must be a mapping"]


def test_shipped_configs_validate() -> None:
    assert load_config(ROOT / "configs" / "demo.yaml", {}).models["demo-chat"].aliases
    assert len(load_config(ROOT / "configs" / "static.yaml", {}).endpoints) == 3


def test_demo_config_file_matches_the_embedded_one() -> None:
    shipped = (ROOT / "configs" / "demo.yaml").read_text()
    embedded = (ROOT / "router" / "demo.yaml").read_text()
    assert shipped == embedded


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    assert main(["check", str(good)]) == 0
    assert "ok (1 endpoints, 1 models)" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("policy: round_robin", "policy: foo"))
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: models.tiny.policy: unknown policy 'foo'" in err
    assert f"{bad}: 1 error(s)" in err

    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tgi", "triton"])
def test_an_endpoints_own_chat_template_is_checked_at_load(kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"endpoints: [{{id: t, url: 'http://t:1', kind: {kind}, models: [m], "
            "options: {chat_template: '{% for %}'}}]",
            {},
        )
    assert info.value.errors[0].startswith(
        f"endpoints[0]: bad options for kind '{kind}': chat_template: invalid chat template"
    )


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    path.write_bytes(b"endpoints: []\nseed: 1 # caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}: line 2: not UTF-8 text (byte 0xe9: invalid continuation byte)"
    ]


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("url", "ftp://admin:S3cret@host:8000"),
        ("url", "admin:S3cret@host"),  # the scheme forgotten
        ("kv_events", "tcp://u:S3cret@*:5557"),
        ("kv_events", "udp://u:S3cret@host:5557"),
    ],
)
def test_a_rejected_url_is_echoed_without_its_credentials(field: str, url: str) -> None:
    """Config errors reach the log, /admin/reload's answer and the fleet page."""
    endpoint = {"id": "a", "url": "http://h:1", "kind": "vllm", "models": ["m"]}
    endpoint[field] = url if field == "url" else {"endpoint": url}
    with pytest.raises(ConfigError) as info:
        parse_config(str({"endpoints": [endpoint]}), {})
    (error,) = info.value.errors
    assert "S3cret" not in error and "***@" in error
