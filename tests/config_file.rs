//! `--config FILE`, `--print-config` and `--log-format` on the real binary: every flag of `serve`
//! and `node` set from a file, the command line over the file over the defaults, clear errors
//! for bad files, the printed configuration reading back to itself with secrets never shown,
//! and JSON log lines from a running node and serve.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clap::{ArgAction, CommandFactory};
use common::etcd::Etcd;
use common::process::Process;
use common::{BIN, PATIENCE};
use push_manager::cli::Cli;
use push_manager::testkit::Reaped;
use toml::Value;

/// The roles that take `--config`.
const ROLES: [&str; 2] = ["serve", "node"];

/// A temporary directory holding the config files of one test.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Runs `push-manager <args>` to its exit (it must exit by itself).
#[track_caller]
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Reaped::spawn(
        Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    child.output_within(PATIENCE)
}

/// What `push-manager <role> --config <path> --print-config <extra>` printed; panics unless it
/// exited 0.
#[track_caller]
fn print_config(role: &str, path: &Path, extra: &[&str]) -> String {
    let mut args = vec![role, "--config", path.to_str().unwrap(), "--print-config"];
    args.extend(extra);
    let out = run(&args, &[]);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Standard error of a run that must fail as a usage error (exit 2).
#[track_caller]
fn refused(args: &[&str]) -> String {
    let out = run(args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?} should be refused; stdout {:?}, stderr {stderr}", out.stdout);
    stderr
}

#[track_caller]
fn assert_has_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
}

/// The flags of `role` a config file may set, from the clap definitions: (long name, action).
fn settable(role: &str) -> Vec<(String, ArgAction)> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(role).unwrap();
    sub.get_arguments()
        .filter(|a| !["config", "print_config"].contains(&a.get_id().as_str()))
        .filter(|a| matches!(a.get_action(), ArgAction::Set | ArgAction::Append | ArgAction::SetTrue))
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            Some((long, a.get_action().clone()))
        })
        .collect()
}

/// A value for the flag `long` unlike its default, that its own parser takes.
fn sample(role: &str, long: &str, action: &ArgAction) -> Value {
    match action {
        ArgAction::SetTrue => return Value::Boolean(true),
        ArgAction::Append => {
            return Value::Array(vec![Value::String("https://a.example".into()), Value::String("*.b.example".into())])
        }
        _ => {}
    }
    // Flags whose values have a shape of their own.
    let special = match long {
        "ws-auth" => Some("optional"),
        "admin-listen" => Some("127.0.0.1:1"),
        "log-level" => Some("debug"),
        "log-format" => Some("json"),
        _ => None,
    };
    if let Some(value) = special {
        return Value::String(value.into());
    }
    let cli = Cli::command();
    let arg = cli.find_subcommand(role).unwrap().get_arguments().find(|a| a.get_long() == Some(long)).unwrap();
    let default = arg.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
    match default {
        Some(d) if d.parse::<i64>().is_ok() => Value::Integer(d.parse::<i64>().unwrap() + 1),
        Some(d) if humantime::parse_duration(&d).is_ok() => {
            Value::String(format!("{}ms", humantime::parse_duration(&d).unwrap().as_millis() + 1500))
        }
        _ => Value::String(format!("/etc/push-manager/{long}")),
    }
}

#[test]
fn every_flag_of_serve_and_node_is_settable_from_the_file() {
    let files = Files::new();
    for role in ROLES {
        let flags = settable(role);
        assert!(flags.len() > 20, "{role} has {} settable flags", flags.len());
        let mut table = toml::Table::new();
        for (long, action) in &flags {
            table.insert(long.clone(), sample(role, long, action));
        }
        let mut document = toml::Table::new();
        document.insert(role.to_string(), Value::Table(table.clone()));
        let path = files.write(&format!("{role}.toml"), &toml::to_string(&document).unwrap());
        let printed = print_config(role, &path, &[]);
        for (long, value) in &table {
            assert_has_line(&printed, &format!("{long} = {value}"));
        }
        assert!(!printed.contains("is not set"), "every flag was given:\n{printed}");
    }
}

