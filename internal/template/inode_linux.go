package template

import (
	"io/fs"
	"syscall"
)

// inodeOf returns the device and inode of a file, to count hard links once.
func inodeOf(fi fs.FileInfo) ([2]uint64, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return [2]uint64{}, false
	}
	return [2]uint64{uint64(st.Dev), st.Ino}, true
}
