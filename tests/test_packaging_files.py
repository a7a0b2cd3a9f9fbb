"""docker-compose.yml and the Dockerfile are for users (no docker engine runs here): parse and check them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from pipeline.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_worker_env_match_the_config_model(monkeypatch):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"localstack", "opensearch", "redis", "init", "worker"} <= set(services)
    for name in ("localstack", "opensearch", "redis"):
        assert "healthcheck" in services[name], name
    env = services["worker"]["environment"]
    # every DDB_CDC_* variable names a real settings field, and the whole set loads
    for key, value in env.items():
        if key.startswith("DDB_CDC_") and key != "DDB_CDC_CONFIG":
            section, _, field = key[len("DDB_CDC_"):].lower().partition("__")
            assert section in Settings.model_fields, key
            model = Settings.model_fields[section].annotation
            assert field in model.model_fields, key
            monkeypatch.setenv(key, str(value))
    mount = services["worker"]["volumes"][0].split(":")
    settings = load_settings(ROOT / mount[0])
    assert settings.source.table == "orders"
    assert settings.aws.endpoint_url == "http://localstack:4566"
    hosts = {s.name: s.options for s in settings.sinks}
    assert hosts["search"]["hosts"] == ["http://opensearch:9200"]
    assert hosts["cache"]["url"].startswith("redis://redis:")
    # the table the init step creates is the one the worker reads, with NEW_AND_OLD_IMAGES
    init = " ".join(services["init"]["command"])
    assert "--table-name orders" in init and "StreamViewType=NEW_AND_OLD_IMAGES" in init
    assert "s3 mb s3://ddb-cdc-audit" in init


def test_dockerfile_is_multistage_nonroot_exec_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert 'ENTRYPOINT ["ddb-cdc", "run"]' in text  # exec form: SIGTERM reaches the worker
    assert "pip wheel" in text


def test_pyproject_declares_console_script_and_entry_points():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["name"] == "ddb-cdc"
    assert data["project"]["scripts"]["ddb-cdc"] == "pipeline.cli:main"
    assert data["project"]["requires-python"] == ">=3.11"
    eps = data["project"]["entry-points"]["ddb_cdc.sinks"]
    assert set(eps) == {"opensearch", "s3_audit", "redis_cache"}
    assert "test" in data["project"]["optional-dependencies"]
