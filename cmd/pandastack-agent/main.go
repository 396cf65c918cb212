// Command pandastack-agent runs inside every sandbox as its init process.
// It serves the daemon over what it was given as stdin and stdout; see
// agent.DetachStdio for why it moves them off descriptors 0 and 1 first.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
)

// logLimit bounds what the agent writes to its original stderr over its
// whole life: on a sandbox that is a file on the host (agent.log).
const logLimit = 64 << 10

func main() {
	// Serving a yamux session on a terminal or /dev/null makes no sense: the
	// agent runs only as a sandbox's init, or when asked explicitly.
	if os.Getpid() != 1 && (len(os.Args) < 2 || os.Args[1] != "serve") {
		fmt.Fprintln(os.Stderr, "pandastack-agent runs as the init process of a PandaStack sandbox (or: pandastack-agent serve)")
		os.Exit(2)
	}
	ctx := context.Background()
	// Before anything else: commands in the sandbox must not be able to
	// kill or stop init, nor reach its descriptors (see package agent's
	// init.go).
	if err := agent.SetNotDumpable(); err != nil {
		fmt.Fprintf(os.Stderr, "pandastack-agent: %v\n", err)
		os.Exit(1)
	}
	sigErr := agent.DropSignals(ctx)
	stdio, err := agent.DetachStdio()
	if err != nil {
		fmt.Fprintf(os.Stderr, "pandastack-agent: %v\n", err)
		os.Exit(1)
	}
	var logOut io.Writer = io.Discard
	if stdio.Log != nil {
		logOut = agent.NewBoundedWriter(stdio.Log, logLimit)
		// A crash trace still reaches the original stderr, once, however
		// long: the process ends with it.
		if err := debug.SetCrashOutput(stdio.Log, debug.CrashOptions{}); err != nil {
			fmt.Fprintf(logOut, "pandastack-agent: setting crash output: %v\n", err)
		}
	}
	log := slog.New(slog.NewTextHandler(logOut, nil))
	if sigErr != nil {
		log.Warn("some signals can still kill the agent", "err", sigErr)
	}
	srv := agent.NewServer(ctx, log)
	for {
		// Every daemon connection starts a new session (see ServeStdio).
		// The runtime keeps both FIFO ends open, so reads do not end while
		// no daemon is connected; an error here is unexpected.
		if err := srv.ServeStdio(ctx, stdio.In, stdio.Out); err != nil {
			log.Error("serving stdio", "err", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
