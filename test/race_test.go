//go:build race

package test

// raceEnabled: this test binary runs with the race detector, and so does the
// helper it builds.
const raceEnabled = true
