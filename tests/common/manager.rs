//! An in-process push-manager for tests: on loopback port 0, watching the test's prefix in the
//! test's etcd, with a short etcd deadline so outages show quickly; each test overrides the
//! rest with struct update syntax.

use std::time::Duration;

use push_manager::etcd;
use push_manager::manager::Config;

use super::etcd::Etcd;

/// The config every manager test starts from: loopback, `prefix`, two workers per node, a
/// 500 ms etcd deadline.
pub fn config(etcd: &Etcd, prefix: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        etcd: etcd::Config { timeout: Duration::from_millis(500), ..etcd.config() },
        prefix: prefix.into(),
        routine_size: 2,
        ..Config::default()
    }
}
