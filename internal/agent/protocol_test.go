package agent

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestWriteJSONEncoding(t *testing.T) {
	// Regression: WriteJSON used json.Marshal, which writes each of <, >
	// and & as a six-byte \u003c escape: a 200,000-character env value of
	// '<' became a frame over MaxFrame.
	big := strings.Repeat("<", 200_000)
	tests := []struct {
		name     string
		req      Request
		wantSize int // the payload's exact size, 0: only under MaxFrame
	}{
		{name: "ping", req: Request{Op: OpPing}, wantSize: len(`{"op":"ping"}`)},
		{name: "html characters are not escaped", req: Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"<&>"}}},
			wantSize: len(`{"op":"exec","exec":{"argv":["<&>"]}}`)},
		{name: "large env of html characters", req: Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"true"}, Env: []string{"A=" + big}}}},
		{name: "large argv of html characters", req: Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"echo", big, strings.Repeat("&", 200_000)}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			size, err := EncodedSize(tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if tt.wantSize != 0 && size != tt.wantSize {
				t.Errorf("EncodedSize: got %d, want %d", size, tt.wantSize)
			}
			if size > MaxFrame {
				t.Fatalf("EncodedSize: got %d, want at most MaxFrame (%d)", size, MaxFrame)
			}
			var buf bytes.Buffer
			if err := WriteJSON(&buf, FrameRequest, tt.req); err != nil {
				t.Fatalf("WriteJSON: got %v, want nil", err)
			}
			typ, payload, err := ReadFrame(&buf)
			if err != nil || typ != FrameRequest {
				t.Fatalf("ReadFrame: got %q, %v, want %q", typ, err, FrameRequest)
			}
			if len(payload) != size {
				t.Errorf("payload: got %d bytes, want EncodedSize's %d", len(payload), size)
			}
			var got Request
			if err := json.Unmarshal(payload, &got); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.req) {
				t.Errorf("round trip: got %.80v, want %.80v", got, tt.req)
			}
		})
	}
	// A request that cannot fit is measured, not refused by EncodedSize.
	huge := Request{Op: OpExec, Exec: &ExecRequest{Argv: []string{"true"}, Env: []string{"A=" + strings.Repeat("x", MaxFrame)}}}
	if size, err := EncodedSize(huge); err != nil || size <= MaxFrame {
		t.Errorf("EncodedSize of an oversize request: got %d, %v, want more than %d", size, err, MaxFrame)
	}
}
