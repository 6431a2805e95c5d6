#!/usr/bin/env bash
# The HTTP API of `podfsm serve` with nothing but curl: start a daemon on a unix socket in a
# private directory, run a pod from examples/pods/userns-allocated.json, list the sandboxes, get
# one, stop it, delete it, and stop the daemon. Run as root:
#
#     bash examples/curl.sh [runc|crun]
#
# Like the other examples it keeps everything in its own directory and CNI network, so it never
# touches the host's podfsm: PODFSM_EXAMPLE_DIR (default: a new temporary directory, removed at
# the end), PODFSM_EXAMPLE_NETWORK, PODFSM_EXAMPLE_BRIDGE, PODFSM_EXAMPLE_SUBNET. PYTHON is the
# Python that has podfsm installed (default: the repository's .venv, else python3).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
runtime=${1:-runc}
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then python=$here/../.venv/bin/python; else python=python3; fi
fi
network=${PODFSM_EXAMPLE_NETWORK:-podfsm-example}
bridge=${PODFSM_EXAMPLE_BRIDGE:-podfsm-ex0}
subnet=${PODFSM_EXAMPLE_SUBNET:-10.209.250.0/24}
if [ -n "${PODFSM_EXAMPLE_DIR:-}" ]; then
    base=$PODFSM_EXAMPLE_DIR own_base=
else
    base=$(mktemp -d /tmp/podfsm-example-XXXXXX) own_base=1
fi
chmod 711 "$base"  # the pod's mapped root must reach the pause rootfs below it
sock=$base/podfsm.sock
daemon= id=

cleanup() {
    local status=$?
    if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
        # a sandbox left by a failure above is removed while the daemon still runs
        if [ -n "$id" ]; then
            curl -sS --unix-socket "$sock" -X DELETE "http://podfsm/v1/sandboxes/$id" \
                -o /dev/null || true
        fi
        kill -TERM "$daemon"
        wait "$daemon" || status=$?
    fi
    if [ -n "$own_base" ]; then rm -rf "$base"; fi
    exit "$status"
}
trap cleanup EXIT

# The daemon's network: a CNI bridge network of our own (the file name sorts it first).
mkdir -p "$base/net.d"
"$python" -c 'import json, sys
from podfsm.core.cniconf import default_conflist
json.dump(default_conflist(*sys.argv[1:4]), open(sys.argv[4], "w"), indent=2)' \
    "$network" "$bridge" "$subnet" "$base/net.d/10-example.conflist"

"$python" -m podfsm serve --socket "$sock" --runtime "$runtime" --state-dir "$base/state" \
    --run-dir "$base/run" --netns-dir "$base/netns" --cni-conf-dir "$base/net.d" \
    2>"$base/serve.log" &
daemon=$!

# api METHOD PATH [curl options...]: the response body, then a line "HTTP <status>"
api() {
    local method=$1 path=$2
    shift 2
    curl -sS --unix-socket "$sock" -X "$method" -w '\nHTTP %{http_code}\n' "$@" \
        "http://podfsm$path"
}
field() {  # field NAME: that field of the JSON object on stdin
    "$python" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

echo "== waiting for the daemon on $sock"
for _ in $(seq 100); do
    if curl -sf --unix-socket "$sock" http://podfsm/healthz >/dev/null 2>&1; then break; fi
    kill -0 "$daemon" 2>/dev/null || { cat "$base/serve.log" >&2; exit 1; }
    sleep 0.1
done
api GET /healthz

echo "== POST /v1/sandboxes (examples/pods/userns-allocated.json)"
created=$(api POST /v1/sandboxes -H 'content-type: application/json' \
    --data-binary @"$here/pods/userns-allocated.json")
echo "$created"
id=$(echo "$created" | sed '$d' | field id)

echo "== GET /v1/sandboxes"
api GET /v1/sandboxes

echo "== GET /v1/sandboxes/$id"
api GET "/v1/sandboxes/$id"

echo "== GET /v1/sandboxes/$id/graph?format=mmd"
api GET "/v1/sandboxes/$id/graph?format=mmd"

echo "== POST /v1/sandboxes/$id/stop"
api POST "/v1/sandboxes/$id/stop"

echo "== DELETE /v1/sandboxes/$id"
api DELETE "/v1/sandboxes/$id"
id=

echo "== GET /v1/sandboxes (empty again)"
api GET /v1/sandboxes

echo "== stopping the daemon (SIGTERM)"
kill -TERM "$daemon"
status=0
wait "$daemon" || status=$?
daemon=
echo "daemon exited with status $status"
exit "$status"
