package build

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// overlayMount mounts an overlay filesystem at merged: lowers (top first)
// read-only under upper, which takes the writes. The options make upper a
// self-contained layer that can serve as a lower later (no index, no
// redirects, no metadata-only copy-ups whose data would stay below).
func overlayMount(lowers []string, upper, work, merged string) error {
	for _, p := range append(append([]string{}, lowers...), upper, work) {
		if strings.ContainsAny(p, ":,\\") {
			return fmt.Errorf("overlay path %q has a ':', ',' or '\\'", p)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=off,redirect_dir=off,metacopy=off",
		strings.Join(lowers, ":"), upper, work)
	if len(opts) >= os.Getpagesize() {
		return fmt.Errorf("too many layers (%d) for one overlay mount", len(lowers))
	}
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mounting the step's overlay at %s: %w", merged, err)
	}
	return nil
}

// unmount unmounts dir, waiting out a briefly busy mount (the sandbox's
// gofer exiting), then detaching it.
func unmount(dir string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.Unmount(dir, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			if derr := unix.Unmount(dir, unix.MNT_DETACH); derr == nil {
				return nil
			}
			return fmt.Errorf("unmounting %s: %w", dir, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// layerDigest digests a step's layer (an overlay upper directory): each
// entry's path, type, permission bits, owner, link target, device number
// (whiteouts are 0/0 character devices), opaque mark and content. Times
// are left out, so that steps producing the same files share a layer. An
// empty layer digests to "".
func layerDigest(ctx context.Context, dir string) (string, error) {
	h := sha256.New()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if n++; n%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		if p == dir {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(h, "%q %o %d %d %d", rel, st.Mode, st.Uid, st.Gid, st.Rdev)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " -> %q", t)
		case unix.S_IFDIR:
			buf := make([]byte, 8)
			if n, err := unix.Lgetxattr(p, "trusted.overlay.opaque", buf); err == nil {
				fmt.Fprintf(h, " opaque=%q", buf[:n])
			}
		case unix.S_IFREG:
			f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
			if err != nil {
				return err
			}
			fh := sha256.New()
			_, err = io.Copy(fh, f)
			f.Close()
			if err != nil {
				return err
			}
			fmt.Fprintf(h, " %x", fh.Sum(nil))
		}
		h.Write([]byte("\n"))
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("digesting layer %s: %w", dir, err)
	}
	if n <= 1 {
		return "", nil
	}
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}

// flattenResult counts what flatten left out.
type flattenResult struct {
	Entries int
	Skipped []string // device nodes and sockets
}

// flatten copies the tree src (a step's merged view) to the new directory
// dst: regular files, directories, symbolic links (as links, never
// followed), FIFOs, hard links within src, permission bits with setuid,
// setgid and sticky, owners and times. Device nodes and sockets are left
// out (a sandbox gets its own /dev); extended attributes are not copied.
// The tree is walked with lstat only, and nothing runs in it meanwhile, so
// no link planted in it is ever followed; dst's entries are created
// exclusively.
func flatten(ctx context.Context, src, dst string) (flattenResult, error) {
	var res flattenResult
	type dirTimes struct {
		path         string
		atime, mtime unix.Timespec
	}
	var dirs []dirTimes
	links := map[[2]uint64]string{}
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if res.Entries++; res.Entries%1024 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		rel, _ := filepath.Rel(src, p)
		out := filepath.Join(dst, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if p != src {
				if err := unix.Mkdir(out, 0o700); err != nil {
					return fmt.Errorf("creating %s: %w", out, err)
				}
			}
			dirs = append(dirs, dirTimes{out, st.Atim, st.Mtim})
		case unix.S_IFLNK:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := unix.Symlink(t, out); err != nil {
				return fmt.Errorf("creating link %s: %w", out, err)
			}
		case unix.S_IFREG:
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := links[key]; ok && st.Nlink > 1 {
				if err := unix.Link(first, out); err != nil {
					return fmt.Errorf("linking %s: %w", out, err)
				}
				return nil
			}
			if err := copyRegular(p, out); err != nil {
				return err
			}
			if st.Nlink > 1 {
				links[key] = out
			}
		case unix.S_IFIFO:
			if err := unix.Mkfifo(out, 0o600); err != nil {
				return fmt.Errorf("creating fifo %s: %w", out, err)
			}
		default:
			if len(res.Skipped) < 100 {
				res.Skipped = append(res.Skipped, "/"+rel)
			}
			return nil
		}
		if err := unix.Lchown(out, int(st.Uid), int(st.Gid)); err != nil {
			return fmt.Errorf("owning %s: %w", out, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			if err := unix.Chmod(out, st.Mode&0o7777); err != nil {
				return fmt.Errorf("moding %s: %w", out, err)
			}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			ts := []unix.Timespec{st.Atim, st.Mtim}
			if err := unix.UtimesNanoAt(unix.AT_FDCWD, out, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("timing %s: %w", out, err)
			}
		}
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("copying the result to %s: %w", dst, err)
	}
	sort.SliceStable(dirs, func(i, j int) bool { return len(dirs[i].path) > len(dirs[j].path) })
	for _, d := range dirs {
		_ = unix.UtimesNanoAt(unix.AT_FDCWD, d.path, []unix.Timespec{d.atime, d.mtime}, unix.AT_SYMLINK_NOFOLLOW)
	}
	return res, nil
}

func copyRegular(src, dst string) error {
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying %s: %w", src, err)
	}
	return out.Close()
}
