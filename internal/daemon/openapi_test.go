package daemon_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// openAPI is the subset of an OpenAPI 3 document the conformance test reads.
type openAPI struct {
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas map[string]*schema `json:"schemas"`
	} `json:"components"`
}

type operation struct {
	Responses map[string]struct {
		Content map[string]struct {
			Schema *schema `json:"schema"`
		} `json:"content"`
	} `json:"responses"`
}

type schema struct {
	Ref                  string             `json:"$ref"`
	Type                 string             `json:"type"`
	Properties           map[string]*schema `json:"properties"`
	Required             []string           `json:"required"`
	Items                *schema            `json:"items"`
	Enum                 []any              `json:"enum"`
	Nullable             bool               `json:"nullable"`
	AdditionalProperties json.RawMessage    `json:"additionalProperties"`
}

func loadSpec(t *testing.T) *openAPI {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "api", "openapi.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPI
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("parsing openapi.json: %v", err)
	}
	return &doc
}

func (d *openAPI) operation(t *testing.T, method, path string) operation {
	t.Helper()
	raw, ok := d.Paths[path][strings.ToLower(method)]
	if !ok {
		t.Fatalf("spec has no %s %s", method, path)
	}
	var op operation
	if err := json.Unmarshal(raw, &op); err != nil {
		t.Fatal(err)
	}
	return op
}

// validate checks v (decoded JSON) against s, returning every mismatch.
func (d *openAPI) validate(s *schema, v any, at string) []string {
	if s == nil {
		return nil
	}
	if s.Ref != "" {
		name := strings.TrimPrefix(s.Ref, "#/components/schemas/")
		rs, ok := d.Components.Schemas[name]
		if !ok {
			return []string{fmt.Sprintf("%s: unknown $ref %s", at, s.Ref)}
		}
		return d.validate(rs, v, at)
	}
	if v == nil {
		if s.Nullable || s.Type == "" {
			return nil
		}
		return []string{fmt.Sprintf("%s: null, want %s", at, s.Type)}
	}
	var errs []string
	switch s.Type {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: %T, want object", at, v)}
		}
		for _, r := range s.Required {
			if _, ok := obj[r]; !ok {
				errs = append(errs, fmt.Sprintf("%s: missing required %q", at, r))
			}
		}
		for k, fv := range obj {
			ps, ok := s.Properties[k]
			if !ok {
				if s.Properties != nil && string(s.AdditionalProperties) != "" && string(s.AdditionalProperties) != "false" {
					var ap schema
					if json.Unmarshal(s.AdditionalProperties, &ap) == nil {
						errs = append(errs, d.validate(&ap, fv, at+"."+k)...)
					}
					continue
				}
				if s.Properties != nil {
					errs = append(errs, fmt.Sprintf("%s: property %q not in spec", at, k))
				} else if len(s.AdditionalProperties) > 0 && string(s.AdditionalProperties) != "true" && string(s.AdditionalProperties) != "false" {
					var ap schema
					if json.Unmarshal(s.AdditionalProperties, &ap) == nil {
						errs = append(errs, d.validate(&ap, fv, at+"."+k)...)
					}
				}
				continue
			}
			errs = append(errs, d.validate(ps, fv, at+"."+k)...)
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			return []string{fmt.Sprintf("%s: %T, want array", at, v)}
		}
		for i, e := range arr {
			errs = append(errs, d.validate(s.Items, e, at+"["+strconv.Itoa(i)+"]")...)
		}
	case "string":
		if _, ok := v.(string); !ok {
			errs = append(errs, fmt.Sprintf("%s: %T, want string", at, v))
		}
	case "integer":
		f, ok := v.(float64)
		if !ok || f != float64(int64(f)) {
			errs = append(errs, fmt.Sprintf("%s: %v, want integer", at, v))
		}
	case "number":
		if _, ok := v.(float64); !ok {
			errs = append(errs, fmt.Sprintf("%s: %T, want number", at, v))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			errs = append(errs, fmt.Sprintf("%s: %T, want boolean", at, v))
		}
	}
	if len(s.Enum) > 0 {
		found := false
		for _, e := range s.Enum {
			found = found || fmt.Sprint(e) == fmt.Sprint(v)
		}
		if !found {
			errs = append(errs, fmt.Sprintf("%s: %v not in enum %v", at, v, s.Enum))
		}
	}
	return errs
}

// TestOpenAPIRoutes checks that the spec and the server have the same routes.
func TestOpenAPIRoutes(t *testing.T) {
	doc := loadSpec(t)
	var inSpec []string
	for p, ops := range doc.Paths {
		for m := range ops {
			switch m {
			case "get", "head", "post", "put", "delete", "patch", "options":
				inSpec = append(inSpec, strings.ToUpper(m)+" "+p)
			}
		}
	}
	var inServer []string
	for _, r := range api.New(api.Config{}).Routes() {
		// A wildcard for the rest of the path is an ordinary parameter in
		// OpenAPI.
		inServer = append(inServer, strings.ReplaceAll(r, "...}", "}"))
	}
	sort.Strings(inSpec)
	sort.Strings(inServer)
	if strings.Join(inSpec, "\n") != strings.Join(inServer, "\n") {
		t.Errorf("routes differ:\nspec:\n%s\nserver:\n%s", strings.Join(inSpec, "\n"), strings.Join(inServer, "\n"))
	}
}

