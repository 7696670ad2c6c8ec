//! Running push-manager and its dependencies on one machine, for the demo, the tests and the
//! benchmarks; `serve` and `node` never use any of it.
//!
//! - [`LocalEtcd`]: a real `etcd` process on free loopback ports in a temporary directory.
//! - [`InProcessEtcd`]: an in-memory stand-in speaking the etcd v3 gRPC API our client uses, so
//!   the demo runs the same client, discovery and registration code where no `etcd` is installed.
//! - [`TestPki`]: a throwaway CA and certificates for `127.0.0.1`, made with `openssl`.
//! - [`Sink`]: an in-process `ConnectNode` server that records or counts what it is sent, and
//!   can stall or answer late.
//! - [`spawn_serve`], [`spawn_node`]: the real binary as a child process on loopback port 0;
//!   [`signal`] and [`wait_exit`] to stop it; [`Reaped`] kills any child left when dropped.
//! - [`poll_until`], [`wait_until`]: waiting for a condition with a deadline instead of a sleep.

mod in_process_etcd;
mod local_etcd;
mod pki;
mod process;
mod sink;
mod wait;

pub use in_process_etcd::InProcessEtcd;
pub use local_etcd::{free_port, EtcdTls, LocalEtcd};
pub use pki::{Identity, TestPki};
pub use process::{
    admin_on_free_port, node_command, serving_line, signal, spawn_node, spawn_serve, wait_exit, NodeProcess, Reaped,
};
pub use sink::Sink;
pub use wait::{poll_until, wait_until};
