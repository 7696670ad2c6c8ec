//! An in-process connect-node on loopback port 0.

use push_manager::gateway::{Config, Gateway};

use super::{wait_until, PATIENCE};

/// Starts a gateway on loopback with free ports, after letting `tweak` change the config.
pub fn start_gateway(tweak: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = Config { grpc_listen: "127.0.0.1:0".into(), ws_listen: "127.0.0.1:0".into(), ..Config::default() };
    tweak(&mut config);
    Gateway::start(config).expect("gateway starts")
}

/// Waits until the gateway counts `n` open WebSocket connections.
#[track_caller]
pub fn wait_connections(gw: &Gateway, n: usize) {
    wait_until(&format!("{n} connections are open"), PATIENCE, || gw.hub().connections() == n);
}
