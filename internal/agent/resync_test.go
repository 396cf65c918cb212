package agent

import (
	"bytes"
	"testing"
)

func TestMarkerMatcherSplits(t *testing.T) {
	nonce := []byte("0123456789abcdef")
	marker := append([]byte(syncMagic), nonce...)
	tests := []struct {
		name   string
		before []byte
	}{
		{"alone", nil},
		{"after data", []byte("some yamux bytes")},
		{"after a partial magic", []byte(syncMagic[:7])},
		{"after a magic-start byte", []byte{0xfe, 0xfe}},
	}
	for _, tt := range tests {
		stream := append(append(append([]byte{}, tt.before...), marker...), []byte("after")...)
		// Feed the stream cut at every position into two chunks.
		for cut := 0; cut <= len(stream); cut++ {
			var m markerMatcher
			var got []byte
			rest := -1
			for ci, chunk := range [][]byte{stream[:cut], stream[cut:]} {
				if end, n := m.feed(chunk); end >= 0 {
					got = n
					if ci == 0 {
						rest = end
					} else {
						rest = cut + end
					}
				}
			}
			if !bytes.Equal(got, nonce) || string(stream[rest:]) != "after" {
				t.Errorf("%s, cut %d: got nonce %q rest %q, want %q %q", tt.name, cut, got, stream[max(rest, 0):], nonce, "after")
			}
		}
	}
}

func TestMarkerMatcherIgnoresNearMisses(t *testing.T) {
	var m markerMatcher
	for _, b := range [][]byte{
		[]byte(syncMagic[:len(syncMagic)-1] + "x" + "0123456789abcdef"),
		[]byte("\xfePANDASTACK"),
		[]byte("-RESYNC-2\xfd0123456789abcdef"),
	} {
		if end, _ := m.feed(b); end >= 0 {
			t.Errorf("feed(%q) found a marker", b)
		}
	}
}

func TestSendStdinBreaksMarkers(t *testing.T) {
	m := []byte(syncMagic + "0123456789abcdef")
	tests := [][]byte{
		[]byte("plain"),
		m,
		append(append([]byte("x"), m...), m...),
		append(append([]byte{}, m...), []byte("tail")...),
	}
	for _, in := range tests {
		var frames [][]byte
		err := sendStdin(func(typ byte, p []byte) error {
			if typ != FrameStdin {
				t.Fatalf("frame type %q", typ)
			}
			frames = append(frames, append([]byte(nil), p...))
			return nil
		}, in)
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.Join(frames, nil); !bytes.Equal(got, in) {
			t.Errorf("frames of %q join to %q", in, got)
		}
		for _, f := range frames {
			if bytes.Contains(f, []byte(syncMagic)) {
				t.Errorf("frame %q holds the whole magic", f)
			}
		}
	}
}
