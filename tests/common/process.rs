//! The `push-manager` binary as a child process whose standard output and error are both kept,
//! for tests that read what it printed or logged (its address, a reload, a refusal) and what it
//! must never print. Killed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use push_manager::testkit::{poll_until, signal, wait_exit};

use super::{BIN, PATIENCE};

pub struct Process {
    pub child: Child,
    /// Both streams, line by line in the order they were read (each stream in its own order).
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Process {
    /// Starts `push-manager <args>` with `env` added to its environment.
    #[track_caller]
    pub fn start(args: &[impl AsRef<OsStr>], env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let readers = vec![collect(stdout, output.clone()), collect(stderr, output.clone())];
        Process { child, output, readers }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.output.lock().clone()
    }

    /// How many printed lines contain `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.output.lock().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` printed lines contain `needle`; panics with the output if they do not,
    /// or if the process exits first.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, n: usize) {
        let mut exited = None;
        let seen = poll_until(PATIENCE, || {
            if self.count(needle) >= n {
                return true;
            }
            exited = self.child.try_wait().expect("the child can be waited for");
            // Its last words may still be in the pipe.
            exited.is_some() && self.finish_reading() && self.count(needle) >= n
        });
        assert!(seen, "no {n} line(s) with {needle:?} (exit: {exited:?}); output:\n{}", self.output());
    }

    /// The rest of the first printed line starting with `prefix`, once there is one. (A log
    /// line may mention the same words earlier: only a line that starts with them counts.)
    #[track_caller]
    pub fn line_after(&mut self, prefix: &str) -> String {
        let starting = |output: &str| output.lines().find_map(|l| l.strip_prefix(prefix)).map(str::to_string);
        let mut exited = None;
        let mut found = None;
        poll_until(PATIENCE, || {
            found = starting(&self.output());
            if found.is_some() {
                return true;
            }
            exited = self.child.try_wait().expect("the child can be waited for");
            // Its last words may still be in the pipe.
            exited.is_some() && self.finish_reading() && {
                found = starting(&self.output());
                true
            }
        });
        let line = found.unwrap_or_else(|| {
            panic!("no line starting with {prefix:?} (exit: {exited:?}); output:\n{}", self.output())
        });
        line.trim().to_string()
    }

    /// Sends SIGTERM (unless it has exited already) and waits for the exit; all output has been
    /// read when this returns.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        // Once reaped, its pid may be another process's.
        if self.child.try_wait().expect("the child can be waited for").is_none() {
            signal(&self.child, libc::SIGTERM);
        }
        let status = wait_exit(&mut self.child, Duration::from_secs(20));
        self.finish_reading();
        status
    }

    /// Waits for the exit (of a process expected to end by itself) and reads all it printed.
    #[track_caller]
    pub fn wait(&mut self) -> ExitStatus {
        let status = wait_exit(&mut self.child, PATIENCE);
        self.finish_reading();
        status
    }

    /// Joins the readers, which end at end of file once the process has exited.
    fn finish_reading(&mut self) -> bool {
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader");
        }
        true
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(stream: impl Read + Send + 'static, output: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let mut output = output.lock();
            output.push_str(&line);
            output.push('\n');
        }
    })
}
