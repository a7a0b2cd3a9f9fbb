"""docker-compose.yml, the Dockerfile and .dockerignore are for users (no docker engine runs here):
parse them and check them against the worker's configuration model, the CLI and each other."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SERVICES = ("worker", "writer")  # services that run the image built from the Dockerfile
ONE_SHOT_CONDITION = "service_completed_successfully"


# --------------------------------------------------------------------------------------------
# parsing helpers


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instrs = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instrs) if ins == "FROM")
    return instrs[last_from:]


def dockerfile_env() -> dict[str, str]:
    """The runtime image's ENV (final stage)."""
    env: dict[str, str] = {}
    for ins, args in final_stage():
        if ins == "ENV":
            tokens = shlex.split(args)
            if "=" not in tokens[0]:  # legacy "ENV key value"
                env[tokens[0]] = " ".join(tokens[1:])
            else:
                env.update(t.split("=", 1) for t in tokens)
    return env


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (fails for shell form)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerfile_healthcheck() -> list[str]:
    checks = [args for ins, args in final_stage() if ins == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK in the runtime stage"
    match = re.match(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(\[.*\])\s*$", checks[0], re.S)
    assert match, f"HEALTHCHECK must be `[--options] CMD [exec form]`: {checks[0]}"
    return exec_form(match.group(2))


def container_env(name: str) -> dict[str, str]:
    """What the container's process sees: the image's ENV (for image services), then compose's."""
    env = dockerfile_env() if name in IMAGE_SERVICES else {}
    env.update(env_of(services()[name]))
    return env


def mounted_host_file(service: dict[str, Any], container_path: str) -> Path:
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if target == container_path:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {container_path}: {service.get('volumes')}")


def settings_of(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load the settings the way the container would: its DDB_CDC_* env + the mounted config file."""
    for key in [k for k in os.environ if k.startswith("DDB_CDC_")]:
        monkeypatch.delenv(key)
    env = container_env(name)
    for key, value in env.items():
        if key.startswith("DDB_CDC_") and key != "DDB_CDC_CONFIG":
            monkeypatch.setenv(key, value)
    config = env.get("DDB_CDC_CONFIG")
    assert config, f"{name}: DDB_CDC_CONFIG is not set"
    return load_settings(mounted_host_file(services()[name], config))


def container_ports(service: dict[str, Any]) -> dict[int, tuple[str | None, int | None]]:
    """container port -> (host ip, host port) for each ``ports`` entry (short syntax)."""
    out = {}
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        container = int(parts[-1])
        host_port = int(parts[-2]) if len(parts) >= 2 else None
        host_ip = parts[-3] if len(parts) == 3 else None
        out[container] = (host_ip, host_port)
    return out


def assert_service_address(url: str, what: str) -> str:
    """``url``'s host is a compose service and its port one the service's container listens on."""
    parts = urlsplit(url)
    assert parts.hostname in services(), f"{what}: host {parts.hostname!r} is not a compose service"
    assert parts.port in container_ports(services()[parts.hostname]), (
        f"{what}: port {parts.port} is not a container port of service {parts.hostname!r}")
    return parts.hostname


def duration_s(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        total += float(number) * units[unit]
    return total


def script(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def one_shot_services() -> set[str]:
    return {dep for svc in services().values() for dep, cond in (svc.get("depends_on") or {}).items()
            if cond.get("condition") == ONE_SHOT_CONDITION}


def health_url(command: list[str]) -> str:
    assert command[0] in ("CMD", "python") or command[:2] == ["CMD", "python"], command
    code = command[-1]
    urls = re.findall(r"https?://[^'\"\s]+", code)
    assert len(urls) == 1, code
    return urls[0]


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def compose_schema() -> dict[str, Any]:
    try:
        from importlib.resources import files

        text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except ModuleNotFoundError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("check-jsonschema (test extra) is not installed", pytrace=False)
        pytest.skip("check-jsonschema (which vendors the Compose Specification schema) is not installed")
    return json.loads(text)


def test_compose_file_is_valid_against_the_compose_specification_schema():
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # the schema is not vacuous: a misspelt key and a bad depends_on condition are refused
    broken = compose()
    broken["services"]["worker"]["stop_grace_periode"] = "45s"
    broken["services"]["writer"]["depends_on"]["init"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_ddb_cdc_variable_names_a_settings_field():
    names = {("Dockerfile", k) for k in dockerfile_env()}
    names |= {(svc, k) for svc, spec in services().items() for k in env_of(spec)}
    checked = 0
    for where, key in sorted(names):
        if not key.startswith("DDB_CDC_") or key == "DDB_CDC_CONFIG":
            continue
        model: Any = Settings
        for part in key[len("DDB_CDC_"):].lower().split("__"):
            assert isinstance(model, type) and issubclass(model, BaseModel), f"{where}: {key}: {part} is not a section"
            assert part in model.model_fields, f"{where}: {key} names no settings field ({part!r})"
            model = model.model_fields[part].annotation
        checked += 1
    assert checked >= 8


def test_worker_settings_load_and_every_address_points_at_a_compose_service(monkeypatch):
    settings = settings_of("worker", monkeypatch)
    svc = services()
    # AWS: the LocalStack service and its container port, for every AWS client of the worker
    assert assert_service_address(settings.aws.endpoint_url, "aws.endpoint_url") == "localstack"
    for service in ("dynamodb", "dynamodbstreams", "s3"):
        assert settings.aws.endpoint_for(service) == settings.aws.endpoint_url
    assert settings.aws.region == env_of(svc["init"])["AWS_DEFAULT_REGION"]
    sinks = {s.type: s for s in settings.sinks}
    assert set(sinks) == {"opensearch", "s3_audit", "redis_cache"}
    for host in sinks["opensearch"].options["hosts"]:
        assert assert_service_address(host, "opensearch hosts") == "opensearch"
    assert assert_service_address(sinks["redis_cache"].options["url"], "redis_cache url") == "redis"
    assert "endpoint_url" not in sinks["s3_audit"].options  # the aws endpoint: LocalStack
    # metrics: served on all interfaces of the container, on the port compose publishes (loopback only)
    assert settings.metrics.enabled is True
    assert settings.metrics.host == "0.0.0.0"
    published = container_ports(svc["worker"])
    assert settings.metrics.port in published, published
    assert published[settings.metrics.port] == ("127.0.0.1", settings.metrics.port)
    exposed = [int(p.split("/")[0]) for ins, args in final_stage() if ins == "EXPOSE" for p in args.split()]
    assert settings.metrics.port in exposed
    # every published port of the stack is bound to loopback
    for name, spec in svc.items():
        for container, (host_ip, _) in container_ports(spec).items():
            assert host_ip == "127.0.0.1", f"{name}: port {container} is published on all interfaces"


def test_the_sink_options_load_with_the_sink_models(monkeypatch):
    from pipeline.registry import build_sinks

    settings = settings_of("worker", monkeypatch)
    built = build_sinks(settings.sinks, "examples/compose-config.yaml")  # validates options, connects nothing
    assert [s.name for s in built] == [s.name for s in settings.sinks]


def test_init_creates_the_table_the_bucket_and_the_index_the_worker_uses(monkeypatch):
    from connectors.embedded.workload import TABLE_ATTRIBUTES, TABLE_KEY_SCHEMA

    settings = settings_of("worker", monkeypatch)
    svc = services()
    init = script(svc["init"])
    table = settings.source.table
    assert f"--endpoint-url {settings.aws.endpoint_url} dynamodb create-table --table-name {table} " in init
    assert "StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES" in init
    # the key schema of the demo writer's items (connectors.embedded.workload)
    attrs = " ".join(f"AttributeName={a['AttributeName']},AttributeType={a['AttributeType']}" for a in TABLE_ATTRIBUTES)
    keys = " ".join(f"AttributeName={k['AttributeName']},KeyType={k['KeyType']}" for k in TABLE_KEY_SCHEMA)
    assert f"--attribute-definitions {attrs} " in init and f"--key-schema {keys} " in init
    assert f"dynamodb wait table-exists --table-name {table}" in init
    # the audit bucket and the dead-letter bucket
    buckets = {s.options["bucket"] for s in settings.sinks if s.type == "s3_audit"}
    buckets.add(urlsplit(settings.dead_letter.s3_uri).netloc)
    for bucket in buckets:
        assert f"s3 mb s3://{bucket}" in init, bucket
    # the opensearch sink sets up its own template, alias and first index version (no step may
    # create a bare index of the alias's name: the sink would refuse to write to it)
    search = next(s for s in settings.sinks if s.type == "opensearch")
    index = search.options.get("index", "{table}").format(table=table).lower()
    assert search.options["index_settings"]["index.number_of_replicas"] == 0  # a single-node cluster
    for name, spec in svc.items():
        assert f"/{index} " not in script(spec) and f"/{index}'" not in script(spec), name
    # the worker starts only after the init step finished successfully
    assert svc["worker"]["depends_on"]["init"] == {"condition": ONE_SHOT_CONDITION}
    assert svc["init"].get("restart") == "no"
    # same credentials and region for init, worker and writer (LocalStack scopes data by both)
    aws_env = {k: v for k, v in env_of(svc["init"]).items() if k.startswith("AWS_")}
    for name in IMAGE_SERVICES:
        assert {k: container_env(name).get(k) for k in aws_env} == aws_env, name


def test_cache_key_templates_match_the_demo_writers_items(monkeypatch):
    from connectors.embedded.workload import Workload

    settings = settings_of("worker", monkeypatch)
    item = Workload(seed=1).item(3)
    templates = next(s for s in settings.sinks if s.type == "redis_cache").options["key_templates"]
    for template in templates:
        for name in re.findall(r"{(\w+)}", template):
            assert name in item, f"{template}: the workload's items have no attribute {name!r}"


def test_healthchecks_and_depends_on(monkeypatch):
    svc = services()
    one_shot = one_shot_services()
    assert one_shot == {"init"}
    valid = {"service_started", "service_healthy", ONE_SHOT_CONDITION}
    for name, spec in svc.items():
        health = spec.get("healthcheck")
        if name in one_shot:
            assert health is None, f"{name}: a one-shot step needs no healthcheck"
        elif health == {"disable": True}:
            # only an image service that does not run the worker (it would inherit /healthz and fail)
            assert name in IMAGE_SERVICES and spec.get("entrypoint", [])[:2] != ["ddb-cdc", "run"], name
        else:
            assert health and health.get("test"), f"{name}: long-running service without a healthcheck"
        for dep, cond in (spec.get("depends_on") or {}).items():
            assert dep in svc, f"{name} depends on unknown service {dep!r}"
            assert cond.get("condition") in valid, (name, dep, cond)
            if cond["condition"] == "service_healthy":
                assert svc[dep].get("healthcheck", {}).get("test"), f"{name} waits for {dep} healthy, it has no check"
            if not spec.get("profiles"):  # `docker compose up` (no profile) must not need a profiled service
                assert not svc[dep].get("profiles"), f"{name} depends on profiled {dep}"


def test_profiles_dashboards_and_demo():
    svc = services()
    by_profile: dict[str, set[str]] = {}
    for name, spec in svc.items():
        for profile in spec.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert by_profile == {"dashboards": {"opensearch-dashboards"}, "demo": {"writer"}}
    default = {name for name, spec in svc.items() if not spec.get("profiles")}
    assert default == {"localstack", "opensearch", "redis", "init", "worker"}
    dashboards = svc["opensearch-dashboards"]
    assert json.loads(env_of(dashboards)["OPENSEARCH_HOSTS"]) == ["http://opensearch:9200"]
    assert env_of(svc["opensearch"])["DISABLE_SECURITY_PLUGIN"] == "true"
    assert env_of(svc["opensearch"])["discovery.type"] == "single-node"
    assert set(env_of(svc["localstack"])["SERVICES"].split(",")) >= {"dynamodb", "dynamodbstreams", "s3"}


def test_writer_runs_ddb_cdc_workload_against_the_workers_table(monkeypatch):
    from connectors.app.cli import build_parser

    svc = services()
    worker, writer = settings_of("worker", monkeypatch), settings_of("writer", monkeypatch)
    assert writer.aws.endpoint_url == worker.aws.endpoint_url and writer.aws.region == worker.aws.region
    assert svc["writer"]["build"] == svc["worker"]["build"] and svc["writer"]["image"] == svc["worker"]["image"]
    assert svc["writer"]["entrypoint"] == ["ddb-cdc", "workload"]
    args = build_parser().parse_args(svc["writer"]["entrypoint"][1:] + svc["writer"]["command"])
    assert args.command == "workload" and args.table == worker.source.table
    assert args.changes == 0 and args.rate and args.rate > 0  # until stopped, paced
    assert svc["writer"]["depends_on"]["init"] == {"condition": ONE_SHOT_CONDITION}


def test_worker_entrypoint_command_and_config_path_agree_with_the_dockerfile(monkeypatch):
    from connectors.app.cli import build_parser

    worker = services()["worker"]
    assert "build" in worker and worker["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    entrypoint = exec_form(next(args for ins, args in final_stage() if ins == "ENTRYPOINT"))
    assert worker.get("entrypoint", entrypoint) == entrypoint == ["ddb-cdc", "run"]
    assert "--config" not in " ".join(worker.get("command") or [])  # the path comes from $DDB_CDC_CONFIG
    path = dockerfile_env()["DDB_CDC_CONFIG"]
    assert env_of(worker).get("DDB_CDC_CONFIG", path) == path
    assert mounted_host_file(worker, path).is_file()
    monkeypatch.setenv("DDB_CDC_CONFIG", path)
    args = build_parser().parse_args(entrypoint[1:] + list(worker.get("command") or []))
    assert args.command == "run" and args.config == path


def test_stop_grace_period_exceeds_the_workers_shutdown_grace(monkeypatch):
    settings = settings_of("worker", monkeypatch)
    worker = services()["worker"]
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    grace = duration_s(worker["stop_grace_period"])
    assert grace >= settings.worker.shutdown_grace_s + 10, (grace, settings.worker.shutdown_grace_s)


# --------------------------------------------------------------------------------------------
# the health check (Dockerfile and compose) and the health endpoint


class _Probe:
    def __init__(self, healthy: bool):
        self._healthy = healthy

    def healthy(self):
        return self._healthy, "ok" if self._healthy else "run loop stalled"

    def ready(self):
        return self._healthy, []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_check(command: list[str], port: int, configured: int) -> subprocess.CompletedProcess:
    argv = command[1:] if command[0] == "CMD" else command
    assert argv[0] == "python"
    code = argv[-1].replace(f":{configured}/", f":{port}/")
    return subprocess.run([sys.executable, *argv[1:-1], code], capture_output=True, text=True, timeout=30)


def test_healthchecks_hit_the_health_endpoint_the_config_serves_and_fail_on_503(monkeypatch):
    from pipeline.metrics import serve

    settings = settings_of("worker", monkeypatch)
    image_check = dockerfile_healthcheck()
    compose_check = services()["worker"]["healthcheck"]["test"]
    assert compose_check == ["CMD", *image_check]
    expected = f"http://127.0.0.1:{settings.metrics.port}/healthz"
    assert health_url(image_check) == health_url(compose_check) == expected

    port = _free_port()
    assert _run_check(image_check, port, settings.metrics.port).returncode == 1  # nothing listening
    for healthy, code in ((True, 0), (False, 1)):
        server = serve("127.0.0.1", port, probe=lambda h=healthy: _Probe(h))
        try:
            result = _run_check(image_check, port, settings.metrics.port)
        finally:
            server.shutdown()
            server.server_close()
        assert result.returncode == code, result.stderr
        if not healthy:
            assert "unhealthy" in result.stderr and "503" in result.stderr


# --------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_is_multistage_nonroot_wheel_installed_exec_entrypoint():
    instrs = dockerfile_instructions()
    froms = [args for ins, args in instrs if ins == "FROM"]
    assert len(froms) >= 2
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    build_stage = froms[0].split()[-1]
    assert froms[0].split()[1].upper() == "AS"
    first_stage = instrs[:[i for i, (ins, _) in enumerate(instrs) if ins == "FROM"][1]]
    assert any(ins == "RUN" and "pip wheel" in args for ins, args in first_stage)
    runtime = final_stage()
    install = [args for ins, args in runtime if ins in ("RUN", "COPY") and f"from={build_stage}" in args]
    assert install, "the runtime stage takes the wheels from the build stage"
    assert any("pip install --no-index" in args and "ddb-cdc" in args for ins, args in runtime if ins == "RUN")
    users = [i for i, (ins, _) in enumerate(runtime) if ins == "USER"]
    assert users, "no USER"
    user = runtime[users[-1]][1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root user"
    last_run = max(i for i, (ins, _) in enumerate(runtime) if ins == "RUN")
    entry = [i for i, (ins, _) in enumerate(runtime) if ins == "ENTRYPOINT"]
    assert last_run < users[-1] < entry[-1], "install as root, then switch user, then the entrypoint"
    assert exec_form(runtime[entry[-1]][1]) == ["ddb-cdc", "run"]  # exec form: SIGTERM reaches ddb-cdc
    assert not any(ins == "CMD" for ins, _ in runtime)
    assert dockerfile_healthcheck()[0] == "python"
    assert [args for ins, args in runtime if ins == "STOPSIGNAL"] == ["SIGTERM"]
    env = dockerfile_env()
    assert env["DDB_CDC_CONFIG"].startswith("/")
    assert env["DDB_CDC_METRICS__ENABLED"] == "true" and env["DDB_CDC_METRICS__HOST"] == "0.0.0.0"
    labels = " ".join(args for ins, args in runtime if ins == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_the_wheels_inputs_and_nothing_else():
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _dockerignore_regex(line.lstrip("!"))))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copied = [args.split()[0] for ins, args in dockerfile_instructions() if ins == "COPY" and "--from" not in args]
    sources = [s for args in (a for ins, a in dockerfile_instructions() if ins == "COPY" and "--from" not in a)
               for s in args.split()[:-1]]
    assert copied and set(sources) == {"pyproject.toml", "README.md", "pipeline", "connectors"}
    for path in tracked:
        needed = any(path == s or path.startswith(s + "/") for s in sources)
        assert dockerignored(path, rules) != needed, f"{path}: {'left out of' if needed else 'sent in'} the context"
    for path in (".git/config", "pipeline/__pycache__/cli.cpython-311.pyc", ".cache/x", "dead-letter/a.json"):
        assert dockerignored(path, rules), path


def test_pyproject_declares_console_script_and_entry_points():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["name"] == "ddb-cdc"
    assert data["project"]["scripts"]["ddb-cdc"] == "connectors.app.cli:main"
    assert data["project"]["requires-python"] == ">=3.11"
    eps = data["project"]["entry-points"]["ddb_cdc.sinks"]
    assert set(eps) == {"opensearch", "s3_audit", "redis_cache"}
    assert "test" in data["project"]["optional-dependencies"]
