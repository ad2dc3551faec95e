"""The shipped deployment files are safe by default: read as a user's tools read them."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


SERVICES = ("fsrl", "fsrl-vllm")  # one GPU; the `vllm` profile: the model over several


def compose_service(name: str = "fsrl") -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][name]


@pytest.mark.parametrize("name", SERVICES)
def test_compose_publishes_on_loopback_unless_told_otherwise(name):
    (port,) = compose_service(name)["ports"]
    assert port.startswith("${FSRL_BIND:-127.0.0.1}:")


@pytest.mark.parametrize("name", SERVICES)
def test_compose_requires_an_api_key_and_mounts_adapters_read_only(name):
    service = compose_service(name)
    assert re.fullmatch(r"\$\{FSRL_API_KEY:\?.+\}", service["environment"]["FSRL_API_KEY"])
    assert "./adapters:/adapters:ro" in service["volumes"]
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_the_vllm_profile_serves_on_vllm_over_several_gpus_with_a_pinned_vllm():
    service = compose_service("fsrl-vllm")
    assert service["profiles"] == ["vllm"] and service["environment"]["FSRL_ENGINE"] == "vllm"
    assert service["build"]["args"]["WITH_VLLM"] == "1"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert '"vllm==0.32.0"' in (REPO / "Dockerfile").read_text()


def test_the_image_runs_as_a_user_on_pinned_versions():
    lines = [line.split("#")[0].strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    base = next(line for line in lines if line.startswith("FROM "))
    assert re.fullmatch(r"FROM python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    assert any('"torch==' in line for line in lines if line.startswith("RUN "))
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")


@pytest.mark.parametrize("name", SERVICES)
def test_compose_serves_a_model_and_sae_the_user_names_offline_unless_told(name):
    env = compose_service(name)["environment"]
    assert env["FSRL_MODEL"] == "${FSRL_MODEL:-}" and env["FSRL_SAE"] == "${FSRL_SAE:-}"
    assert env["HF_HUB_OFFLINE"] == "${HF_HUB_OFFLINE:-1}" and env["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert "${FSRL_MODELS_DIR:-./models}:/models:ro" in compose_service(name)["volumes"]
    assert "HF_HOME=/cache/huggingface" in (REPO / "Dockerfile").read_text()  # the hub cache in the volume


def test_an_empty_variable_means_the_default(monkeypatch):
    from server.settings import Settings

    monkeypatch.setenv("FSRL_MODEL", "")
    monkeypatch.setenv("FSRL_SAE", "")
    settings = Settings()
    assert settings.model is None and settings.sae is None
