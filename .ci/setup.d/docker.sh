#!/usr/bin/env bash
# Docker for the compose stack test (tests/stack/, `make stack-test`): Debian's docker.io engine and
# docker-compose, the daemon started by hand (no systemd), a Debian bookworm base image made from
# Debian's packages (no container registry is reachable here), and the settings docker/build.sh needs
# on this machine, written to $CXR_DOCKER_BUILD_ENV for the test to read.
# Idempotent: what a previous run on the same machine left (packages, daemon, base image, rootfs) is
# reused. Never fails CI: when the daemon cannot start, the stack test is skipped with the reason.
set -uo pipefail

BUILD_ENV="${CXR_DOCKER_BUILD_ENV:-/etc/cxr-attention-sweeps/docker-build.env}"
BASE_IMAGE="${CXR_BASE_IMAGE:-cxr-local/debian:bookworm}"
CACHE="${CXR_DOCKER_CACHE:-/var/cache/cxr-attention-sweeps}"
say() { echo "docker.sh: $*"; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io docker-compose debootstrap iptables >/dev/null || { say "apt-get install docker.io failed"; exit 0; }
fi

# Debian's 20.10 client has BuildKit built in; a newer client on PATH without buildx does not
DOCKER=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  nohup dockerd >/var/log/cxr-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  say "the Docker daemon did not start (last lines of /var/log/cxr-dockerd.log below); the stack test will be skipped"
  tail -n 5 /var/log/cxr-dockerd.log 2>/dev/null
  exit 0
fi
say "daemon $("$DOCKER" version --format '{{.Server.Version}}'), storage $("$DOCKER" info --format '{{.Driver}}')"

if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  if [ ! -x "$CACHE/bookworm/usr/bin/apt-get" ]; then
    rm -rf "$CACHE/bookworm"
    debootstrap --variant=minbase bookworm "$CACHE/bookworm" >"$CACHE/debootstrap.log" 2>&1 \
      || { say "debootstrap failed: $CACHE/debootstrap.log"; exit 0; }
  fi
  tar -C "$CACHE/bookworm" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  say "base image $BASE_IMAGE made from Debian's packages"
fi

# This machine's package indexes on disk (pip's extra-index-url here), served on 127.0.0.1 so that
# image builds (on the host network) find the same releases, torch's CUDA wheels among them
extra=""
port=8801
for index in /opt/pypi /opt/pypi-more; do
  [ -d "$index/simple" ] || continue
  if ! python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/simple/', timeout=2)" 2>/dev/null; then
    nohup python3 -m http.server --bind 127.0.0.1 "$port" --directory "$index" >/dev/null 2>&1 &
  fi
  extra="${extra:+$extra }http://127.0.0.1:$port/simple"
  port=$((port + 1))
done

mkdir -p "$(dirname "$BUILD_ENV")"
{
  echo "# written by .ci/setup.d/docker.sh: docker/build.sh settings for this machine (sh syntax)"
  echo "DOCKER=$DOCKER"
  echo "BASE_IMAGE=$BASE_IMAGE"
  if [ -s /etc/ssl/certs/ca-certificates.crt ]; then echo "CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"; fi
  if [ -n "$extra" ]; then
    echo "PIP_EXTRA_INDEX_URL=\"$extra\""
    echo "PIP_TRUSTED_HOST=127.0.0.1"
    echo "BUILD_NETWORK=host"
  fi
} >"$BUILD_ENV"
say "build settings in $BUILD_ENV"
