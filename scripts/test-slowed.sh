#!/usr/bin/env bash
# Runs the whole test suite (scripts/test.sh, with its arguments) with a CPU
# hog on every core beside it, and prints how long it took. Machines differ
# several-fold in speed from day to day; a suite that passes here does not
# assume how fast anything happens. PANDASTACK_HOGS sets the number of hogs
# (default: one per core, from nproc).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
n=${PANDASTACK_HOGS:-$(nproc)}

hogs=()
stop_hogs() {
	for pid in "${hogs[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${hogs[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	hogs=()
}
trap stop_hogs EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq "$n"); do
	sh -c 'while :; do :; done' &
	hogs+=("$!")
done
echo "==> $n CPU hogs running beside the tests (pids ${hogs[*]})"

start=$(date +%s)
status=0
"$repo/scripts/test.sh" "$@" || status=$?
elapsed=$(($(date +%s) - start))
stop_hogs
printf '==> scripts/test.sh with %d CPU hogs: exit %d after %dm%02ds\n' "$n" "$status" $((elapsed / 60)) $((elapsed % 60))
exit "$status"
