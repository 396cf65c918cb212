// Package hostile holds the hostile-workload suite: fork bombs, memory and
// disk balloons, CPU spinners, output floods, unkillable process trees,
// probes for host data and escape attempts, each run in a real gVisor
// sandbox of a real daemon while a neighbour sandbox keeps answering. The
// suite asserts the safe outcome of each (the limit holds, the host and the
// daemon are unaffected, nothing is left behind) and is in its tests only;
// docs/SECURITY-hostile-cases.md records what it observed.
package hostile
