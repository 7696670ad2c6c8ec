//! gRPC server reflection on real `serve` and `node` processes: a client that has none of our
//! .proto files (Python's grpcio-reflection, as grpcurl would) lists the services, builds a
//! request from JSON, calls `Broadcast` and reads the reply; unknown symbols are NOT_FOUND.
//! Our own v1 client checks the other version. The Python venv is made by `.ci/install-deps`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use futures::{SinkExt, TryStreamExt};
use grpcio::{ChannelBuilder, EnvBuilder, WriteFlags};
use protobuf::descriptor::FileDescriptorProto;
use protobuf::Message;
use serde_json::Value;

use common::etcd::Etcd;
use common::grpc::push_client;
use common::ws::Client;
use common::{wait_until, BIN, PATIENCE};
use push_manager::proto::broadcast_request;
use push_manager::proto::reflection_v1::reflection::{
    ServerReflectionRequest, ServerReflectionResponse_oneof_message_response as Response,
};
use push_manager::proto::reflection_v1::reflection_grpc::ServerReflectionClient;
use push_manager::testkit::{spawn_node, spawn_serve, NodeProcess, Reaped};

const PREFIX: &str = "/reflection/nodes/";

/// A cold Python importing grpc and protobuf on a loaded machine takes seconds.
const PYTHON_PATIENCE: Duration = Duration::from_secs(60);

/// The venv's python: `$PUSH_MANAGER_VENV` or `.ci/install-deps`'s default place.
fn python() -> PathBuf {
    let venv = std::env::var_os("PUSH_MANAGER_VENV").unwrap_or_else(|| "/var/tmp/push-manager-venv".into());
    let python = PathBuf::from(venv).join("bin/python");
    assert!(python.exists(), "{} is missing: run .ci/install-deps (it installs grpcio-reflection)", python.display());
    python
}

/// Runs tests/reflection_client.py against `addr`: lists services, calls `service/method` with
/// `request` (JSON), asks for `unknown`; returns what it printed.
#[track_caller]
fn reflect_and_call(addr: &str, service: &str, method: &str, request: &str, unknown: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reflection_client.py");
    let mut client = Reaped::spawn(
        Command::new(python())
            .args([script, addr, service, method, request, unknown])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let out = client.output_within(PYTHON_PATIENCE);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "reflection_client.py failed ({}):\n{stderr}\n{stdout}", out.status);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

/// A real node, and a real serve that has discovered it.
fn start(etcd: &Etcd) -> (NodeProcess, Reaped, String) {
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "n1", &[]);
    let (serve, addr) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &[], Stdio::null());
    let client = push_client(&addr);
    wait_until("serve discovers the node", PATIENCE, || {
        client.broadcast(&broadcast_request("nobody", 1, 0, "warm-up")).is_ok_and(|r| r.get_accepted() == 1)
    });
    (node, serve, addr)
}

#[test]
fn a_client_without_our_protos_calls_broadcast_through_reflection() {
    let etcd = Etcd::start();
    let (node, _serve, addr) = start(&etcd);
    let mut user = Client::subscribed(node.ws_addr, &["room"]);

    // As `grpcurl -plaintext -d '{"topic":"room","proto":{"body":"aGk="}}' ADDR protocol.PushServer/Broadcast`.
    let body = r#"{"topic": "room", "proto": {"body": "aGk="}}"#;
    let out = reflect_and_call(&addr, "protocol.PushServer", "Broadcast", body, "protocol.NoSuchThing");
    let services = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "protocol.PushServer",
    ];
    assert_eq!(out["services"], serde_json::json!(services), "{out}");
    assert_eq!(out["reply"]["targeted"], 1, "{out}");
    assert_eq!(out["reply"]["accepted"], 1, "the node accepted it: {out}");
    assert_eq!(user.next_json()["body"], "hi");
    assert_eq!(out["unknown"]["code"], 5, "NOT_FOUND: {out}");
    assert_eq!(out["unknown"]["message"], "symbol \"protocol.NoSuchThing\" not found", "{out}");
    assert_eq!(out["unknown_raises"], "KeyError", "the client library reads it as not found: {out}");

    // The node's own server, the same way: its service, and a message straight to its users.
    let request = r#"{"topic": "room", "proto": {"body": "ZGlyZWN0"}}"#;
    let out = reflect_and_call(&node.grpc, "protocol.ConnectNode", "Broadcast", request, "protocol.ConnectNode.Nope");
    let services = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "protocol.ConnectNode",
    ];
    assert_eq!(out["services"], serde_json::json!(services), "{out}");
    assert_eq!(out["reply"]["received"], 1, "{out}");
    assert_eq!(user.next_json()["body"], "direct");
    assert_eq!(out["unknown"]["code"], 5, "{out}");
}

/// One request over `grpc.reflection.v1.ServerReflection/ServerReflectionInfo` on `addr`.
fn ask_v1(addr: &str, request: ServerReflectionRequest) -> Response {
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("test-reflect").build());
    let client = ServerReflectionClient::new(ChannelBuilder::new(env).connect(addr));
    let (mut requests, responses) = client.server_reflection_info().unwrap();
    block_on(async {
        requests.send((request, WriteFlags::default())).await.unwrap();
        requests.close().await.unwrap();
        let all: Vec<_> = responses.try_collect().await.unwrap();
        assert_eq!(all.len(), 1, "one response per request");
        all.into_iter().next().unwrap().message_response.expect("an answer")
    })
}

fn symbol(name: &str) -> ServerReflectionRequest {
    let mut request = ServerReflectionRequest::new();
    request.set_file_containing_symbol(name.into());
    request
}

#[test]
fn version_1_answers_on_both_roles() {
    let etcd = Etcd::start();
    let (node, _serve, addr) = start(&etcd);
    for (addr, service, method) in
        [(&addr, "protocol.PushServer", "Broadcast"), (&node.grpc, "protocol.ConnectNode", "BroadcastBatch")]
    {
        let mut list = ServerReflectionRequest::new();
        list.set_list_services(String::new());
        let Response::list_services_response(listed) = ask_v1(addr, list) else { panic!("not a service list") };
        assert!(listed.get_service().iter().any(|s| s.get_name() == service), "{listed:?}");

        let Response::file_descriptor_response(files) = ask_v1(addr, symbol(&format!("{service}.{method}"))) else {
            panic!("no file for {service}.{method}")
        };
        let file = FileDescriptorProto::parse_from_bytes(&files.get_file_descriptor_proto()[0]).unwrap();
        assert_eq!(file.get_name(), "protocol.proto");
        assert!(file.get_service().iter().any(|s| format!("protocol.{}", s.get_name()) == service));

        let Response::error_response(error) = ask_v1(addr, symbol("protocol.Nope")) else { panic!("no error") };
        assert_eq!((error.get_error_code(), error.get_error_message()), (5, "symbol \"protocol.Nope\" not found"));
    }
}
