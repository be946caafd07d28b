//! Fire times of a schedule's trigger: cron expressions (croner: 5, 6 or 7 fields, names,
//! ranges, steps, lists, `L`, `W`, `#`) evaluated in the schedule's IANA time zone, fixed
//! intervals from a start time, and one-shot times. Pure: no clock, no I/O.

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::CronParser;

use crate::model::{TriggerSpec, UnixMillis};

/// The shortest interval a schedule may have.
pub const MIN_INTERVAL_MS: i64 = 100;

/// The longest interval a schedule may have: ten years. Rarer fires are one-shot `at` times
/// or a cron expression's job, and the bound keeps every fire time within an `i64`.
pub const MAX_INTERVAL_MS: i64 = 10 * 366 * 86_400_000;

/// A validated trigger.
#[derive(Debug, Clone)]
pub struct Trigger(Kind);

#[derive(Debug, Clone)]
enum Kind {
    Cron {
        cron: Box<Cron>,
        zone: Tz,
    },
    Interval {
        every: i64,
        jitter: i64,
        start_at: i64,
        end_at: Option<i64>,
    },
    At(i64),
}

/// Why a trigger is invalid, with the request field to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTrigger {
    pub field: &'static str,
    pub message: String,
}

/// Which field of a cron expression croner refuses, found by parsing it with every other field
/// replaced by `*`.
fn bad_cron_field(expr: &str) -> Option<&'static str> {
    /// The fields of 7; 6 leave out the year, 5 the seconds too.
    const NAMES: [&str; 7] = [
        "second",
        "minute",
        "hour",
        "day-of-month",
        "month",
        "day-of-week",
        "year",
    ];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names: &[&'static str] = match fields.len() {
        5 => &NAMES[1..6],
        6 => &NAMES[..6],
        7 => &NAMES,
        _ => return None,
    };
    (0..fields.len()).find_map(|index| {
        let alone: Vec<&str> = (0..fields.len())
            .map(|other| if other == index { fields[index] } else { "*" })
            .collect();
        CronParser::new()
            .parse(&alone.join(" "))
            .is_err()
            .then_some(names[index])
    })
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidTrigger {
    InvalidTrigger {
        field,
        message: message.into(),
    }
}

impl Trigger {
    /// Validates `spec`. An interval without `start_at` first fires one interval after
    /// `created_at`, as APScheduler's does.
    pub fn new(spec: &TriggerSpec, created_at: UnixMillis) -> Result<Trigger, InvalidTrigger> {
        match spec {
            TriggerSpec::Cron { expr, timezone } => {
                let cron = CronParser::new().parse(expr).map_err(|error| {
                    invalid(
                        "trigger.cron",
                        format!(
                            "invalid cron expression {expr:?}: {}{error}",
                            bad_cron_field(expr)
                                .map(|field| format!("the {field} field is invalid: "))
                                .unwrap_or_default()
                        ),
                    )
                })?;
                let zone: Tz = timezone.parse().map_err(|_| {
                    invalid(
                        "trigger.timezone",
                        format!("unknown time zone {timezone:?} (use an IANA name such as Europe/Berlin)"),
                    )
                })?;
                Ok(Trigger(Kind::Cron {
                    cron: Box::new(cron),
                    zone,
                }))
            }
            TriggerSpec::Interval {
                interval_ms,
                jitter_ms,
                start_at,
                end_at,
            } => {
                if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(interval_ms) {
                    return Err(invalid(
                        "trigger.interval_ms",
                        format!(
                            "interval_ms must be from {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} (ten years)"
                        ),
                    ));
                }
                if *jitter_ms < 0 || *jitter_ms >= *interval_ms {
                    return Err(invalid(
                        "trigger.jitter_ms",
                        format!(
                            "jitter_ms must be from 0 to less than interval_ms ({interval_ms}): a fire delayed past the next one would always be missed"
                        ),
                    ));
                }
                let start_at = start_at.unwrap_or(created_at + interval_ms);
                if let Some(end_at) = end_at
                    && *end_at <= start_at
                {
                    return Err(invalid("trigger.end_at", "end_at must be after start_at"));
                }
                Ok(Trigger(Kind::Interval {
                    every: *interval_ms,
                    jitter: *jitter_ms,
                    start_at,
                    end_at: *end_at,
                }))
            }
            TriggerSpec::At { at } => Ok(Trigger(Kind::At(*at))),
        }
    }

