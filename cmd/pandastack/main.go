// Command pandastack is the PandaStack daemon (pandastack serve) and its CLI.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/pandastack/pandastack/internal/cli"
)

func main() {
	if err := cli.NewRoot().Execute(); err != nil {
		var ec cli.ExitCodeError
		if errors.As(err, &ec) {
			os.Exit(ec.Code)
		}
		fmt.Fprintln(os.Stderr, "pandastack:", err)
		os.Exit(1)
	}
}
