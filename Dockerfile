# The cachefs image: the node daemon, the CSI plugin and the CLI (`cachefs`), as the
# Helm chart in charts/cachefs runs them.
#
#   docker build -t registry.example.com/cachefs:0.1.0 .
#
# The image's user is unprivileged (uid 10001): the CLI and the prefetch Jobs run as
# it. The chart runs the node daemon as root without capabilities (it owns the cache's
# host directories) and only the CSI plugin privileged (it mounts views into pods).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/cachefs
WORKDIR /src
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
# Empty packages stand in for the code (node/ and csi/ install as cachefs.node and
# cachefs.csi: pyproject.toml lists every package).
RUN for package in cachefs cachefs/proto cachefs/loaders node node/origins node/cluster node/store node/models \
        csi csi/proto; do mkdir -p "$package" && touch "$package/__init__.py"; done \
    && /opt/cachefs/bin/pip install '.[node]' \
    && /opt/cachefs/bin/pip uninstall --yes cachefs
COPY cachefs ./cachefs
COPY node ./node
COPY csi ./csi
RUN /opt/cachefs/bin/pip install --no-deps . \
    && /opt/cachefs/bin/cachefs --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cachefs" \
      org.opencontainers.image.description="A model-weight cache for Kubernetes: node daemon, CSI plugin, CLI" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cachefs \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin cachefs \
    && mkdir -p /var/cache/cachefs /run/cachefs /etc/cachefs /var/lib/cachefs/csi
COPY --from=build /opt/cachefs /opt/cachefs
ENV PATH=/opt/cachefs/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# gRPC (token required; the health service without), Prometheus metrics.
EXPOSE 7070 9090
ENTRYPOINT ["cachefs"]
CMD ["--help"]
