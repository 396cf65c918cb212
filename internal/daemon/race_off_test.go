//go:build !race

package daemon_test

// raceDetector: see race_on_test.go.
const raceDetector = false
