//go:build tools

// Package tools records the runsc dependency so go.mod and go.sum pin it.
package tools

import _ "gvisor.dev/gvisor/runsc"