#[test]
fn the_command_line_beats_the_file_and_the_file_beats_the_default() {
    let files = Files::new();
    let path = files.write(
        "both.toml",
        r#"
        [serve]
        routine-size = 7
        queue-size = 5
        no-watch = true

        [node]
        allowed-origins = ["https://from-the-file.example"]
        event-loops = 3
        require-origin = true
        "#,
    );
    let serve = print_config("serve", &path, &["--routine-size", "9", "--no-watch=false"]);
    assert_has_line(&serve, "routine-size = 9");
    assert_has_line(&serve, "no-watch = false");
    assert_has_line(&serve, "queue-size = 5");
    let default_batch = push_manager::manager::Config::default().batch_max;
    assert_has_line(&serve, &format!("batch-max = {default_batch}"));
    assert!(!serve.contains("event-loops"), "serve ignores [node]:\n{serve}");

    let node = print_config("node", &path, &["--allowed-origins", "https://from-the-flag.example"]);
    assert_has_line(&node, r#"allowed-origins = ["https://from-the-flag.example"]"#);
    assert_has_line(&node, "event-loops = 3");
    assert_has_line(&node, "require-origin = true");
    assert!(!node.contains("routine-size"), "node ignores [serve]:\n{node}");
    // A switch given bare on the command line is on, whatever the file says.
    let flipped = files.write("off.toml", "[node]\nrequire-origin = false\n");
    assert_has_line(&print_config("node", &flipped, &["--require-origin"]), "require-origin = true");
}

#[test]
fn an_unknown_key_names_the_nearest_one_and_the_fixed_file_starts() {
    let etcd = Etcd::start();
    let files = Files::new();
    let settings = format!(
        "listen = \"127.0.0.1:0\"\netcd = \"{}\"\nprefix = \"/config-test/nodes/\"\nadmin-listen = \"127.0.0.1:0\"\n",
        etcd.endpoint()
    );
    let typo = files.write("typo.toml", &format!("[serve]\n{settings}rotine-size = 2\n"));
    let stderr = refused(&["serve", "--config", typo.to_str().unwrap()]);
    assert!(stderr.contains(typo.to_str().unwrap()), "names the file: {stderr}");
    assert!(stderr.contains("unknown key `rotine-size`; did you mean `routine-size`?"), "{stderr}");

    let misplaced = files.write("misplaced.toml", &format!("[serve]\n{settings}ws-listen = \"127.0.0.1:0\"\n"));
    let stderr = refused(&["serve", "--config", misplaced.to_str().unwrap()]);
    assert!(stderr.contains("`ws-listen` is a flag of node, not of serve: put it in [node]"), "{stderr}");

    let fixed = files.write("fixed.toml", &format!("[serve]\n{settings}routine-size = 2\n"));
    let mut serve = Process::start(&["serve", "--config", fixed.to_str().unwrap()], &[]);
    serve.wait_for("listening 127.0.0.1:", 1);
    assert!(serve.stop().success(), "{}", serve.output());
}

#[test]
fn bad_files_and_values_are_refused_naming_the_file_the_key_and_what_is_expected() {
    let files = Files::new();
    let cases: &[(&str, &str, &[&str])] = &[
        ("serve", "[serve]\nroutine-size = true\n", &["routine-size = true", "expected a string or a number"]),
        ("serve", "[serve]\nroutine-size = [1, 2]\n", &["routine-size = [1, 2]", "expected a string or a number"]),
        ("serve", "[serve]\nroutine-size = \"four\"\n", &["routine-size = \"four\"", "invalid digit"]),
        ("serve", "[serve]\nno-watch = \"yes\"\n", &["no-watch = \"yes\"", "expected true or false"]),
        ("serve", "[serve]\npoll-interval = \"soon\"\n", &["poll-interval", "is not a duration like 3s"]),
        ("node", "[node]\nws-auth = \"sometimes\"\n", &["ws-auth", "use off, optional or required"]),
        ("node", "[node]\nlog-format = \"xml\"\n", &["log-format", "possible values: text, json"]),
        ("node", "[node]\nallowed-origins = [true]\n", &["allowed-origins", "expected an array of strings"]),
        ("node", "[node]\nconfig = \"other.toml\"\n", &["`config` cannot be set in a config file"]),
        ("serve", "[srve]\nroutine-size = 2\n", &["unknown table [srve] (did you mean [serve]?)"]),
        ("serve", "routine-size = 2\n", &["`routine-size` is outside a table"]),
        ("serve", "[serve\nroutine-size = 2\n", &["is not valid TOML", "line 1"]),
    ];
    for (i, (role, text, wanted)) in cases.iter().enumerate() {
        let path = files.write(&format!("bad-{i}.toml"), text);
        let stderr = refused(&[role, "--config", path.to_str().unwrap(), "--print-config"]);
        assert!(stderr.contains(path.to_str().unwrap()), "{text:?} should name the file: {stderr}");
        for want in *wanted {
            assert!(stderr.contains(want), "{text:?} should say {want:?}: {stderr}");
        }
    }
    let missing = files.0.path().join("missing.toml");
    let stderr = refused(&["node", "--config", missing.to_str().unwrap()]);
    assert!(stderr.contains(&format!("cannot read the config file {}", missing.display())), "{stderr}");
    // The same flags from a good file still work.
    let good = files.write("good.toml", "[serve]\nroutine-size = 2\nno-watch = true\npoll-interval = \"4s\"\n");
    let printed = print_config("serve", &good, &[]);
    assert_has_line(&printed, "poll-interval = \"4s\"");
}

#[test]
fn printed_configuration_read_back_prints_the_same() {
    let files = Files::new();
    let path = files.write(
        "start.toml",
        r#"
        [serve]
        routine-size = 6
        no-watch = true
        prefix = "007"
        stats-interval = "90s"
        api-key-file = "/etc/push-manager/api-keys"

        [node]
        node-id = "node-1"
        allowed-origins = ["https://app.example", "*.example.com"]
        require-origin = true
        ws-auth = "optional"
        max-connections = 5000
        "#,
    );
    for role in ROLES {
        let first = print_config(role, &path, &["--log-level", "debug"]);
        let again = files.write(&format!("{role}-printed.toml"), &first);
        let second = print_config(role, &again, &[]);
        assert_eq!(first, second, "{role}: the printed configuration reads back to itself");
        // A string that looks like a number stays a string.
        if role == "serve" {
            assert_has_line(&first, "prefix = \"007\"");
        }
    }
}

#[test]
fn print_config_never_shows_a_secret() {
    let files = Files::new();
    let password = files.write("etcd-password", "hunter2-password\n");
    let keys = files.write("api-keys", "hunter2-api-key-0123456789abcdef0123456789abcdef\n");
    let tokens = files.write("node-tokens", "hunter2-node-token-0123456789abcdef0123456789\n");
    let path = files.write(
        "secrets.toml",
        &format!(
            "[serve]\netcd-user = \"alice\"\netcd-password-file = {:?}\napi-key-file = {:?}\nnode-token-file = {:?}\n\n\
             [node]\nnode-token-file = {:?}\ntoken-key-file = {:?}\n",
            password, keys, tokens, tokens, keys
        ),
    );
    let env = [("PUSH_MANAGER_ETCD_PASSWORD", "hunter2-from-env"), ("PUSH_MANAGER_API_KEY", "hunter2-env-key")];
    for role in ROLES {
        let out = run(&[role, "--config", path.to_str().unwrap(), "--print-config"], &env);
        assert!(out.status.success(), "{out:?}");
        let printed = String::from_utf8(out.stdout).unwrap();
        assert!(!printed.contains("hunter2"), "{role} printed a secret:\n{printed}");
        // What points at a secret is not one.
        assert_has_line(&printed, &format!("node-token-file = {:?}", tokens.to_str().unwrap()));
    }
}

/// The lines `process` printed, JSON log lines (standard error) parsed; the others must start
/// with one of `stdout_prefixes` (what it prints on standard output).
#[track_caller]
fn json_lines(process: &Process, stdout_prefixes: &[&str]) -> Vec<serde_json::Value> {
    let output = process.output();
    let mut objects = Vec::new();
    for line in output.lines() {
        if stdout_prefixes.iter().any(|p| line.starts_with(p)) {
            continue;
        }
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{output}"));
        assert!(object.is_object(), "not an object: {line}");
        let time = object["time"].as_str().unwrap_or_else(|| panic!("no time: {line}"));
        assert!(time.ends_with('Z'), "UTC: {line}");
        humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("time is not RFC 3339 ({e}): {line}"));
        let level = object["level"].as_str().unwrap_or_default();
        assert!(["error", "warn", "info", "debug", "trace"].contains(&level), "{line}");
        assert!(!object["thread"].as_str().unwrap_or_default().is_empty(), "{line}");
        assert!(object["message"].is_string(), "{line}");
        objects.push(object);
    }
    objects
}

