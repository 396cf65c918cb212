// Command pandastack-agent runs inside every sandbox as its init process.
// It serves the daemon over its own stdin and stdout; it logs to stderr.
package main

import (
	"context"
	"log/slog"
	"os"

	"github.com/pandastack/pandastack/internal/agent"
)

// stdio joins the agent's stdin and stdout into one connection.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) Close() error                { return nil }

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx := context.Background()
	srv := agent.NewServer(ctx, log)
	for {
		// A session ends when the daemon goes away; the next one starts on
		// the same stdio when a daemon connects again.
		if err := srv.Serve(ctx, stdio{}); err != nil {
			log.Error("agent session ended", "err", err)
		}
	}
}
