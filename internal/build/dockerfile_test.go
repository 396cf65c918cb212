package build

import (
	"errors"
	"strings"
	"testing"
)

func TestParseDockerfile(t *testing.T) {
	src := "# syntax comment\n" +
		"ARG BASE=base\n" +
		"FROM ${BASE} AS app\n" +
		"# a comment\n" +
		"ENV A=1 \\\n" +
		"    B=\"two words\"\n" +
		"RUN echo one \\\n" +
		"  && echo two\n" +
		"RUN [\"/bin/echo\", \"json\"]\n" +
		"COPY --chown=user:user --chmod=755 a b /dst/\n" +
		"RUN <<EOF\n" +
		"echo heredoc\n" +
		"EOF\n" +
		"CMD [\"sh\"]\n"
	df, err := ParseDockerfile([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if len(df.MetaArgs) != 1 || df.From.Line != 3 || df.From.Args[0] != "${BASE}" {
		t.Fatalf("meta args %+v, from %+v", df.MetaArgs, df.From)
	}
	want := []struct {
		cmd  string
		line int
		json bool
		args []string
	}{
		{"ENV", 5, false, []string{"A", "1", "=", "B", "\"two words\"", "="}},
		{"RUN", 7, false, []string{"echo one   && echo two"}},
		{"RUN", 9, true, []string{"/bin/echo", "json"}},
		{"COPY", 10, false, []string{"a", "b", "/dst/"}},
		{"RUN", 11, false, []string{"<<EOF"}},
		{"CMD", 14, true, []string{"sh"}},
	}
	if len(df.Steps) != len(want) {
		t.Fatalf("got %d steps, want %d: %+v", len(df.Steps), len(want), df.Steps)
	}
	for i, w := range want {
		s := df.Steps[i]
		if s.Cmd != w.cmd || s.Line != w.line || s.JSON != w.json || strings.Join(s.Args, "|") != strings.Join(w.args, "|") {
			t.Errorf("step %d = %s line %d json %v args %q; want %s line %d json %v args %q", i, s.Cmd, s.Line, s.JSON, s.Args, w.cmd, w.line, w.json, w.args)
		}
	}
	if got := df.Steps[4].Heredocs; len(got) != 1 || !strings.Contains(got[0].Content, "echo heredoc") {
		t.Errorf("heredoc = %+v", got)
	}
	if got := df.Steps[3].Flags; len(got) != 2 {
		t.Errorf("COPY flags = %q", got)
	}
}

func TestParseDockerfileRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, src   string
		line        int
		unsupported bool
		want        string
	}{
		{"volume", "FROM base\nVOLUME /data\n", 2, true, "VOLUME"},
		{"healthcheck", "FROM base\nRUN true\nHEALTHCHECK CMD true\n", 3, true, "HEALTHCHECK"},
		{"multi-stage", "FROM base AS a\nRUN true\nFROM base\n", 3, true, "multi-stage"},
		{"run mount", "FROM base\nRUN --mount=type=cache,target=/x true\n", 2, true, "--mount"},
		{"run network", "FROM base\nRUN --network=host true\n", 2, true, "--network"},
		{"copy from", "FROM base\nCOPY --from=other /a /b\n", 2, true, "--from"},
		{"copy heredoc", "FROM base\nCOPY <<EOF /x\nhi\nEOF\n", 2, true, "here-document"},
		{"before from", "RUN true\nFROM base\n", 1, false, "before FROM"},
		{"copy one arg", "FROM base\nCOPY a\n", 2, false, "source and a destination"},
		{"shell not json", "FROM base\nSHELL /bin/bash -c\n", 2, false, "JSON"},
		{"onbuild", "FROM base\n\n# c\nONBUILD RUN true\n", 4, true, "ONBUILD"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseDockerfile([]byte(tc.src))
			var le *LineError
			if !errors.As(err, &le) {
				t.Fatalf("err = %v, want a *LineError", err)
			}
			if le.Line != tc.line || errors.Is(err, ErrUnsupported) != tc.unsupported || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v (line %d, unsupported %v); want line %d, unsupported %v, mentioning %q",
					err, le.Line, errors.Is(err, ErrUnsupported), tc.line, tc.unsupported, tc.want)
			}
			if !strings.Contains(err.Error(), "line ") {
				t.Fatalf("err %q does not name its line", err)
			}
		})
	}
	if _, err := ParseDockerfile([]byte("# nothing\nARG X=1\n")); err == nil || !strings.Contains(err.Error(), "no FROM") {
		t.Fatalf("err = %v, want no FROM", err)
	}
}
