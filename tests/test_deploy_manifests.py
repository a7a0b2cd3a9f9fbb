"""deploy/kubernetes/ (issue 18 item 2), offline:

- every built-in object validates against the Kubernetes API schemas (``kubernetes-validate``,
  strict: unknown fields are errors) of several Kubernetes versions;
- the KEDA ScaledObject and the ServiceMonitor validate against the OpenAPI schemas of their CRDs,
  vendored in tests/data/crds (SOURCES.md), made strict (unknown fields are errors, as
  ``kubectl --validate=strict`` reports them);
- cross-references: kustomization lists every file; labels and selectors, names (ServiceAccount,
  ConfigMap, Secret key, scale target), ports (container port = metrics.port = Service target =
  ServiceMonitor port), probe paths served by the health app, DDB_CDC_* env names vs the settings
  model, terminationGracePeriodSeconds above worker.shutdown_grace_s, non-root uid = the image's,
  the KEDA query's metric exists and maxReplicaCount ≤ the stated open shard count.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
CRDS = Path(__file__).resolve().parent / "data" / "crds"
KUBERNETES_VERSIONS = ["1.29.0", "1.33.0", "1.37.0"]


def settings_field_for_env(name: str) -> Any:
    """The settings field a ``DDB_CDC_A__B`` variable sets (pydantic FieldInfo), or None."""
    if not name.startswith(ENV_PREFIX):
        return None
    model: Any = Settings
    info = None
    for part in name[len(ENV_PREFIX):].lower().split("__"):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        annotation = info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return info


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "kustomization.yaml must list every manifest"
    out = {}
    for name in files:
        for doc in _load(K8S / name):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _one(objects, kind: str) -> dict:
    (obj,) = [o for (k, _), o in objects.items() if k == kind]
    return obj


def _pod(objects) -> dict:
    return _one(objects, "Deployment")["spec"]["template"]


def _container(objects) -> dict:
    (container,) = _pod(objects)["spec"]["containers"]
    return container


# -- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_against_the_kubernetes_schemas(objects, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    checked = []
    for (kind, name), obj in objects.items():
        if obj["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
            continue
        kv.validate(obj, version, strict=True)
        checked.append(kind)
    assert sorted(checked) == ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Service",
                               "ServiceAccount"]


def test_the_kubernetes_validator_is_strict():
    kv = pytest.importorskip("kubernetes_validate")
    deployment = _load(K8S / "deployment.yaml")[0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz",
                                                                                      "port": 9108}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with ``additionalProperties: false`` wherever properties are listed
    and unknown fields are not explicitly kept (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(crd_file: str, api_version: str):
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("kind, crd_file", [("ScaledObject", "keda.sh_scaledobjects.yaml"),
                                            ("ServiceMonitor", "monitoring.coreos.com_servicemonitors.yaml")])
def test_custom_resources_validate_against_their_crd_schemas(objects, kind, crd_file):
    obj = _one(objects, kind)
    validator = _crd_validator(crd_file, obj["apiVersion"])
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # and the strict schema catches a typo
    broken = copy.deepcopy(obj)
    broken["spec"]["maxReplicas" if kind == "ScaledObject" else "endpoint"] = 3
    assert list(validator.iter_errors(broken))


# -- cross-references ----------------------------------------------------------------------------


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _effective_settings(objects, monkeypatch, tmp_path) -> Settings:
    """The settings a pod would load: the ConfigMap's file at DDB_CDC_CONFIG, the Deployment's
    literal env vars, a sample sinks JSON for the Secret."""
    config_map = _one(objects, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    for name in [n for n in list(__import__("os").environ) if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in _env(_container(objects)).items():
        if not name.startswith(ENV_PREFIX) or name == "DDB_CDC_CONFIG":
            continue
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
        elif "secretKeyRef" in value:
            monkeypatch.setenv(name, json.dumps([{"name": "search", "type": "opensearch",
                                                  "options": {"hosts": ["https://s:9200"], "index": "orders"}}]))
        elif "fieldRef" in value:
            monkeypatch.setenv(name, "ddb-cdc-7d9f-abcde")
    return load_settings(path)


def test_env_var_names_are_settings_fields(objects):
    for name in _env(_container(objects)):
        if name.startswith(ENV_PREFIX) and name != "DDB_CDC_CONFIG":
            assert settings_field_for_env(name) is not None, f"{name} names no field of the settings model"


def test_config_ports_probes_and_grace(objects, monkeypatch, tmp_path):
    settings = _effective_settings(objects, monkeypatch, tmp_path)
    pod, container = _pod(objects), _container(objects)
    # the config file is where DDB_CDC_CONFIG says, from the ConfigMap's key
    config_path = Path(_env(container)["DDB_CDC_CONFIG"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == _one(objects, "ConfigMap")["metadata"]["name"]
    assert config_path.name in _one(objects, "ConfigMap")["data"]
    # ports: container port = metrics.port, bound on all interfaces; Service and ServiceMonitor use it by name
    assert settings.metrics.enabled and settings.metrics.host == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == settings.metrics.port and port["name"] == "metrics"
    service = _one(objects, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    monitor = _one(objects, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # probes: the paths the health app answers with its JSON status, on the metrics port
    from pipeline.metrics import health_app

    class Probe:
        def healthy(self):
            return True, "ticking"

        def ready(self):
            return True, []

    app = health_app(lambda: Probe())
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics"
        status: list[str] = []
        body = json.loads(b"".join(app({"PATH_INFO": get["path"], "REQUEST_METHOD": "GET"},
                                       lambda s, h: status.append(s))))
        assert status == ["200 OK"] and body["status"] in ("ok", "ready")
    # the startup probe waits at least as long as the sinks are retried at start
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.worker.sink_open_timeout_s
    # SIGTERM → drain within worker.shutdown_grace_s; the kubelet must wait longer before SIGKILL
    assert pod["spec"]["terminationGracePeriodSeconds"] >= settings.worker.shutdown_grace_s + 10
    # read-only root filesystem: dead letters go to S3 (a local directory would be the emptyDir)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert settings.dead_letter.s3_uri
    assert settings.worker.id == "ddb-cdc-7d9f-abcde"  # the pod name names the lease owner


def test_names_labels_and_selectors_line_up(objects):
    deployment, pod = _one(objects, "Deployment"), _pod(objects)
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert _one(objects, "Service")["spec"]["selector"].items() <= labels.items()
    assert _one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service_labels = _one(objects, "Service")["metadata"]["labels"]
    assert _one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    account = _one(objects, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    target = _one(objects, "ScaledObject")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # the Secret is referenced, never shipped
    assert "Secret" not in {k for k, _ in objects}
    refs = [v["secretKeyRef"] for v in _env(_container(objects)).values() if isinstance(v, dict) and "secretKeyRef" in v]
    assert refs and all(r["key"] and r["name"] for r in refs)


def test_pod_runs_as_the_image_user_non_root(objects):
    pod = _pod(objects)["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, flags=re.M)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user
    container = _container(objects)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_scaling_on_lag_uses_an_existing_metric_and_caps_replicas_at_the_shard_count(objects):
    scaled = _one(objects, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    names = set(re.findall(r"\b(ddb_cdc_[a-z_]+)\b", trigger["metadata"]["query"]))
    assert names == {"ddb_cdc_shard_iterator_age_seconds"}
    metrics_source = (ROOT / "pipeline" / "metrics.py").read_text()
    assert all(f'"{n}"' in metrics_source for n in names)
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= int(scaled["metadata"]["annotations"]["ddb-cdc.io/open-shards"])
    # the ServiceMonitor's labels are what a Prometheus selects; the query's server is in-cluster
    assert trigger["metadata"]["serverAddress"].startswith("http://")
