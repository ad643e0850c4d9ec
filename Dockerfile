# syntax=docker/dockerfile:1
# realtime-relay: one uvicorn worker per container; scale with replicas (deploy/README.md).
#
#   docker build -t realtime-relay .
#   docker run --rm -p 8000:8000 -e OPENAI_API_KEY realtime-relay
#
# The base is pinned to a Python patch release and a Debian release; bump both on purpose.

# --- builder: the dependencies from pyproject.toml alone, then the project, in a venv ----------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/relay

# Only pyproject.toml is copied here, so this layer is rebuilt when the dependencies change, not
# when the code does. Every dependency ships manylinux wheels, so no compiler is needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself, without its dependencies: this installs the `realtime-relay` command.
# Editable, so the code stays in /srv/relay, where app/main.py finds the page at ../static; a
# wheel would put app/ in site-packages without it. README.md is the package's long description.
# .dockerignore leaves app/local_upstream/ (the demo echo server) out of the context.
COPY README.md ./
COPY app/ ./app/
RUN pip install --no-cache-dir --no-deps --editable .

# --- runtime ------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

# libopus0: app/audio/codecs.py loads the system libopus (ctypes) for clients that ask for Opus.
# Versions are not pinned: the base tag pins the Debian release, and a point release removes the
# superseded package from the archive, which would break every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay

COPY --from=builder /opt/venv /opt/venv

# The venv's editable install points at /srv/relay/app; app/main.py finds the page at ../static.
WORKDIR /srv/relay
COPY app/ ./app/
COPY static/ ./static/
# Byte-compiled at build time: in Kubernetes the root filesystem is read-only.
RUN /opt/venv/bin/python -m compileall -q app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8000

# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000

# The slim image has no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8000'), timeout=2)"]

# SIGTERM starts the drain: /readyz turns 503, new sessions are refused, live ones are warned and
# closed with 1012 after RELAY_DRAIN_SECONDS. Give the container longer than that to stop.
STOPSIGNAL SIGTERM
# No --demo: without OPENAI_API_KEY the relay refuses to start and names the variable (and the
# image has no local upstream to fall back to).
CMD ["realtime-relay"]
