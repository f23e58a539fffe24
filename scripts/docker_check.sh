#!/usr/bin/env bash
# Build the Docker image where no container registry can be reached, and check it.
#
# The Dockerfile's CUDA base cannot be pulled offline, so this builds on a local Debian
# base made by debootstrap (recipe: docker-offline.md) with podman, then in containers:
#   1. `--help` and `--print-config` (default config);
#   2. a user error exits 2 with one `error:` line;
#   3. a one-batch CPU training run as the non-root user (asserts `id -u` != 0 inside)
#      writing its run directory to a host directory mounted at /app/runs
#      (asserts config.yaml and metrics.json appear on the host).
# It prints timings and the image size. Needs root (apt-get, debootstrap, rootful podman).
# Not part of the default test command: the first build installs torch (several GB).
#
# Usage: sudo bash scripts/docker_check.sh
# Environment (all optional):
#   IMAGE=deepnets:check       tag of the image built
#   BASE=localhost/debian-base:bookworm   base image (made here when missing)
#   WORK=/tmp/deepnets-docker-check       scratch: rootfs, containers.conf, run volume
#   CHECK_CONFIG=mlp.yaml      config of the training check (digits: no download)
#   WHEELHOUSE="dir ..."       local wheel directories mounted into the build as pip
#                              find-links (default: /opt/pypi*/files where present), so
#                              torch need not come from PyPI; WHEELHOUSE=none disables.
#   REBUILD_BASE=1             rebuild the Debian base even if it exists
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-deepnets:check}
BASE=${BASE:-localhost/debian-base:bookworm}
WORK=${WORK:-/tmp/deepnets-docker-check}
SUITE=${SUITE:-bookworm}
CHECK_CONFIG=${CHECK_CONFIG:-mlp.yaml}
RUN_NAME=docker_check

