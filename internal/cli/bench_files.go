package cli

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// benchFileRuns is how many times each file figure is measured.
const benchFileRuns = 3

// benchFiles measures the throughput of a file of mb MB written into a
// sandbox and read back through the HTTP API, beside copying the same file
// on the host (as cp does), in the
// same run.
func benchFiles(ctx context.Context, c *pandastack.Client, tmpl string, mb int) ([]benchFigure, error) {
	dir, err := os.MkdirTemp("", "pandastack-bench-files-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	size := int64(mb) << 20
	src := filepath.Join(dir, "src")
	if err := writeRandomFile(src, size); err != nil {
		return nil, err
	}
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 30 * time.Minute, DiskMB: 2*mb + 512})
	if err != nil {
		return nil, err
	}
	defer sb.Close()
	files := sb.Files()

	var host, up, down []time.Duration
	for i := range benchFileRuns {
		d, err := timeIt(func() error { return copyFile(src, filepath.Join(dir, fmt.Sprintf("copy%d", i))) })
		if err != nil {
			return nil, err
		}
		host = append(host, d)
		os.Remove(filepath.Join(dir, fmt.Sprintf("copy%d", i)))

		d, err = timeIt(func() error {
			f, err := os.Open(src)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = files.Write(ctx, "/home/user/bench.bin", f, pandastack.WriteOptions{})
			return err
		})
		if err != nil {
			return nil, err
		}
		up = append(up, d)

		dst := filepath.Join(dir, "down")
		d, err = timeIt(func() error {
			rc, err := files.Read(ctx, "/home/user/bench.bin", pandastack.ReadOptions{})
			if err != nil {
				return err
			}
			defer rc.Close()
			out, err := os.Create(dst)
			if err != nil {
				return err
			}
			n, err := io.Copy(out, rc)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err == nil && n != size {
				err = fmt.Errorf("read back %d bytes, want %d", n, size)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		down = append(down, d)
		os.Remove(dst)
	}
	rate := func(d []time.Duration) float64 {
		best := d[0]
		for _, x := range d {
			best = min(best, x)
		}
		return float64(size) / best.Seconds() / 1e6
	}
	name := fmt.Sprintf("%d MB", mb)
	return []benchFigure{
		figure("file copy on the host, "+name, fmt.Sprintf("%.0f MB/s (best run); io.Copy between two files, as cp (copy_file_range)", rate(host)), host),
		figure("file upload, "+name, fmt.Sprintf("%.0f MB/s (best run); PUT /files, streamed into the sandbox's disk", rate(up)), up),
		figure("file download, "+name, fmt.Sprintf("%.0f MB/s (best run); GET /files, to a host file", rate(down)), down),
	}, nil
}

func timeIt(f func() error) (time.Duration, error) {
	start := time.Now()
	err := f()
	return time.Since(start), err
}

func writeRandomFile(p string, size int64) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	_, err = io.CopyN(f, rand.Reader, size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
