# syntax=docker/dockerfile:1
# ddb-cdc worker image: multi-stage, slim Python base, non-root, the project installed from its wheel.
#
#   docker build -t ddb-cdc .
#   docker run --rm -v "$PWD/config.yaml:/etc/ddb-cdc/config.yaml:ro" -p 127.0.0.1:9108:9108 ddb-cdc
#
# Signals: the entrypoint is exec form, so `ddb-cdc run` is PID 1 and receives SIGTERM from
# `docker stop` itself. It installs its own SIGTERM/SIGINT handlers first, before any AWS call
# (connectors/app/cli.py cmd_run; as PID 1 a signal without a handler is dropped by the kernel): during
# start-up (DescribeTable retrying an endpoint that does not answer) SIGTERM exits 0 at once;
# later it stops reading, flushes every sink, checkpoints, releases leases and exits 0 within
# worker.shutdown_grace_s (default 30 s). No init process (tini, --init) is needed; only the
# interpreter's own start (imports, well under a second) runs before the handlers exist. Give `docker stop -t` /
# compose's stop_grace_period more than worker.shutdown_grace_s, or the worker is SIGKILLed
# mid-flush (safe — delivery is at-least-once — but the tail is delivered again on restart).

# ---- build: the project's wheel and the wheels of its dependencies ----------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
RUN pip wheel --wheel-dir /wheels .

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ddb-cdc" \
      org.opencontainers.image.description="Change-data-capture worker for Amazon DynamoDB Streams: OpenSearch, S3 audit log, Redis cache invalidation and plugin sinks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DDB_CDC_CONFIG=/etc/ddb-cdc/config.yaml \
    DDB_CDC_METRICS__ENABLED=true \
    DDB_CDC_METRICS__HOST=0.0.0.0

# Install from the wheels only (no index): exactly what the build stage resolved.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels ddb-cdc \
    && groupadd --system --gid 10001 ddbcdc \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ddb-cdc --create-home \
       --shell /usr/sbin/nologin ddbcdc \
    && mkdir -p /etc/ddb-cdc /var/lib/ddb-cdc/dead-letter \
    && chown 10001:10001 /var/lib/ddb-cdc/dead-letter

# Numeric user, so Kubernetes' runAsNonRoot can verify it. The working directory is writable
# (a local dead-letter directory, a SQLite checkpoint file).
USER 10001:10001
WORKDIR /var/lib/ddb-cdc

# Dead letters must outlive the container, so the default dead-letter directory
# (dead_letter.directory "dead-letter", relative to the working directory: /var/lib/ddb-cdc/dead-letter)
# is a volume, never only the container's writable layer. Without a mount Docker creates an
# anonymous volume (kept by `docker rm`, deleted by `docker rm -v` / `compose down -v`): mount a
# named volume or a host directory to keep and find them, e.g.
#   -v ddb-cdc-dead-letter:/var/lib/ddb-cdc/dead-letter
# (a new named volume takes the directory's owner, uid 10001, from the image; a host directory
# must be writable by uid 10001). Declared after the last RUN: later build steps would not reach it.
# With dead_letter.s3_uri set the volume stays empty. A dead_letter.directory elsewhere is not covered.
VOLUME ["/var/lib/ddb-cdc/dead-letter"]

# /metrics, /healthz, /readyz (metrics.port; DDB_CDC_METRICS__HOST=0.0.0.0 above makes it reachable
# through a published port — publish it on 127.0.0.1 or a private network only).
EXPOSE 9108

# The slim image has no curl: Python's urllib, exec form. /healthz is 200 while the run loop ticks,
# 503 otherwise (urlopen raises for it). Change the URL if you change metrics.port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)\nexcept Exception as exc:\n    sys.exit(f'unhealthy: {exc}')"]

STOPSIGNAL SIGTERM
# Exec form: ddb-cdc is PID 1 and receives SIGTERM itself; the config path comes from
# $DDB_CDC_CONFIG (`run --config` defaults to it). Extra arguments (`--processes auto`) go after
# the image name; the supervisor then forwards SIGTERM to its workers.
ENTRYPOINT ["ddb-cdc", "run"]
