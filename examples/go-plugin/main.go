// An example Mycelium plugin in Go, built with hashicorp/go-plugin (1.0.1 and later):
// events of type com.example.upper get their text upper-cased, every other event is echoed.
//
// Build it with ./build.sh OUTPUT (GOPATH mode, offline, Debian's Go packages), then
// `mycelium deploy upper OUTPUT`.
package main

import (
	"context"
	"strings"

	cloudevents "cloudevents.io/genproto/v1"
	functionv1 "github.com/mycelium-fn/mycelium/proto/mycelium/function/v1"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// Handshake must match the Mycelium host: protocol version 1 and its magic cookie.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "MYCELIUM_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "6d79636c-6975-6d2d-6675-6e6374696f6e",
}

type upper struct {
	functionv1.UnimplementedFunctionServer
}

func (upper) Execute(ctx context.Context, req *functionv1.ExecuteRequest) (*functionv1.ExecuteResponse, error) {
	event := req.GetEvent()
	if event == nil {
		return failure(functionv1.ErrorCode_ERROR_CODE_INVALID_EVENT, "no event"), nil
	}
	if event.GetType() == "com.example.upper" {
		text, ok := event.GetData().(*cloudevents.CloudEvent_TextData)
		if !ok {
			return failure(functionv1.ErrorCode_ERROR_CODE_INVALID_EVENT, "send text data"), nil
		}
		event = &cloudevents.CloudEvent{
			Id:          "upper-" + event.GetId(),
			Source:      "mycelium/" + req.GetContext().GetFunctionName(),
			SpecVersion: "1.0",
			Type:        "com.example.upper.result",
			Attributes: map[string]*cloudevents.CloudEvent_CloudEventAttributeValue{
				"datacontenttype": {Attr: &cloudevents.CloudEvent_CloudEventAttributeValue_CeString{CeString: "text/plain"}},
			},
			Data: &cloudevents.CloudEvent_TextData{TextData: strings.ToUpper(text.TextData)},
		}
	}
	return &functionv1.ExecuteResponse{
		Result: &functionv1.ExecuteResponse_Events{Events: &cloudevents.CloudEventBatch{Events: []*cloudevents.CloudEvent{event}}},
	}, nil
}

func failure(code functionv1.ErrorCode, message string) *functionv1.ExecuteResponse {
	return &functionv1.ExecuteResponse{
		Result: &functionv1.ExecuteResponse_Error{Error: &functionv1.FunctionError{Code: code, Message: message}},
	}
}

// functionPlugin is the go-plugin side of the Function service.
type functionPlugin struct {
	plugin.Plugin
}

func (functionPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	functionv1.RegisterFunctionServer(s, upper{})
	return nil
}

func (functionPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return functionv1.NewFunctionClient(c), nil
}

func main() {
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: Handshake,
		Plugins:         map[string]plugin.Plugin{"function": functionPlugin{}},
		GRPCServer:      plugin.DefaultGRPCServer,
	})
}
