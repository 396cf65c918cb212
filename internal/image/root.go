package image

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// root is a destination directory held open by descriptor. Every path below
// it is resolved one component at a time with O_NOFOLLOW, so no symbolic
// link (wherever it points) is ever followed and nothing outside the
// directory can be reached, whatever earlier entries planted.
type root struct {
	fd   int
	path string
}

func openRoot(dir string) (*root, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening destination %s: %w", dir, err)
	}
	return &root{fd: fd, path: dir}, nil
}

func (r *root) close() error { return unix.Close(r.fd) }

// cleanName turns an archive name into a clean path relative to the root
// ("" for the root itself). Absolute names and names that climb out of the
// root with ".." are refused: a layer has no business naming them.
func cleanName(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("%w: empty name", ErrUnsafePath)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL byte in name", ErrUnsafePath)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("%w: absolute path", ErrUnsafePath)
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("%w: path climbs out of the root", ErrUnsafePath)
	}
	if c == "." {
		return "", nil
	}
	return c, nil
}

// errNotExist says that a directory on the way does not exist (only when
// openDir was asked not to create it).
var errNotExist = errors.New("does not exist")

// openDir opens the directory rel (clean, relative; "" is the root) as an
// O_PATH descriptor the caller closes. With create, missing directories are
// made (mode 0755, owned by the unpacker, as tar does). A component that is
// a symbolic link fails with ErrUnsafePath, one that is not a directory
// with an error saying so; a missing one without create with errNotExist.
func (r *root) openDir(rel string, create bool) (int, error) {
	cur, err := unix.Openat(r.fd, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening root: %w", err)
	}
	if rel == "" {
		return cur, nil
	}
	done := ""
	for _, comp := range strings.Split(rel, "/") {
		next, err := unix.Openat(cur, comp, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) && create {
			if err := unix.Mkdirat(cur, comp, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(cur)
				return -1, fmt.Errorf("creating directory %s: %w", path.Join(done, comp), err)
			}
			next, err = unix.Openat(cur, comp, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		}
		if err != nil {
			p := path.Join(done, comp)
			var st unix.Stat_t
			serr := unix.Fstatat(cur, comp, &st, unix.AT_SYMLINK_NOFOLLOW)
			unix.Close(cur)
			switch {
			case serr == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK:
				return -1, fmt.Errorf("%w: %s is a symbolic link, which is never followed", ErrUnsafePath, p)
			case serr == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR:
				return -1, fmt.Errorf("%s is not a directory", p)
			case errors.Is(err, unix.ENOENT):
				return -1, fmt.Errorf("%s: %w", p, errNotExist)
			default:
				return -1, fmt.Errorf("opening %s: %w", p, err)
			}
		}
		unix.Close(cur)
		cur = next
		done = path.Join(done, comp)
	}
	return cur, nil
}

// openParent opens the directory holding rel (which must not be the root)
// and returns it with rel's last component.
func (r *root) openParent(rel string, create bool) (int, string, error) {
	dir, base := path.Split(rel)
	fd, err := r.openDir(strings.TrimSuffix(dir, "/"), create)
	if err != nil {
		return -1, "", err
	}
	return fd, base, nil
}

// lstatAt stats name in dirfd without following a link; ok is false when
// it does not exist.
func lstatAt(dirfd int, name string) (st unix.Stat_t, ok bool, err error) {
	err = unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return st, false, nil
	}
	if err != nil {
		return st, false, err
	}
	return st, true, nil
}

// removeAllAt removes name in dirfd and, for a directory, everything in it.
// Links are removed, never followed. A missing name is not an error.
func removeAllAt(dirfd int, name string) error {
	st, ok, err := lstatAt(dirfd, name)
	if err != nil || !ok {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return unix.Unlinkat(dirfd, name, 0)
	}
	if err := removeChildren(dirfd, name, nil); err != nil {
		return err
	}
	return unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// removeChildren removes what directory name in dirfd holds. keep, when
// not nil, is asked about each child (by its name) and says whether to keep
// it and whether to descend into it (a kept directory whose own children
// must be pruned); it serves opaque whiteouts.
func removeChildren(dirfd int, name string, keep func(child string) (keepIt, descend bool)) error {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return err
	}
	for _, n := range names {
		if keep != nil {
			k, descend := keep(n)
			if k {
				if st, ok, _ := lstatAt(fd, n); descend && ok && st.Mode&unix.S_IFMT == unix.S_IFDIR {
					if err := removeChildren(fd, n, subKeep(keep, n)); err != nil {
						return err
					}
				}
				continue
			}
		}
		if err := removeAllAt(fd, n); err != nil {
			return err
		}
	}
	return nil
}

// subKeep is keep for the children of child: it asks about "child/name".
func subKeep(keep func(string) (bool, bool), child string) func(string) (bool, bool) {
	return func(n string) (bool, bool) { return keep(child + "/" + n) }
}
