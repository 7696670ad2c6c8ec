//! One handle for every long-lived thread in the crate, so each is named, stopped and joined the
//! same way, and a panic is reported the same way whichever layer owns the thread.
//!
//! A thread's body gets a `Receiver<()>` that never carries a value: the handle drops its
//! `Sender` to ask the thread to stop, so the body ends on disconnection (`select!` on it next
//! to its other channels, or `try_recv` between polls). A thread that sleeps where no channel
//! reaches (a mio poll, a gRPC stream read) is also given a wake-up to run once on stop. Linux
//! keeps 15 bytes of a thread's name, which is what `top -H`, `perf` and `gdb` show: names are
//! chosen to be distinct within that.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{bounded, Receiver, Sender};

/// Bytes of a thread name Linux keeps (16 with the NUL).
pub const MAX_NAME_BYTES: usize = 15;

/// The OS refused to start a thread.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot start thread {name}: {source}")]
pub struct SpawnError {
    /// The thread's name.
    pub name: String,
    /// What the OS said (typically out of memory or over a thread limit).
    #[source]
    pub source: Arc<io::Error>,
}

/// A named thread that is asked to stop by dropping a channel and is joined on drop.
pub struct StoppableThread<T = ()> {
    name: String,
    stop: Option<Sender<()>>,
    wake: Option<Box<dyn FnOnce() + Send>>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> StoppableThread<T> {
    /// Starts `body` on a thread called `name`. `body` gets the stop receiver: it disconnects
    /// when the handle is shut down or dropped.
    pub fn spawn<F>(name: impl Into<String>, body: F) -> Result<StoppableThread<T>, SpawnError>
    where
        F: FnOnce(Receiver<()>) -> T + Send + 'static,
    {
        let name = name.into();
        debug_assert!(name.len() <= MAX_NAME_BYTES, "thread name {name:?} is cut by Linux");
        let (stop, stop_rx) = bounded(0);
        let handle = thread::Builder::new()
            .name(name.clone())
            .spawn(move || body(stop_rx))
            .map_err(|e| SpawnError { name: name.clone(), source: Arc::new(e) })?;
        Ok(StoppableThread { name, stop: Some(stop), wake: None, handle: Some(handle) })
    }
}

impl<T> StoppableThread<T> {
    /// Also runs `wake` (once) when the thread is asked to stop, for a thread that waits where
    /// the stop channel cannot reach it.
    pub fn with_wake(mut self, wake: impl FnOnce() + Send + 'static) -> StoppableThread<T> {
        self.wake = Some(Box::new(wake));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the thread to stop, without waiting for it. Idempotent.
    pub fn signal(&mut self) {
        drop(self.stop.take());
        if let Some(wake) = self.wake.take() {
            wake();
        }
    }

    /// Whether the thread has ended (or was joined already).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread to end, without asking it to. Returns what its body returned;
    /// `None` if it was joined before or panicked (logged here, once, for every thread).
    pub fn join(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
        match handle.join() {
            Ok(value) => Some(value),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("a non-string payload");
                log::error!("thread {} panicked: {what}", self.name);
                None
            }
        }
    }

    /// Asks the thread to stop and waits for it. Idempotent.
    pub fn shutdown(&mut self) -> Option<T> {
        self.signal();
        self.join()
    }
}

impl<T> Drop for StoppableThread<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<T> std::fmt::Debug for StoppableThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppableThread").field("name", &self.name).field("finished", &self.is_finished()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_body_sees_the_stop_and_its_result_comes_back() {
        let mut t = StoppableThread::spawn("t-stop", |stop: Receiver<()>| stop.recv().is_err()).unwrap();
        assert_eq!(t.name(), "t-stop");
        assert_eq!(t.shutdown(), Some(true));
        assert!(t.is_finished());
        assert_eq!(t.shutdown(), None, "a second shutdown is a no-op");
    }

    #[test]
    fn the_wake_up_runs_once_on_stop() {
        let woken = Arc::new(AtomicBool::new(false));
        let flag = woken.clone();
        let mut t = StoppableThread::spawn("t-wake", |stop: Receiver<()>| {
            let _ = stop.recv();
        })
        .unwrap()
        .with_wake(move || assert!(!flag.swap(true, Ordering::SeqCst), "woken twice"));
        t.signal();
        t.signal();
        t.join();
        assert!(woken.load(Ordering::SeqCst));
    }

    #[test]
    fn a_panic_is_reported_as_none() {
        let mut t = StoppableThread::spawn("t-panic", |_stop: Receiver<()>| -> u8 { panic!("boom") }).unwrap();
        assert_eq!(t.join(), None);
    }

    #[test]
    fn dropping_the_handle_stops_and_joins() {
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let t = StoppableThread::spawn("t-drop", move |stop: Receiver<()>| {
            let _ = stop.recv();
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
        drop(t);
        assert!(ended.load(Ordering::SeqCst));
    }
}
