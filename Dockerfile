# syntax=docker/dockerfile:1
# lrserve server image: python:3.11-slim, two stages (the build stage keeps pip caches and
# build tooling out of the runtime image), runs as an unprivileged user.
#
#   docker build -t lrserve .
#   docker run -p 8000:8000 -e LRSERVE_TOKEN=secret -v lrserve-data:/var/lib/lrserve lrserve

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtual environment is the unit copied into the runtime stage: everything installed, nothing else.
RUN python -m venv /opt/lrserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
RUN /opt/lrserve/bin/pip install ".[server,postgres]"

FROM python:3.11-slim
ENV PATH=/opt/lrserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LRSERVE_HOST=0.0.0.0 \
    LRSERVE_PORT=8000 \
    LRSERVE_DATABASE=sqlite:////var/lib/lrserve/lrserve.db
# A fixed uid/gid so that volumes can be chowned from outside; no login shell, no home contents.
RUN groupadd --system --gid 10001 lrserve \
    && useradd --system --uid 10001 --gid lrserve --no-create-home --shell /usr/sbin/nologin lrserve \
    && install -d -o lrserve -g lrserve -m 0750 /var/lib/lrserve
COPY --from=build /opt/lrserve /opt/lrserve
USER lrserve:lrserve
WORKDIR /var/lib/lrserve
# The default SQLite database lives here; with PostgreSQL (LRSERVE_DATABASE=postgresql://...) it stays empty.
VOLUME ["/var/lib/lrserve"]
EXPOSE 8000
# slim has no curl: probe /healthz with the standard library. Any non-2xx or a refused connection
# raises, so the exit status is 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LRSERVE_PORT', '8000'), timeout=2)"]
# The token comes from the environment (LRSERVE_TOKEN, and LRSERVE_READ_TOKEN for read-only
# clients); it is never baked into the image.
CMD ["lrserve", "serve", "--host", "0.0.0.0"]
