// Command pandastack-agent runs inside every sandbox as its init process.
// It serves the daemon over its own stdin and stdout; it logs to stderr.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
)

func main() {
	// Serving a yamux session on a terminal or /dev/null makes no sense: the
	// agent runs only as a sandbox's init, or when asked explicitly.
	if os.Getpid() != 1 && (len(os.Args) < 2 || os.Args[1] != "serve") {
		fmt.Fprintln(os.Stderr, "pandastack-agent runs as the init process of a PandaStack sandbox (or: pandastack-agent serve)")
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx := context.Background()
	srv := agent.NewServer(ctx, log)
	for {
		// Every daemon connection starts a new session (see ServeStdio).
		// The runtime keeps both FIFO ends open, so reads do not end while
		// no daemon is connected; an error here is unexpected.
		if err := srv.ServeStdio(ctx, os.Stdin, os.Stdout); err != nil {
			log.Error("serving stdio", "err", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
