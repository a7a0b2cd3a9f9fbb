# syntax=docker/dockerfile:1
# ddb-cdc worker image: multi-stage, slim Python base, non-root, installed from the wheel.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DDB_CDC_CONFIG=/etc/ddb-cdc/config.yaml
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/ddb-cdc --create-home ddbcdc
USER 10001
WORKDIR /var/lib/ddb-cdc
# Exec form: ddb-cdc is PID 1 and receives SIGTERM itself (it reads the config path from $DDB_CDC_CONFIG).
ENTRYPOINT ["ddb-cdc", "run"]
