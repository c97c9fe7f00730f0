# edgeproxy: a lean proxy for LLM API traffic.
#
#   docker build -t edgeproxy .
#   docker run -d --name edgeproxy -p 8787:8787 -p 127.0.0.1:8788:8788 \
#     -e EDGEPROXY_TOKEN="$(openssl rand -hex 24)" --stop-timeout 45 edgeproxy
#
# The install is the README's ("The two commands"), in a venv at /opt/edgeproxy and without -e:
# the image keeps the installed package, not the source tree.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/edgeproxy/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeproxy ./edgeproxy
RUN python3 -m venv /opt/edgeproxy && /opt/edgeproxy/bin/pip install . && rm -rf /src
WORKDIR /

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin edgeproxy

# Listens on 0.0.0.0, so a strong EDGEPROXY_TOKEN (openssl rand -hex 24) must be set at `docker run`.
# Mount your own file here to configure keys, lines, limits (docs/config.md).
COPY docker/edgeproxy.yaml /etc/edgeproxy/edgeproxy.yaml

USER edgeproxy

# 8787: clients (x-edgeproxy-token required). 8788: admin (/metrics, /-/healthy, /-/status):
# publish it on the host's loopback or a private network only.
EXPOSE 8787 8788

# No curl in the slim image: python's urllib checks /-/healthy (exit 1 on error or non-2xx).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8788/-/healthy', headers={'x-edgeproxy-token': os.environ.get('EDGEPROXY_TOKEN', '')}), timeout=2)"]

# SIGTERM drains: in-flight requests and streams get drain_timeout (30 s) to finish. docker stop
# sends SIGKILL after 10 s unless run with --stop-timeout 45 (compose: stop_grace_period: 45s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/edgeproxy/bin/edgeproxy"]
CMD ["run", "-c", "/etc/edgeproxy/edgeproxy.yaml"]
