# syntax=docker/dockerfile:1
# The Stavily Orchestrator (and its reference agent: same image, `stavily agent run`).
#
#   docker build -t stavily-orchestrator .
#   docker run --rm -p 127.0.0.1:8700:8700 \
#     -e STAVILY_BOOTSTRAP_TOKEN=stv_$(openssl rand -hex 32) \
#     -v stavily-data:/var/lib/stavily/data stavily-orchestrator
#
# Without STAVILY_DATABASE_URL the server runs on SQLite in STAVILY_DATA_DIR (mount a volume
# there); compose.yaml runs it on PostgreSQL with two agents.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: install the package and its dependencies into a virtual environment ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install .

# -- runtime: the environment alone, run by an unprivileged user ---------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="Stavily Orchestrator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STAVILY_HOST=0.0.0.0 \
    STAVILY_PORT=8700 \
    STAVILY_DATA_DIR=/var/lib/stavily/data
RUN groupadd --system --gid 10001 stavily \
 && useradd --system --uid 10001 --gid stavily --home-dir /var/lib/stavily \
      --shell /usr/sbin/nologin stavily \
 && mkdir -p /var/lib/stavily/data /var/lib/stavily/agents \
 && chown -R stavily:stavily /var/lib/stavily \
 && chmod 0700 /var/lib/stavily/data /var/lib/stavily/agents
COPY --from=build /opt/venv /opt/venv
# The example plugins (echo, system-info), for agents run from this image.
COPY src/stavily/examples/plugins /opt/stavily/plugins
USER stavily:stavily
WORKDIR /var/lib/stavily
EXPOSE 8700
# No curl in slim images: Python's urllib (a non-2xx answer or no answer exits non-zero).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${STAVILY_PORT:-8700}/healthz', timeout=4)" || exit 1
ENTRYPOINT ["stavily"]
# Binds STAVILY_HOST (0.0.0.0 in the container) and STAVILY_PORT.
CMD ["serve"]
