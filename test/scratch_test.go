package test

import (
	"testing"
	"time"
)

func TestScratch(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a := dialControl(t, ctx, alpha)
	b := dialControl(t, ctx, beta)
	p, err := a.Listen(ctx, 0)
	t.Logf("listen 0: %v %v", p, err)
	p2, err := a.Listen(ctx, 0)
	t.Logf("listen 0: %v %v", p2, err)
	for _, c := range []struct{ host string; port, to int }{
		{"alpha", p, 2000}, {"100.64.0.99", 9, 1000}, {"fd7a:115c:a1e0:ab12:4843:cd96:6240:99", 9, 1000},
	} {
		start := time.Now()
		conn, err := b.DialTailnet(ctx, c.host, c.port, c.to)
		t.Logf("%v: %v after %v", c, err, time.Since(start))
		if conn != nil { t.Logf("%+v", conn.Peer); conn.Close() }
	}
}
