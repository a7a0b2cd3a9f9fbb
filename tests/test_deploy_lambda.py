"""deploy/lambda/template.yaml (issue 18 item 1): cfn-lint (with the SAM transform, every rule
including informational ones) finds nothing; the template's handler, environment variables and
event source mapping match the code (settings model, LambdaOptions, fail-fast contract)."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

cfnlint_api = pytest.importorskip("cfnlint.api", reason="cfn-lint is in the test extra (pip install -e .[test])")

from connectors.aws_lambda.handler import LambdaOptions
from pipeline.config import ENV_PREFIX, Settings
from test_deploy_manifests import settings_field_for_env

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "lambda" / "template.yaml"


@pytest.fixture(scope="module")
def template() -> dict:
    data, problems = cfnlint_api.decode_str(TEMPLATE.read_text())
    assert not problems, problems
    return data


def test_cfn_lint_finds_nothing():
    matches = cfnlint_api.lint_all(TEMPLATE.read_text())
    assert matches == [], "\n".join(str(m) for m in matches)


def test_handler_is_the_entry_point(template):
    props = template["Resources"]["Function"]["Properties"]
    module, _, name = props["Handler"].rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
    # the build instructions target the template's runtime, which the project supports
    runtime = props["Runtime"]
    version = runtime.removeprefix("python")
    assert f"--python-version {version}" in TEMPLATE.read_text()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(int(p) for p in version.split(".")) >= tuple(int(p) for p in re.findall(r"\d+", requires)[:2])


def test_environment_variables_are_settings_fields(template):
    variables = template["Resources"]["Function"]["Properties"]["Environment"]["Variables"]
    lambda_fields = {f"DDB_CDC_LAMBDA_{name.upper()}" for name in LambdaOptions.model_fields}
    for name in variables:
        assert name.startswith(ENV_PREFIX), name
        if name.startswith("DDB_CDC_LAMBDA_"):
            assert name in lambda_fields, f"{name} is not a LambdaOptions field ({sorted(lambda_fields)})"
        else:
            assert settings_field_for_env(name) is not None, f"{name} names no field of the settings model"
    # the dead-letter destination must be S3 (the handler refuses a local directory)
    assert "DDB_CDC_DEAD_LETTER__S3_URI" in variables and "DDB_CDC_SOURCE__TABLE" in variables
    literal = {k: v for k, v in variables.items() if isinstance(v, str) and not k.startswith("DDB_CDC_LAMBDA_")}
    Settings.model_validate({"source": {"table": "t"}, "sinks": [{"name": "a", "type": "x"}],
                             **_nest(literal)})  # literal values are valid for their fields
    LambdaOptions.model_validate({k.removeprefix("DDB_CDC_LAMBDA_").lower(): v for k, v in variables.items()
                                  if k.startswith("DDB_CDC_LAMBDA_")})


def test_event_source_mapping_is_the_fail_fast_contract(template):
    props = template["Resources"]["Function"]["Properties"]
    (event,) = props["Events"].values()
    assert event["Type"] == "DynamoDB"
    mapping = event["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BisectBatchOnFunctionError"] is True
    for key in ("MaximumRetryAttempts", "MaximumRecordAgeInSeconds", "ParallelizationFactor", "StartingPosition",
                "BatchSize"):
        assert key in mapping, key
    assert mapping["DestinationConfig"]["OnFailure"]["Type"] == "SQS"
    # the function's default timeout leaves the delivery budget room after margin and flush reserve
    timeout = template["Parameters"]["FunctionTimeout"]["Default"]
    options = LambdaOptions.model_validate({"deadline_margin_s": 3, "flush_reserve_s": 10})
    writes, flush = options.budgets(float(timeout))
    assert writes >= 60 and flush == 10
    # the IAM policy can read the stream and write the dead letters
    statements = props["Policies"][0]["Statement"]
    actions = {a for s in statements for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert {"dynamodb:GetRecords", "dynamodb:GetShardIterator", "dynamodb:DescribeStream",
            "dynamodb:ListStreams", "s3:PutObject"} <= actions


def _nest(flat: dict[str, str]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out
