#!/usr/bin/env bash
# Build the stack's images from the repository root (`make images`): the worker (Ray head and workers)
# and the MLflow server, both from docker/Dockerfile.
#   docker/build.sh                    both, tagged $CXR_IMAGE and $CXR_MLFLOW_IMAGE
#   docker/build.sh mlflow=TAG ...     the named targets, with these tags
# Settings, all optional:
#   BASE_IMAGE        a Debian bookworm image (default: the official python:3.11-slim-bookworm);
#                     one without Python gets Debian's python3 (3.11) from apt
#   CA_BUNDLE         a CA bundle file pip trusts while building (a TLS-intercepting proxy); a build
#                     secret, in no layer of the images
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST   a package mirror for pip
#   BUILD_NETWORK     `host` when the mirror listens on this machine's 127.0.0.1
#   CXR_IMAGE, CXR_MLFLOW_IMAGE   the tags (defaults as in docker/compose.yaml)
#   DOCKERFILE        another Dockerfile (default docker/Dockerfile; tests/stack/Dockerfile: the stack
#                     test's stand-ins); BUILD_ARGS: more KEY=VALUE build arguments, space-separated
#   DOCKER            the docker client (default: `docker`, or one with BuildKit built in when the
#                     default has no buildx, as Debian's docker.io 20.10 client)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "docker/build.sh: $*" >&2; exit 2; }

docker_cli="${DOCKER:-}"
if [ -z "$docker_cli" ]; then
  docker_cli=docker
  # Docker 23+ clients build with buildx only; Debian's 20.10 client has BuildKit built in
  if ! docker buildx version >/dev/null 2>&1; then
    for candidate in /usr/bin/docker /bin/docker; do
      if [ -x "$candidate" ] && "$candidate" version --format '{{.Client.Version}}' 2>/dev/null | grep -qE '^(19|20|21|22)\.'; then
        docker_cli="$candidate"
        break
      fi
    done
  fi
fi
command -v "$docker_cli" >/dev/null || die "no docker client ($docker_cli): install Docker"
"$docker_cli" info >/dev/null 2>&1 || die "the Docker daemon does not answer ($docker_cli info): start it"

args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}")
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
  if [ -n "${!var:-}" ]; then args+=(--build-arg "$var=${!var}"); fi
done
if [ -n "${CA_BUNDLE:-}" ]; then
  [ -s "$CA_BUNDLE" ] || die "CA_BUNDLE=$CA_BUNDLE: no such file, or empty"
  args+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi
if [ -n "${BUILD_NETWORK:-}" ]; then args+=(--network "$BUILD_NETWORK"); fi
for arg in ${BUILD_ARGS:-}; do args+=(--build-arg "$arg"); done

dockerfile="${DOCKERFILE:-docker/Dockerfile}"
[ -f "$dockerfile" ] || die "DOCKERFILE=$dockerfile: no such file"
if [ $# -eq 0 ]; then
  set -- "mlflow=${CXR_MLFLOW_IMAGE:-cxr-attention-sweeps-mlflow:latest}" "worker=${CXR_IMAGE:-cxr-attention-sweeps:latest}"
fi
for spec in "$@"; do
  target="${spec%%=*}"
  tag="${spec#*=}"
  [ -n "$target" ] && [ "$tag" != "$spec" ] && [ -n "$tag" ] || die "$spec: expected TARGET=TAG"
  grep -qiE "^FROM .* AS $target\$" "$dockerfile" || die "$dockerfile has no target $target"
  echo "docker/build.sh: $target -> $tag"
  start=$(date +%s)
  DOCKER_BUILDKIT=1 "$docker_cli" build --progress plain -f "$dockerfile" --target "$target" -t "$tag" "${args[@]}" .
  echo "docker/build.sh: $target built in $(( $(date +%s) - start )) s"
done
