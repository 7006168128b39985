package main

import (
	"testing"
	"time"
)

// The load process reconnects as a real Envoy does, neither faster nor slower: Envoy's gRPC
// mux (JitteredExponentialBackOffStrategy(500 ms, 30 s)) doubles the interval after each
// attempt that got no response, and a wait is uniform below it.
func TestBackoffIsEnvoysJitteredExponential(t *testing.T) {
	for failures, want := range map[int]float64{0: 0.5, 1: 1, 2: 2, 5: 16, 6: 30, 40: 30} {
		if got := backoffCeiling(failures); got != want {
			t.Errorf("backoffCeiling(%d) = %v, want %v", failures, got, want)
		}
		limit := time.Duration(want * float64(time.Second))
		var longest time.Duration
		for range 2000 {
			d := backoff(failures)
			if d < 0 || d >= limit {
				t.Fatalf("backoff(%d) = %v, outside [0, %v)", failures, d, limit)
			}
			longest = max(longest, d)
		}
		if longest < limit/2 { // uniform below the ceiling, not stuck near zero
			t.Errorf("backoff(%d): longest of 2000 waits %v, under half of %v", failures, longest, limit)
		}
	}
}

func TestFingerprintIsOfTheFirstCertificate(t *testing.T) {
	chain := []byte("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n" +
		"-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n" +
		"-----BEGIN CERTIFICATE-----\nAwQF\n-----END CERTIFICATE-----\n")
	fp, ok := leafFingerprint(chain)
	// sha256 of the bytes 00 01 02
	const want = "ae4b3280e56e2faf83f414a6e3dabe9d5fbe18976544c05fed121accb85b53fc"
	if !ok || fp != want {
		t.Fatalf("leafFingerprint = %q, %v; want %q", fp, ok, want)
	}
	if _, ok := leafFingerprint([]byte("no PEM here")); ok {
		t.Fatal("a chain without a certificate has no fingerprint")
	}
}
