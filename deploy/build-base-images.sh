#!/usr/bin/env bash
# Local stand-ins for the three public base images the deployment uses, built from Debian with
# debootstrap, for machines that reach Debian's package mirror but no container registry:
#
#   lrserve-base/python:3.11    for python:3.11-slim     (Debian's python3 3.11, python3-venv)
#   lrserve-base/postgres:15    for postgres:16          (Debian's postgresql-15, with an entry
#                                                          point that reads POSTGRES_USER,
#                                                          POSTGRES_PASSWORD and POSTGRES_DB
#                                                          like the official image)
#   lrserve-base/nginx:light    for nginx:1.27-alpine    (Debian's nginx-light, and wget for the
#                                                          compose healthcheck)
#
#   deploy/build-base-images.sh            # about 3 minutes the first time, seconds after that
#
# The mirror is the one apt already uses (read from /etc/apt/sources.list*); a debootstrap'd
# root file system and each image's tree are cached under $LRSERVE_DEPLOY_WORK
# (default /var/tmp/lrserve-deploy). An image that already exists is kept; FORCE=1 rebuilds.
# Needs root (debootstrap, chroot) and a running Docker engine.
set -euo pipefail

WORK=${LRSERVE_DEPLOY_WORK:-/var/tmp/lrserve-deploy}
SUITE=${LRSERVE_DEBIAN_SUITE:-bookworm}
DOCKER=${DOCKER:-docker}
FORCE=${FORCE:-0}

log() { printf '[base-images] %s\n' "$*" >&2; }

# The first Debian (not -security) mirror apt is configured with, one-line or deb822 format.
debian_mirror() {
    local uri
    uri=$(
        {
            grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                sed -E 's/^\s*deb\s+(\[[^]]*\]\s+)?//' | awk '{print $1}'
            grep -hsiE '^\s*URIs:' /etc/apt/sources.list.d/*.sources | sed -E 's/^\s*URIs:\s*//I' |
                tr ' ' '\n'
        } | grep -E '^(https?|file)://' | grep -v -- '-security' | head -n1
    )
    if [ -z "$uri" ]; then
        log "no Debian mirror found in /etc/apt/sources.list*; set LRSERVE_DEBIAN_MIRROR"
        return 1
    fi
    printf '%s\n' "$uri"
}

MIRROR=${LRSERVE_DEBIAN_MIRROR:-$(debian_mirror)}

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# The shared minimal root file system, made once.
base_rootfs() {
    local root="$WORK/rootfs-$SUITE"
    if [ ! -e "$root/.lrserve-complete" ]; then
        command -v debootstrap >/dev/null || {
            log "debootstrap is not installed (apt-get install debootstrap)"
            return 1
        }
        rm -rf "$root.tmp"
        mkdir -p "$WORK"
        log "debootstrap --variant=minbase $SUITE (about a minute)"
        debootstrap --variant=minbase "$SUITE" "$root.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
            tail -n 20 "$WORK/debootstrap.log" >&2
            return 1
        }
        touch "$root.tmp/.lrserve-complete"
        rm -rf "$root"
        mv "$root.tmp" "$root"
    fi
    printf '%s\n' "$root"
}

# install_tree NAME PACKAGES...: a copy of the base root file system with PACKAGES installed.
install_tree() {
    local name=$1 tree="$WORK/tree-$1"
    shift
    rm -rf "$tree"
    cp -a "$(base_rootfs)" "$tree"
    rm -f "$tree/.lrserve-complete"
    # No service may start inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
    chmod +x "$tree/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$tree/etc/resolv.conf"
    mount -t proc proc "$tree/proc"
    local rc=0
    (
        export DEBIAN_FRONTEND=noninteractive LC_ALL=C
        chroot "$tree" apt-get update -qq
        chroot "$tree" apt-get install -y -qq --no-install-recommends "$@"
        chroot "$tree" apt-get clean
    ) >"$WORK/apt-$name.log" 2>&1 || rc=$?
    umount "$tree/proc"
    if [ "$rc" -ne 0 ]; then
        tail -n 20 "$WORK/apt-$name.log" >&2
        return "$rc"
    fi
    rm -f "$tree/usr/sbin/policy-rc.d"
    rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/* "$tree"/usr/share/doc/* \
        "$tree"/usr/share/man/* "$tree"/usr/share/info/* "$tree"/var/log/*.log "$tree"/tmp/*
    : >"$tree/etc/resolv.conf"
    printf '%s\n' "$tree"
}

# import TREE TAG CHANGES...: the tree as a one-layer image.
import_tree() {
    local tree=$1 tag=$2
    shift 2
    local args=()
    for change in "$@"; do args+=(--change "$change"); done
    tar -C "$tree" --numeric-owner -c . | "$DOCKER" import "${args[@]}" - "$tag" >/dev/null
    rm -rf "$tree"
    log "built $tag ($("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

build_python() {
    local tag=lrserve-base/python:3.11
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "$tag exists"; return; fi
    local tree
    # python3-venv brings ensurepip (the build stage's venv needs pip); the Dockerfile's runtime
    # stage removes it again.
    tree=$(install_tree python python3 python3-venv python-is-python3 ca-certificates)
    import_tree "$tree" "$tag" \
        'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV LANG=C.UTF-8' \
        'CMD ["python3"]'
}

build_postgres() {
    local tag=lrserve-base/postgres:15
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "$tag exists"; return; fi
    local tree
    tree=$(install_tree postgres postgresql-15)
    # Debian's package makes a cluster of its own; the entry point makes one in $PGDATA instead.
    rm -rf "$tree/var/lib/postgresql/15" "$tree/etc/postgresql/15"
    install -d -m 0755 "$tree/usr/local/bin"
    cat >"$tree/usr/local/bin/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/bin/sh
# Like the official postgres image's entry point, for what docker-compose.yml uses: a new data
# directory is initialised with POSTGRES_USER (owner, password POSTGRES_PASSWORD) and
# POSTGRES_DB; local connections are trusted, TCP ones need the password (scram-sha-256).
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
USER_NAME=${POSTGRES_USER:-postgres}
DB_NAME=${POSTGRES_DB:-$USER_NAME}
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "POSTGRES_PASSWORD is not set: refusing to create a database without one" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U "$USER_NAME" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$DB_NAME" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -q -U "$USER_NAME" -d postgres -c "CREATE DATABASE \"$DB_NAME\""
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "database $DB_NAME initialised in $PGDATA" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
ENTRYPOINT
    chmod 0755 "$tree/usr/local/bin/docker-entrypoint.sh"
    import_tree "$tree" "$tag" \
        'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV LANG=C.UTF-8' \
        'ENV PGDATA=/var/lib/postgresql/data' \
        'VOLUME /var/lib/postgresql/data' \
        'EXPOSE 5432' \
        'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]'
}

build_nginx() {
    local tag=lrserve-base/nginx:light
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "$tag exists"; return; fi
    local tree
    tree=$(install_tree nginx nginx-light wget)
    rm -f "$tree/etc/nginx/sites-enabled/default"
    import_tree "$tree" "$tag" \
        'EXPOSE 80' \
        'CMD ["nginx", "-g", "daemon off;"]'
}

build_python
build_postgres
build_nginx
