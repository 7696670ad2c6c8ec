//! A real etcd per test: the library's `LocalEtcd`, panicking here instead of returning errors.

use std::ops::{Deref, DerefMut};

use push_manager::testkit::LocalEtcd;

/// A single-member etcd of the test's own, killed and deleted on drop.
pub struct Etcd(LocalEtcd);

impl Etcd {
    #[track_caller]
    pub fn start() -> Etcd {
        Etcd(LocalEtcd::start().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Kills etcd if it runs and starts it again on the same data dir and ports.
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(e) = self.0.restart() {
            panic!("etcd did not restart: {e}");
        }
    }
}

impl Deref for Etcd {
    type Target = LocalEtcd;
    fn deref(&self) -> &LocalEtcd {
        &self.0
    }
}

impl DerefMut for Etcd {
    fn deref_mut(&mut self) -> &mut LocalEtcd {
        &mut self.0
    }
}
