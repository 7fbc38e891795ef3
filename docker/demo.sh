#!/usr/bin/env bash
# The docker-compose demo, end to end, with or without a container registry: start dockerd if none
# is running, make the base image (docker/base/build.sh) and build the project image, bring up
# models, certs, receiver, sharer and demo (docker/compose.yaml), wait for the demo to finish,
# print its output, check it, tear down, and stop dockerd again if this script started it.
#
# Exits non-zero when any step or check fails; 77 (and nothing else) when Docker cannot run here at
# all (no dockerd, not root, dockerd does not start, no compose tool), so a test can skip. Checks: the demo container exits 0 and answered
# every question of both parts (cross-context through LCF-X, same-context through LCF, each beside
# the note and the other text channels, from one pair of services serving every adapter in the image), and one LCF-X handoff's trace has spans from all three of
# lcflow-demo, lcflow-sharer and lcflow-receiver (the services print their spans to their logs).
#
# Kept between runs, so a second run is quick: the images (an unchanged rebuild is all cache)
# and the `models` and `certs` volumes (no model download or conversion). --fresh drops the volumes.
#
# Environment:
#   LCFLOW_BASE_IMAGE  image to build on (default lcflow-base:bookworm, made here by debootstrap;
#                      python:3.11-slim-bookworm where a registry is reachable)
#   TORCH_WHEEL_DIR    a directory holding a CPU torch wheel to build with, when docker/wheels/ has
#                      none (otherwise pip's find-links directories are searched, then the index)
#   DEMO_TIMEOUT_S     longest wait for the demo container (default 3600)
set -euo pipefail

usage="usage: bash docker/demo.sh [--n N] [--same-n N] [--out DIR] [--fresh]"
n=""
same_n=""
out=""
fresh=0
while [ $# -gt 0 ]; do
  case "$1" in
    --n) n=$2; shift 2 ;;
    --same-n) same_n=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
base_image=${LCFLOW_BASE_IMAGE:-lcflow-base:bookworm}
image=lcflow:cpu  # what compose.yaml runs
out=${out:-$(mktemp -d /tmp/lcflow-compose-demo.XXXXXX)}
mkdir -p "$out"
project=lcflow-demo
started=$(date +%s)

step() { echo "== [$(($(date +%s) - started)) s] $*"; }

# The compose tool first, before anything slow: Compose v2 (`docker compose`) or Debian's 1.29.
command -v docker >/dev/null || { echo "no docker CLI: apt-get install -y docker.io" >&2; exit 77; }
if docker compose version >/dev/null 2>&1; then
  compose_tool=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose_tool=(docker-compose)
else
  echo "no compose tool: apt-get install -y docker-compose" >&2
  exit 77
fi

