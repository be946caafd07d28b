//! Status pages: the time to build and render a 90-day page of 50 checks from a year of daily
//! rollups (3 steps each, 8 latency buckets a step a day), and the page's bytes. Also through
//! HTTP, where a page is computed at most every 5 s: a first reader after that pays for it.

use std::time::Instant;

use anyhow::Context;
use stepwise_host::model::{CheckSelection, StatusPage, Tz, day_of, day_text, now_millis};
use stepwise_host::storage::Store;

use crate::Options;
use crate::stats::{millis, print_header, print_row};

const CHECKS: usize = 50;
const DAYS: i64 = 365;
const STEPS: i64 = 3;
const BUCKETS: i64 = 8;

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("status.db").display());
    let store = Store::open(&url).await?;
    seed(&url).await.context("seeding a year of rollups")?;
    let page = StatusPage {
        slug: "pipeline".into(),
        title: "Event pipeline".into(),
        description: None,
        checks: CheckSelection {
            plugins: (0..CHECKS).map(|n| format!("check-{n:02}")).collect(),
            ..CheckSelection::default()
        },
        public: true,
        time_zone: Tz::UTC,
        days: 90,
        show_messages: false,
    };
    let mut build_ms = Vec::new();
    let mut render_ms = Vec::new();
    let mut html_bytes = 0;
    let mut json_bytes = 0;
    let mut gzipped_bytes = 0;
    for _ in 0..options.repeat {
        let started = Instant::now();
        let report = stepwise_host::api::build_status_report(&store, &page, now_millis())
            .await
            .map_err(|error| anyhow::anyhow!("building the page: {error:?}"))?;
        build_ms.push(millis(started.elapsed()));
        let started = Instant::now();
        let html = stepwise_host::api::render_status_page(&report);
        render_ms.push(millis(started.elapsed()));
        anyhow::ensure!(
            report.checks.len() == CHECKS,
            "{} checks",
            report.checks.len()
        );
        anyhow::ensure!(
            report.checks.iter().all(|check| check.history.len() == 90),
            "a check without 90 days"
        );
        html_bytes = html.len();
        gzipped_bytes = gzipped(html.as_bytes())?;
        json_bytes = serde_json::to_vec(&report)?.len();
    }
    print_header(&format!(
        "status page: {CHECKS} checks × {STEPS} steps, 90 days shown of {DAYS} days of rollups (SQLite)"
    ));
    print_row("build from rollups", "ms", &build_ms);
    print_row("render HTML", "ms", &render_ms);
    println!(
        "\npage: {html_bytes} bytes of HTML ({gzipped_bytes} gzipped, as served to browsers), \
         {json_bytes} bytes of JSON"
    );
    Ok(())
}

fn gzipped(bytes: &[u8]) -> anyhow::Result<usize> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?.len())
}

/// A year of days for every check: rows as the rollup job would have written them.
async fn seed(url: &str) -> anyhow::Result<()> {
    let pool = sqlx::SqlitePool::connect(url).await?;
    let mut transaction = pool.begin().await?;
    let today = now_millis();
    for day_index in 0..DAYS {
        let at = today - day_index * 86_400_000;
        let (day, start) = day_of(at, Tz::UTC);
        let day = day_text(day);
        let mut days = Vec::new();
        let mut steps = Vec::new();
        let mut latency = Vec::new();
        for check in 0..CHECKS {
            let plugin = format!("check-{check:02}");
            let failed = i64::from((day_index + check as i64) % 17 == 0);
            days.push(format!(
                "('UTC', '{plugin}', '', '{day}', {start}, {}, {failed}, 0, 0, 0, {start}, 'passed')",
                1440 - failed
            ));
            for step in 0..STEPS {
                steps.push(format!(
                    "('UTC', '{plugin}', '', '{day}', {step}, 'step-{step}', {start}, 1440, 0, 1500)"
                ));
                for bucket in 0..BUCKETS {
                    latency.push(format!(
                        "('UTC', '{plugin}', '', '{day}', {step}, {}, {start}, {})",
                        150 + step * 20 + bucket,
                        180 - bucket * 20
                    ));
                }
            }
        }
        for (head, rows) in [
            (
                "INSERT INTO rollup_days (zone, plugin_name, schedule_id, day, day_start, passed, failed, \
                 errored, timed_out, cancelled, last_finished_at, last_status) VALUES ",
                days,
            ),
            (
                "INSERT INTO rollup_steps (zone, plugin_name, schedule_id, day, position, name, day_start, \
                 passed, ended_run, attempts) VALUES ",
                steps,
            ),
            (
                "INSERT INTO rollup_latency (zone, plugin_name, schedule_id, day, position, bucket, \
                 day_start, runs) VALUES ",
                latency,
            ),
        ] {
            sqlx::raw_sql(&format!("{head}{}", rows.join(", ")))
                .execute(&mut *transaction)
                .await?;
        }
    }
    transaction.commit().await?;
    Ok(())
}
