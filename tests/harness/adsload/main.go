// Command adsload is the benchmarks' ADS load process: one process standing in for the xDS
// side of N downstream Envoys (tests/harness/ads_load.py starts it and reads what it writes;
// its docstring says why it is compiled: the Python one it replaced spent more CPU than the
// atlasd replicas it loaded, on the same machine).
//
// Every stream is one downstream cluster's Envoy: its own gRPC connection (its own client
// certificate, the server checked against its CA bundle with SAN server_name) to host:port,
// node id = the cluster name, ADS in State of the World or Delta. It subscribes to every
// type by wildcard, ACKs every response and, like Envoy, opens a new stream after a failure
// with a jittered exponential back-off (uniform below 0.5 s doubling up to 30 s, reset by a
// response).
//
// Run: adsload --duration SECONDS [--hold] LOAD.json. The spec is {"host": "127.0.0.1",
// "port": 10900, "server_name": "atlas", "streams": [{"node": ..., "kind": "delta"|"sotw",
// "ca": "<CA bundle PEM file>", "cert": "<client cert PEM file>", "key": "<key PEM file>"},
// ...]}. It loads every stream's TLS config, writes <spec>.ready ("<streams>\n"), with
// --hold waits for SIGUSR2, then dials. SIGUSR1 writes the state to <spec>.state
// (atomically); SIGTERM/SIGINT or the end of --duration make it exit (status 0).
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	maxStreams       = 20_000
	maxDuration      = 4 * 3600.0
	backoffBase      = 0.5
	backoffMax       = 30.0
	connectingAtOnce = 128 // Envoy's default accept backlog: more at once only adds SYN retransmits
	bufferSize       = 8 << 10
	maxRecvMsgSize   = 64 << 20
)

const (
	prefix = "type.googleapis.com/"
	secret = prefix + "envoy.extensions.transport_sockets.tls.v3.Secret"
)

// types: every type URL subscribed, in the order requested, with its short name.
var types = []struct{ url, short string }{
	{secret, "sds"},
	{prefix + "envoy.config.cluster.v3.Cluster", "cds"},
	{prefix + "envoy.config.endpoint.v3.ClusterLoadAssignment", "eds"},
	{prefix + "envoy.config.listener.v3.Listener", "lds"},
	{prefix + "envoy.config.route.v3.ScopedRouteConfiguration", "srds"},
	{prefix + "envoy.config.route.v3.RouteConfiguration", "rds"},
}

func shortName(url string) string {
	for _, t := range types {
		if t.url == url {
			return t.short
		}
	}
	return url
}

type streamSpec struct {
	Node string `json:"node"`
	Kind string `json:"kind"`
	CA   string `json:"ca"`
	Cert string `json:"cert"`
	Key  string `json:"key"`
}

type spec struct {
	Host       string       `json:"host"`
	Port       json.Number  `json:"port"`
	ServerName *string      `json:"server_name"`
	Streams    []streamSpec `json:"streams"`
}

// streamState is one downstream Envoy's xDS as this process holds it (JSON in the state
// file; the field names are what the Python side reads).
type streamState struct {
	Node      string             `json:"node"`
	Kind      string             `json:"kind"`
	Acked     map[string]string  `json:"acked"`    // short type -> version ACKed
	AckedAt   map[string]float64 `json:"acked_at"` // short type -> unix time
	Certs     map[string]string  `json:"certs"`    // SDS secret -> sha256 of its leaf
	CertsAt   map[string]float64 `json:"certs_at"` // when that leaf arrived
	Opened    int                `json:"opened"`   // streams opened (1 + reconnects)
	Live      bool               `json:"live"`     // a stream is open and has had a response
	LastError string             `json:"last_error"`

	mu sync.Mutex
}

func newState(s streamSpec) *streamState {
	return &streamState{
		Node: s.Node, Kind: s.Kind,
		Acked: map[string]string{}, AckedAt: map[string]float64{},
		Certs: map[string]string{}, CertsAt: map[string]float64{},
	}
}

