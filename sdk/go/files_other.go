//go:build !unix

package pandastack

import "io/fs"

// inode is unknown here: hard links are archived as separate files.
func inode(fs.FileInfo) (key [2]uint64, nlink uint64, ok bool) { return key, 0, false }