#[test]
fn json_logs_of_a_node_and_serve_are_one_object_per_line_with_thread_and_node() {
    let etcd = Etcd::start();
    let files = Files::new();
    let endpoint = etcd.endpoint();
    let node_args = [
        "node",
        "--grpc-listen",
        "127.0.0.1:0",
        "--ws-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--etcd",
        endpoint.as_str(),
        "--prefix",
        "/json-test/nodes/",
        "--node-id",
        "json-node",
        "--log-format",
        "json",
    ];
    let mut node = Process::start(&node_args, &[]);
    node.wait_for("connect-node json-node serving", 1);
    assert!(node.stop().success(), "{}", node.output());
    let lines = json_lines(&node, &["node json-node grpc ", "admin http://"]);
    assert!(lines.iter().all(|l| l["node"] == "json-node"), "every line names the node: {lines:?}");
    let said = |l: &serde_json::Value, what: &str| l["message"].as_str().is_some_and(|m| m.contains(what));
    assert!(lines.iter().any(|l| said(l, "connect-node json-node stopped")), "{lines:?}");
    assert!(lines.iter().any(|l| l["thread"] == "main"), "{lines:?}");
    assert!(lines.iter().any(|l| l["thread"].as_str().is_some_and(|t| t.starts_with("ws-loop-"))), "{lines:?}");

    // serve's log format, from a config file this time.
    let path = files.write(
        "serve.toml",
        &format!(
            "[serve]\nlisten = \"127.0.0.1:0\"\netcd = \"{endpoint}\"\nprefix = \"/json-test/nodes/\"\n\
             admin-listen = \"127.0.0.1:0\"\nlog-format = \"json\"\n"
        ),
    );
    let mut serve = Process::start(&["serve", "--config", path.to_str().unwrap()], &[]);
    serve.wait_for("listening ", 1);
    assert!(serve.stop().success(), "{}", serve.output());
    let lines = json_lines(&serve, &["listening ", "admin http://", "instance "]);
    assert!(lines.iter().any(|l| l["message"] == "shutdown signal received"), "{lines:?}");
    assert!(lines.iter().all(|l| l["node"].is_null()), "serve is no node: {lines:?}");
}

#[test]
fn a_bad_log_format_is_refused_naming_the_choices() {
    for command in ["serve", "node", "demo"] {
        let stderr = refused(&[command, "--log-format", "xml"]);
        assert!(stderr.contains("invalid value 'xml' for '--log-format"), "{command}: {stderr}");
        assert!(stderr.contains("[possible values: text, json]"), "{command}: {stderr}");
    }
}
