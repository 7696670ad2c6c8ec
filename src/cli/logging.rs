//! Where the process's log lines go: standard error, as text for people (simplelog) or as one
//! JSON object per line for log collectors (`--log-format json`), chosen once at start-up by
//! every subcommand that takes `--log-level`.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use clap::{Args, ValueEnum};
use log::{LevelFilter, Log, Metadata, Record};
use serde::Serialize;

/// How log lines are written.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `HH:MM:SS [LEVEL] (thread) message`, for people.
    #[default]
    Text,
    /// One JSON object per line: time (RFC 3339, UTC), level, thread, node (the connect-node's
    /// id, once known) and message.
    Json,
}

/// Flags every long-running subcommand shares.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    pub log_level: LevelFilter,
    /// Log line format on standard error: text, or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::default())]
    pub log_format: LogFormat,
}

pub(super) fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not a log level; use error, warn, info, debug or trace"))
}

/// The connect-node id JSON lines carry, set once the role knows it (a default id waits for
/// the bound port); lines logged before carry none.
#[derive(Clone, Default)]
pub struct LogNode(Arc<OnceLock<String>>);

impl LogNode {
    pub fn set(&self, id: &str) {
        let _ = self.0.set(id.to_string());
    }
}

/// Installs the logger for the process; returns where to give it the node id.
pub fn init(level: LevelFilter, format: LogFormat) -> LogNode {
    let node = LogNode::default();
    // Both only fail if a logger is already set, e.g. when a test runs two commands.
    match format {
        LogFormat::Text => {
            let config = simplelog::ConfigBuilder::new()
                .set_thread_level(LevelFilter::Error)
                .set_thread_mode(simplelog::ThreadLogMode::Names)
                .set_target_level(LevelFilter::Off)
                .build();
            let _ = simplelog::TermLogger::init(
                level,
                config,
                simplelog::TerminalMode::Stderr,
                simplelog::ColorChoice::Never,
            );
        }
        LogFormat::Json => {
            if log::set_boxed_logger(Box::new(JsonLogger { level, node: node.clone() })).is_ok() {
                log::set_max_level(level);
            }
        }
    }
    node
}

/// `--log-format json`: each record as one line, written whole in one call so that threads
/// logging at once never interleave within a line.
struct JsonLogger {
    level: LevelFilter,
    node: LogNode,
}

/// One JSON log line; the fields are written in this order.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    level: &'static str,
    thread: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    message: String,
}

impl Log for JsonLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let line = Line {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            level: level_name(record.level()),
            thread: thread.name().unwrap_or("unnamed"),
            node: self.node.0.get().map(String::as_str),
            message: record.args().to_string(),
        };
        let Ok(mut text) = serde_json::to_string(&line) else { return };
        text.push('\n');
        // Nowhere to report a failed write to standard error.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// The level as `--log-level` spells it.
fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_in_field_order() {
        let line = Line {
            time: "2024-01-02T03:04:05.000006Z".into(),
            level: level_name(log::Level::Warn),
            thread: "ws-loop-0",
            node: Some("n1"),
            message: "a \"quoted\"\nmessage".into(),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(
            text,
            r#"{"time":"2024-01-02T03:04:05.000006Z","level":"warn","thread":"ws-loop-0","node":"n1","message":"a \"quoted\"\nmessage"}"#
        );
        let without_node = Line { node: None, ..line };
        assert!(!serde_json::to_string(&without_node).unwrap().contains("node"));
    }
}