declare -a TIMES=()
step() { printf '\n=== %s\n' "$*"; }
now() { date +%s.%N; }
record() { TIMES+=("$(awk -v a="$(now)" -v b="$2" -v n="$1" 'BEGIN{printf "%-34s %7.1f s", n, a - b}')"); }
die() { echo "docker_check: FAIL: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (apt-get, debootstrap and rootful podman)"
mkdir -p "$WORK"
T_ALL=$(now)

# ---------------------------------------------------------------- 1. tools
step "tools: podman buildah runc debootstrap"
t=$(now)
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v runc >/dev/null || ! command -v buildah >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah runc debootstrap
fi
podman --version
record "tools" "$t"

# ---------------------------------------------------------------- 2. runtime settings
# crun fails where the cgroup2 mount has extra controllers; raising rlimits may be
# forbidden, so pin them.
export CONTAINERS_CONF="$WORK/containers.conf"
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF

# ---------------------------------------------------------------- 3. base image
step "base image $BASE"
t=$(now)
if [[ -n ${REBUILD_BASE:-} ]] || ! podman image exists "$BASE"; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE-raw" >/dev/null
  rm -rf "$WORK/rootfs"
  # Where HTTPS goes through a re-signing proxy, the host's extra CA certificates must be
  # trusted inside too (pip, apt over https).
  shopt -s nullglob
  certs=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  if ((${#certs[@]})); then
    ctx="$WORK/base-ctx"
    rm -rf "$ctx" && mkdir -p "$ctx/certs"
    cp "${certs[@]}" "$ctx/certs/"
    cat >"$ctx/Containerfile" <<EOF
FROM $BASE-raw
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \\
    && update-ca-certificates && rm -rf /var/lib/apt/lists/*
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
EOF
    podman build --network host -q -t "$BASE" "$ctx" >/dev/null
    echo "baked ${#certs[@]} host CA certificate(s) into $BASE"
  else
    podman tag "$BASE-raw" "$BASE"
  fi
else
  echo "reusing existing $BASE (REBUILD_BASE=1 to rebuild)"
fi
record "base image (debootstrap + import)" "$t"

# ---------------------------------------------------------------- 4. build
step "podman build -t $IMAGE (BASE_IMAGE=$BASE)"
# --format docker: the OCI format drops the SHELL instruction
declare -a BUILD_OPTS=(--format docker --network host --build-arg "BASE_IMAGE=$BASE")
if [[ ${WHEELHOUSE:-} != none ]]; then
  if [[ -z ${WHEELHOUSE:-} ]]; then
    WHEELHOUSE=""
    for d in /opt/pypi/files /opt/pypi-more/files; do [[ -d $d ]] && WHEELHOUSE+="$d "; done
  fi
  links=""
  for d in $WHEELHOUSE; do
    BUILD_OPTS+=(-v "$d:$d:ro")
    links+="$d "
  done
  if [[ -n $links ]]; then
    # A pip config visible to the build's RUN steps only; the Dockerfile is unchanged and
    # the image keeps no trace of it. Local wheels win ties with PyPI (same version).
    printf '[global]\nfind-links = %s\n' "$links" >"$WORK/pip.conf"
    BUILD_OPTS+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
    echo "pip find-links (build only): $links"
  fi
fi
t=$(now)
set +e
podman build "${BUILD_OPTS[@]}" -t "$IMAGE" . 2>&1 | tee "$WORK/build.log" | grep -E '^(STEP|COMMIT|Successfully|Error|error)'
st=("${PIPESTATUS[@]}")
set -e
[[ ${st[0]} == 0 ]] || { tail -30 "$WORK/build.log"; die "podman build failed (log: $WORK/build.log)"; }
record "podman build" "$t"
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$BASE")
human() { numfmt --to=iec --suffix=B "$1"; }
echo "image $IMAGE: $(human "$SIZE") (base $(human "$BASE_SIZE"))"

# ---------------------------------------------------------------- 5. checks in containers
RUN=(podman run --rm --network none)

step "--help"
t=$(now)
"${RUN[@]}" "$IMAGE" --help >"$WORK/help.out" || die "--help exited non-zero"
head -5 "$WORK/help.out"
record "run --help" "$t"

step "--print-config (default CMD's config, resnet.yaml)"
t=$(now)
"${RUN[@]}" "$IMAGE" --config resnet.yaml --print-config >"$WORK/print-config.out" \
  || die "--print-config exited non-zero"
head -12 "$WORK/print-config.out"
grep -q '^model:' "$WORK/print-config.out" || die "--print-config printed no model: section"
record "run --print-config" "$t"

step "user error: exit code 2, one error: line"
rc=0
"${RUN[@]}" "$IMAGE" --config no_such_config.yaml >"$WORK/err.out" 2>&1 || rc=$?
cat "$WORK/err.out"
[[ $rc == 2 ]] || die "a missing config exited $rc, expected 2"
grep -q '^error: ' "$WORK/err.out" || die "no 'error: ' line for a missing config"
! grep -q Traceback "$WORK/err.out" || die "traceback on a user error"

step "one-batch CPU training run as the image's user, run dir on a host volume"
UID_IN=$("${RUN[@]}" --entrypoint id "$IMAGE" -u)
[[ $UID_IN != 0 ]] || die "the image runs as root"
VOL="$WORK/runs"
rm -rf "$VOL" && mkdir -p "$VOL" && chown "$UID_IN" "$VOL"
t=$(now)
set +e
# shellcheck disable=SC2016  # $(id -u) is expanded inside the container
"${RUN[@]}" -v "$VOL:/app/runs" --entrypoint bash "$IMAGE" -c \
  'u=$(id -u); echo "inside: uid=$u user=$(id -un)"; [ "$u" != 0 ] || { echo "running as root" >&2; exit 3; }
   exec python train.py "$@"' _ \
  --config "$CHECK_CONFIG" name="$RUN_NAME" trainer.max_steps=1 trainer.accelerator=cpu trainer.progress_bar=false \
  2>&1 | tee "$WORK/train.log" | tail -15
st=("${PIPESTATUS[@]}")
set -e
[[ ${st[0]} == 0 ]] || die "training run failed (log: $WORK/train.log)"
record "run 1-step CPU training" "$t"
RUN_DIR="$VOL/$RUN_NAME/version_0"
[[ -f $RUN_DIR/config.yaml ]] || die "no $RUN_DIR/config.yaml on the host"
[[ -f $RUN_DIR/metrics.json ]] || die "no $RUN_DIR/metrics.json on the host"
echo "host sees: $(cd "$VOL" && find . -maxdepth 4 | sort | tr '\n' ' ')"
echo "metrics.json: $(head -c 400 "$RUN_DIR/metrics.json")"
echo "owner on host: $(stat -c '%u' "$RUN_DIR/metrics.json") (container uid $UID_IN)"

# ---------------------------------------------------------------- summary
record "total" "$T_ALL"
step "summary"
printf '%s\n' "${TIMES[@]}"
echo "image size                         $(human "$SIZE") ($IMAGE on $BASE; base $(human "$BASE_SIZE"))"
echo "docker_check: OK"