// TestOpenAPIResponses checks real responses of a real server against the
// spec's schema for their status and media type.
func TestOpenAPIResponses(t *testing.T) {
	doc := loadSpec(t)
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{Metadata: map[string]string{"a": "b"}})
	cases := []struct {
		method, path, specPath string
		body                   any
		accept                 string
	}{
		{"GET", "/v1/health", "/v1/health", nil, ""},
		{"GET", "/v1/templates", "/v1/templates", nil, ""},
		{"GET", "/v1/templates/base", "/v1/templates/{name}", nil, ""},
		{"GET", "/v1/templates/nope:v1", "/v1/templates/{name}", nil, ""},
		{"GET", "/v1/templates/Not!Valid", "/v1/templates/{name}", nil, ""},
		{"DELETE", "/v1/templates/base", "/v1/templates/{name}", nil, ""},
		{"DELETE", "/v1/templates/nope", "/v1/templates/{name}", nil, ""},
		{"POST", "/v1/templates?name=empty", "/v1/templates", nil, ""},
		{"POST", "/v1/templates", "/v1/templates", nil, ""},
		{"POST", "/v1/sandboxes", "/v1/sandboxes", `{"template":"nope"}`, ""},
		{"POST", "/v1/sandboxes", "/v1/sandboxes", `{"ttl_seconds":-1}`, ""},
		{"GET", "/v1/sandboxes", "/v1/sandboxes", nil, ""},
		{"GET", "/v1/sandboxes/" + sb.ID, "/v1/sandboxes/{id}", nil, ""},
		{"GET", "/v1/sandboxes/sb-0000000000000000", "/v1/sandboxes/{id}", nil, ""},
		{"POST", "/v1/sandboxes/" + sb.ID + "/timeout", "/v1/sandboxes/{id}/timeout", wire.SetTimeoutRequest{TTLSeconds: 120}, ""},
		{"POST", "/v1/sandboxes/" + sb.ID + "/exec", "/v1/sandboxes/{id}/exec", wire.ExecRequest{Cmd: "echo hi; echo err >&2"}, ""},
		{"POST", "/v1/sandboxes/" + sb.ID + "/exec", "/v1/sandboxes/{id}/exec", wire.ExecRequest{Cmd: "echo hi; echo err >&2"}, "application/x-ndjson"},
		{"POST", "/v1/sandboxes/" + sb.ID + "/exec", "/v1/sandboxes/{id}/exec", `{}`, ""},
		{"GET", "/v1/sandboxes/" + sb.ID + "/metrics", "/v1/sandboxes/{id}/metrics", nil, ""},
		{"GET", "/v1/sandboxes/sb-0000000000000000/metrics", "/v1/sandboxes/{id}/metrics", nil, ""},
		{"GET", "/v1/audit", "/v1/audit", nil, ""},
		{"GET", "/v1/audit?action=nope", "/v1/audit", nil, ""},
		{"DELETE", "/v1/sandboxes/" + sb.ID, "/v1/sandboxes/{id}", nil, ""},
		{"DELETE", "/v1/sandboxes/" + sb.ID, "/v1/sandboxes/{id}", nil, ""},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path+" "+c.accept, func(t *testing.T) {
			var hdr []string
			if c.accept != "" {
				hdr = []string{"Accept", c.accept}
			}
			resp, body := s.Do(t, c.method, c.path, c.body, hdr...)
			op := doc.operation(t, c.method, c.specPath)
			r, ok := op.Responses[strconv.Itoa(resp.StatusCode)]
			if !ok {
				t.Fatalf("status %d (%s) not in spec for %s %s", resp.StatusCode, body, c.method, c.specPath)
			}
			if resp.StatusCode == http.StatusNoContent {
				return
			}
			ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
			media, ok := r.Content[ct]
			if !ok {
				t.Fatalf("media type %q not in spec for %d", ct, resp.StatusCode)
			}
			var docs [][]byte
			if ct == "application/x-ndjson" {
				sc := bufio.NewScanner(bytes.NewReader(body))
				for sc.Scan() {
					docs = append(docs, append([]byte(nil), sc.Bytes()...))
				}
			} else {
				docs = [][]byte{body}
			}
			for _, d := range docs {
				var v any
				if err := json.Unmarshal(d, &v); err != nil {
					t.Fatalf("response %q is not JSON: %v", d, err)
				}
				if errs := doc.validate(media.Schema, v, "$"); len(errs) > 0 {
					t.Errorf("response %s does not match the spec:\n%s", d, strings.Join(errs, "\n"))
				}
			}
		})
	}
}
