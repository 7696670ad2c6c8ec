//! The deployment files: `push-manager systemd-unit serve|node` prints units systemd accepts
//! (`systemd-analyze verify`), and `compose.yaml` is YAML whose commands are the binary's real
//! subcommands and flags, so that neither drifts from the binary unnoticed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{BIN, PATIENCE};
use push_manager::testkit::Reaped;

/// Runs `program args`, to its end within a deadline.
fn run(program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Reaped::spawn(&mut command).output_within(PATIENCE * 3)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn available(program: &str, probe: &[&str]) -> bool {
    Command::new(program).args(probe).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn the_printed_units_are_hardened_and_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    for role in ["serve", "node"] {
        let out = run(BIN, &["systemd-unit", role, "--bin", BIN]);
        assert!(out.status.success(), "{out:?}");
        let unit = text(&out.stdout);
        for line in [
            format!("ExecStart={BIN} {role} --config /etc/push-manager/{role}.toml"),
            "DynamicUser=yes".into(),
            "User=push-manager".into(),
            "ProtectSystem=strict".into(),
            "ProtectHome=yes".into(),
            "NoNewPrivileges=yes".into(),
            "PrivateTmp=yes".into(),
            "CapabilityBoundingSet=".into(),
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX".into(),
            "Restart=on-failure".into(),
            "KillSignal=SIGTERM".into(),
        ] {
            assert!(unit.lines().any(|l| l == line), "no line {line:?} in:\n{unit}");
        }
        let nofile: u64 = unit.lines().find_map(|l| l.strip_prefix("LimitNOFILE=")).unwrap().parse().unwrap();
        assert!(nofile >= 65_536, "{nofile}");
        let path = dir.path().join(format!("push-manager-{role}.service"));
        std::fs::write(&path, &unit).unwrap();
        verify(&path);
    }
    // The default binary is this one.
    let out = run(BIN, &["systemd-unit", "node"]);
    let exe = std::fs::canonicalize(BIN).unwrap();
    assert!(text(&out.stdout).contains(&format!("ExecStart={} node ", exe.display())), "{out:?}");
    // Bad input is refused clearly.
    let relative = run(BIN, &["systemd-unit", "node", "--bin", "bin/push-manager"]);
    assert!(text(&relative.stderr).contains("--bin bin/push-manager: systemd needs an absolute path"), "{relative:?}");
    let spaced = run(BIN, &["systemd-unit", "node", "--bin", "/opt/my bin/push-manager"]);
    assert!(text(&spaced.stderr).contains("would need quoting"), "{spaced:?}");
    let role = run(BIN, &["systemd-unit", "gateway"]);
    assert!(!role.status.success() && text(&role.stderr).contains("possible values: serve, node"), "{role:?}");
}

/// `systemd-analyze verify` with no complaint at all (unknown keys are only warned about).
fn verify(unit: &Path) {
    if !available("systemd-analyze", &["--version"]) {
        eprintln!("skipping systemd-analyze verify of {}: systemd-analyze is not installed", unit.display());
        return;
    }
    let out = run("systemd-analyze", &["verify", unit.to_str().unwrap()]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}: {out:?}", unit.display());
}

#[test]
fn compose_yaml_runs_the_binary_s_real_subcommands_and_flags() {
    let compose = Path::new(env!("CARGO_MANIFEST_DIR")).join("compose.yaml");
    if !available("python3", &["-c", "import yaml"]) {
        eprintln!("skipping the compose.yaml check: python3 with its yaml module is not installed");
        return;
    }
    // YAML to JSON with a parser we did not write; the merge keys (<<) resolved.
    let script = "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let out = run("python3", &["-c", script, compose.to_str().unwrap()]);
    assert!(out.status.success(), "compose.yaml does not parse: {out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = doc["services"].as_object().expect("services");
    for name in ["etcd", "push-manager", "node1", "node2"] {
        assert!(services.contains_key(name), "no service {name}");
    }
    let mut roles = BTreeSet::new();
    for (name, service) in services.iter().filter(|(name, _)| *name != "etcd") {
        assert_eq!(service["image"], "push-manager:latest", "{name}");
        assert_eq!(service["build"], ".", "{name}: built from the Dockerfile");
        let command: Vec<&str> = service["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let subcommand = command[0];
        roles.insert(subcommand);
        let help = run(BIN, &[subcommand, "--help"]);
        assert!(help.status.success(), "{name}: `{subcommand}` is no subcommand: {help:?}");
        let help = text(&help.stdout);
        for flag in command[1..].iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            let listed = help.lines().any(|l| l.trim_start().split([' ', ',', '[']).next() == Some(flag));
            assert!(listed, "{name}: `{subcommand}` has no flag {flag}");
        }
    }
    assert!(roles.contains("serve") && roles.contains("node"), "{roles:?}");
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    for needle in
        ["cargo build --release", "libssl3", "USER push-manager", "ENTRYPOINT [\"/usr/local/bin/push-manager\"]"]
    {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle:?}");
    }
}
