//go:build race

package daemon_test

// raceDetector: the race detector's shadow memory multiplies a Go
// process's resident memory several times over (about 3× measured for
// TestBlockingExecsHoldBoundedMemory), so tests bounding RSS scale by it.
const raceDetector = true
