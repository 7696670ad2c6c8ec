//! `push-manager status`: a human summary of a running serve or node, read from its admin
//! endpoint (`/metrics`, `/healthz`, `/readyz`): health, readiness, totals and their rates over
//! the last interval, and serve's node table. `--watch` prints it again every interval. Given
//! `--etcd` instead of `--admin`, it reads the admin URL a registered serve instance published.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;

use super::{parse_duration, LocateArgs};
use crate::admin;

/// How long one request to the admin endpoint may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The admin endpoint of a serve or node: http://host:port (as --admin-listen) [default: that
    /// of a serve instance registered in --etcd].
    #[arg(long)]
    pub admin: Option<String>,
    #[command(flatten)]
    pub locate: LocateArgs,
    /// Print the summary again every --interval until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Time between the two readings rates are computed from (and between summaries with --watch).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: humantime::Duration,
}

/// A sample's label pairs, in the order written.
type Labels = Vec<(String, String)>;

/// One reading of `/metrics`: each family's samples, by name.
#[derive(Debug, Default)]
struct Reading {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Reading {
    /// Our own exposition, read back: `name{k="v",...} value` lines, comments skipped.
    fn parse(text: &str) -> Reading {
        let mut reading = Reading::default();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            reading.samples.entry(name.to_string()).or_default().push((labels, value));
        }
        reading
    }

    /// The sum of a family's samples whose labels include `filter`.
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        let Some(samples) = self.samples.get(name) else { return 0.0 };
        samples
            .iter()
            .filter(|(labels, _)| filter.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, v)| v)
            .sum()
    }

    /// The values a label takes in a family, in order.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|(labels, _)| labels.iter().find(|(k, _)| k == label).map(|(_, v)| v.clone()))
            .collect();
        values.dedup();
        values
    }
}

fn parse_labels(text: &str) -> Labels {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end..];
    }
    labels
}

/// The endpoint's answers at one moment.
struct Snapshot {
    at: Instant,
    metrics: Reading,
    health: admin::Response,
    ready: admin::Response,
}

fn read(base: &str) -> Result<Snapshot, String> {
    let get = |path: &str| admin::get(&format!("{base}{path}"), REQUEST_TIMEOUT);
    let metrics = get("/metrics")?;
    if metrics.status != 200 {
        return Err(format!("{base}/metrics answered {}: {}", metrics.status, metrics.body.trim()));
    }
    Ok(Snapshot {
        at: Instant::now(),
        metrics: Reading::parse(&metrics.body),
        health: get("/healthz")?,
        ready: get("/readyz")?,
    })
}

