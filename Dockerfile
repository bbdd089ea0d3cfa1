# One image for the four services; the command picks the service (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    POSTBUS_STATE_DIR=/var/lib/postbus

WORKDIR /app
# dependencies first (cached layer), then the code
COPY pyproject.toml ./
COPY services ./services
COPY schemas ./schemas
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/postbus postbus \
 && mkdir -p /var/lib/postbus \
 && chown postbus /var/lib/postbus

# run from /app: the services load their Avro schemas from /app/schemas
USER postbus
VOLUME ["/var/lib/postbus"]
CMD ["python", "-m", "services.api"]
