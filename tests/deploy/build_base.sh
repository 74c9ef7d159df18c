#!/usr/bin/env bash
# Builds the container tests' base image from Debian packages alone (registries other than
# Debian's and PyPI are out of reach): a minbase bookworm root with Debian's python3 (3.11)
# and python3-venv, imported as the image named by $1. A no-op when that image exists.
set -euo pipefail
IMAGE="${1:?usage: build_base.sh IMAGE}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if podman image exists "$IMAGE"; then exit 0; fi
ROOTFS="$(mktemp -d /var/tmp/modelgate-base.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$ROOTFS" "$MIRROR" \
  >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
  "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["/usr/bin/python3"]' - "$IMAGE" >/dev/null