// snapshot is a copy of st taken under its lock, safe to encode.
func (st *streamState) snapshot() *streamState {
	st.mu.Lock()
	defer st.mu.Unlock()
	return &streamState{
		Node: st.Node, Kind: st.Kind, Opened: st.Opened, Live: st.Live, LastError: st.LastError,
		Acked: maps.Clone(st.Acked), AckedAt: maps.Clone(st.AckedAt),
		Certs: maps.Clone(st.Certs), CertsAt: maps.Clone(st.CertsAt),
	}
}

// backoff is the seconds before the next stream after failures streams in a row that ended
// without a response, as Envoy's gRPC mux waits: uniform below 0.5 s, 1 s, 2 s, ... 30 s.
func backoff(failures int) time.Duration {
	return time.Duration(rand.Float64() * backoffCeiling(failures) * float64(time.Second))
}

// backoffCeiling is the seconds a wait after failures failed streams stays below.
func backoffCeiling(failures int) float64 {
	return math.Min(backoffBase*math.Pow(2, float64(failures)), backoffMax)
}

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// leafFingerprint is the SHA-256 (hex) of the first certificate of a PEM chain.
func leafFingerprint(chain []byte) (string, bool) {
	for {
		var block *pem.Block
		block, chain = pem.Decode(chain)
		if block == nil {
			return "", false
		}
		if block.Type == "CERTIFICATE" {
			sum := sha256.Sum256(block.Bytes)
			return hex.EncodeToString(sum[:]), true
		}
	}
}

// secretLeaf is the name of the SDS Secret in res and the fingerprint of its certificate;
// ok is false for a secret without a certificate (the validation context).
func secretLeaf(res *anypb.Any) (name, fp string, ok bool) {
	if res == nil {
		return "", "", false
	}
	var s tlsv3.Secret
	if err := res.UnmarshalTo(&s); err != nil {
		return "", "", false
	}
	cert := s.GetTlsCertificate()
	if cert == nil {
		return s.GetName(), "", false
	}
	chain := cert.GetCertificateChain()
	data := chain.GetInlineBytes()
	if len(data) == 0 {
		data = []byte(chain.GetInlineString())
	}
	fp, ok = leafFingerprint(data)
	return s.GetName(), fp, ok
}

type load struct {
	target     string
	serverName string
	specs      []streamSpec
	states     []*streamState
	creds      []credentials.TransportCredentials
	connecting chan struct{}
}

// prepare loads every stream's TLS config (what an Envoy loads at boot, before it dials).
func (l *load) prepare() error {
	pools := map[string]*x509.CertPool{} // CA bundles shared between streams are parsed once
	l.creds = make([]credentials.TransportCredentials, len(l.specs))
	for i, s := range l.specs {
		pool, ok := pools[s.CA]
		if !ok {
			data, err := os.ReadFile(s.CA)
			if err != nil {
				return fmt.Errorf("stream %d (%s): %w", i, s.Node, err)
			}
			pool = x509.NewCertPool()
			if !pool.AppendCertsFromPEM(data) {
				return fmt.Errorf("stream %d (%s): no certificate in %s", i, s.Node, s.CA)
			}
			pools[s.CA] = pool
		}
		pair, err := tls.LoadX509KeyPair(s.Cert, s.Key)
		if err != nil {
			return fmt.Errorf("stream %d (%s): %w", i, s.Node, err)
		}
		l.creds[i] = credentials.NewTLS(&tls.Config{
			// always present this stream's certificate, as OpenSSL (and Envoy) does
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				return &pair, nil
			},
			RootCAs:    pool,
			ServerName: l.serverName,
			MinVersion: tls.VersionTLS12,
			NextProtos: []string{"h2"},
		})
	}
	return nil
}

func (l *load) dial(i int) (*grpc.ClientConn, error) {
	return grpc.NewClient(l.target,
		grpc.WithTransportCredentials(l.creds[i]),
		grpc.WithReadBufferSize(bufferSize),
		grpc.WithWriteBufferSize(bufferSize),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithIdleTimeout(0),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
	)
}

