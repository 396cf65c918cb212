package build

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/pandastack/pandastack/internal/template"
)

// identity is who a RUN step runs as, or who owns what COPY writes.
type identity struct {
	uid, gid uint32
	groups   []uint32
	home     string
}

// passwdEntry is one line of /etc/passwd.
type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// readPasswd reads the root filesystem's /etc/passwd (through root, so a
// link there cannot lead out). A missing file is empty.
func readPasswd(root *os.Root) ([]passwdEntry, error) {
	b, err := root.ReadFile("etc/passwd")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading /etc/passwd: %w", err)
	}
	var out []passwdEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 7 {
			continue
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, passwdEntry{name: f[0], uid: uint32(uid), gid: uint32(gid), home: f[5]})
	}
	return out, nil
}

// groupEntry is one line of /etc/group.
type groupEntry struct {
	name    string
	gid     uint32
	members []string
}

func readGroups(root *os.Root) ([]groupEntry, error) {
	b, err := root.ReadFile("etc/group")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading /etc/group: %w", err)
	}
	var out []groupEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 4 {
			continue
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		g := groupEntry{name: f[0], gid: uint32(gid)}
		if f[3] != "" {
			g.members = strings.Split(f[3], ",")
		}
		out = append(out, g)
	}
	return out, nil
}

// resolveUser resolves a USER or --chown value ("name", "uid",
// "name:group", "uid:gid") against the root filesystem's /etc/passwd and
// /etc/group, as Docker does: a name must exist; a uid without an entry
// gets gid 0 and home "/"; supplementary groups are those listing the
// user. The empty string is root.
func resolveUser(root *os.Root, spec string) (identity, error) {
	if spec == "" {
		spec = "root"
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	users, err := readPasswd(root)
	if err != nil {
		return identity{}, err
	}
	id := identity{home: "/"}
	name := ""
	if n, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		id.uid = uint32(n)
		for _, u := range users {
			if u.uid == id.uid {
				id.gid, id.home, name = u.gid, u.home, u.name
				break
			}
		}
	} else {
		found := false
		for _, u := range users {
			if u.name == userPart {
				id.uid, id.gid, id.home, name, found = u.uid, u.gid, u.home, u.name, true
				break
			}
		}
		if !found {
			return identity{}, fmt.Errorf("user %q is not in the image's /etc/passwd", userPart)
		}
	}
	groups, err := readGroups(root)
	if err != nil {
		return identity{}, err
	}
	if hasGroup {
		if n, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			id.gid = uint32(n)
		} else {
			found := false
			for _, g := range groups {
				if g.name == groupPart {
					id.gid, found = g.gid, true
					break
				}
			}
			if !found {
				return identity{}, fmt.Errorf("group %q is not in the image's /etc/group", groupPart)
			}
		}
		return id, nil
	}
	if name != "" {
		for _, g := range groups {
			for _, m := range g.members {
				if m == name && g.gid != id.gid {
					id.groups = append(id.groups, g.gid)
				}
			}
		}
	}
	return id, nil
}

// ensureDefaultUser gives a root filesystem unpacked from an OCI image the
// user every PandaStack sandbox runs commands as by default (template.
// UserName, uid and gid template.UserID, home template.UserHome, shell
// /bin/sh), when it has no user of that name: appended to /etc/passwd and
// /etc/group (created when missing, with root), and its home created. An
// image with another user at uid 1000 keeps it; "user" shares the uid.
func ensureDefaultUser(root *os.Root) error {
	users, err := readPasswd(root)
	if err != nil {
		return err
	}
	for _, u := range users {
		if u.name == template.UserName {
			return nil
		}
	}
	if err := root.MkdirAll("etc", 0o755); err != nil {
		return fmt.Errorf("creating /etc: %w", err)
	}
	appendLine := func(name, missing, line string) error {
		b, err := root.ReadFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			b, err = []byte(missing), nil
		}
		if err != nil {
			return fmt.Errorf("reading /%s: %w", name, err)
		}
		if len(b) > 0 && b[len(b)-1] != '\n' {
			b = append(b, '\n')
		}
		b = append(b, line+"\n"...)
		mode := fs.FileMode(0o644)
		if st, err := root.Lstat(name); err == nil {
			if !st.Mode().IsRegular() {
				return fmt.Errorf("/%s is not a regular file", name)
			}
			mode = st.Mode().Perm()
			if err := root.Remove(name); err != nil {
				return fmt.Errorf("replacing /%s: %w", name, err)
			}
		}
		if err := root.WriteFile(name, b, mode); err != nil {
			return fmt.Errorf("writing /%s: %w", name, err)
		}
		return nil
	}
	id := strconv.Itoa(template.UserID)
	if err := appendLine("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n",
		fmt.Sprintf("%s:x:%s:%s::%s:/bin/sh", template.UserName, id, id, template.UserHome)); err != nil {
		return err
	}
	groups, err := readGroups(root)
	if err != nil {
		return err
	}
	hasGroup := false
	for _, g := range groups {
		hasGroup = hasGroup || g.gid == template.UserID
	}
	if !hasGroup {
		if err := appendLine("etc/group", "root:x:0:\n", fmt.Sprintf("%s:x:%s:", template.UserName, id)); err != nil {
			return err
		}
	}
	home := strings.TrimPrefix(template.UserHome, "/")
	if _, err := root.Lstat(home); errors.Is(err, fs.ErrNotExist) {
		if err := root.MkdirAll(home, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", template.UserHome, err)
		}
		if err := root.Lchown(home, template.UserID, template.UserID); err != nil {
			return fmt.Errorf("giving %s to %s: %w", template.UserHome, template.UserName, err)
		}
	}
	return nil
}
