//! `stepwise dev FILE --replay RECORDING`: runs a plugin's steps against a recording (README,
//! "Debugging a failed run"), attempt by attempt, with the recorded run's params. Every
//! capability call is answered from the recorded attempt of the same step and number, and
//! nothing reaches the network: no source is connected, and the tape answers before any
//! capability would. The plugin may be a newer build than the recorded one; a call it makes
//! differently is a mismatch that stops the replay (or, with `lenient`, is answered by the
//! nearest recorded call). A directory of recordings is replayed one by one, as a table.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value as Json};

use super::{Prepared, keep_output, prepare, print_call};
use crate::capabilities::recording::{RecordedAttempt, Recording, Tape};
use crate::config::Settings;
use crate::model::{AttemptOutcome, StepStatus};
use crate::runner::rules::{self, CallResult, RunClock, StepClock, Verdict};
use crate::runtime::StepCall;

/// How one replay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The recording's file name.
    pub name: String,
    /// How the recorded run ended, and at which step.
    pub recorded: String,
    /// `passed`, `failed`, `errored`, `timed_out`, `cancelled`, `mismatch`, or `cut` (the
    /// recording stops short of what the replay asked).
    pub status: String,
    /// Where the replay ended (`at step warehouse`), and why.
    pub detail: String,
}

impl Replayed {
    pub fn passed(&self) -> bool {
        self.status == "passed"
    }

    /// `stepwise dev`'s exit code: 0 passed, 1 failed or timed out, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.status.as_str() {
            "passed" => 0,
            "failed" | "timed_out" => 1,
            _ => 2,
        }
    }
}

/// Replays `plugin_file` against `recordings`: one file, printing every call as `stepwise
/// dev` does, or every `*.rec` file of a directory, printing a table of recording, recorded
/// outcome and replayed outcome. With `junit`, a JUnit XML report (a test case per
/// recording) is written there. Returns the replays, in order.
pub async fn replay(
    plugin_file: &Path,
    recordings: &Path,
    settings: &Settings,
    lenient: bool,
    junit: Option<&Path>,
    artifacts: Option<&Path>,
    out: &mut impl Write,
) -> anyhow::Result<Vec<Replayed>> {
    let files = recording_files(recordings)?;
    let prepared = prepare(plugin_file, settings, &[], artifacts, false).await?;
    let one = !recordings.is_dir();
    let mut replays = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let replayed = match Recording::parse(&text) {
            Ok(recording) => {
                let mut lines = Vec::new();
                let mut replayed =
                    replay_one(&prepared, &recording, lenient, &mut lines, name).await?;
                if one {
                    out.write_all(&lines)?;
                }
                replayed.recorded = recorded_outcome(&recording);
                replayed
            }
            Err(error) => Replayed {
                name,
                recorded: "unreadable".into(),
                status: "errored".into(),
                detail: format!("{error:#}"),
            },
        };
        replays.push(replayed);
    }
    if one {
        let replayed = &replays[0];
        writeln!(
            out,
            "replayed: {} {} (recorded: {})",
            replayed.status, replayed.detail, replayed.recorded
        )?;
    } else {
        write_table(&replays, out)?;
    }
    if let Some(path) = junit {
        let plugin = &prepared.info.name;
        let cases: Vec<crate::junit::ReplayCase<'_>> = replays
            .iter()
            .map(|replayed| crate::junit::ReplayCase {
                name: &replayed.name,
                recorded: &replayed.recorded,
                status: &replayed.status,
                detail: &replayed.detail,
            })
            .collect();
        std::fs::write(path, crate::junit::render_replays(plugin, &cases))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(replays)
}

/// `path` itself, or the `*.rec` files of the directory `path`, by name.
fn recording_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        anyhow::ensure!(path.exists(), "--replay {}: no such file", path.display());
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|file| file.extension().is_some_and(|extension| extension == "rec"))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "--replay {}: the directory has no *.rec recording",
        path.display()
    );
    Ok(files)
}

fn write_table(replays: &[Replayed], out: &mut impl Write) -> std::io::Result<()> {
    let width = replays
        .iter()
        .map(|replayed| replayed.name.len())
        .max()
        .unwrap_or(0)
        .max("recording".len());
    writeln!(out, "{:<width$}  {:<28}  replayed", "recording", "recorded")?;
    for replayed in replays {
        writeln!(
            out,
            "{:<width$}  {:<28}  {} {}",
            replayed.name, replayed.recorded, replayed.status, replayed.detail
        )?;
    }
    let passed = replays.iter().filter(|replayed| replayed.passed()).count();
    writeln!(out, "{passed} of {} replays passed", replays.len())
}

/// "failed at warehouse": the recorded run's end and the step of its last attempt.
fn recorded_outcome(recording: &Recording) -> String {
    let status = match &recording.end {
        Some(end) => end.status.clone(),
        None => "unfinished".into(),
    };
    match recording.attempts.last() {
        Some(last) if status != "passed" => format!("{status} at {}", last.start.step),
        _ => status,
    }
}

