//! push-manager: a thread-based fan-out service for real-time push.
//!
//! Business servers call `protocol.PushServer/Broadcast`; the `manager` role discovers
//! connect-nodes in etcd and forwards each broadcast to every node through a bounded queue and
//! dedicated worker threads; the `gateway` role is a connect-node that registers itself in etcd
//! and pushes what it receives to its WebSocket subscribers.

pub mod addr;
pub mod admin;
pub mod auth;
pub mod cli;
pub mod discovery;
pub mod duration;
pub mod etcd;
pub mod gateway;
pub mod grpc;
pub mod loadgen;
pub mod manager;
pub mod proto;
pub mod reflection;
pub mod registry;
pub mod secret;
pub mod testkit;
pub mod thread;
pub mod token;
pub mod topic;
pub mod trace;
