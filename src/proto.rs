//! Generated protobuf messages and grpcio stubs (see `build.rs`): `protocol` is push-manager's
//! public API and the connect-node service; `kv`/`rpc` are the trimmed etcd v3 API.

include!(concat!(env!("OUT_DIR"), "/mod.rs"));
