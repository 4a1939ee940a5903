"""Host matching, catalogues and policy loading (the guard's decisions, no kernel needed)."""

import json

import pytest

from jupyter_dua_guard.policy import (
    Decision,
    HostSet,
    Policy,
    PolicyError,
    build_policy,
    load_endpoint_catalogue,
    load_package_catalogue,
    load_policy,
    normalize_host,
    write_policy,
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(
        build_policy(
            blocked_hosts=["llm.example.test", "203.0.113.0/24", "2001:db8:a1::/48"],
            allowed_hosts=["onprem.openai.azure.com", "198.51.100.7"],
            model_servers=["gpu-llm.hospital.test"],
        )
    )


@pytest.mark.parametrize(
    "host",
    [
        "api.openai.com",
        "API.OPENAI.COM.",
        "Api.OpenAI.com",
        "x.openai.azure.com",
        "deep.x.openai.azure.com",
        "bedrock-runtime.us-east-1.amazonaws.com",
        "BEDROCK-RUNTIME.EU-WEST-3.AMAZONAWS.COM.",
        "us-central1-aiplatform.googleapis.com",
        "generativelanguage.googleapis.com",
        "api.anthropic.com",
        "api.mistral.ai",
        "api.cohere.com",
        "api.deepseek.com",
        "dashscope-intl.aliyuncs.com",
        "router.huggingface.co",
        "api.together.xyz",
        "api.groq.com",
        "api.perplexity.ai",
        "api.replicate.com",
        "api.fireworks.ai",
        "openrouter.ai",
        "api.x.ai",
        "api.githubcopilot.com",
        "api.llama.com",
        "llm.example.test",
        "203.0.113.99",
        "2001:db8:a1::5",
        "[2001:DB8:A1::5]",
        "::ffff:203.0.113.4",
        b"api.openai.com",
    ],
)
def test_blocked(policy: Policy, host: object) -> None:
    decision, _, provider = policy.decide(host, 443)
    assert decision == Decision.BLOCK
    assert provider


@pytest.mark.parametrize(
    "host",
    [
        "example.org",
        "pypi.org",
        "openai.azure.com",  # '*.' needs at least one label
        "notopenai.com",
        "bedrock-runtime.amazonaws.com",  # region label missing
        "s3.us-east-1.amazonaws.com",
        "203.0.114.1",
        "2001:db8:a2::5",
        "",
        None,
        ("tuple",),
    ],
)
def test_not_blocked(policy: Policy, host: object) -> None:
    assert policy.decide(host, 443)[0] == Decision.ALLOW


def test_allow_list_beats_block_list_and_is_recorded_as_ai(policy: Policy) -> None:
    decision, name, provider = policy.decide("ONPREM.openai.azure.com.", 443)
    assert (decision, name) == (Decision.ALLOW_AI, "onprem.openai.azure.com")
    assert "allow-listed" in provider
    assert policy.decide("198.51.100.7", 443)[0] == Decision.ALLOW


def test_model_servers_and_loopback(policy: Policy) -> None:
    assert policy.decide("gpu-llm.hospital.test", 8000)[0] == Decision.ALLOW_AI
    assert policy.decide("127.0.0.1", 11434) == (Decision.ALLOW_AI, "127.0.0.1", "Ollama")
    assert policy.decide("localhost", "11434")[0] == Decision.ALLOW_AI
    assert policy.decide("::1", 1234)[2] == "LM Studio"
    assert policy.decide("127.0.0.1", 45678)[0] == Decision.ALLOW
    assert policy.decide("10.1.2.3", 11434)[0] == Decision.ALLOW  # not loopback


def test_normalize_host() -> None:
    assert normalize_host("API.OpenAI.COM.") == "api.openai.com"
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("fe80::1%eth0") == "fe80::1"
    assert normalize_host("bücher.example") == "xn--bcher-kva.example"
    assert normalize_host(42) is None


def test_hostset_rejects_bad_cidr() -> None:
    with pytest.raises(PolicyError, match="CIDR"):
        HostSet(["10.0.0.0/99"])
    with pytest.raises(PolicyError, match="address"):
        HostSet(["2001:db8:zz::/48"])


def test_catalogues_are_complete() -> None:
    endpoints = load_endpoint_catalogue()["endpoints"]
    assert all(
        e["host"] and e["provider"] and e["source"].startswith("https://") for e in endpoints
    )
    providers = " ".join(e["provider"] for e in endpoints)
    for name in [
        "OpenAI",
        "Azure OpenAI",
        "Anthropic",
        "Gemini",
        "Vertex AI",
        "Bedrock",
        "Mistral",
        "Cohere",
        "DeepSeek",
        "Qwen",
        "Hugging Face",
        "Together",
        "Groq",
        "Perplexity",
        "Replicate",
        "Fireworks",
        "OpenRouter",
        "xAI",
        "GitHub Copilot",
        "Meta Llama",
    ]:
        assert name in providers, name
    HostSet({e["host"]: e["provider"] for e in endpoints})  # every pattern compiles
    packages = load_package_catalogue()
    assert len(packages) >= 60
    categories = {p["category"] for p in packages.values()}
    assert {"llm-client", "deep-learning", "classical-ml", "nlp", "agent-framework"} <= categories
    assert "local-llm-runtime" in categories
    assert packages["sklearn"]["distributions"] == ["scikit-learn"]


def test_policy_round_trip_and_data_paths(tmp_path) -> None:
    doc = build_policy(
        data_paths=["seer/**/*.csv", "~/nccr", "/srv/registry/"],
        packages={"mytool": "my-tool-dist"},
        mode="record",
        base_dir=str(tmp_path),
    )
    path = write_policy(doc, str(tmp_path / "rt" / "policy.json"))
    loaded = load_policy(path)
    assert loaded.defaults_reason is None
    assert loaded.mode == "record"
    assert loaded.packages["mytool"]["distributions"] == ["my-tool-dist"]
    rx = loaded.data_regex
    assert rx.match(f"{tmp_path}/seer/2020/cases.csv")
    assert rx.match(f"{tmp_path}/seer/cases.csv")
    assert not rx.match(f"{tmp_path}/seer/cases.parquet")
    assert rx.match("/srv/registry/a/b.sas7bdat")
    assert not rx.match("/srv/registry2/x")
    assert loaded.model_regex.match("pytorch_model-00001.bin")
    assert loaded.model_regex.match("Model.SAFETENSORS")
    assert not loaded.model_regex.match("table.csv")


def test_policy_file_cannot_drop_the_catalogue(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"mode": "block", "blocked_hosts": {}, "packages": {}}))
    loaded = load_policy(str(path))
    assert loaded.decide("api.openai.com", 443)[0] == Decision.BLOCK
    assert "transformers" in loaded.packages


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"mode": "off"}), None, ""])
def test_fail_closed_on_bad_policy_file(tmp_path, content) -> None:
    path = tmp_path / "policy.json"
    if content is not None:
        path.write_text(content)
    loaded = load_policy(str(path))
    assert loaded.defaults_reason and str(path) in loaded.defaults_reason
    assert "\n" not in loaded.defaults_reason
    assert loaded.mode == "block"
    assert loaded.decide("x.openai.azure.com", 443)[0] == Decision.BLOCK


def test_build_policy_rejects_bad_settings() -> None:
    with pytest.raises(PolicyError, match="mode"):
        build_policy(mode="off")
    with pytest.raises(PolicyError, match="CIDR"):
        build_policy(blocked_hosts=["10.0.0.0/x"])


def test_config_validation_names_the_setting() -> None:
    from traitlets import TraitError

    from jupyter_dua_guard.config import DUAGuard

    with pytest.raises(TraitError, match=r"DUAGuard.allowed_hosts.*CIDR"):
        DUAGuard(allowed_hosts=["10.0.0.0/77"])
    with pytest.raises(TraitError, match="mode"):
        DUAGuard(mode="off")