pub fn run(args: StatusArgs) -> super::CmdResult {
    let base = admin_url(&args)?.trim_end_matches('/').to_string();
    let interval: Duration = args.interval.into();
    let mut before = read(&base)?;
    let mut out = std::io::stdout().lock();
    loop {
        std::thread::sleep(interval);
        let now = read(&base)?;
        let summary = summarize(&base, &before, &now);
        if args.watch {
            writeln!(out, "--- {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()))?;
        }
        write!(out, "{summary}")?;
        out.flush()?;
        if !args.watch {
            return Ok(());
        }
        before = now;
    }
}

/// `--admin`, else the admin URL of the instance found in `--etcd`.
fn admin_url(args: &StatusArgs) -> Result<String, String> {
    if let Some(admin) = &args.admin {
        return Ok(admin.clone());
    }
    let Some(instance) = args.locate.find()? else {
        return Err("give the admin endpoint with --admin http://host:port, or --etcd to find a serve instance".into());
    };
    instance.record.admin.ok_or_else(|| {
        format!(
            "instance {} ({}) registered no admin endpoint (it runs with --admin-listen off, or its default port \
             was taken): give --admin",
            instance.id, instance.record.addr
        )
    })
}

/// The text printed for two readings `before` and `now` of the endpoint at `base`.
fn summarize(base: &str, before: &Snapshot, now: &Snapshot) -> String {
    let secs = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let rate = |name: &str, filter: &[(&str, &str)]| {
        (now.metrics.sum(name, filter) - before.metrics.sum(name, filter)).max(0.0) / secs
    };
    let m = &now.metrics;
    let verdict =
        |r: &admin::Response| if r.status == 200 { "yes".to_string() } else { format!("no ({})", r.body.trim()) };
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    let (role, prefix) = if m.samples.contains_key("push_manager_node_build_info") {
        ("connect-node", "push_manager_node")
    } else {
        ("push-manager serve", "push_manager")
    };
    let version = m.label_values(&format!("{prefix}_build_info"), "version").join(",");
    line(format!("{role} {version} at {base}"));
    line(format!("healthy: {}", verdict(&now.health)));
    line(format!("ready:   {}", verdict(&now.ready)));
    if role == "connect-node" {
        let registered = if m.sum("push_manager_node_registered", &[]) > 0.0 { "yes" } else { "no" };
        let registrations = m.sum("push_manager_node_registrations_total", &[]);
        line(format!("registered in etcd: {registered} ({registrations} registration(s))"));
        line(format!(
            "connections open {}  subscriptions {}  topics {}  users {}",
            m.sum("push_manager_node_connections_open", &[]),
            m.sum("push_manager_node_subscriptions", &[]),
            m.sum("push_manager_node_topics", &[]),
            m.sum("push_manager_node_users", &[])
        ));
        for (what, name) in [
            ("messages received", "push_manager_node_messages_received_total"),
            ("frames sent", "push_manager_node_frames_sent_total"),
            ("connections accepted", "push_manager_node_connections_accepted_total"),
            ("connections refused", "push_manager_node_connections_refused_total"),
            ("connections closed by the node", "push_manager_node_connections_closed_total"),
            ("broadcasts refused busy", "push_manager_node_broadcasts_refused_busy_total"),
        ] {
            line(format!("{what}: {} ({:.1}/s)", m.sum(name, &[]), rate(name, &[])));
        }
        let closed = "push_manager_node_connections_closed_total";
        let reasons: Vec<String> = m
            .label_values(closed, "reason")
            .iter()
            .map(|r| format!("{r} {}", m.sum(closed, &[("reason", r)])))
            .collect();
        line(format!("  closed by reason: {}", reasons.join(", ")));
        return text;
    }
    let reachable = if m.sum("push_manager_etcd_reachable", &[]) > 0.0 { "reachable" } else { "UNREACHABLE" };
    line(format!(
        "etcd {reachable}, {} listing(s); nodes known {}, retiring {}",
        m.sum("push_manager_discovery_listings_total", &[]),
        m.sum("push_manager_nodes_known", &[]),
        m.sum("push_manager_nodes_retiring", &[])
    ));
    line(format!(
        "{:<24} {:<8} {:>10} {:>9} {:>7} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "NODE", "STATE", "SENT", "SENT/s", "QUEUED", "DROPPED", "FAILED", "ABANDONED", "RETRIED", "RPCS/s"
    ));
    let label = |labels: &[(String, String)], key: &str| {
        labels.iter().find(|(k, _)| k == key).map_or(String::new(), |(_, v)| v.clone())
    };
    let series = m.samples.get("push_manager_sent_total").into_iter().flatten();
    for (node, state) in series.map(|(labels, _)| (label(labels, "node"), label(labels, "state"))) {
        let f = [("node", node.as_str()), ("state", state.as_str())];
        line(format!(
            "{:<24} {:<8} {:>10} {:>9.1} {:>7} {:>9} {:>8} {:>9} {:>8} {:>8.1}",
            node,
            state,
            m.sum("push_manager_sent_total", &f),
            rate("push_manager_sent_total", &f),
            m.sum("push_manager_queue_depth", &f),
            m.sum("push_manager_dropped_total", &f),
            m.sum("push_manager_failed_total", &f),
            m.sum("push_manager_abandoned_total", &f),
            m.sum("push_manager_retried_total", &f),
            rate("push_manager_rpcs_total", &f),
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_exposition_reads_back_with_escaped_labels() {
        let r = Reading::parse(
            "# HELP x y\nx_total{node=\"a\\\"b\",state=\"active\"} 3\nx_total{node=\"c\",state=\"active\"} 4\ng 1.5\n",
        );
        assert_eq!(r.sum("x_total", &[("node", "a\"b")]), 3.0);
        assert_eq!(r.sum("x_total", &[("state", "active")]), 7.0);
        assert_eq!(r.sum("g", &[]), 1.5);
        assert_eq!(r.label_values("x_total", "node"), vec!["a\"b".to_string(), "c".to_string()]);
    }
}
