# modelgate's container image. Two stages: the first builds the gateway's wheel and a virtual
# environment with its runtime dependencies; the second copies that environment onto the same
# base, without pip, compilers or test dependencies, and runs it as a non-root user.
#
#   CPU (default):  docker build -t modelgate .
#   CUDA:           docker build -t modelgate:cuda \
#                     --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg ORT_PACKAGE=onnxruntime-gpu .
#
# BASE must provide python3 (>= 3.11) or apt-get to install it; docs/deployment.md explains
# the variants, the ports and the files the gateway expects.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS python
# Bases without Python (NVIDIA's CUDA images) get Debian/Ubuntu's; python:* and the test
# suite's Debian base already have it.
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python AS build
ARG ORT_PACKAGE=onnxruntime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret:
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt
# It is used by pip during the build only and never lands in a layer.
# Dependencies first, from pyproject.toml alone, so a source change reuses this layer.
COPY pyproject.toml /src/pyproject.toml
COPY deploy/container/requirements.py /src/deploy/container/requirements.py
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 /src/deploy/container/requirements.py /src/pyproject.toml "${ORT_PACKAGE}" \
      > /tmp/requirements.txt \
    && python3 -m venv /opt/modelgate \
    && /opt/modelgate/bin/pip install -r /tmp/requirements.txt
COPY . /src
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/modelgate/bin/pip wheel --no-deps --wheel-dir /wheels /src \
    && /opt/modelgate/bin/pip install --no-deps /wheels/modelgate-*.whl \
    && /opt/modelgate/bin/pip uninstall -y pip \
    && find /opt/modelgate -name __pycache__ -prune -exec rm -rf {} + \
    && /opt/modelgate/bin/python -m compileall -q /opt/modelgate/lib \
    && mkdir -p /models \
    && cp -r "$(/opt/modelgate/bin/python -c 'from gateway.settings import demo_store; print(demo_store())')"/. /models/

FROM python
LABEL org.opencontainers.image.title="modelgate" \
      org.opencontainers.image.description="KServe V2 / Triton gRPC gateway for ONNX models"
# A fixed numeric uid so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN (getent group modelgate || groupadd --system --gid 10001 modelgate) \
    && (getent passwd modelgate || useradd --system --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin modelgate)
COPY --from=build /opt/modelgate /opt/modelgate
# The demo store, replaced by mounting a real store on /models.
COPY --from=build --chown=10001:10001 /models /models
ENV PATH=/opt/modelgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MODELGATE_STORE=/models \
    MODELGATE_HOST=0.0.0.0 \
    MODELGATE_GRPC_PORT=8001 \
    MODELGATE_METRICS_PORT=8002 \
    MODELGATE_HTTP_PORT=8000
# KServe V2 HTTP/REST, gRPC, and the metrics / health port (/metrics, /healthz, /readyz).
EXPOSE 8000 8001 8002
USER 10001:10001
# Ready: every version the store says to serve is loaded (the metrics port's /readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/modelgate/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MODELGATE_METRICS_PORT', '8002'), timeout=2)"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself, then drains.
ENTRYPOINT ["/opt/modelgate/bin/modelgate"]
CMD ["serve"]
