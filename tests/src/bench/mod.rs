//! Benchmarks of our VMM beside QEMU, both run inside one emulated KVM
//! host. [`inside`] runs the scenarios there (a `testhost-init bench` job)
//! and prints one `BENCH name=... vmm=... value=...` line per sample; the
//! `bench` binary on this machine collects them and prints medians and
//! ratios. Nothing here asserts on time.

pub mod client;
pub mod inside;

use std::collections::BTreeMap;

/// Prefix of every sample line.
pub const PREFIX: &str = "BENCH";

/// Errors of the benchmark scenarios.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A system call or a child process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step did not finish in time.
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        secs: f64,
    },
    /// A VMM answered something unexpected.
    #[error("{0}")]
    Protocol(String),
}

impl BenchError {
    /// An [`BenchError::Io`] with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result of the benchmark code.
pub type Result<T> = std::result::Result<T, BenchError>;

/// One sample: `BENCH name=hotadd_total vmm=ours value=123.4`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Figure name.
    pub name: String,
    /// `ours` or `qemu`.
    pub vmm: String,
    /// Milliseconds, MiB or items/s depending on the figure.
    pub value: f64,
}

impl Sample {
    /// The console line.
    pub fn line(&self) -> String {
        format!(
            "{PREFIX} name={} vmm={} value={:.3}",
            self.name, self.vmm, self.value
        )
    }

    /// Parses a console line.
    pub fn parse(line: &str) -> Option<Sample> {
        let rest = line.trim().strip_prefix(PREFIX)?.strip_prefix(' ')?;
        let mut s = Sample {
            name: String::new(),
            vmm: String::new(),
            value: f64::NAN,
        };
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "name" => s.name = v.to_string(),
                "vmm" => s.vmm = v.to_string(),
                "value" => s.value = v.parse().ok()?,
                _ => {}
            }
        }
        (!s.name.is_empty() && !s.vmm.is_empty() && s.value.is_finite()).then_some(s)
    }
}

/// Median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Samples grouped by (name, vmm).
#[derive(Debug, Default)]
pub struct Collected {
    by_key: BTreeMap<(String, String), Vec<f64>>,
}

impl Collected {
    /// Adds one sample.
    pub fn add(&mut self, s: Sample) {
        self.by_key
            .entry((s.name, s.vmm))
            .or_default()
            .push(s.value);
    }

    /// All values of a figure for one VMM.
    pub fn values(&self, name: &str, vmm: &str) -> &[f64] {
        self.by_key
            .get(&(name.to_string(), vmm.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Median of a figure for one VMM.
    pub fn median(&self, name: &str, vmm: &str) -> Option<f64> {
        median(self.values(name, vmm))
    }

    /// Number of samples collected.
    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// True if nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_round_trip() {
        let s = Sample {
            name: "hotadd_total".into(),
            vmm: "ours".into(),
            value: 12.5,
        };
        assert_eq!(Sample::parse(&s.line()), Some(s));
        assert_eq!(Sample::parse("BENCHX name=a vmm=b value=1"), None);
        assert_eq!(Sample::parse("BENCH name=a vmm=b value=x"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let mut c = Collected::default();
        c.add(Sample::parse("BENCH name=a vmm=ours value=1").unwrap());
        c.add(Sample::parse("BENCH name=a vmm=ours value=3").unwrap());
        assert_eq!(c.median("a", "ours"), Some(2.0));
        assert_eq!(c.median("a", "qemu"), None);
    }
}