// run keeps stream i's ADS stream open until ctx ends: a new stream after each failure,
// after a back-off, on the same connection while it lives (a new one after a failed dial).
func (l *load) run(ctx context.Context, i int) {
	st := l.states[i]
	cc, err := l.dial(i)
	if err != nil {
		st.mu.Lock()
		st.LastError = fmt.Sprintf("%T: %v", err, err)
		st.mu.Unlock()
		return
	}
	defer func() { cc.Close() }()
	failures := 0
	first := true
	for {
		st.mu.Lock()
		st.Opened++
		st.mu.Unlock()
		release := func() {}
		if first { // hold a connecting slot from the dial until the stream is answered
			select {
			case l.connecting <- struct{}{}:
			case <-ctx.Done():
				return
			}
			var once sync.Once
			release = func() { once.Do(func() { <-l.connecting }) }
			first = false
		}
		got, err := l.stream(ctx, cc, st, release)
		release()
		if ctx.Err() != nil {
			return
		}
		st.mu.Lock()
		st.LastError = describe(err)
		st.Live = false
		st.mu.Unlock()
		if got {
			failures = 0
		} else {
			failures++
		}
		if cc.GetState() == connectivity.TransientFailure { // a broken connection: dial again
			cc.Close()
			if cc, err = l.dial(i); err != nil {
				st.mu.Lock()
				st.LastError = fmt.Sprintf("%T: %v", err, err)
				st.mu.Unlock()
				return
			}
		}
		t := time.NewTimer(backoff(failures))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// describe is last_error for the end of a stream: nil when the server ended it.
func describe(err error) string {
	if err == nil {
		return "stream ended by the server"
	}
	if s, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", s.Code(), s.Message())
	}
	return fmt.Sprintf("%T: %v", err, err)
}

// adsStream is what the SotW and the Delta streams have in common, in terms of messages
// this process builds and reads.
type adsStream interface {
	send(typeURL string, node *core.Node, version, nonce string) error
	recv() (typeURL, version, nonce string, secrets []*anypb.Any, err error)
}

type sotw struct {
	s discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
}

func (a sotw) send(typeURL string, node *core.Node, version, nonce string) error {
	return a.s.Send(&discovery.DiscoveryRequest{
		Node: node, TypeUrl: typeURL, VersionInfo: version, ResponseNonce: nonce,
	})
}

func (a sotw) recv() (string, string, string, []*anypb.Any, error) {
	r, err := a.s.Recv()
	if err != nil {
		return "", "", "", nil, err
	}
	var secrets []*anypb.Any
	if r.GetTypeUrl() == secret {
		secrets = r.GetResources()
	}
	return r.GetTypeUrl(), r.GetVersionInfo(), r.GetNonce(), secrets, nil
}

type delta struct {
	s discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
}

func (a delta) send(typeURL string, node *core.Node, _, nonce string) error {
	return a.s.Send(&discovery.DeltaDiscoveryRequest{
		Node: node, TypeUrl: typeURL, ResponseNonce: nonce,
	})
}

func (a delta) recv() (string, string, string, []*anypb.Any, error) {
	r, err := a.s.Recv()
	if err != nil {
		return "", "", "", nil, err
	}
	var secrets []*anypb.Any
	if r.GetTypeUrl() == secret {
		for _, res := range r.GetResources() {
			secrets = append(secrets, res.GetResource())
		}
	}
	return r.GetTypeUrl(), r.GetSystemVersionInfo(), r.GetNonce(), secrets, nil
}

// stream runs one ADS stream until it fails or the server ends it (err nil); got tells
// whether it had a response. release is called at its first response.
func (l *load) stream(
	ctx context.Context, cc *grpc.ClientConn, st *streamState, release func(),
) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := discovery.NewAggregatedDiscoveryServiceClient(cc)
	var s adsStream
	if st.Kind == "delta" {
		c, err := client.DeltaAggregatedResources(ctx)
		if err != nil {
			return false, err
		}
		s = delta{c}
	} else {
		c, err := client.StreamAggregatedResources(ctx)
		if err != nil {
			return false, err
		}
		s = sotw{c}
	}
	// The error of a failed Send is io.EOF; the stream's status comes from Recv.
	recvErr := func(err error) error {
		if !errors.Is(err, io.EOF) {
			return err
		}
		for {
			if _, _, _, _, err := s.recv(); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
	}
	node := &core.Node{Id: st.Node, Cluster: st.Node}
	for k, t := range types {
		var n *core.Node
		if k == 0 {
			n = node
		}
		if err := s.send(t.url, n, "", ""); err != nil {
			return false, recvErr(err)
		}
	}
	for {
		typeURL, version, nonce, secrets, err := s.recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return got, nil
			}
			return got, err
		}
		at := now()
		if len(secrets) > 0 {
			st.mu.Lock()
			for _, res := range secrets {
				if name, fp, ok := secretLeaf(res); ok && st.Certs[name] != fp {
					st.Certs[name], st.CertsAt[name] = fp, at
				}
			}
			st.mu.Unlock()
		}
		if err := s.send(typeURL, nil, version, nonce); err != nil {
			return got, recvErr(err)
		}
		short := shortName(typeURL)
		st.mu.Lock()
		st.Acked[short], st.AckedAt[short] = version, at
		st.Live = true
		st.mu.Unlock()
		if !got {
			got = true
			release()
		}
	}
}

