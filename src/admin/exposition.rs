//! The Prometheus text format (version 0.0.4), written from snapshots at scrape time, and the
//! one kind of metric the roles did not already keep: a histogram of plain atomics, cheap enough
//! to observe on every RPC.
//!
//! Written here rather than through a metrics registry because nothing is registered: each
//! role's counters already live where their events happen, and a scrape only reads them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The kinds of metric family written.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One scrape's text, family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    /// A counter family (`name` should end in `_total`) with one sample per label set.
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(Labels, u64)]) {
        self.header(name, help, Kind::Counter);
        for (labels, value) in samples {
            self.sample(name, labels, None, *value as f64);
        }
    }

    /// A gauge family with one sample per label set.
    pub fn gauge(&mut self, name: &str, help: &str, samples: &[(Labels, f64)]) {
        self.header(name, help, Kind::Gauge);
        for (labels, value) in samples {
            self.sample(name, labels, None, *value);
        }
    }

    /// A histogram family; each snapshot's values (and bounds) are multiplied by `scale` (1e-6
    /// for microseconds shown as seconds).
    pub fn histogram(&mut self, name: &str, help: &str, scale: f64, samples: &[(Labels, &HistogramSnapshot)]) {
        self.header(name, help, Kind::Histogram);
        for (labels, h) in samples {
            let mut cumulative = 0;
            let bucket = format!("{name}_bucket");
            for (i, count) in h.counts.iter().enumerate() {
                cumulative += count;
                let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| format_value(*b as f64 * scale));
                self.sample(&bucket, labels, Some(&le), cumulative as f64);
            }
            self.sample(&format!("{name}_sum"), labels, None, h.sum as f64 * scale);
            self.sample(&format!("{name}_count"), labels, None, h.count as f64);
        }
    }

    /// The text to serve.
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: Kind) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels, le: Option<&str>, value: f64) {
        self.out.push_str(name);
        let pairs = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (key, value)) in pairs.enumerate() {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(self.out, "{}{key}=\"{escaped}\"", if i == 0 { '{' } else { ',' });
        }
        if !labels.is_empty() || le.is_some() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

fn format_value(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

/// Counts of observations at or under each bound (and over the last), their sum and number:
/// one relaxed add each per observation.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, plus one for what exceeds the last.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// `bounds` ascending, in the unit observations come in.
    pub fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        self.observe_n(value, 1);
    }

    /// `n` observations of the same `value`, at the cost of one.
    pub fn observe_n(&self, value: u64, n: u64) {
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(n, Relaxed);
        self.sum.fetch_add(value.saturating_mul(n), Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum: self.sum.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// Adds `other`'s observations (same bounds) to these.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        debug_assert_eq!(self.bounds, other.bounds, "merging histograms of other bounds");
        self.counts.iter_mut().zip(&other.counts).for_each(|(c, o)| *c += o);
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// A [`Histogram`] at one moment. Its fields are read one by one, so `count` may differ from
/// the sum of `counts` by what was observed meanwhile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [u64],
    /// Per bucket, not cumulative: `counts[i]` observations in `(bounds[i-1], bounds[i]]`, the
    /// last one over every bound.
    pub counts: Vec<u64>,
    pub sum: u64,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 2, 10, 11, 1000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 2, 1, 1]);
        assert_eq!((s.sum, s.count), (1024, 6));
    }

    #[test]
    fn the_text_has_cumulative_buckets_escaped_labels_and_scaled_values() {
        let h = Histogram::new(&[500, 1000]);
        h.observe(400);
        h.observe(2000);
        let mut out = Exposition::default();
        out.counter("x_total", "Things.", &[(&[("node", "a\"b")], 3)]);
        out.histogram("lat_seconds", "Latency.", 1e-6, &[(&[], &h.snapshot())]);
        let text = out.finish();
        assert!(text.contains("# TYPE x_total counter\nx_total{node=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("lat_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("lat_seconds_sum 0.0024\n"), "{text}");
    }
}
