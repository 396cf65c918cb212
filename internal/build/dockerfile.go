package build

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

// ErrUnsupported wraps every refusal of a Dockerfile feature this builder
// does not implement (inside a *LineError).
var ErrUnsupported = errors.New("not supported")

// LineError is an error about one instruction of the Dockerfile.
type LineError struct {
	// Line is the instruction's first line, counting from 1.
	Line int
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("Dockerfile line %d: %v", e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

func lineErr(line int, format string, args ...any) error {
	return &LineError{Line: line, Err: fmt.Errorf(format, args...)}
}

func unsupported(line int, format string, args ...any) error {
	return &LineError{Line: line, Err: fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrUnsupported)}
}

// Instruction is one parsed Dockerfile instruction, before variable
// substitution.
type Instruction struct {
	// Cmd is the instruction in upper case ("RUN").
	Cmd string
	// Args are its arguments as the parser split them: for the shell form
	// of RUN, CMD and ENTRYPOINT one string; for the JSON form each
	// element; for ENV and LABEL key, value and separator ("=" or " ")
	// for each pair.
	Args []string
	// JSON says the arguments were written in the JSON (exec) form.
	JSON bool
	// Flags are the "--name=value" flags written after the instruction.
	Flags []string
	// Heredocs are the here-documents attached to the instruction.
	Heredocs []parser.Heredoc
	// Line and EndLine are where it is written, counting from 1.
	Line, EndLine int
	// Original is the instruction as written (continuations joined).
	Original string
}

// Dockerfile is a parsed single-stage Dockerfile.
type Dockerfile struct {
	// Escape is the escape character (the "escape" parser directive).
	Escape rune
	// MetaArgs are the ARG instructions before FROM: they serve FROM only.
	MetaArgs []Instruction
	// From is the FROM instruction.
	From Instruction
	// Steps are the instructions after FROM, in order.
	Steps []Instruction
}

// supported lists the instructions the builder executes.
var supported = map[string]bool{
	"FROM": true, "RUN": true, "COPY": true, "ADD": true, "ENV": true, "ARG": true,
	"WORKDIR": true, "USER": true, "CMD": true, "ENTRYPOINT": true, "EXPOSE": true,
	"LABEL": true, "SHELL": true, "STOPSIGNAL": true,
}

// maxDockerfile bounds a Dockerfile's size: real ones are a few KiB.
const maxDockerfile = 1 << 20

// heredocOnly matches a RUN whose whole command is one here-document.
var heredocOnly = regexp.MustCompile(`^\s*<<-?\s*["']?[A-Za-z_][A-Za-z0-9_]*["']?\s*$`)

// ParseDockerfile parses a Dockerfile with BuildKit's parser (comments,
// line continuations, parser directives, JSON and shell forms, heredocs)
// and checks that it uses only what the builder supports: one stage; FROM,
// RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT, EXPOSE, LABEL,
// SHELL, STOPSIGNAL. Anything else is a *LineError wrapping ErrUnsupported.
func ParseDockerfile(src []byte) (*Dockerfile, error) {
	if len(src) > maxDockerfile {
		return nil, fmt.Errorf("the Dockerfile is larger than %d bytes", maxDockerfile)
	}
	res, err := parser.Parse(bytes.NewReader(src))
	if err != nil {
		return nil, fmt.Errorf("parsing Dockerfile: %w", err)
	}
	df := &Dockerfile{Escape: res.EscapeToken}
	seenFrom := false
	for _, n := range res.AST.Children {
		in := Instruction{
			Cmd:      strings.ToUpper(n.Value),
			JSON:     n.Attributes["json"],
			Flags:    append([]string(nil), n.Flags...),
			Heredocs: append([]parser.Heredoc(nil), n.Heredocs...),
			Line:     n.StartLine,
			EndLine:  n.EndLine,
			Original: n.Original,
		}
		for a := n.Next; a != nil; a = a.Next {
			in.Args = append(in.Args, a.Value)
		}
		if !supported[in.Cmd] {
			return nil, unsupported(in.Line, "the %s instruction is", in.Cmd)
		}
		if err := check(in); err != nil {
			return nil, err
		}
		switch {
		case in.Cmd == "FROM" && seenFrom:
			return nil, unsupported(in.Line, "a second FROM (multi-stage builds) is")
		case in.Cmd == "FROM":
			seenFrom = true
			df.From = in
		case !seenFrom && in.Cmd == "ARG":
			df.MetaArgs = append(df.MetaArgs, in)
		case !seenFrom:
			return nil, lineErr(in.Line, "%s before FROM: only ARG may come before FROM", in.Cmd)
		default:
			df.Steps = append(df.Steps, in)
		}
	}
	if !seenFrom {
		return nil, errors.New("the Dockerfile has no FROM instruction")
	}
	return df, nil
}

// flagNames returns the names of an instruction's flags ("--chown=x" →
// "chown"), refusing those not in allowed.
func flagValues(in Instruction, allowed ...string) (map[string]string, error) {
	out := map[string]string{}
	for _, f := range in.Flags {
		name, val, _ := strings.Cut(strings.TrimPrefix(f, "--"), "=")
		ok := false
		for _, a := range allowed {
			ok = ok || a == name
		}
		if !ok {
			return nil, unsupported(in.Line, "%s --%s is", in.Cmd, name)
		}
		out[name] = val
	}
	return out, nil
}

// check refuses what the builder does not implement, by instruction.
func check(in Instruction) error {
	var allowed []string
	switch in.Cmd {
	case "FROM":
		allowed = []string{"platform"}
		if len(in.Args) != 1 && !(len(in.Args) == 3 && strings.EqualFold(in.Args[1], "AS")) {
			return lineErr(in.Line, "FROM takes an image or template, optionally followed by AS name")
		}
	case "COPY", "ADD":
		allowed = []string{"chown", "chmod"}
		if len(in.Args) < 2 {
			return lineErr(in.Line, "%s needs at least one source and a destination", in.Cmd)
		}
		if len(in.Heredocs) > 0 {
			return unsupported(in.Line, "%s with a here-document is", in.Cmd)
		}
	case "RUN":
		if len(in.Heredocs) > 0 && (in.JSON || len(in.Heredocs) != 1 || len(in.Args) != 1 || !heredocOnly.MatchString(in.Args[0])) {
			return unsupported(in.Line, "RUN with here-documents other than one that is the whole command is")
		}
		if len(in.Args) == 0 {
			return lineErr(in.Line, "RUN needs a command")
		}
	case "SHELL":
		if !in.JSON || len(in.Args) == 0 {
			return lineErr(in.Line, "SHELL needs a JSON array, e.g. [\"/bin/bash\", \"-c\"]")
		}
	case "WORKDIR", "USER", "STOPSIGNAL":
		if len(in.Args) != 1 {
			return lineErr(in.Line, "%s takes one argument", in.Cmd)
		}
	case "ENV", "LABEL":
		if len(in.Args) == 0 || len(in.Args)%3 != 0 {
			return lineErr(in.Line, "%s needs key=value pairs", in.Cmd)
		}
	case "ARG", "EXPOSE":
		if len(in.Args) == 0 {
			return lineErr(in.Line, "%s needs an argument", in.Cmd)
		}
	}
	_, err := flagValues(in, allowed...)
	return err
}
