package gvisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/pandastack/pandastack/internal/runtime"
)

var _ runtime.JobRunner = (*Runtime)(nil)

// jobFlags are the runsc flags of a job: no network, and no overlay, so
// that the command writes to the job's root filesystem directory itself
// (through gVisor's gofer, never by a host process of the command).
func (r *Runtime) jobFlags() []string {
	return []string{
		"--root=" + filepath.Join(r.cfg.StateDir, "runsc"),
		"--platform=" + r.cfg.Platform,
		"--network=none",
		"--overlay2=none",
	}
}

// RunJob implements runtime.JobRunner with runsc run. The command's stdout
// and stderr are pipes the sandbox holds until it ends; cancelling ctx
// kills every process of the job.
func (r *Runtime) RunJob(ctx context.Context, j runtime.Job) (code int, err error) {
	if !validID(j.ID) {
		return -1, fmt.Errorf("invalid job id %q", j.ID)
	}
	if len(j.Args) == 0 {
		return -1, fmt.Errorf("job %s has no command", j.ID)
	}
	dir := r.dir(j.ID)
	if err := os.MkdirAll(filepath.Join(dir, "bundle"), 0o700); err != nil {
		return -1, fmt.Errorf("creating job directory: %w", err)
	}
	// Whatever happens, the job's sandbox, cgroups and directory go; then
	// the output copies end (the sandbox held the pipes' write ends).
	var copies sync.WaitGroup
	defer func() {
		if derr := r.Delete(context.WithoutCancel(ctx), j.ID); derr != nil && err == nil {
			err = fmt.Errorf("removing job sandbox: %w", derr)
		}
		copies.Wait()
	}()
	oci, err := jobSpec(j, r.cfg.CgroupParent)
	if err != nil {
		return -1, err
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle", "config.json"), oci, 0o600); err != nil {
		return -1, fmt.Errorf("writing OCI spec: %w", err)
	}

	// The sandbox inherits the write ends; the copies end when it is gone.
	pipe := func(w io.Writer) (*os.File, error) {
		if w == nil {
			w = io.Discard
		}
		rd, wr, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("creating job output pipe: %w", err)
		}
		copies.Add(1)
		go func() {
			defer copies.Done()
			defer rd.Close()
			_, _ = io.Copy(w, rd)
		}()
		return wr, nil
	}
	var createOut bytes.Buffer
	stdout, err := pipe(j.Stdout)
	if err != nil {
		return -1, err
	}
	stderr, err := pipe(&teeWriter{w: j.Stderr, keep: &limitedBuffer{buf: &createOut, max: 4096}})
	if err != nil {
		stdout.Close()
		return -1, err
	}
	// runsc's own errors (as JSON lines) go to a file of their own, so
	// that they are told apart from the command's exit status: runsc
	// exits 128 on its errors, which a command can too.
	errLog, err := os.Create(filepath.Join(dir, "runsc-errors.json"))
	if err != nil {
		stdout.Close()
		stderr.Close()
		return -1, fmt.Errorf("creating runsc error log: %w", err)
	}
	defer errLog.Close()
	// runsc run, not create/start/wait: the sandbox is then runsc's child,
	// whose exit status runsc reads even when it ends before anyone could
	// ask it (runsc wait cannot then).
	cmd := r.jobCmd(context.WithoutCancel(ctx), "--log-fd=3", "run", "--bundle="+filepath.Join(dir, "bundle"), j.ID)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = []*os.File{errLog}
	serr := cmd.Start()
	stdout.Close()
	stderr.Close()
	if serr != nil {
		return -1, fmt.Errorf("starting runsc: %w", serr)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-done:
	case <-ctx.Done():
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), runscTimeout)
		defer kcancel()
		_ = r.jobCmd(kctx, "kill", "--all", j.ID, "KILL").Run()
		select {
		case <-done:
		case <-time.After(runscTimeout):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		return -1, fmt.Errorf("job %s: %w", j.ID, ctx.Err())
	}
	if msg := runscErrors(errLog); msg != "" {
		return -1, fmt.Errorf("running job with runsc: %s", msg)
	}
	var exit *exec.ExitError
	switch {
	case werr == nil:
		return 0, nil
	case errors.As(werr, &exit) && exit.ExitCode() >= 0:
		return exit.ExitCode(), nil
	default:
		return -1, fmt.Errorf("running job with runsc: %w: %s", werr, strings.TrimSpace(createOut.String()))
	}
}

// runscErrors returns the messages runsc wrote to its error log.
func runscErrors(f *os.File) string {
	b, err := os.ReadFile(f.Name())
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	var msgs []string
	dec := json.NewDecoder(bytes.NewReader(b))
	for {
		var e struct {
			Msg string `json:"msg"`
		}
		if err := dec.Decode(&e); err != nil {
			break
		}
		msgs = append(msgs, e.Msg)
	}
	if len(msgs) == 0 {
		return strings.TrimSpace(string(b))
	}
	return strings.Join(msgs, "; ")
}

func (r *Runtime) jobCmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.cfg.Runsc, append(r.jobFlags(), args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// teeWriter writes to w (when set) and keeps a copy in keep.
type teeWriter struct {
	w    io.Writer
	keep io.Writer
	mu   sync.Mutex
}

func (t *teeWriter) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, _ = t.keep.Write(p)
	if t.w != nil {
		return t.w.Write(p)
	}
	return len(p), nil
}

// jobSpec renders the OCI runtime spec of a job: a sandbox's, with the
// job's process, a writable root and no /tmp tmpfs (what a build step
// leaves in /tmp is part of its result, as in Docker).
func jobSpec(j runtime.Job, cgroupParent string) ([]byte, error) {
	b, err := ociSpec(runtime.Spec{ID: j.ID, Hostname: "build", RootfsDir: j.RootfsDir, Init: j.Args, Env: j.Env, Limits: j.Limits}, cgroupParent)
	if err != nil {
		return nil, err
	}
	var sp specs.Spec
	if err := json.Unmarshal(b, &sp); err != nil {
		return nil, fmt.Errorf("decoding OCI spec: %w", err)
	}
	cwd := j.Cwd
	if cwd == "" {
		cwd = "/"
	}
	sp.Process.Cwd = cwd
	sp.Process.User = specs.User{UID: j.UID, GID: j.GID, AdditionalGids: j.Groups}
	mounts := sp.Mounts[:0]
	for _, m := range sp.Mounts {
		if m.Destination != "/tmp" {
			mounts = append(mounts, m)
		}
	}
	sp.Mounts = mounts
	out, err := json.MarshalIndent(sp, "", "  ")
	if err != nil {
		return nil, errors.Join(errors.New("encoding OCI spec"), err)
	}
	return out, nil
}
