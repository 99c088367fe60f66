#!/usr/bin/env bash
# A Docker daemon and a Debian base image on a machine where no image registry answers (the tests' machines):
#   docker/local-base.sh [IMAGE]        (as root; default IMAGE codetune-base:bookworm)
# Installs docker.io and debootstrap if missing, starts dockerd without a bridge (containers use host
# networking, so test traffic stays on loopback), and builds IMAGE from Debian bookworm with python3.
set -euo pipefail
image="${1:-codetune-base:bookworm}"

if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null; then
    apt-get install -y --no-install-recommends docker.io debootstrap > /dev/null \
        || { apt-get update > /dev/null && apt-get install -y --no-install-recommends docker.io debootstrap > /dev/null; }
fi
if ! docker info > /dev/null 2>&1; then
    nohup dockerd --bridge=none --iptables=false > /var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
    docker info > /dev/null
fi
if ! docker image inspect "$image" > /dev/null 2>&1; then
    root="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian > /dev/null
    tar -C "$root" -c . | docker import - "$image" > /dev/null
    rm -rf "$root"
fi
echo "$image"
