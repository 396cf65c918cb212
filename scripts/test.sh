#!/usr/bin/env bash
# Runs every test against real gVisor sandboxes: installs what the tests
# need (scripts/install.sh --no-start), then the Go tests, then the Python
# SDK's unit tests and its integration tests against a real server started
# here on a free loopback port with its own data directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH=/usr/local/go/bin:$PATH

"$repo/scripts/install.sh" --no-start

echo "==> go vet"
go vet ./...

echo "==> go test -race (real sandboxes)"
export PANDASTACK_REQUIRE_SANDBOX=1
export PANDASTACK_TEMPLATE_DIR=${PANDASTACK_DATA_DIR:-/var/lib/pandastack}/templates
go test -race -count=1 -timeout 40m ./...

echo "==> fuzz targets (short runs)"
for target in "FuzzReadFrame ./internal/agent/" "FuzzServerRequest ./internal/agent/" "FuzzDecodeRequests ./internal/api/"; do
	set -- $target
	go test -run '^$' -fuzz "^$1\$" -fuzztime 10s "$2"
done

echo "==> Python SDK unit tests"
(cd sdk/python && /usr/bin/python3 -m pytest -q tests/test_unit*.py)

echo "==> Python SDK integration tests against a real server"
tmp=$(mktemp -d)
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Its sandboxes' traffic leaves from an empty network namespace of its own
# (loopback only): no test packet can leave the machine, and it does not
# meet the installed server's network (one networked server per namespace).
netns="pst-py-$$"
ip netns add "$netns"
ip -n "$netns" link set lo up
/usr/local/bin/pandastack serve --listen "127.0.0.1:$port" --data-dir "$tmp/data" \
	--template-dir "$PANDASTACK_TEMPLATE_DIR" --build-templates=false \
	--network-namespace "/var/run/netns/$netns" --dns 127.0.0.1:1 \
	--metrics-listen 127.0.0.1:0 >"$tmp/server.log" 2>&1 &
server=$!
cleanup() {
	kill "$server" 2>/dev/null || true
	wait "$server" 2>/dev/null || true
	ip netns del "$netns" 2>/dev/null || true
	umount -l "$tmp/data/runtime/runsc/null-netns" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
# Waits for the server (a generous deadline: machines differ several-fold).
up=
for _ in $(seq 1200); do
	if curl -fsS "http://127.0.0.1:$port/v1/health" >/dev/null 2>&1; then
		up=1
		break
	fi
	kill -0 "$server" 2>/dev/null || break
	sleep 0.1
done
if [ -z "$up" ]; then
	echo "the test server did not come up; its log:" >&2
	tail -50 "$tmp/server.log" >&2
	exit 1
fi
export PANDASTACK_URL="http://127.0.0.1:$port"
PANDASTACK_API_KEY=$(cat "$tmp/data/api-key")
export PANDASTACK_API_KEY PANDASTACK_REQUIRE_SERVER=1
if ! (cd sdk/python && /usr/bin/python3 -m pytest -q tests/test_integration*.py); then
	echo "--- server log" >&2
	tail -50 "$tmp/server.log" >&2
	exit 1
fi
echo "==> all tests passed"
