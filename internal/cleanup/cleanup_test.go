package cleanup

import (
	"slices"
	"testing"
)

func TestCleanRunsNewestFirstAndReleaseKeeps(t *testing.T) {
	for _, tc := range []struct {
		name    string
		release bool
		want    []int
	}{
		{"clean", false, []int{3, 2, 1}},
		{"release", true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []int
			cu := Make(func() { got = append(got, 1) })
			cu.Add(func() { got = append(got, 2) })
			cu.Add(nil)
			cu.Add(func() { got = append(got, 3) })
			if tc.release {
				cu.Release()
			}
			cu.Clean()
			cu.Clean() // a second Clean does nothing
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}
