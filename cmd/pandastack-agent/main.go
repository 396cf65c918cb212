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

// stdio joins the agent's stdin and stdout into one connection.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) Close() error                { return nil }

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
		// A session ends when the daemon goes away; the next one starts on
		// the same stdio when a daemon connects again.
		if err := srv.Serve(ctx, stdio{}); err != nil {
			log.Error("agent session ended", "err", err)
		}
		// The runtime keeps both FIFO ends open, so a session ends only
		// when a daemon goes away; wait a little before listening again.
		time.Sleep(50 * time.Millisecond)
	}
}
