# syntax=docker/dockerfile:1
# Build stage: compile wheels (asyncpg, uvloop, orjson) once, with a compiler we do not ship.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY delivery ./delivery
COPY workers ./workers
COPY chaos ./chaos
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim, no compiler, non-root.
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DELIVERY_ADMIN_PORT=9600 \
    DELIVERY_LOG_FORMAT=json \
    DELIVERY_MIGRATIONS_DIR=/app/migrations \
    DELIVERY_ALLOW_PRIVATE_TARGETS=false
RUN groupadd --system delivery && useradd --system --gid delivery --home /app delivery
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY migrations ./migrations
USER delivery
EXPOSE 9600
# /healthz answers while the event loop runs; orchestrators use /readyz for traffic decisions.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DELIVERY_ADMIN_PORT', '9600'), timeout=2)"]
ENTRYPOINT ["delivery"]
CMD ["run"]
