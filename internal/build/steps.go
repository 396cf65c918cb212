package build

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pandastack/pandastack/internal/image"
	"github.com/pandastack/pandastack/internal/runtime"
)

// imageBase unpacks an image once per digest under bases/ (with the
// default user added, see ensureDefaultUser) and returns it as a base.
func (b *Builder) imageBase(ctx context.Context, img v1.Image) (baseInfo, error) {
	digest, err := img.Digest()
	if err != nil {
		return baseInfo{}, fmt.Errorf("image digest: %w", err)
	}
	cfg, err := image.ConfigOf(img)
	if err != nil {
		return baseInfo{}, err
	}
	dir := filepath.Join(b.cfg.Dir, "bases", digest.Hex)
	rootfs := filepath.Join(dir, "rootfs")
	info := baseInfo{id: "image:" + digest.String(), rootfs: rootfs, config: cfg}
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		return info, nil
	}
	tmp, err := os.MkdirTemp(filepath.Join(b.cfg.Dir, "work"), "base-")
	if err != nil {
		return baseInfo{}, fmt.Errorf("creating unpack directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return baseInfo{}, err
	}
	tmpRoot := filepath.Join(tmp, "rootfs")
	if err := os.Mkdir(tmpRoot, 0o755); err != nil {
		return baseInfo{}, err
	}
	res, err := image.Unpack(ctx, img, tmpRoot, b.cfg.UnpackLimits)
	if err != nil {
		return baseInfo{}, fmt.Errorf("unpacking image %s: %w", digest, err)
	}
	b.cfg.Log.Info("unpacked image base", "digest", digest.String(), "layers", res.Layers, "bytes", res.Written)
	root, err := os.OpenRoot(tmpRoot)
	if err != nil {
		return baseInfo{}, err
	}
	err = ensureDefaultUser(root)
	root.Close()
	if err != nil {
		return baseInfo{}, fmt.Errorf("adding the default user to image %s: %w", digest, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "done"), nil, 0o600); err != nil {
		return baseInfo{}, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another build unpacked it first.
		if _, serr := os.Stat(filepath.Join(dir, "done")); serr == nil {
			return info, nil
		}
		return baseInfo{}, fmt.Errorf("storing unpacked image: %w", err)
	}
	return info, nil
}

// step executes one instruction after FROM.
func (bd *build) step(ctx context.Context, in Instruction, n int) error {
	st := &bd.st
	subst := func(w string) (string, error) {
		v, _, err := bd.lex.ProcessWord(w, st.substEnv())
		if err != nil {
			return "", lineErr(in.Line, "%s: %v", in.Cmd, err)
		}
		return v, nil
	}
	meta := func(parts ...string) {
		st.key = hashOf(append([]string{st.key, in.Cmd}, parts...)...)
	}
	switch in.Cmd {
	case "ENV":
		var kv []string
		var keys []string
		for i := 0; i+1 < len(in.Args); i += 3 {
			v, err := subst(in.Args[i+1])
			if err != nil {
				return err
			}
			keys = append(keys, in.Args[i])
			kv = append(kv, in.Args[i]+"="+v)
		}
		// All values are substituted with the environment before this
		// instruction, as Docker does.
		for i, e := range kv {
			st.setEnv(keys[i], strings.TrimPrefix(e, keys[i]+"="))
		}
		meta(kv...)
	case "ARG":
		for _, w := range in.Args {
			k, def, hasDef := strings.Cut(w, "=")
			if _, seen := st.args[k]; !seen {
				st.argOrder = append(st.argOrder, k)
			}
			if v, ok := bd.opts.Args[k]; ok {
				st.args[k] = v
			} else if hasDef {
				v, err := subst(def)
				if err != nil {
					return err
				}
				st.args[k] = v
			} else if v, ok := bd.meta[k]; ok {
				st.args[k] = v // a global ARG redeclared without a value
			}
			meta(k, st.args[k])
		}
	case "WORKDIR":
		w, err := subst(in.Args[0])
		if err != nil {
			return err
		}
		if !path.IsAbs(w) {
			w = path.Join(st.workdir, w)
		}
		st.workdir = path.Clean(w)
		return bd.fsStep(ctx, in, n, []string{st.workdir, st.user}, func(merged *os.Root) error {
			return bd.mkWorkdir(merged)
		})
	case "USER":
		u, err := subst(in.Args[0])
		if err != nil {
			return err
		}
		st.user = u
		meta(u)
	case "SHELL":
		st.shell = append([]string(nil), in.Args...)
		meta(in.Args...)
	case "CMD", "ENTRYPOINT":
		argv := in.Args
		if !in.JSON {
			argv = append(append([]string(nil), st.shell...), in.Args[0])
		}
		if in.Cmd == "CMD" {
			st.cmd, st.cmdHere = argv, true
		} else {
			st.entrypoint = argv
			if !st.cmdHere {
				st.cmd = nil // Docker: ENTRYPOINT resets a CMD inherited from the base
			}
		}
		meta(jsonString(argv))
	case "EXPOSE":
		for _, w := range in.Args {
			p, err := subst(w)
			if err != nil {
				return err
			}
			if !strings.Contains(p, "/") {
				p += "/tcp"
			}
			num, proto, _ := strings.Cut(p, "/")
			if n, err := strconv.Atoi(num); err != nil || n < 1 || n > 65535 || (proto != "tcp" && proto != "udp") {
				return lineErr(in.Line, "EXPOSE %q: want PORT or PORT/tcp or PORT/udp", w)
			}
			st.ports[p] = true
			meta(p)
		}
	case "LABEL":
		for i := 0; i+1 < len(in.Args); i += 3 {
			k, err := subst(in.Args[i])
			if err != nil {
				return err
			}
			v, err := subst(in.Args[i+1])
			if err != nil {
				return err
			}
			st.labels[k] = v
			meta(k, v)
		}
	case "STOPSIGNAL":
		s, err := subst(in.Args[0])
		if err != nil {
			return err
		}
		st.stopSignal = s
		meta(s)
	case "RUN":
		return bd.run(ctx, in, n)
	case "COPY", "ADD":
		return bd.copy(ctx, in, n, subst)
	default:
		return unsupported(in.Line, "the %s instruction is", in.Cmd)
	}
	return nil
}

// mkWorkdir creates the working directory in the step's root filesystem
// (as Docker does for WORKDIR), owned by the step's user.
func (bd *build) mkWorkdir(root *os.Root) error {
	rel := strings.TrimPrefix(bd.st.workdir, "/")
	if rel == "" {
		return nil
	}
	if _, err := root.Stat(rel); err == nil {
		return nil
	}
	id, err := resolveUser(root, bd.st.user)
	if err != nil {
		return err
	}
	if err := root.MkdirAll(rel, 0o755); err != nil {
		return fmt.Errorf("creating the working directory %s: %w", bd.st.workdir, err)
	}
	return root.Lchown(rel, int(id.uid), int(id.gid))
}

// stepRecord is a cached step: the layers of the root filesystem after it.
type stepRecord struct {
	Key         string    `json:"key"`
	Instruction string    `json:"instruction"`
	Layers      []string  `json:"layers"`
	Created     time.Time `json:"created"`
}

func (b *Builder) layerDir(id string) string { return filepath.Join(b.cfg.Dir, "layers", id, "diff") }

// lookup returns the cached record for key, if it and all its layers are
// there.
func (b *Builder) lookup(key string) (stepRecord, bool) {
	raw, err := os.ReadFile(filepath.Join(b.cfg.Dir, "steps", key+".json"))
	if err != nil {
		return stepRecord{}, false
	}
	var rec stepRecord
	if json.Unmarshal(raw, &rec) != nil || rec.Key != key {
		return stepRecord{}, false
	}
	for _, l := range rec.Layers {
		if _, err := os.Stat(b.layerDir(l)); err != nil {
			return stepRecord{}, false
		}
	}
	return rec, true
}

// writeAtomic writes a file by renaming a complete temporary one over it.
func writeAtomic(p string, data []byte) error {
	tmp := p + ".tmp-" + randHex(4)
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// lowers returns the overlay lower directories of the current state, top
// first, ending with the base.
func (bd *build) lowers() []string {
	out := make([]string, 0, len(bd.st.layers)+1)
	for i := len(bd.st.layers) - 1; i >= 0; i-- {
		out = append(out, bd.b.layerDir(bd.st.layers[i]))
	}
	return append(out, bd.base.rootfs)
}

// mounted mounts the current state's root filesystem with a fresh upper
// directory, calls fn with the merged view's path, unmounts, and returns
// the upper directory (in work, which the caller removes).
func (bd *build) mounted(work string, fn func(merged string) error) (upper string, err error) {
	upper = filepath.Join(work, "upper")
	wk := filepath.Join(work, "work")
	merged := filepath.Join(work, "merged")
	for _, d := range []string{upper, wk, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return "", fmt.Errorf("creating step directory: %w", err)
		}
	}
	if err := overlayMount(bd.lowers(), upper, wk, merged); err != nil {
		return "", err
	}
	ferr := fn(merged)
	if err := unmount(merged); err != nil {
		return "", errors.Join(ferr, err)
	}
	return upper, ferr
}

// fsStep runs a step that changes files, or takes it from the cache. parts
// are what the step depends on besides the key before it and the
// instruction; do changes the root filesystem.
func (bd *build) fsStep(ctx context.Context, in Instruction, n int, parts []string, do func(root *os.Root) error) error {
	return bd.fsStepPath(ctx, in, n, parts, func(merged string) error {
		root, err := os.OpenRoot(merged)
		if err != nil {
			return fmt.Errorf("opening the step's root filesystem: %w", err)
		}
		defer root.Close()
		return do(root)
	})
}

func (bd *build) fsStepPath(ctx context.Context, in Instruction, n int, parts []string, do func(merged string) error) error {
	key := hashOf(append([]string{bd.st.key, in.Cmd, jsonString(in.Args), jsonString(in.Flags)}, parts...)...)
	if !bd.opts.NoCache {
		if rec, ok := bd.b.lookup(key); ok {
			bd.st.key, bd.st.layers = key, rec.Layers
			bd.res.Cached++
			bd.emit(Event{Kind: EventCached, Step: n, Line: in.Line})
			return nil
		}
	}
	work, err := os.MkdirTemp(filepath.Join(bd.b.cfg.Dir, "work"), "step-")
	if err != nil {
		return fmt.Errorf("creating step directory: %w", err)
	}
	defer os.RemoveAll(work)
	upper, err := bd.mounted(work, do)
	if err != nil {
		var se *StepError
		var le *LineError
		if errors.As(err, &se) || errors.As(err, &le) {
			return err
		}
		return &LineError{Line: in.Line, Err: fmt.Errorf("%s: %w", in.Cmd, err)}
	}
	id, err := layerDigest(ctx, upper)
	if err != nil {
		return err
	}
	layers := append([]string(nil), bd.st.layers...)
	if id != "" {
		dir := filepath.Join(bd.b.cfg.Dir, "layers", id)
		if _, err := os.Stat(dir); err != nil {
			// Stored once: a layer with the same content is reused.
			tmp := filepath.Join(work, "layer")
			if err := os.Mkdir(tmp, 0o700); err != nil {
				return err
			}
			if err := os.Rename(upper, filepath.Join(tmp, "diff")); err != nil {
				return fmt.Errorf("storing layer: %w", err)
			}
			if err := os.Rename(tmp, dir); err != nil {
				if _, serr := os.Stat(dir); serr != nil {
					return fmt.Errorf("storing layer: %w", err)
				}
			}
		}
		layers = append(layers, id)
	}
	rec, _ := json.MarshalIndent(stepRecord{Key: key, Instruction: in.Original, Layers: layers, Created: time.Now().UTC()}, "", "  ")
	if err := writeAtomic(filepath.Join(bd.b.cfg.Dir, "steps", key+".json"), rec); err != nil {
		return fmt.Errorf("recording step: %w", err)
	}
	bd.st.key, bd.st.layers = key, layers
	bd.res.Ran++
	return nil
}

// run executes a RUN step in a gVisor sandbox over the step's overlay.
func (bd *build) run(ctx context.Context, in Instruction, n int) error {
	st := &bd.st
	var argv []string
	switch {
	case in.JSON:
		argv = append([]string(nil), in.Args...)
	case len(in.Heredocs) == 1:
		argv = append(append([]string(nil), st.shell...), in.Heredocs[0].Content)
	default:
		argv = append(append([]string(nil), st.shell...), in.Args[0])
	}
	env := st.runEnv()
	parts := []string{jsonString(argv), jsonString(env), st.workdir, st.user}
	return bd.fsStepPath(ctx, in, n, parts, func(merged string) error {
		root, err := os.OpenRoot(merged)
		if err != nil {
			return err
		}
		id, err := resolveUser(root, st.user)
		if err == nil {
			err = bd.mkWorkdir(root)
		}
		root.Close()
		if err != nil {
			return lineErr(in.Line, "RUN: %v", err)
		}
		jobEnv := env
		if !hasKey(jobEnv, "HOME") {
			jobEnv = append(append([]string(nil), jobEnv...), "HOME="+id.home)
		}
		out := &stepOutput{bd: bd, step: n, line: in.Line}
		jctx, cancel := context.WithTimeout(ctx, bd.opts.StepTimeout)
		defer cancel()
		code, err := bd.b.cfg.Runner.RunJob(jctx, runtime.Job{
			ID:        runtime.BuildJobPrefix + randHex(8),
			RootfsDir: merged,
			Args:      argv,
			Env:       jobEnv,
			Cwd:       st.workdir,
			UID:       id.uid,
			GID:       id.gid,
			Groups:    id.groups,
			Limits:    bd.opts.Limits,
			Stdout:    out,
			Stderr:    out,
		})
		if err != nil {
			if ctx.Err() == nil && errors.Is(jctx.Err(), context.DeadlineExceeded) {
				return lineErr(in.Line, "RUN timed out after %s; its output ends with:\n%s", bd.opts.StepTimeout, out.tail())
			}
			return lineErr(in.Line, "RUN: %w", err)
		}
		if code != 0 {
			return &StepError{Line: in.Line, Instruction: in.Original, ExitCode: code, Output: out.tail()}
		}
		return nil
	})
}

func hasKey(env []string, k string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, k+"=") {
			return true
		}
	}
	return false
}

// stepOutput passes a RUN step's output to the log and keeps its end.
type stepOutput struct {
	bd         *build
	step, line int
	last       []byte
}

const outputTail = 4096

func (o *stepOutput) Write(p []byte) (int, error) {
	o.bd.logMu.Lock()
	o.last = append(o.last, p...)
	if len(o.last) > outputTail {
		o.last = append([]byte(nil), o.last[len(o.last)-outputTail:]...)
	}
	o.bd.logMu.Unlock()
	o.bd.emit(Event{Kind: EventOutput, Step: o.step, Line: o.line, Text: string(p)})
	return len(p), nil
}

func (o *stepOutput) tail() string {
	o.bd.logMu.Lock()
	defer o.bd.logMu.Unlock()
	return strings.TrimRight(string(o.last), "\n")
}

// copy executes COPY or ADD from the build context.
func (bd *build) copy(ctx context.Context, in Instruction, n int, subst func(string) (string, error)) error {
	st := &bd.st
	if bd.ctxRoot == nil {
		return lineErr(in.Line, "%s needs a build context", in.Cmd)
	}
	flags, err := flagValues(in, "chown", "chmod")
	if err != nil {
		return err
	}
	words := make([]string, len(in.Args))
	for i, a := range in.Args {
		if words[i], err = subst(a); err != nil {
			return err
		}
	}
	srcs, dest := words[:len(words)-1], words[len(words)-1]
	destDir := strings.HasSuffix(dest, "/") || dest == "." || strings.HasSuffix(dest, "/.")
	if len(srcs) > 1 && !destDir {
		return lineErr(in.Line, "%s with several sources needs a destination directory ending in /", in.Cmd)
	}
	if !path.IsAbs(dest) {
		dest = path.Join(st.workdir, dest)
	}
	var o copyOpts
	if m, ok := flags["chmod"]; ok {
		v, err := strconv.ParseUint(m, 8, 32)
		if err != nil || v > 0o7777 {
			return lineErr(in.Line, "%s --chmod=%s: want an octal mode", in.Cmd, m)
		}
		o.chmod, o.hasChmod = fs.FileMode(v)&fs.ModePerm|modeBits(uint32(v)), true
	}
	chown, err := subst(flags["chown"])
	if err != nil {
		return err
	}
	sources, err := resolveSources(bd.ctxRoot, srcs)
	if err != nil {
		return &LineError{Line: in.Line, Err: fmt.Errorf("%s: %w", in.Cmd, err)}
	}
	if in.Cmd == "ADD" {
		for _, s := range sources {
			for _, e := range s.entries {
				if e.mode.IsRegular() && bd.sniffArchive(e.ctxPath) {
					return unsupported(in.Line, "ADD of an archive (%s), which Docker would unpack, is", e.ctxPath)
				}
			}
		}
	}
	sum, err := hashSources(bd.ctxRoot, sources)
	if err != nil {
		return &LineError{Line: in.Line, Err: fmt.Errorf("%s: %w", in.Cmd, err)}
	}
	parts := []string{jsonString(srcs), dest, strconv.FormatBool(destDir), chown, flags["chmod"], sum}
	return bd.fsStep(ctx, in, n, parts, func(root *os.Root) error {
		if chown != "" {
			id, err := resolveUser(root, chown)
			if err != nil {
				return err
			}
			o.uid, o.gid = int(id.uid), int(id.gid)
			if !strings.Contains(chown, ":") {
				o.gid = o.uid // Docker: a user without a group means the same number
			}
		}
		return copyInto(bd.ctxRoot, root, sources, dest, destDir, o)
	})
}

func modeBits(v uint32) fs.FileMode {
	var m fs.FileMode
	if v&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if v&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if v&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

func (bd *build) sniffArchive(p string) bool {
	f, err := bd.ctxRoot.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	head := make([]byte, 512)
	k, _ := io.ReadFull(f, head)
	return isArchive(head[:k])
}

// finish writes the result: the final state's root filesystem copied out
// of its layers into Output/rootfs, and its metadata.
func (bd *build) finish(ctx context.Context) error {
	st := &bd.st
	ports := make([]string, 0, len(st.ports))
	for p := range st.ports {
		ports = append(ports, p)
	}
	sort.Strings(ports)
	md := Metadata{
		From: bd.res.Metadata.From, Base: bd.res.Metadata.Base,
		Env: st.env, WorkingDir: st.workdir, User: st.user,
		Entrypoint: st.entrypoint, Cmd: st.cmd, ExposedPorts: ports, StopSignal: st.stopSignal,
		Shell: st.shell,
	}
	if len(st.labels) > 0 {
		md.Labels = st.labels
	}
	md.Key = hashOf(st.key, "result", jsonString(md))[:32]
	out := bd.opts.Output
	bd.res.Rootfs = filepath.Join(out, "rootfs")
	if raw, err := os.ReadFile(filepath.Join(out, MetadataFile)); err == nil {
		var have Metadata
		if json.Unmarshal(raw, &have) == nil && have.Key == md.Key {
			bd.res.Metadata = have // the same result is there already
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return fmt.Errorf("creating output directory: %w", err)
	}
	tmp := out + ".building-" + randHex(4)
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("creating output directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	work, err := os.MkdirTemp(filepath.Join(bd.b.cfg.Dir, "work"), "final-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	var fres flattenResult
	if _, err := bd.mounted(work, func(merged string) error {
		root, err := os.OpenRoot(merged)
		if err != nil {
			return err
		}
		err = bd.mkWorkdir(root)
		if err == nil {
			// Every sandbox runs /bin/sh (commands, the agent's shell).
			if st, serr := root.Stat("bin/sh"); serr != nil || st.IsDir() {
				err = errors.New("the result has no /bin/sh, which every PandaStack sandbox needs")
			}
		}
		root.Close()
		if err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(tmp, "rootfs"), 0o755); err != nil {
			return err
		}
		fres, err = flatten(ctx, merged, filepath.Join(tmp, "rootfs"))
		return err
	}); err != nil {
		return fmt.Errorf("writing the result: %w", err)
	}
	md.Skipped = fres.Skipped
	md.Created = time.Now().UTC()
	raw, _ := json.MarshalIndent(md, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, MetadataFile), append(raw, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing template metadata: %w", err)
	}
	if err := os.RemoveAll(out); err != nil {
		return fmt.Errorf("removing the earlier result: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("publishing the result: %w", err)
	}
	bd.res.Metadata = md
	return nil
}