// dump writes the state of every stream to path, atomically.
func (l *load) dump(path string) error {
	out := struct {
		Pid     int            `json:"pid"`
		Streams []*streamState `json:"streams"`
	}{Pid: os.Getpid(), Streams: make([]*streamState, len(l.states))}
	for i, st := range l.states {
		out.Streams[i] = st.snapshot()
	}
	data, err := json.Marshal(out)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readSpec(path string) (*load, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var sp spec
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&sp); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	port, err := strconv.Atoi(sp.Port.String())
	if err != nil {
		return nil, fmt.Errorf("%s: port %q: %w", path, sp.Port, err)
	}
	if len(sp.Streams) > maxStreams {
		return nil, fmt.Errorf("%d streams: at most %d", len(sp.Streams), maxStreams)
	}
	serverName := "atlas"
	if sp.ServerName != nil {
		serverName = *sp.ServerName
	}
	l := &load{
		target:     "passthrough:///" + net.JoinHostPort(sp.Host, strconv.Itoa(port)),
		serverName: serverName,
		specs:      sp.Streams,
		states:     make([]*streamState, len(sp.Streams)),
		connecting: make(chan struct{}, connectingAtOnce),
	}
	for i, s := range sp.Streams {
		l.states[i] = newState(s)
	}
	return l, nil
}

// parseArgs reads "--duration SECONDS [--hold] LOAD.json".
func parseArgs(args []string) (specPath string, duration float64, hold bool, err error) {
	fs := flag.NewFlagSet("adsload", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: adsload --duration SECONDS [--hold] LOAD.json")
		fs.PrintDefaults()
	}
	d := fs.Float64("duration", -1, "seconds, then exit (required)")
	fs.BoolVar(&hold, "hold", false, "after <spec>.ready, dial only once SIGUSR2 comes")
	if err := fs.Parse(args); err != nil {
		return "", 0, false, err
	}
	if fs.NArg() != 1 || *d < 0 {
		fs.Usage()
		return "", 0, false, errors.New("one LOAD.json and --duration are required")
	}
	return fs.Arg(0), math.Min(*d, maxDuration), hold, nil
}

func main() {
	specPath, duration, hold, err := parseArgs(os.Args[1:])
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "adsload:", err)
		}
		os.Exit(2)
	}
	l, err := readSpec(specPath)
	if err == nil {
		err = l.prepare()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "adsload:", err)
		os.Exit(1)
	}
	statePath := specPath + ".state"
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGUSR2)
	deadline := time.NewTimer(time.Duration(math.Max(0, duration) * float64(time.Second)))
	if err := os.WriteFile(specPath+".ready", []byte(fmt.Sprintf("%d\n", len(l.states))), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "adsload:", err)
		os.Exit(1)
	}
	// wait until SIGUSR2 (go: true) or SIGTERM/SIGINT or the deadline (false); SIGUSR1
	// dumps the state meanwhile
	wait := func(forGo bool) bool {
		for {
			select {
			case <-deadline.C:
				return false
			case sig := <-signals:
				switch sig {
				case syscall.SIGUSR1:
					if err := l.dump(statePath); err != nil {
						fmt.Fprintln(os.Stderr, "adsload: state:", err)
					}
				case syscall.SIGUSR2:
					if forGo {
						return true
					}
				default:
					return false
				}
			}
		}
	}
	if hold && !wait(true) {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range l.states {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.run(ctx, i)
		}()
	}
	wait(false)
	cancel()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		fmt.Fprintln(os.Stderr, "adsload: streams still closing after 10 s; exiting")
	}
}