    /// The first fire time strictly after `after`, or `None` once the trigger is done.
    pub fn next_after(&self, after: UnixMillis) -> Option<UnixMillis> {
        match &self.0 {
            Kind::Cron { cron, zone } => {
                let local = Utc
                    .timestamp_millis_opt(after)
                    .single()?
                    .with_timezone(zone);
                let next = cron.find_next_occurrence(&local, false).ok()?;
                Some(next.timestamp_millis())
            }
            Kind::Interval {
                every,
                start_at,
                end_at,
                ..
            } => {
                // Checked: RFC 3339 times reach ±262,000 years, and a fire past the range of an
                // `i64` is a fire that never comes.
                let next = if after < *start_at {
                    *start_at
                } else {
                    let fires = after.checked_sub(*start_at)? / every + 1;
                    fires.checked_mul(*every)?.checked_add(*start_at)?
                };
                end_at.is_none_or(|end| next <= end).then_some(next)
            }
            Kind::At(at) => (*at > after).then_some(*at),
        }
    }

    /// The first fire of a trigger set up at `now`: the next one from now, except that a
    /// one-shot time already past still fires (and the misfire grace decides), as in
    /// APScheduler.
    pub fn first_from(&self, now: UnixMillis) -> Option<UnixMillis> {
        match &self.0 {
            Kind::At(at) => Some(*at),
            _ => self.next_after(now - 1),
        }
    }