/// One replay, by the runner's rules (`runner::rules`) without its clock: the recording
/// decides when a step's time ran out.
async fn replay_one(
    prepared: &Prepared,
    recording: &Recording,
    lenient: bool,
    out: &mut impl Write,
    name: String,
) -> anyhow::Result<Replayed> {
    let Prepared {
        runtime,
        plugin,
        info,
        capabilities,
        ..
    } = prepared;
    let header = &recording.header;
    writeln!(
        out,
        "replaying run {} of {} ({} recorded attempts) with {} {}",
        header.run_id,
        header.plugin,
        recording.attempts.len(),
        info.name,
        info.version
    )?;
    let ended = |status: &str, detail: String| Replayed {
        name: name.clone(),
        recorded: String::new(),
        status: status.to_owned(),
        detail,
    };
    let run = RunClock {
        created_at: header.created_at_ms,
        deadline_at: i64::MAX,
        poll_interval_ms: 0,
        max_errors: capabilities.limits.max_errors,
    };
    let mut outputs = Map::new();
    let mut errors = 0;
    let mut tick = 1;
    for step in &info.steps {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(recorded) = recording.attempts.iter().find(|recorded| {
                recorded.start.step == step.name && recorded.start.attempt == attempt
            }) else {
                let (status, detail) = beyond(recording, &step.name, attempt);
                return Ok(ended(status, detail));
            };
            let tape = Tape::replaying(recorded.clone(), lenient);
            let call = StepCall {
                run_id: header.run_id.clone(),
                step: step.name.clone(),
                attempt,
                elapsed: Duration::from_millis(recorded.start.elapsed_ms),
                run_created_at_ms: header.created_at_ms,
                params: header.params.to_string(),
                outputs: Json::Object(outputs.clone()).to_string(),
                traceparent: None,
                tape: tape.clone(),
            };
            let report = runtime
                .run_step(plugin, call, capabilities)
                .await
                .map_err(|fault| anyhow::anyhow!("the host could not make the call: {fault}"))?;
            print_call(out, tick, &step.name, attempt, &report)?;
            if let Some(mismatch) = tape.first_mismatch() {
                // Past where the budget cut the recording, nothing can be told apart.
                let status = if tape.reached_cut() {
                    "cut"
                } else {
                    "mismatch"
                };
                return Ok(ended(status, mismatch));
            }
            if report.outcome == AttemptOutcome::Errored {
                errors += 1;
            }
            let clock = StepClock {
                name: &step.name,
                timeout_ms: None,
                max_attempts: step.max_attempts,
                first_attempt_at: Some(recorded.start.clock_ms),
            };
            let result = CallResult {
                outcome: report.outcome,
                message: report.message.as_deref().unwrap_or_default(),
                attempt,
                started_at: recorded.start.clock_ms,
                finished_at: recorded.start.clock_ms,
                errors,
            };
            match rules::decide(&run, &clock, &result, capabilities.grant.retry) {
                Verdict::Passed => {
                    keep_output(&mut outputs, &step.name, &report);
                    break;
                }
                Verdict::Again { .. } => tick += 1,
                Verdict::Ends(ending) => {
                    let detail = format!("at {}: {}", step.name, ending.message);
                    return Ok(ended(ending.run.as_str(), detail));
                }
            }
        }
    }
    Ok(ended("passed", "(every step)".into()))
}

/// The replay wants attempt `attempt` of `step`, which the recording does not have. When
/// the recorded run ended right there (its time ran out, or it was cancelled, after the
/// attempt before), so does the replay; otherwise every recorded attempt replayed without a
/// failure: the replay passed as far as the recording goes, unless its budget cut it short.
fn beyond(recording: &Recording, step: &str, attempt: u32) -> (&'static str, String) {
    let last: Option<&RecordedAttempt> = recording.attempts.last();
    if last.is_some_and(|last| last.cut) {
        return (
            "cut",
            format!(
                "before attempt {attempt} of step {step}: the recording was cut at the run's \
                 budget (run_recording_bytes)"
            ),
        );
    }
    let ended_here = last.is_some_and(|last| {
        last.start.step == step
            && last.start.attempt + 1 == attempt
            && last
                .end
                .as_ref()
                .is_some_and(|end| end.outcome == StepStatus::Pending.as_str())
    });
    match &recording.end {
        Some(end) if ended_here && end.status == "timed_out" => (
            "timed_out",
            format!(
                "at {step}: the recorded run timed out after attempt {}",
                attempt - 1
            ),
        ),
        Some(end) if ended_here && end.status == "cancelled" => (
            "cancelled",
            format!(
                "at {step}: the recorded run was cancelled after attempt {}",
                attempt - 1
            ),
        ),
        _ => (
            "passed",
            format!("(the recording ends before attempt {attempt} of step {step})"),
        ),
    }
}
