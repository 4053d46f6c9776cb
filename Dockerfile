# lrserve server image: two stages on python:3.11-slim. The build stage installs the server into a
# virtual environment; only that environment is copied into the runtime stage, which runs as an
# unprivileged user and needs no writable path but its data volume and /tmp.
#
#   docker build -t lrserve .
#   docker run --read-only --tmpfs /tmp -p 8000:8000 -e LRSERVE_TOKEN=secret \
#       -v lrserve-data:/var/lib/lrserve lrserve
#
# No "# syntax=" line on purpose: the builder's own Dockerfile frontend is used, so a build needs
# no registry beyond the base image (which PYTHON_IMAGE can name: a mirror or a local stand-in).
# Behind a package mirror or a TLS-inspecting proxy (BuildKit, the default since Docker 23):
#
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example/simple \
#       --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt -t lrserve .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# pip reads these from the environment; unset unless given with --build-arg, and never part of
# the runtime stage.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lrserve
WORKDIR /src
# The CA bundle is an optional build secret: it is mounted for each pip command and is in no
# layer. The dependencies come first, in a layer of their own (read from pyproject.toml), so a
# change to the source does not download them again.
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/lrserve/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extra['server'] + extra['postgres']))" >/tmp/requirements.txt \
    && /opt/lrserve/bin/pip install -r /tmp/requirements.txt
COPY service ./service
COPY clients ./clients
# Then lrserve itself; ".[server,postgres]" finds every dependency installed. pip and setuptools
# leave the environment afterwards: nothing at run time uses them. The bytecode pip compiled
# stays: with a read-only root file system nothing could be cached later.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/lrserve/bin/pip install ".[server,postgres]" \
    && /opt/lrserve/bin/pip uninstall -y -q pip setuptools wheel \
    && /opt/lrserve/bin/python -c "import service, lrserve, uvicorn, psycopg, psycopg_pool"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/lrserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LRSERVE_HOST=0.0.0.0 \
    LRSERVE_PORT=8000 \
    LRSERVE_DATABASE=sqlite:////var/lib/lrserve/lrserve.db
# The base interpreter's own pip, setuptools, wheel and ensurepip bundles are unused at run time:
# remove them, so that nothing in the container can install packages. A fixed uid/gid lets
# volumes be chowned from outside; no login shell, no home.
RUN set -eu; \
    py=$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])'); \
    for d in /usr/local/lib/$py/site-packages /usr/lib/python3/dist-packages; do \
        rm -rf $d/pip $d/pip-* $d/setuptools $d/setuptools-* $d/wheel $d/wheel-* \
            $d/_distutils_hack $d/distutils-precedence.pth $d/pkg_resources; \
    done; \
    rm -rf /usr/local/lib/$py/ensurepip /usr/lib/$py/ensurepip /usr/share/python-wheels \
        /usr/local/bin/pip /usr/local/bin/pip3*; \
    groupadd --system --gid 10001 lrserve; \
    useradd --system --uid 10001 --gid lrserve --no-create-home --shell /usr/sbin/nologin lrserve; \
    install -d -o lrserve -g lrserve -m 0750 /var/lib/lrserve
COPY --from=build /opt/lrserve /opt/lrserve
USER lrserve:lrserve
WORKDIR /var/lib/lrserve
# The default SQLite database lives here; with PostgreSQL (LRSERVE_DATABASE=postgresql://...) it
# stays empty. The server writes nowhere else but /tmp, so the image runs with
# `--read-only --tmpfs /tmp` (deploy/test-deployment.sh checks that).
VOLUME ["/var/lib/lrserve"]
EXPOSE 8000
# Readiness, not liveness: /readyz answers 503 while the database does not, so a replica that lost
# its database turns unhealthy. slim has no curl: the standard library fetches it, and any non-2xx
# or a refused connection raises, so the exit status is 1.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=2 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('LRSERVE_PORT', '8000'), timeout=2)"]
# The token comes from the environment (LRSERVE_TOKEN, and LRSERVE_READ_TOKEN for read-only
# clients); it is never baked into the image.
CMD ["lrserve", "serve", "--host", "0.0.0.0"]
