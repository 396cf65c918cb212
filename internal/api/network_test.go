package api

import (
	"net/http"
	"strings"
	"testing"
)

func TestWithoutCookie(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{nil, nil},
		{[]string{"a=1"}, []string{"a=1"}},
		{[]string{accessCookie + "=secret"}, nil},
		{[]string{"a=1; " + accessCookie + "=secret; b=2"}, []string{"a=1; b=2"}},
		{[]string{accessCookie + "=x", "c=3"}, []string{"c=3"}},
	} {
		h := http.Header{}
		for _, v := range tc.in {
			h.Add("Cookie", v)
		}
		withoutCookie(h, accessCookie)
		if got := h.Values("Cookie"); strings.Join(got, "|") != strings.Join(tc.want, "|") {
			t.Errorf("%q: got %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestPortHost(t *testing.T) {
	s := &Server{cfg: Config{Domain: "Sandbox.Test"}}
	for _, tc := range []struct {
		host string
		port int
		id   string
		ok   bool
	}{
		{"8000-sb-0123456789abcdef.sandbox.test", 8000, "sb-0123456789abcdef", true},
		{"8000-sb-0123456789abcdef.sandbox.test:3000", 8000, "sb-0123456789abcdef", true},
		{"api.sandbox.test", 0, "", false},
		{"x-sb-1.sandbox.test", 0, "", false},
		{"8000-sb-1.other.test", 0, "", false},
		{"sandbox.test", 0, "", false},
		{"localhost:3000", 0, "", false},
	} {
		port, id, ok := s.portHost(&http.Request{Host: tc.host})
		if port != tc.port || id != tc.id || ok != tc.ok {
			t.Errorf("%s: got %d %q %v, want %d %q %v", tc.host, port, id, ok, tc.port, tc.id, tc.ok)
		}
	}
}
