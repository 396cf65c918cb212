package agent

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// identity is who a command or file operation runs as inside the sandbox.
type identity struct {
	name     string
	uid, gid uint32
	groups   []uint32
	home     string
}

// errUnknownUser reports a user the sandbox's /etc/passwd does not have.
type errUnknownUser struct{ name string }

func (e errUnknownUser) Error() string {
	return fmt.Sprintf("user %q does not exist in this sandbox", e.name)
}

// lookupIdentity resolves a user name of the sandbox (its /etc/passwd and
// /etc/group: os/user reads them in pure Go). The empty name is the
// agent's own identity.
func lookupIdentity(name string) (identity, error) {
	if name == "" {
		return identity{uid: uint32(os.Getuid()), gid: uint32(os.Getgid())}, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if ok := asUnknownUser(err, &unknown); ok {
			return identity{}, errUnknownUser{name}
		}
		return identity{}, fmt.Errorf("looking up user %q: %w", name, err)
	}
	id := identity{name: u.Username, home: u.HomeDir}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return identity{}, fmt.Errorf("user %q has a non-numeric uid or gid", name)
	}
	id.uid, id.gid = uint32(uid), uint32(gid)
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				id.groups = append(id.groups, uint32(n))
			}
		}
	}
	return id, nil
}

func asUnknownUser(err error, target *user.UnknownUserError) bool {
	u, ok := err.(user.UnknownUserError)
	if ok {
		*target = u
	}
	return ok
}

// credential is what a child process gets to run as id; nil for the
// agent's own identity.
func (id identity) credential() *syscall.Credential {
	if id.uid == uint32(os.Getuid()) && id.gid == uint32(os.Getgid()) && id.name == "" {
		return nil
	}
	return &syscall.Credential{Uid: id.uid, Gid: id.gid, Groups: id.groups}
}

// env is the part of a command's environment that says who it runs as.
func (id identity) env() []string {
	if id.name == "" {
		return nil
	}
	return []string{"HOME=" + id.home, "USER=" + id.name, "LOGNAME=" + id.name}
}

// chown gives a path the agent made to id (files written through the API
// belong to the user they were written as); a no-op for the agent's own.
func (id identity) chown(path string) error {
	if id.name == "" {
		return nil
	}
	return os.Lchown(path, int(id.uid), int(id.gid))
}
