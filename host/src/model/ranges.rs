//! The documented range of every numeric setting and limit, and the one check of a value
//! against it, which `config` (settings) and `grant` (grants and the policy) share.

/// The documented range of every numeric setting (README, "Configuration" and "What a plugin
/// can and cannot do"), by key. Every path that reads one checks it here: `stepwise.toml`,
/// `[limits]`, `[policy.max_limits]` and grants from the API or the plugins directory.
pub const RANGES: &[(&str, u64, u64)] = &[
    ("max_concurrent_ticks", 1, 4096),
    ("default_poll_interval_ms", 50, 3_600_000),
    ("default_run_timeout_ms", 1_000, 604_800_000),
    ("lease_ms", 1_000, 3_600_000),
    ("max_upload_mib", 1, 1024),
    ("events_buffer", 16, 1_000_000),
    ("events_buffer_bytes", 65_536, 1 << 30),
    ("events_replay_bytes", 65_536, 1 << 30),
    ("events_keep_alive_ms", 100, 3_600_000),
    ("max_event_streams", 1, 1_000_000),
    ("max_event_streams_per_token", 1, 1_000_000),
    ("run_log_bytes", 0, 1 << 30),
    ("run_recording_bytes", 0, 1 << 30),
    ("plugin_memory_mib", 1, 65_536),
    ("header_read_timeout_ms", 100, 3_600_000),
    ("max_connections", 16, 1_000_000),
    ("poll_interval_ms", 50, 3_600_000),
    ("call_timeout_ms", 10, 3_600_000),
    ("step_timeout_ms", 10, 3_600_000),
    ("default_step_timeout_ms", 1, 604_800_000),
    ("timeout_ms", 1, 604_800_000),
    ("memory_mib", 1, 4096),
    ("output_bytes", 1, 16 << 20),
    ("http_response_bytes", 1, 1 << 30),
    ("http_timeout_ms", 10, 3_600_000),
    ("sql_rows", 1, 1_000_000),
    ("sql_timeout_ms", 10, 3_600_000),
    ("sql_result_bytes", 1, 1 << 30),
    ("max_errors", 1, 1_000_000),
    ("table_elements", 1, 10_000_000),
    ("instances", 1, 64),
    ("http_requests_per_run", 1, 10_000_000),
    ("http_concurrent_requests", 1, 256),
    ("after_consecutive", 1, 1_000_000),
    ("max_delivery_ms", 1_000, 604_800_000),
    ("keep_last_per_schedule", 0, 1_000_000),
    ("interval_ms", 100, 86_400_000),
];

/// `value` of `key` (written as `prefix` + `key` in messages), if it is within its range.
pub fn in_range<T: Copy + TryInto<u64>>(
    prefix: &str,
    key: &str,
    value: Option<T>,
) -> anyhow::Result<Option<T>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let (_, min, max) = RANGES
        .iter()
        .find(|(known, ..)| *known == key)
        .copied()
        .unwrap_or((key, 0, u64::MAX));
    let number = value.try_into().unwrap_or(u64::MAX);
    anyhow::ensure!(
        (min..=max).contains(&number),
        "{prefix}{key} = {number} is out of range: it must be from {min} to {max}"
    );
    Ok(Some(value))
}
