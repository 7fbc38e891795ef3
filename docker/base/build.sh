#!/usr/bin/env bash
# Make the lcflow base image without a container registry: a minimal Debian bookworm root file
# system (debootstrap, from a Debian mirror) with python3, venv and pip, imported as a local image.
# The Dockerfile takes it through its BASE_IMAGE argument:
#
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=lcflow-base:bookworm -t lcflow:cpu .
#
# Where a registry is reachable the public python:3.11-slim-bookworm does the same job.
#
# Needs root, a running dockerd and debootstrap (apt-get install -y debootstrap). Idempotent: does
# nothing when the image already exists, unless --force.
set -euo pipefail

usage="usage: $0 [--force] [IMAGE]   (default IMAGE lcflow-base:bookworm; env MIRROR, SECURITY_MIRROR: Debian mirrors)"
force=0
image=lcflow-base:bookworm
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) image=$arg ;;
  esac
done
mirror=${MIRROR:-http://deb.debian.org/debian}
suite=bookworm

if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists (--force to remake it)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }

# /var/tmp, not /tmp: the tree is ~300 MB and /tmp may be a small tmpfs or mounted noexec.
rootfs=$(mktemp -d /var/tmp/lcflow-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "== debootstrap $suite from $mirror"
# minbase: apt and the essentials, no init system; ca-certificates so pip can speak HTTPS.
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  "$suite" "$rootfs" "$mirror" > "$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2
  exit 1
}
rm -f "$rootfs.log"

# Security and point-release updates too, as the python:*-bookworm images have.
cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main
EOF

# Trust what this host trusts: the local CAs it added (a TLS-inspecting proxy, a private PyPI
# mirror) go into the image's system store, or every pip download in the build fails.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1  # (rehash warns about the bundle itself)
fi
# pip (once upgraded in a venv) uses its own certifi bundle, not the system store: point it there.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"

# Nothing downloaded during bootstrap is needed in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*

echo "== docker import $image"
tar --numeric-owner -C "$rootfs" -c . \
  | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $suite (python3, venv, pip) from $mirror" \
    - "$image" >/dev/null
docker run --rm "$image" python3 -c 'import sys, venv, ensurepip; print("python", sys.version.split()[0])'
docker image ls "$image"
