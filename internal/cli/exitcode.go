package cli

import "fmt"

// ExitCodeError makes the process exit with Code without printing anything:
// `pandastack run` and `sandbox exec` pass on the exit code of the command
// they ran.
type ExitCodeError struct{ Code int }

func (e ExitCodeError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }
