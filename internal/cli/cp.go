package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// newSandboxCpCmd returns `pandastack sandbox cp`: files and directories
// between this machine and a sandbox, both ways, as `docker cp` does.
func newSandboxCpCmd() *cobra.Command {
	var user string
	cmd := &cobra.Command{
		Use:   "cp SRC_PATH SANDBOX:DEST_PATH | SANDBOX:SRC_PATH DEST_PATH",
		Short: "Copy files and directories between this machine and a sandbox",
		Long: `Copy a file or a directory into a sandbox or out of one, streamed (nothing is held whole
in memory), as docker cp does:
  - a file goes to DEST_PATH, or into it when DEST_PATH is an existing directory or ends in /;
  - a directory goes into DEST_PATH when that is an existing directory (as DEST_PATH/NAME),
    else becomes DEST_PATH (with its parents);
  - SRC_PATH "-" reads a tar archive from stdin and extracts it into the sandbox's directory
    DEST_PATH; DEST_PATH "-" writes a tar archive of SANDBOX:SRC_PATH to stdout (a directory's
    contents with names relative to it, or a file under its base name).
Paths in the sandbox are absolute. Files made in the sandbox belong to --user (the sandbox's
unprivileged default user unless "root"); files made here belong to whoever runs this.
An archive from a sandbox is not trusted: nothing of it lands outside DEST_PATH.`,
		Example: "  pandastack sandbox cp ./data.csv sb-123:/home/user/\n" +
			"  pandastack sandbox cp ./project sb-123:/home/user/project\n" +
			"  pandastack sandbox cp sb-123:/home/user/out ./results\n" +
			"  tar -C src -cf - . | pandastack sandbox cp - sb-123:/home/user/src",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			src, dst := parseCpArg(args[0]), parseCpArg(args[1])
			switch {
			case src.sandbox == "" && dst.sandbox == "":
				return fmt.Errorf("one of SRC_PATH and DEST_PATH must name a sandbox, as SANDBOX:PATH")
			case src.sandbox != "" && dst.sandbox != "":
				return fmt.Errorf("copying from one sandbox to another is not supported: copy to this machine first")
			}
			remote := dst
			if src.sandbox != "" {
				remote = src
			}
			if !strings.HasPrefix(remote.path, "/") {
				return fmt.Errorf("the sandbox path must be absolute, got %q", remote.path)
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			// Connect turns a wrong id into a clear error and resumes a
			// paused sandbox.
			sb, err := c.Connect(cmd.Context(), remote.sandbox)
			if err != nil {
				return err
			}
			files := sb.Files()
			if user != "" {
				files = files.As(user)
			}
			cp := copier{cmd: cmd, files: files}
			if dst.sandbox != "" {
				return cp.in(src.path, dst.path)
			}
			return cp.out(src.path, dst.path)
		},
	}
	cmd.Flags().StringVarP(&user, "user", "u", "", `user in the sandbox: "user" (the default, unprivileged) or "root"`)
	return cmd
}

// cpArg is one side of a copy: a sandbox path (sandbox set) or a local one.
type cpArg struct {
	sandbox, path string
}

// parseCpArg reads SANDBOX:PATH, or a local path: one with a "/" before
// any ":" (write ./a:b for a local file named a:b), "-", or no ":".
func parseCpArg(s string) cpArg {
	i := strings.IndexByte(s, ':')
	if i <= 0 || strings.Contains(s[:i], "/") {
		return cpArg{path: s}
	}
	return cpArg{sandbox: s[:i], path: s[i+1:]}
}

type copier struct {
	cmd   *cobra.Command
	files *pandastack.Files
}

// in copies the local src into the sandbox's dst.
func (c copier) in(src, dst string) error {
	ctx := c.cmd.Context()
	if src == "-" {
		_, err := c.files.UploadTar(ctx, dst, c.cmd.InOrStdin())
		return err
	}
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	target, err := c.files.Stat(ctx, dst)
	dstIsDir := err == nil && target.Type == wire.FileTypeDir
	if err != nil && !errors.Is(err, pandastack.ErrNotFound) {
		return err
	}
	if fi.IsDir() {
		if dstIsDir {
			dst = path.Join(dst, filepath.Base(filepath.Clean(src)))
		}
		_, err := c.files.UploadDir(ctx, src, dst)
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is neither a regular file nor a directory", src)
	}
	if dstIsDir || strings.HasSuffix(dst, "/") {
		dst = path.Join(dst, filepath.Base(src))
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = c.files.Write(ctx, dst, f, pandastack.WriteOptions{Mode: fi.Mode().Perm()})
	return err
}

// out copies the sandbox's src to the local dst.
func (c copier) out(src, dst string) error {
	ctx := c.cmd.Context()
	if dst == "-" {
		rc, err := c.files.DownloadTar(ctx, src)
		if err != nil {
			return err
		}
		defer rc.Close()
		_, err = io.Copy(c.cmd.OutOrStdout(), rc)
		return err
	}
	fi, err := c.files.Stat(ctx, src)
	if err != nil {
		return err
	}
	local, lerr := os.Stat(dst)
	dstIsDir := lerr == nil && local.IsDir()
	if fi.Type == wire.FileTypeDir {
		if dstIsDir {
			dst = filepath.Join(dst, path.Base(src))
		}
		return c.files.DownloadDir(ctx, src, dst)
	}
	if fi.Type != wire.FileTypeFile {
		// A symlink or special file: the archive holds it as it is.
		if !dstIsDir {
			return fmt.Errorf("%s is a %s: copy it into a directory", src, fi.Type)
		}
		return c.files.DownloadDir(ctx, src, dst)
	}
	if dstIsDir || strings.HasSuffix(dst, string(filepath.Separator)) {
		dst = filepath.Join(dst, path.Base(src))
	}
	return c.download(src, dst, os.FileMode(fi.Mode).Perm())
}

// download streams a file into dst through a temporary file beside it,
// renamed into place when complete.
func (c copier) download(src, dst string, mode os.FileMode) error {
	rc, err := c.files.Read(c.cmd.Context(), src, pandastack.ReadOptions{})
	if err != nil {
		return err
	}
	defer rc.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".pandastack-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, rc); err != nil {
		tmp.Close()
		return fmt.Errorf("copying %s: %w", src, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}
