package build

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBuildHostileCopy: COPY and ADD never read outside the build context
// and never write outside the step's root filesystem, whatever the context
// or an earlier step planted. Each case must fail at its line, and the
// sentinel directory outside must stay empty.
func TestBuildHostileCopy(t *testing.T) {
	h := newHarness(t)
	sentinel := filepath.Join(h.dir, "sentinel")
	if err := os.Mkdir(sentinel, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(h.dir, "secret.txt")
	if err := os.WriteFile(secret, []byte("host secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctxDir := filepath.Join(h.dir, "context")
	writeFiles(t, ctxDir, map[string]string{"a.txt": "a\n", "arch.tar.gz": "\x1f\x8b\x08\x00rest"})
	for name, target := range map[string]string{
		"abs-link": secret,                          // absolute, out of the context
		"rel-link": "../secret.txt",                 // relative, climbing out
		"dir-link": filepath.Join(h.dir, "context"), // absolute, even to the context itself
	} {
		if err := os.Symlink(target, filepath.Join(ctxDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name       string
		dockerfile string
		line       int
		want       error // nil: any error naming the line
	}{
		{"dotdot source", "FROM base\nCOPY ../secret.txt /x\n", 2, ErrOutsideContext},
		{"dotdot in the middle", "FROM base\nCOPY sub/../../secret.txt /x\n", 2, ErrOutsideContext},
		{"absolute link out", "FROM base\nCOPY abs-link /x\n", 2, ErrOutsideContext},
		{"relative link out", "FROM base\nCOPY rel-link /x\n", 2, ErrOutsideContext},
		{"glob reaching a link out", "FROM base\nCOPY abs-* /x/\n", 2, ErrOutsideContext},
		{"link to a directory by absolute path", "FROM base\nCOPY dir-link/a.txt /x\n", 2, ErrOutsideContext},
		{"planted absolute link", "FROM base\nRUN ln -s " + sentinel + " /planted\nCOPY a.txt /planted/\n", 3, nil},
		{"planted climbing link", "FROM base\nRUN ln -s ../../../../../../../../../../.." + sentinel + " /planted\nCOPY a.txt /planted/x\n", 3, nil},
		{"planted link as parent", "FROM base\nRUN mkdir -p /app && ln -s " + sentinel + " /app/sub\nWORKDIR /app/sub/deeper\n", 3, nil},
		{"ADD URL", "FROM base\nADD https://example.com/x /x\n", 2, ErrUnsupported},
		{"ADD archive", "FROM base\nADD arch.tar.gz /x/\n", 2, ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var log buildLog
			_, err := h.b.Build(ctx, Options{
				Dockerfile: []byte(tc.dockerfile),
				Context:    ctxDir,
				Output:     filepath.Join(h.dir, "out"),
				Log:        log.add,
			})
			var le *LineError
			if !errors.As(err, &le) || le.Line != tc.line {
				t.Fatalf("err = %v, want an error at line %d\nlog:\n%s", err, tc.line, log.text())
			}
			t.Logf("refused: %v", err)
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if ents, _ := os.ReadDir(sentinel); len(ents) != 0 {
				t.Fatalf("the build wrote outside its root filesystem: %v", ents)
			}
			if strings.Contains(log.text(), "host secret") {
				t.Fatalf("the host secret reached the build")
			}
		})
	}
}
