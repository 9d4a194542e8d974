package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// defaultSocket is where `tsdist serve --hostname H` puts its control socket
// unless told otherwise: $XDG_RUNTIME_DIR/tsdist/H.sock, or
// /tmp/tsdist-UID/H.sock without XDG_RUNTIME_DIR. The directory is private
// to the user (0700).
func defaultSocket(hostname string) string {
	return filepath.Join(runtimeDir(), hostname+".sock")
}

func runtimeDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "tsdist")
	}
	return filepath.Join(os.TempDir(), "tsdist-"+strconv.Itoa(os.Getuid()))
}

// defaultStateDir is where a node keeps its keys and login:
// $XDG_STATE_HOME/tsdist/H, or ~/.local/state/tsdist/H.
func defaultStateDir(hostname string) (string, error) {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "tsdist", hostname), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no state dir given and no home directory: %w", err)
	}
	return filepath.Join(home, ".local", "state", "tsdist", hostname), nil
}
