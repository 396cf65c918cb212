//go:build unix

package pandastack

import (
	"io/fs"
	"syscall"
)

// inode returns a file's device and inode numbers and its link count.
func inode(fi fs.FileInfo) (key [2]uint64, nlink uint64, ok bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return key, 0, false
	}
	return [2]uint64{uint64(st.Dev), uint64(st.Ino)}, uint64(st.Nlink), true
}
