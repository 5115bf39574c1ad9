# syntax=docker/dockerfile:1
# Tidings image: docker build -t tidings:0.1.0 .
# Run: docker run -p 8000:8000 -e TIDINGS_AUTH__SECRET=... -e TIDINGS_API__KEYS=... tidings:0.1.0
# Configuration: /etc/tidings/tidings.toml (mount your own) and TIDINGS_* variables,
# which win over the file. See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a wheel of this tree, installed with its dependencies into /opt/tidings ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY deploy/docker/install.sh /usr/local/bin/tidings-install
# The same script tests/server/test_deploy_files.py runs: keep the install steps in it.
RUN sh /usr/local/bin/tidings-install /src /opt/tidings

# -- runtime: the virtual environment only, run as an unprivileged user ------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tidings \
    && useradd --system --uid 10001 --gid tidings --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tidings
COPY --from=build /opt/tidings /opt/tidings
COPY deploy/docker/tidings.toml /etc/tidings/tidings.toml
ENV PATH=/opt/tidings/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIDINGS_CONFIG=/etc/tidings/tidings.toml
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# 8000: /ws and /client/tidings.js (public); 9000: the server API, probes and metrics.
EXPOSE 8000 9000
# Liveness only (/healthz): readiness (/readyz) is the load balancer's business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=2)"]
# SIGTERM drains: /readyz fails, drain_delay passes, clients get 1001.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tidings", "serve"]