# --- dockerd ---------------------------------------------------------------------------------
dockerd_pid=""
compose=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  local down=(down --remove-orphans)
  if [ "$fresh" = 1 ]; then down+=(--volumes); fi
  if [ ${#compose[@]} -gt 0 ]; then
    step "tear down"
    # rm -v first: it removes the anonymous /models volume the image's VOLUME gives `certs`, which
    # `down` would leave behind on every run; the named volumes stay unless --fresh.
    { "${compose[@]}" rm -f -s -v && "${compose[@]}" "${down[@]}"; } \
      > "$out/down.log" 2>&1 || { echo "compose down failed, see $out/down.log" >&2; status=1; }
  fi
  if [ -n "$dockerd_pid" ]; then
    step "stop the dockerd this script started (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  exit "$status"
}
trap cleanup EXIT

if docker info >/dev/null 2>&1; then
  step "dockerd already running"
else
  command -v dockerd >/dev/null || { echo "no dockerd: apt-get install -y docker.io" >&2; exit 77; }
  [ "$(id -u)" = 0 ] || { echo "no dockerd running, and starting one needs root" >&2; exit 77; }
  # overlay2 where the kernel and the file system allow it, else vfs (slow, copies every layer).
  for driver in overlay2 vfs; do
    step "start dockerd (storage driver $driver; log $out/dockerd.log)"
    dockerd --storage-driver "$driver" >> "$out/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
      docker info >/dev/null 2>&1 && break
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 1
    done
    docker info >/dev/null 2>&1 && break
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    dockerd_pid=""
  done
  if [ -z "$dockerd_pid" ]; then
    echo "dockerd did not start (overlay2 nor vfs); the end of its log:" >&2
    tail -n 20 "$out/dockerd.log" >&2
    exit 77
  fi
fi

# --- images ----------------------------------------------------------------------------------
if [ "$base_image" = lcflow-base:bookworm ]; then
  step "base image $base_image"
  bash docker/base/build.sh "$base_image"
fi

# A local CPU torch wheel, so the build needs no PyTorch index: docker/wheels/ first, then
# TORCH_WHEEL_DIR, then the directories pip itself installs from here (its find-links).
torch_pin=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
if ! compgen -G "docker/wheels/torch-*.whl" >/dev/null; then
  find_links=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.find-links='\(.*\)'$/\1/p" || true)
  for dir in ${TORCH_WHEEL_DIR:-} $find_links; do
    wheel=$(compgen -G "$dir/torch-$torch_pin+cpu-cp311-*.whl" | head -n 1 || true)
    if [ -n "$wheel" ]; then
      step "torch wheel for the build: $wheel"
      ln "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
      break
    fi
  done
fi
compgen -G "docker/wheels/torch-*.whl" >/dev/null \
  || echo "no local torch wheel (docker/wheels/, TORCH_WHEEL_DIR): the build uses the PyTorch index" >&2

# Always build: layers are cached, so an unchanged tree costs seconds, and a changed one is never
# run from a stale image. The classic builder where the client has no buildx plugin.
step "build $image on $base_image"
buildkit=1
docker buildx version >/dev/null 2>&1 || buildkit=0
DOCKER_BUILDKIT=$buildkit docker build -f docker/Dockerfile --build-arg BASE_IMAGE="$base_image" \
  -t "$image" . > "$out/build.log" 2>&1 || { tail -n 30 "$out/build.log" >&2; exit 1; }
docker image prune -f --filter label=org.opencontainers.image.title=lcflow > /dev/null
docker image inspect "$image" --format "image $image: user {{.Config.User}}, {{.Size}} bytes"

# --- compose ---------------------------------------------------------------------------------
compose=("${compose_tool[@]}" -p "$project" -f docker/compose.yaml)  # from here on, cleanup tears down
export LCFLOW_BASE_IMAGE="$base_image"
if [ -n "$n" ]; then export LCFLOW_DEMO_N="$n"; fi
if [ -n "$same_n" ]; then export LCFLOW_DEMO_SAME_N="$same_n"; fi

# `up -d` returns once every dependency condition held (models and certs done, receiver and
# sharer healthy) and the demo container started; its own exit status comes from `docker wait`.
step "compose up (models, certs, receiver, sharer, then demo)"
# --no-build: run what was built above, never rebuild or pull it.
"${compose[@]}" up -d --no-build > "$out/up.log" 2>&1 || {
  cat "$out/up.log" >&2
  for service in models certs receiver sharer; do
    "${compose[@]}" logs --no-color --tail 20 "$service" >&2 || true
  done
  exit 1
}
demo_id=$("${compose[@]}" ps -a -q demo)
step "services healthy; demo running (container ${demo_id:0:12})"
demo_status=$(timeout "${DEMO_TIMEOUT_S:-3600}" docker wait "$demo_id") || {
  echo "the demo did not finish within ${DEMO_TIMEOUT_S:-3600} s" >&2
  exit 1
}
step "demo exited with status $demo_status"

for service in models certs receiver sharer demo; do
  docker logs "$("${compose[@]}" ps -a -q "$service")" > "$out/$service.log" 2>&1
done
# The demo's output without the JSON spans the console exporter interleaves (one object per
# line, lcflow.serving.telemetry.span_as_one_line).
grep -v '^{.*}$' "$out/demo.log" > "$out/demo-output.txt" || true
echo
cat "$out/demo-output.txt"
echo

# --- checks ----------------------------------------------------------------------------------
failed=0
check() {  # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then echo "ok: $what"; else echo "FAILED: $what" >&2; failed=1; fi
}
check "demo container exit status 0" [ "$demo_status" = 0 ]
# Cross-context questions go through LCF-X, same-context ones through LCF (the services serve
# every adapter in the image), each beside the note (and cross-context beside FORWARD and
# SELECTED too): an answer line per question (indented), and one summary line per part and
# channel ("facts-cross     LCFX: ...", not indented).
cross=$(grep -c '^ *LCFX: ' "$out/demo-output.txt" || true)
same=$(grep -c '^ *LCF: ' "$out/demo-output.txt" || true)
questions=$(grep -c '^question:' "$out/demo-output.txt" || true)
parts=$(( (cross > 0) + (same > 0) ))
check "the demo asked questions in both parts ($cross cross-context, $same same-context)" \
  [ "$cross" -gt 0 -a "$same" -gt 0 -a "$questions" = $((cross + same)) ]
if [ -n "$n" ]; then check "as many cross-context ones as --n $n" [ "$cross" = "$n" ]; fi
if [ -n "$same_n" ]; then check "as many same-context ones as --same-n $same_n" [ "$same" = "$same_n" ]; fi
check "a NOTE answer for each question and in each part's summary" \
  [ "$(grep -c " NOTE: " "$out/demo-output.txt" || true)" = $((questions + parts)) ]
check "a FORWARD and a SELECTED answer for each cross-context question" \
  [ "$(grep -c '^ *FORWARD: ' "$out/demo-output.txt" || true)" = "$cross" -a "$(grep -c '^ *SELECTED: ' "$out/demo-output.txt" || true)" = "$cross" ]
trace=$(sed -n 's/^ *LCFX: .* trace \([0-9a-f]\{32\}\)$/\1/p' "$out/demo-output.txt" | head -n 1)
check "an LCF-X handoff printed its trace id (${trace:-none})" [ -n "$trace" ]
for service in demo sharer receiver; do
  check "trace ${trace:-?} has spans in the $service container's log" \
    grep -q "\"trace_id\": \"0x${trace:-none}\"" "$out/$service.log"
done
step "logs and spans in $out"
exit "$failed"
