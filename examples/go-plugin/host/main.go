// A go-plugin host for benchmarks: starts a Mycelium Go plugin with hashicorp/go-plugin's own
// client and calls its Execute directly (no NATS, no Mycelium), so mycelium-bench can put
// go-plugin's own cost per call beside the runtime's, in the same run.
//
// usage: go-host PLUGIN SECONDS CONCURRENCY WARMUP_SECONDS
// prints one JSON object: requests, errors, p50/p90/p99/p999/max in microseconds.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"sync"
	"time"

	cloudevents "cloudevents.io/genproto/v1"
	functionv1 "github.com/mycelium-fn/mycelium/proto/mycelium/function/v1"
	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// Handshake is the Mycelium host's: protocol version 1 and its magic cookie.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "MYCELIUM_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "6d79636c-6975-6d2d-6675-6e6374696f6e",
}

type functionPlugin struct {
	plugin.Plugin
}

func (functionPlugin) GRPCServer(_ *plugin.GRPCBroker, _ *grpc.Server) error {
	return fmt.Errorf("the host serves nothing")
}

func (functionPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return functionv1.NewFunctionClient(c), nil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-host: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 5 && len(os.Args) != 6 {
		fail("usage: go-host PLUGIN SECONDS CONCURRENCY WARMUP_SECONDS [PAUSE_MICROSECONDS]")
	}
	seconds, _ := strconv.ParseFloat(os.Args[2], 64)
	concurrency, _ := strconv.Atoi(os.Args[3])
	warmup, _ := strconv.ParseFloat(os.Args[4], 64)
	// A pause before each call lets both processes go idle between calls, as a runtime's
	// calls to a plugin do when they come from the network: back to back, each call finds
	// the other side's threads still awake.
	pause := time.Duration(0)
	if len(os.Args) == 6 {
		micros, _ := strconv.Atoi(os.Args[5])
		pause = time.Duration(micros) * time.Microsecond
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  Handshake,
		Plugins:          map[string]plugin.Plugin{"function": functionPlugin{}},
		Cmd:              exec.Command(os.Args[1]),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           hclog.NewNullLogger(),
	})
	defer client.Kill()
	rpc, err := client.Client()
	if err != nil {
		fail("starting the plugin: %v", err)
	}
	raw, err := rpc.Dispense("function")
	if err != nil {
		fail("dispensing: %v", err)
	}
	function := raw.(functionv1.FunctionClient)
	request := &functionv1.ExecuteRequest{
		Event: &cloudevents.CloudEvent{
			Id: "bench", Source: "mycelium-bench", SpecVersion: "1.0", Type: "com.example.bench",
			Attributes: map[string]*cloudevents.CloudEvent_CloudEventAttributeValue{
				"datacontenttype": {Attr: &cloudevents.CloudEvent_CloudEventAttributeValue_CeString{CeString: "text/plain"}},
			},
			Data: &cloudevents.CloudEvent_TextData{TextData: "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
		},
		Context: &functionv1.InvocationContext{FunctionName: "bench-go", FunctionVersion: 1, InvocationId: "bench"},
	}
	start := time.Now()
	measureFrom := start.Add(time.Duration(warmup * float64(time.Second)))
	stopAt := measureFrom.Add(time.Duration(seconds * float64(time.Second)))
	var mu sync.Mutex
	var latencies []int64
	errors := 0
	var wg sync.WaitGroup
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []int64
			failed := 0
			for {
				if pause > 0 {
					time.Sleep(pause)
				}
				began := time.Now()
				if !began.Before(stopAt) {
					break
				}
				_, err := function.Execute(context.Background(), request)
				if began.Before(measureFrom) {
					continue
				}
				if err != nil {
					failed++
				} else {
					mine = append(mine, time.Since(began).Microseconds())
				}
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			errors += failed
			mu.Unlock()
		}()
	}
	wg.Wait()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	q := func(p float64) int64 {
		if len(latencies) == 0 {
			return 0
		}
		i := int(p * float64(len(latencies)-1))
		return latencies[i]
	}
	out, _ := json.Marshal(map[string]interface{}{
		"requests": len(latencies), "errors": errors,
		"p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": q(1.0),
	})
	fmt.Println(string(out))
}
