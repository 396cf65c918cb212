//go:build !(linux && (amd64 || arm64))

package agent

import (
	"fmt"
	"syscall"
)

// dropUnnotifiable is implemented for linux/amd64 and linux/arm64 only;
// elsewhere those signals keep their default action.
func dropUnnotifiable(sig syscall.Signal) error {
	return fmt.Errorf("dropping signal %d: not implemented on this platform", sig)
}
