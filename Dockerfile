# syntax=docker/dockerfile:1
# The base image is pinned by tag, not yet by digest: this file was written on a machine that
# reaches no container registry, so no digest could be looked up (one copied from elsewhere
# unverified could name another image). Before a release, pin it where a registry answers:
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<that digest> .
# and write that value here as the default.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: the locked dependencies (every file checked against requirements.lock's hashes)
# and the project, into one virtualenv; compiled with a compiler we do not ship.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/delivery \
    && /opt/delivery/bin/pip install --no-cache-dir --require-hashes --no-deps \
        -r requirements.lock
# The wheel bundles migrations/ and runbooks/ (setup.py); chaos/, bench/ and tests/ stay out.
COPY pyproject.toml setup.py MANIFEST.in LICENSE README.md ./
COPY delivery ./delivery
COPY workers ./workers
COPY migrations ./migrations
COPY runbooks ./runbooks
# Built with the locked setuptools (the lock holds the build requirements too), not a fresh one.
RUN /opt/delivery/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/delivery/bin/pip check

# Runtime stage: slim, no compiler, a numeric non-root user (so `runAsNonRoot` can verify it).
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/delivery/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DELIVERY_ADMIN_HOST=0.0.0.0 \
    DELIVERY_ADMIN_PORT=9600 \
    DELIVERY_LOG_FORMAT=json \
    DELIVERY_ALLOW_PRIVATE_TARGETS=false
RUN groupadd --system --gid 10001 delivery \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home delivery
COPY --from=build /opt/delivery /opt/delivery
WORKDIR /app
USER 10001:10001
EXPOSE 9600
# /healthz answers while the event loop runs; orchestrators use /readyz for traffic decisions.
# With DELIVERY_ADMIN_PORT=0 the check says so and passes: liveness is then the process itself.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-m", "delivery.ops.healthcheck"]
ENTRYPOINT ["delivery"]
CMD ["run"]
