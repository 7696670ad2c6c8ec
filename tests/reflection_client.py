"""A gRPC client that knows nothing of push-manager's .proto files, as grpcurl does not: it learns
the services and messages from the server's reflection service (grpcio-reflection, v1alpha),
builds the request from JSON, calls the method, and prints, as one JSON object on standard
output: the services listed, the reply as JSON, and the reflection error for an unknown symbol.

Usage: reflection_client.py ADDRESS SERVICE METHOD REQUEST_JSON UNKNOWN_SYMBOL

Run by tests/reflection.rs with the venv .ci/install-deps makes.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TIMEOUT_SECONDS = 10


def call(channel, pool, service_name, method_name, request_json):
    """Calls a unary method whose types come from reflection alone; returns the reply as JSON."""
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    request_class = GetMessageClass(method.input_type)
    reply_class = GetMessageClass(method.output_type)
    stub = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    reply = stub(json_format.Parse(request_json, request_class()), timeout=TIMEOUT_SECONDS)
    return json_format.MessageToDict(reply)


def unknown_symbol(channel, symbol):
    """The raw reflection answer for a symbol the server does not have."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_SECONDS))
    error = response.error_response
    return {"code": error.error_code, "message": error.error_message}


def main():
    address, service_name, method_name, request_json, unknown = sys.argv[1:6]
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        out = {
            "services": sorted(database.get_services()),
            "reply": call(channel, pool, service_name, method_name, request_json),
            "unknown": unknown_symbol(channel, unknown),
        }
        try:
            database.FindFileContainingSymbol(unknown)
            out["unknown_raises"] = None
        except KeyError:
            out["unknown_raises"] = "KeyError"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
