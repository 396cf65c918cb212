#!/usr/bin/env bash
# Installs everything PandaStack needs on a Debian 12 machine (as root) and
# starts the server on its defaults. Idempotent: what is already installed
# or built (apt packages, runsc, templates) is kept.
#
#   scripts/install.sh             install, then (re)start the server
#   scripts/install.sh --no-start  install only (used by scripts/test.sh)
set -euo pipefail

start=1
for a in "$@"; do
	case "$a" in
	--no-start) start=0 ;;
	*) echo "usage: $0 [--no-start]" >&2; exit 2 ;;
	esac
done

if [ "$(id -u)" != 0 ]; then
	echo "install.sh: run as root (gVisor sandboxes need it)" >&2
	exit 1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
lib=/usr/local/lib/pandastack
data=${PANDASTACK_DATA_DIR:-/var/lib/pandastack}
export PATH=/usr/local/go/bin:$PATH

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages.
pkgs=(mmdebstrap iproute2 nftables ca-certificates python3 python3-pytest procps)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing Debian packages: ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Go (the module proxy must be reachable for the first build).
if ! command -v go >/dev/null; then
	echo "install.sh: Go >= 1.26 is needed at /usr/local/go/bin or on PATH" >&2
	exit 1
fi

# 3. runsc, pinned in tools/runsc/go.mod, built statically (a cgo build fails
#    inside runsc's own chroot) and with its seccomp filters precompiled
#    (tools/runsc/precompile; saves ~10 ms per sandbox start and restore).
#    Rebuilt only when the pin or the generator changes.
mkdir -p "$lib"
stamp=$(cat "$repo/tools/runsc/go.mod" "$repo/tools/runsc/go.sum" "$repo/tools/runsc/precompile/main.go" | sha256sum | cut -c1-16)
if [ ! -x "$lib/runsc" ] || [ "$(cat "$lib/runsc.stamp" 2>/dev/null)" != "$stamp" ]; then
	log "building runsc (gVisor, pinned in tools/runsc/go.mod)"
	build=$(mktemp -d)
	trap 'rm -rf "$build"' EXIT
	cp "$repo/tools/runsc/go.mod" "$repo/tools/runsc/go.sum" "$repo/tools/runsc/tools.go" "$build/"
	(cd "$build" && go mod vendor)
	filters="$build/vendor/gvisor.dev/gvisor/runsc"
	if (cd "$repo/tools/runsc" && go run ./precompile boot >"$build/boot.go" && go run ./precompile gofer >"$build/gofer.go"); then
		cp "$build/boot.go" "$filters/boot/filter/filter_precompiled.go"
		cp "$build/gofer.go" "$filters/fsgofer/filter/filter_precompiled.go"
	else
		echo "install.sh: precompiling seccomp filters failed; runsc will compile them at start" >&2
	fi
	(cd "$build" && CGO_ENABLED=0 go build -mod=vendor -trimpath -o "$lib/runsc.new" gvisor.dev/gvisor/runsc)
	mv "$lib/runsc.new" "$lib/runsc"
	echo "$stamp" >"$lib/runsc.stamp"
	rm -rf "$build"
	trap - EXIT
fi

# 4. PandaStack itself: the server/CLI and the in-sandbox agent, both static.
log "building pandastack and its agent"
version=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo dev)
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -ldflags "-X github.com/pandastack/pandastack/internal/cli.Version=$version" -o "$lib/pandastack.new" ./cmd/pandastack)
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$lib/pandastack-agent.new" ./cmd/pandastack-agent)
mv "$lib/pandastack.new" /usr/local/bin/pandastack
mv "$lib/pandastack-agent.new" "$lib/pandastack-agent"
rm -f "$lib/pandastack.new"

# 5. The Python SDK (standard library only), copied to a fixed place and
#    made importable by every python3 on the machine.
rm -rf "$lib/python.new"
mkdir -p "$lib/python.new"
cp -r "$repo/sdk/python/pandastack" "$lib/python.new/"
find "$lib/python.new" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$lib/python"
mv "$lib/python.new" "$lib/python"
for py in python3 /usr/bin/python3; do
	command -v "$py" >/dev/null || continue
	site=$("$py" -c 'import site,sys; p=[d for d in site.getsitepackages() if d.endswith(("site-packages","dist-packages"))]; print(p[0])' 2>/dev/null) || continue
	mkdir -p "$site"
	echo "$lib/python" >"$site/pandastack-sdk.pth"
done

# 6. Templates: built from Debian packages once, cached in the data directory.
log "building templates (cached after the first time)"
PANDASTACK_DATA_DIR=$data pandastack template build >/dev/null

if [ "$start" = 0 ]; then
	log "installed"
	exit 0
fi

# 7. (Re)start the server on its defaults.
pidfile=/run/pandastack.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
	log "stopping the running server"
	kill "$(cat "$pidfile")"
	for _ in $(seq 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
fi
log "starting pandastack serve (log: /var/log/pandastack.log)"
PANDASTACK_DATA_DIR=$data setsid nohup pandastack serve >>/var/log/pandastack.log 2>&1 </dev/null &
echo $! >"$pidfile"
for _ in $(seq 100); do
	if curl -fsS http://127.0.0.1:7423/v1/health >/dev/null 2>&1; then
		log "PandaStack is running on http://127.0.0.1:7423 (API key in $data/api-key)"
		exit 0
	fi
	sleep 0.1
done
echo "install.sh: the server did not come up; see /var/log/pandastack.log" >&2
tail -20 /var/log/pandastack.log >&2
exit 1
