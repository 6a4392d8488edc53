#!/usr/bin/env bash
# Build the CPU image from deploy/docker/Dockerfile with podman and prove it serves:
# /ready, a chat completion through the openai SDK, /metrics, no torch inside, and a
# SIGTERM during a stream that lets the stream finish and exits 0. Prints the image size
# and fails above 2 GB.
#
# No Docker daemon and no registry here: the base image is Debian bookworm built by
# debootstrap from the mirror apt uses, imported into podman. Downloads inside the build
# go through the host's TLS proxy, whose CA is the host's bundle, mounted into the build.
#
#   deploy/test-image.sh            (as root; PYTHON=… names a Python with the openai SDK)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-localhost/balansis:cpu-test}
BASE=${BASE:-localhost/balansis-base:bookworm}
PORT=${PORT:-18080}
MAX_BYTES=$((2 * 1024 * 1024 * 1024))
CA=/etc/ssl/certs/ca-certificates.crt
# Debian's podman on these hosts: runc (crun fails on the hybrid cgroup layout), cgroupfs,
# and explicit ulimits (the defaults are refused): open files up to this shell's hard limit,
# processes 32768 (higher values were refused here, though under the hard limit).
PODMAN=(podman --cgroup-manager=cgroupfs --runtime runc)
NOFILE=$(ulimit -Hn); [[ "$NOFILE" == unlimited || "$NOFILE" -gt 65536 ]] && NOFILE=65536
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=32768:32768")
NAME=balansis-image-test-$$

log() { printf '[test-image] %s\n' "$*" >&2; }

need() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
  fi
}

base_image() {
  if "${PODMAN[@]}" image exists "$BASE"; then return; fi
  local mirror rootfs
  # The first Debian mirror in the apt sources (one-line or deb822 format), security excluded.
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | awk '/^(URIs:|deb) +https?:\/\// && !/security/ {print $2; exit}' || true)
  [[ -n "$mirror" ]] || { log "no Debian mirror in the apt sources"; exit 1; }
  log "debootstrap bookworm from ${mirror}"
  rootfs=$(mktemp -d /var/tmp/balansis-rootfs.XXXXXX)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" >/dev/null
  rm -rf "$rootfs"
}

cleanup() {
  "${PODMAN[@]}" logs "$NAME" >"${LOG_FILE:-/tmp/balansis-image-test.log}" 2>&1 || true
  "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
}

need
base_image
log "building $IMAGE"
started=$(date +%s)
"${PODMAN[@]}" build --format docker "${ULIMITS[@]}" --network host \
  -v "$CA:$CA:ro" --build-arg PIP_CERT="$CA" --build-arg BASE_IMAGE="$BASE" --build-arg VARIANT=cpu \
  -f deploy/docker/Dockerfile -t "$IMAGE" . >/tmp/balansis-image-build.log 2>&1 \
  || { tail -40 /tmp/balansis-image-build.log; exit 1; }
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "built in $(($(date +%s) - started)) s: $(numfmt --to=iec "$size") ($size bytes)"
((size < MAX_BYTES)) || { log "the CPU image is over 2 GB"; exit 1; }

log "no torch in the image"
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network host --entrypoint python3 "$IMAGE" -c \
  "import importlib.util, sys; sys.exit('torch is installed' if importlib.util.find_spec('torch') else 0)"

trap cleanup EXIT
log "running it on port $PORT"
user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
[[ "$user" == 10001:0 ]] || { log "the image runs as '$user', not 10001:0"; exit 1; }
# Podman schedules HEALTHCHECKs with systemd timers, and complains without systemd; the
# script runs the check itself below (podman healthcheck run).
"${PODMAN[@]}" run -d --name "$NAME" "${ULIMITS[@]}" --network host -e BALANSIS_PORT="$PORT" \
  -e BALANSIS_DRAIN_TIMEOUT=60 "$IMAGE" >/dev/null 2>/tmp/balansis-image-run.log \
  || { cat /tmp/balansis-image-run.log; exit 1; }

"$PYTHON" - "$PORT" "$NAME" <<'PY'
"""Against the running container: /ready, the SDK, /metrics, then SIGTERM mid-stream."""
import subprocess, sys, threading, time, urllib.request

import openai

port, name = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
podman = ["podman", "--cgroup-manager=cgroupfs", "--runtime", "runc"]

deadline = time.monotonic() + 900
while True:
    state = subprocess.run(podman + ["inspect", "--format", "{{.State.Running}}", name],
                           capture_output=True, text=True).stdout.strip()
    if state != "true":
        sys.exit(f"the container stopped before /ready (state {state!r})")
    try:
        with urllib.request.urlopen(base + "/ready", timeout=5) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("not ready within 900 s")
    time.sleep(2)
print(f"[test-image] ready", file=sys.stderr)
health = subprocess.run(podman + ["healthcheck", "run", name], capture_output=True, text=True)
assert health.returncode == 0, f"the image's HEALTHCHECK failed: {health.stdout} {health.stderr}"
print("[test-image] HEALTHCHECK healthy", file=sys.stderr)

client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
(model,) = [m.id for m in client.models.list().data]
reply = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
assert reply.choices[0].message.content and reply.usage.completion_tokens > 0, reply
print(f"[test-image] chat: {reply.choices[0].message.content!r}", file=sys.stderr)

with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
    metrics = response.read().decode()
for family in ("balansis:num_requests_running", "balansis:time_to_first_token_seconds_count",
               "balansis:generation_tokens_total"):
    assert family in metrics, f"/metrics lacks {family}"

stream = client.chat.completions.create(model=model, max_tokens=200, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                        messages=[{"role": "user", "content": "Tell me a long story."}])
pieces, finish, usage, after_signal = [], None, None, 0
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
        if len(pieces) == 3:  # mid-stream: the container gets SIGTERM now
            subprocess.run(podman + ["kill", "--signal", "TERM", name], check=True, capture_output=True)
            print("[test-image] SIGTERM sent mid-stream", file=sys.stderr)
        elif len(pieces) > 3:
            after_signal += 1
    if chunk.usage:
        usage = chunk.usage
assert finish == "length" and usage is not None and usage.completion_tokens == 200, (finish, usage)
assert after_signal > 0, "nothing arrived after SIGTERM"
print(f"[test-image] the stream finished after SIGTERM: {after_signal} chunks after it, "
      f"{usage.completion_tokens} tokens, finish_reason {finish}", file=sys.stderr)

code = subprocess.run(podman + ["wait", name], capture_output=True, text=True, timeout=120).stdout.strip()
assert code == "0", f"exit code {code}"
print("[test-image] exit code 0", file=sys.stderr)
PY
log "passed: $IMAGE, $(numfmt --to=iec "$size")"