    /// The random delay bound of each fire (intervals only).
    pub fn jitter_ms(&self) -> i64 {
        match &self.0 {
            Kind::Interval { jitter, .. } => *jitter,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .expect("a valid time")
            .timestamp_millis()
    }

    fn cron(expr: &str, zone: &str) -> Trigger {
        let spec = TriggerSpec::Cron {
            expr: expr.into(),
            timezone: zone.into(),
        };
        Trigger::new(&spec, 0).expect("valid cron trigger")
    }

    /// The next `count` fire times after `from`, as RFC 3339 in UTC.
    fn fires(trigger: &Trigger, from: &str, count: usize) -> Vec<String> {
        let mut at = millis(from);
        let mut out = Vec::new();
        for _ in 0..count {
            at = trigger.next_after(at).expect("a next fire");
            out.push(
                Utc.timestamp_millis_opt(at)
                    .single()
                    .expect("valid")
                    .to_rfc3339(),
            );
        }
        out
    }

    #[test]
    fn five_and_six_field_expressions_with_names_and_steps() {
        let daily = cron("30 2 * * *", "UTC");
        assert_eq!(
            fires(&daily, "2026-12-01T00:00:00Z", 2),
            ["2026-12-01T02:30:00+00:00", "2026-12-02T02:30:00+00:00"]
        );
        let seconds = cron("*/20 * * * * *", "UTC");
        assert_eq!(
            fires(&seconds, "2026-12-01T00:00:05Z", 3),
            [
                "2026-12-01T00:00:20+00:00",
                "2026-12-01T00:00:40+00:00",
                "2026-12-01T00:01:00+00:00"
            ]
        );
        let weekdays = cron("0 9 * JAN MON-FRI", "UTC");
        // 2027-01-01 is a Friday; the next weekday is Monday the 4th.
        assert_eq!(
            fires(&weekdays, "2027-01-01T10:00:00Z", 1),
            ["2027-01-04T09:00:00+00:00"]
        );
        let last_day = cron("0 0 L * *", "UTC");
        assert_eq!(
            fires(&last_day, "2027-02-10T00:00:00Z", 1),
            ["2027-02-28T00:00:00+00:00"]
        );
        let second_tuesday = cron("0 0 * * TUE#2", "UTC");
        assert_eq!(
            fires(&second_tuesday, "2026-12-01T00:00:00Z", 1),
            ["2026-12-08T00:00:00+00:00"]
        );
    }

    #[test]
    fn cron_in_a_named_zone_across_the_spring_gap() {
        // Europe/Berlin skips 02:00-03:00 on 2027-03-28: 02:30 does not exist that night.
        let trigger = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&trigger, "2027-03-26T12:00:00Z", 3),
            [
                "2027-03-27T01:30:00+00:00", // 02:30 CET
                "2027-03-28T01:00:00+00:00", // in the gap: at 03:00 CEST, when it ends, once
                "2027-03-29T00:30:00+00:00", // 02:30 CEST
            ]
        );
    }

    #[test]
    fn cron_in_a_named_zone_across_the_autumn_overlap() {
        // Europe/Berlin repeats 02:00-03:00 on 2027-10-31: 02:30 happens twice, fires once.
        let trigger = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&trigger, "2027-10-29T12:00:00Z", 3),
            [
                "2027-10-30T00:30:00+00:00", // 02:30 CEST
                "2027-10-31T00:30:00+00:00", // the first 02:30 (CEST) only
                "2027-11-01T01:30:00+00:00", // 02:30 CET
            ]
        );
        let hourly = cron("0 * * * *", "Europe/Berlin");
        let times = fires(&hourly, "2027-10-30T23:30:00Z", 4);
        let mut sorted = times.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(times, sorted, "in order and never twice: {times:?}");
    }

    #[test]
    fn invalid_triggers_name_their_field() {
        let bad_cron = TriggerSpec::Cron {
            expr: "61 * * * *".into(),
            timezone: "UTC".into(),
        };
        assert_eq!(
            Trigger::new(&bad_cron, 0).unwrap_err().field,
            "trigger.cron"
        );
        let bad_zone = TriggerSpec::Cron {
            expr: "* * * * *".into(),
            timezone: "Mars/Olympus".into(),
        };
        assert_eq!(
            Trigger::new(&bad_zone, 0).unwrap_err().field,
            "trigger.timezone"
        );
        let backwards = TriggerSpec::Interval {
            interval_ms: 1000,
            jitter_ms: 0,
            start_at: Some(5000),
            end_at: Some(4000),
        };
        assert_eq!(
            Trigger::new(&backwards, 0).unwrap_err().field,
            "trigger.end_at"
        );
    }

    #[test]
    fn intervals_count_from_their_start_and_stop_at_their_end() {
        let spec = TriggerSpec::Interval {
            interval_ms: 1000,
            jitter_ms: 0,
            start_at: Some(10_000),
            end_at: Some(12_000),
        };
        let trigger = Trigger::new(&spec, 0).expect("valid");
        assert_eq!(trigger.next_after(0), Some(10_000));
        assert_eq!(trigger.next_after(10_000), Some(11_000));
        assert_eq!(trigger.next_after(11_500), Some(12_000));
        assert_eq!(trigger.next_after(12_000), None);
        let once = Trigger::new(&TriggerSpec::At { at: 5_000 }, 0).expect("valid");
        assert_eq!(once.next_after(0), Some(5_000));
        assert_eq!(once.next_after(5_000), None);
    }

    #[test]
    fn huge_intervals_are_refused_and_far_fire_times_end_the_trigger() {
        let huge = TriggerSpec::Interval {
            interval_ms: i64::MAX,
            jitter_ms: 0,
            start_at: None,
            end_at: None,
        };
        assert_eq!(
            Trigger::new(&huge, 1_000).unwrap_err().field,
            "trigger.interval_ms"
        );
        // A start near the end of an `i64`: the fire after it lies past the range, so it is
        // none at all rather than an overflow.
        let latest = TriggerSpec::Interval {
            interval_ms: MAX_INTERVAL_MS,
            jitter_ms: MAX_INTERVAL_MS - 1,
            start_at: Some(i64::MAX - MAX_INTERVAL_MS / 2),
            end_at: None,
        };
        let trigger = Trigger::new(&latest, 0).expect("valid");
        assert_eq!(trigger.next_after(i64::MAX - MAX_INTERVAL_MS / 2), None);
        assert_eq!(trigger.next_after(0), Some(i64::MAX - MAX_INTERVAL_MS / 2));
    }
}
