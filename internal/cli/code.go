package cli

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// newSandboxRunCodeCmd returns `pandastack sandbox run-code`: a cell in a
// live interpreter of the sandbox.
func newSandboxRunCodeCmd() *cobra.Command {
	var (
		contextID string
		timeout   float64
		outDir    string
		asJSON    bool
	)
	cmd := &cobra.Command{
		Use:   "run-code ID FILE|-",
		Short: "Run Python in a sandbox's live interpreter; print its output and save its images",
		Long: "Run the Python code in FILE (- for standard input) as one cell in a live interpreter of\n" +
			"the sandbox (a Jupyter kernel): variables persist between runs in the same context.\n" +
			"Output is printed as it comes; the cell's value and displayed results are printed as\n" +
			"text, and images (PNG, JPEG, SVG, PDF, e.g. matplotlib figures) are saved to files in\n" +
			"--out-dir whose names are printed. A cell that raises prints its traceback and exits 1;\n" +
			"one interrupted at its timeout exits 124.",
		Example: "  echo 'import pandas as pd; df = pd.DataFrame({\"a\": [1, 2]}); df.a.sum()' | pandastack sandbox run-code sb-123 -\n" +
			"  pandastack sandbox run-code sb-123 plot.py --out-dir figures",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout < 0 {
				return fmt.Errorf("--timeout must not be negative, got %v", timeout)
			}
			code, err := readCode(cmd, args[1])
			if err != nil {
				return err
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			opts := pandastack.RunCodeOptions{Context: contextID, Timeout: time.Duration(timeout * float64(time.Second))}
			stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
			if asJSON {
				exe, err := sb.RunCode(cmd.Context(), code, opts)
				if err != nil {
					return err
				}
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(exe)
			}
			var saveErr error
			// Write errors (a closed pipe) are ignored, as for exec.
			opts.OnStdout = func(s string) { io.WriteString(stdout, s) }
			opts.OnStderr = func(s string) { io.WriteString(stderr, s) }
			opts.OnResult = func(r wire.CodeResult) {
				paths, err := saveImages(outDir, r)
				if err != nil && saveErr == nil {
					saveErr = err
				}
				for _, p := range paths {
					fmt.Fprintf(stdout, "[%s]\n", p)
				}
				if len(paths) == 0 && r.Text != "" {
					fmt.Fprintln(stdout, r.Text)
				}
			}
			opts.OnError = func(e wire.ExecutionError) {
				tb := e.Traceback
				if tb == "" {
					tb = e.Name + ": " + e.Value
				}
				fmt.Fprintln(stderr, tb)
			}
			exe, err := sb.RunCode(cmd.Context(), code, opts)
			if err != nil {
				return err
			}
			if saveErr != nil {
				return saveErr
			}
			if exe.Truncated {
				fmt.Fprintln(stderr, "pandastack: output was truncated at the server's limit")
			}
			switch {
			case exe.TimedOut:
				fmt.Fprintln(stderr, "pandastack: the cell was interrupted at its timeout")
				return ExitCodeError{Code: 124}
			case exe.Error != nil:
				return ExitCodeError{Code: 1}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&contextID, "context", "", `code context to run in (default: the default Python context, "python")`)
	f.Float64Var(&timeout, "timeout", 0, "seconds before the cell is interrupted (0: the server's default, 60)")
	f.StringVar(&outDir, "out-dir", ".", "directory the images of results are saved in")
	f.BoolVar(&asJSON, "json", false, "print the whole execution as JSON (images stay base64) instead")
	return cmd
}

// readCode reads the cell from a file, or from standard input for "-".
func readCode(cmd *cobra.Command, name string) (string, error) {
	var (
		b   []byte
		err error
	)
	if name == "-" {
		b, err = io.ReadAll(cmd.InOrStdin())
	} else {
		b, err = os.ReadFile(name)
	}
	if err != nil {
		return "", fmt.Errorf("reading the code: %w", err)
	}
	if len(b) == 0 {
		return "", errors.New("the code is empty")
	}
	return string(b), nil
}

// saveImages writes the result's images to new files in dir (result-N.png
// and so on, never overwriting one) and returns their paths.
func saveImages(dir string, r wire.CodeResult) ([]string, error) {
	var paths []string
	for _, img := range []struct {
		ext, data string
		binary    bool
	}{{"png", r.PNG, true}, {"jpeg", r.JPEG, true}, {"svg", r.SVG, false}, {"pdf", r.PDF, true}} {
		if img.data == "" {
			continue
		}
		b := []byte(img.data)
		if img.binary {
			var err error
			if b, err = base64.StdEncoding.DecodeString(img.data); err != nil {
				return paths, fmt.Errorf("decoding a %s result: %w", img.ext, err)
			}
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return paths, fmt.Errorf("creating %s: %w", dir, err)
		}
		p, err := createNew(dir, "result-", "."+img.ext, b)
		if err != nil {
			return paths, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// createNew writes b to the first prefixN.ext in dir that does not exist.
func createNew(dir, prefix, ext string, b []byte) (string, error) {
	for n := 1; ; n++ {
		p := filepath.Join(dir, prefix+strconv.Itoa(n)+ext)
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("saving a result: %w", err)
		}
		_, werr := f.Write(b)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return "", fmt.Errorf("saving a result to %s: %w", p, werr)
		}
		return p, nil
	}
}
