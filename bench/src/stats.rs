//! Medians and spread of repeated measurements, printed as table rows.

use std::time::Duration;

/// Summary of samples in milliseconds.
pub struct Summary {
    pub count: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |quantile: f64| sorted[((sorted.len() - 1) as f64 * quantile).round() as usize];
        Summary {
            count: sorted.len(),
            median: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn print_header(title: &str) {
    println!("\n## {title}\n");
    println!("| measurement | n | median | p90 | p99 | min | max |");
    println!("|---|---|---|---|---|---|---|");
}

pub fn print_row(what: &str, unit: &str, samples: &[f64]) {
    let summary = Summary::of(samples);
    println!(
        "| {what} | {} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} |",
        summary.count, summary.median, summary.p90, summary.p99, summary.min, summary.max
    );
}

/// This process's resident memory now (`VmRSS`), in MiB.
pub fn resident_mib() -> anyhow::Result<f64> {
    status_mib("VmRSS")
}

/// This process's peak resident memory (`VmHWM`), in MiB.
pub fn peak_resident_mib() -> anyhow::Result<f64> {
    status_mib("VmHWM")
}

fn status_mib(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{field} in /proc/self/status"))?;
    Ok(kib / 1024.0)
}
