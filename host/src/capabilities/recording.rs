//! Recordings: every capability call of an attempt (HTTP, SQL, key-value, messages), its log
//! lines, the clock it saw and its outcome, as JSON Lines (README, "Debugging a failed run"),
//! and their replay. A call's [`Tape`] is off (the default, which costs nothing), recording,
//! or replaying. Each capability passes its calls through [`Tape::exchange`]: recording
//! keeps the request and the answer; replaying answers from the recording without running
//! the call, so nothing reaches the network, and a request other than the recorded one is a
//! mismatch that names both.
//!
//! What is recorded is redacted of every secret's value first (strings, and byte lists as the
//! bytes they are), and bounded by the run's byte budget: past it, one `cut` line says so.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::secrets::SecretSet;

/// The first line's `format`, and the version of the line types below. A reader refuses a
/// recording of a version it does not know.
pub const FORMAT: &str = "stepwise-recording";
pub const VERSION: u32 = 1;

/// One line of a recording: a JSON object with one key, the line's kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// The first line: the run.
    Recording(Header),
    /// An attempt begins; the lines up to its `outcome` are its own.
    Attempt(AttemptStart),
    Call(Exchange),
    Log(LogEntry),
    /// The run's recording budget was spent here: later calls were not recorded.
    Cut(String),
    Outcome(AttemptEnd),
    /// The last line: how the run ended, if it has.
    End(RunEnd),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub run_id: String,
    pub plugin: String,
    pub plugin_version: String,
    /// The run's params, as given.
    pub params: Json,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptStart {
    pub step: String,
    pub attempt: u32,
    /// What the plugin was told: milliseconds since the run started.
    pub elapsed_ms: u64,
    /// The wall clock at the call's start (ms since the Unix epoch); a replay's plugin sees
    /// its clock start there.
    pub clock_ms: i64,
}

/// One capability call: which (`http`, `sql.query`, `kv`, `messages.find`), what the plugin
/// asked, and what it was answered (`{"Ok": …}` or `{"Err": …}`, as the interface returns it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub call: String,
    pub request: Json,
    pub response: Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub level: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEnd {
    /// `passed`, `pending`, `failed` or `errored`.
    pub outcome: String,
    pub message: Option<String>,
    pub output: Option<Json>,
    /// The limit a call broke (the host's verdict: the attempt `errored`), which a replay of
    /// the same answers reaches again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    pub status: String,
    pub message: Option<String>,
}

/// A recording read back: its run and its attempts, in order.
#[derive(Debug, Clone)]
pub struct Recording {
    pub header: Header,
    pub attempts: Vec<RecordedAttempt>,
    pub end: Option<RunEnd>,
}

#[derive(Debug, Clone)]
pub struct RecordedAttempt {
    pub start: AttemptStart,
    pub calls: Vec<Exchange>,
    /// The run's budget was spent during this attempt: the run recorded nothing after it.
    pub cut: bool,
    /// How many of its calls were recorded before the cut, when the cut came before its
    /// outcome: the calls after those are missing.
    pub cut_at: Option<usize>,
    pub end: Option<AttemptEnd>,
}

impl Recording {
    /// Reads a recording's text, refusing another format or a version this host does not
    /// know, with the line that is wrong.
    pub fn parse(text: &str) -> anyhow::Result<Recording> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty());
        let read = |(number, line): (usize, &str)| {
            serde_json::from_str::<Line>(line)
                .map_err(|error| anyhow::anyhow!("line {}: {error}", number + 1))
        };
        let header = match lines.next().map(read).transpose()? {
            Some(Line::Recording(header)) => header,
            _ => anyhow::bail!("not a Stepwise recording: its first line has no \"recording\""),
        };
        anyhow::ensure!(
            header.format == FORMAT,
            "not a Stepwise recording: its format is {:?}",
            header.format
        );
        anyhow::ensure!(
            header.version == VERSION,
            "a recording of version {}; this stepwise reads version {VERSION}",
            header.version
        );
        let mut recording = Recording {
            header,
            attempts: Vec::new(),
            end: None,
        };
        for numbered in lines {
            let number = numbered.0 + 1;
            let line = read(numbered)?;
            let current = recording.attempts.last_mut();
            match (line, current) {
                (Line::Attempt(start), _) => recording.attempts.push(RecordedAttempt {
                    start,
                    calls: Vec::new(),
                    cut: false,
                    cut_at: None,
                    end: None,
                }),
                (Line::End(end), _) => recording.end = Some(end),
                (Line::Call(call), Some(attempt)) => attempt.calls.push(call),
                (Line::Cut(_), Some(attempt)) => {
                    attempt.cut = true;
                    if attempt.end.is_none() {
                        attempt.cut_at = Some(attempt.calls.len());
                    }
                }
                (Line::Outcome(end), Some(attempt)) => attempt.end = Some(end),
                (Line::Log(_), Some(_)) => {}
                (Line::Recording(_), _) => anyhow::bail!("line {number}: a second \"recording\""),
                (_, None) => anyhow::bail!("line {number}: a line before the first \"attempt\""),
            }
        }
        Ok(recording)
    }
}

/// A run's whole recording: `header`, then each attempt's lines as stored (compressed with
/// zstd), then how the run ended, if it has. An attempt whose bytes do not decompress is
/// named in a `cut` line rather than failing the rest.
pub fn assemble(header: Header, attempts: &[Vec<u8>], end: Option<RunEnd>) -> String {
    let mut lines = String::new();
    for stored in attempts {
        match zstd::stream::decode_all(stored.as_slice()) {
            Ok(attempt) => lines.push_str(&String::from_utf8_lossy(&attempt)),
            Err(error) => lines.push_str(&line_text(&Line::Cut(format!(
                "an attempt's recording could not be read: {error}"
            )))),
        }
    }
    assemble_lines(header, &lines, end)
}

/// An attempt's lines as stored: compressed with zstd, by a compressor each thread keeps (a
/// new one per attempt cost more than the compression of a few hundred bytes).
pub fn compress(lines: &str) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        if compressor.is_none() {
            *compressor = zstd::bulk::Compressor::new(1).ok();
        }
        compressor.as_mut()?.compress(lines.as_bytes()).ok()
    })
}

/// A whole recording from its attempts' lines, as [`Tape::finish`] returned them.
pub fn assemble_lines(header: Header, attempts: &str, end: Option<RunEnd>) -> String {
    let mut text = line_text(&Line::Recording(header));
    text.push_str(attempts);
    if let Some(end) = end {
        text.push_str(&line_text(&Line::End(end)));
    }
    text
}

fn line_text(line: &Line) -> String {
    serde_json::to_string(line).unwrap_or_default() + "\n"
}

/// How a call's capabilities meet the outside: as they are (off), recorded, or replayed.
/// Cheap to clone; every capability of a call holds the same one.
#[derive(Clone, Default)]
pub struct Tape(Option<Arc<Mutex<Reel>>>);

impl std::fmt::Debug for Tape {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.reel().as_deref() {
            None => "off",
            Some(Reel::Recording(_)) => "recording",
            Some(Reel::Replaying(_)) => "replaying",
        };
        write!(formatter, "Tape({mode})")
    }
}

enum Reel {
    Recording(Recorder),
    Replaying(Box<Replayer>),
}

struct Recorder {
    /// The attempt's lines in the order their calls were made, with the places of calls in
    /// flight kept until they are answered ([`Tape::reserve`]).
    lines: Vec<Slot>,
    /// Bytes the run's recording may still take.
    budget: u64,
    cut: bool,
    secrets: Arc<SecretSet>,
}

enum Slot {
    Line(String),
    /// A call not answered yet, recorded as such if the attempt ends first.
    Waiting {
        call: String,
        request: Json,
    },
    /// A call not answered yet, left out if the attempt ends first.
    Kept,
}

struct Replayer {
    /// "attempt 3 of step warehouse", for mismatches.
    label: String,
    attempt: RecordedAttempt,
    used: Vec<bool>,
    lenient: bool,
    mismatch: Option<String>,
    /// A call asked past the place where the budget cut the recording.
    past_cut: bool,
}

/// A request the recording cannot answer: the replay stops at it. Raised as the call's
/// trap, and kept by the tape ([`Tape::mismatch`]) for the replay's report.
#[derive(Debug)]
pub struct ReplayMismatch(pub String);

impl std::fmt::Display for ReplayMismatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for ReplayMismatch {}

impl Tape {
    /// A tape that records the attempt `start`, within `budget` bytes, redacting `secrets`.
    pub fn recording(start: AttemptStart, budget: u64, secrets: Arc<SecretSet>) -> Tape {
        let mut recorder = Recorder {
            lines: Vec::new(),
            budget,
            cut: false,
            secrets,
        };
        recorder.push(None, &Line::Attempt(start), true);
        Tape(Some(Arc::new(Mutex::new(Reel::Recording(recorder)))))
    }

    /// A tape that answers every call from `attempt`: in order, or with `lenient`, by the
    /// nearest recorded call of the same kind.
    pub fn replaying(attempt: RecordedAttempt, lenient: bool) -> Tape {
        let label = format!(
            "attempt {} of step {}",
            attempt.start.attempt, attempt.start.step
        );
        Tape(Some(Arc::new(Mutex::new(Reel::Replaying(Box::new(
            Replayer {
                label,
                used: vec![false; attempt.calls.len()],
                attempt,
                lenient,
                mismatch: None,
                past_cut: false,
            },
        ))))))
    }

    fn reel(&self) -> Option<std::sync::MutexGuard<'_, Reel>> {
        self.0
            .as_ref()
            .map(|reel| reel.lock().unwrap_or_else(|poison| poison.into_inner()))
    }

    /// Whether calls go out as they are, unrecorded.
    pub fn is_off(&self) -> bool {
        self.0.is_none()
    }

    /// Whether calls are answered from a recording, not made.
    pub fn is_replaying(&self) -> bool {
        self.reel()
            .is_some_and(|reel| matches!(*reel, Reel::Replaying(_)))
    }

    /// The wall clock the replayed attempt saw at its start, in ms since the Unix epoch.
    pub fn replay_clock_ms(&self) -> Option<i64> {
        match &*self.reel()? {
            Reel::Replaying(replayer) => Some(replayer.attempt.start.clock_ms),
            Reel::Recording(_) => None,
        }
    }

    /// Makes the call `live` (named `call`, asking `request`), or answers it from the
    /// recording. Only the plugin's answers are recorded: a fault of the host's (`Err`) is
    /// retried as if the call had not happened.
    pub async fn exchange<T, F>(
        &self,
        call: &str,
        request: impl FnOnce() -> Json,
        live: F,
    ) -> wasmtime::Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = wasmtime::Result<T>>,
    {
        if self.0.is_none() {
            return live.await;
        }
        if self.is_replaying() {
            let request = request();
            let response = self.answer(call, &request)?;
            return serde_json::from_value(response).map_err(|error| {
                self.mismatch(format!(
                    "the recorded answer to {} does not fit this interface: {error}",
                    describe(call, &request)
                ))
            });
        }
        let slot = self.reserve();
        let answer = live.await?;
        if let Some(slot) = slot {
            // Written within what the budget has room for, and only then read back for its
            // redaction: an answer's JSON can be many times its size (each byte of a blob a
            // number), and one past the budget is never built.
            match capped_json(&answer, self.room()) {
                Some(response) => self.fill(slot, call, request(), response),
                None => self.cut(slot),
            }
        }
        Ok(answer)
    }

    /// Keeps the place of a call made now, whose answer comes later ([`Tape::fill`]), so that
    /// calls are recorded in the order the plugin made them; `None` when nothing is recorded.
    pub fn reserve(&self) -> Option<usize> {
        self.keep(Slot::Kept)
    }

    /// [`Tape::reserve`] for a call whose answer may not come before the attempt ends (an
    /// HTTP request to a server that hangs): it is then recorded as asked, answered
    /// `{"Pending": …}`, and its replay waits as long.
    pub fn reserve_waiting(&self, call: &str, request: Json) -> Option<usize> {
        self.keep(Slot::Waiting {
            call: call.to_owned(),
            request,
        })
    }

    fn keep(&self, slot: Slot) -> Option<usize> {
        match self.reel().as_deref_mut() {
            Some(Reel::Recording(recorder)) if !recorder.cut => {
                recorder.lines.push(slot);
                Some(recorder.lines.len() - 1)
            }
            _ => None,
        }
    }

    /// Bytes the recording may still take.
    pub fn room(&self) -> usize {
        match self.reel().as_deref() {
            Some(Reel::Recording(recorder)) if !recorder.cut => {
                usize::try_from(recorder.budget).unwrap_or(usize::MAX)
            }
            _ => 0,
        }
    }

    /// Records the call kept at `slot`, redacted, if the budget has room for it.
    pub fn fill(&self, slot: usize, call: &str, request: Json, response: Json) {
        if let Some(Reel::Recording(recorder)) = self.reel().as_deref_mut() {
            let line = Line::Call(Exchange {
                call: call.to_owned(),
                request,
                response,
            });
            recorder.push(Some(slot), &line, false);
        }
    }

    /// The call kept at `slot` did not fit: the recording is cut there.
    pub fn cut(&self, slot: usize) {
        if let Some(Reel::Recording(recorder)) = self.reel().as_deref_mut() {
            recorder.cut_at(Some(slot));
        }
    }

    /// The recorded answer to `call` with `request`, or the mismatch (as the call's trap).
    pub fn answer(&self, call: &str, request: &Json) -> wasmtime::Result<Json> {
        let found = match self.reel().as_deref_mut() {
            Some(Reel::Replaying(replayer)) => replayer.answer(call, request),
            _ => return Err(wasmtime::Error::msg("the tape is not replaying")),
        };
        found.map_err(|text| self.mismatch(text))
    }

    /// Keeps the first mismatch and returns it as a trap.
    pub fn mismatch(&self, text: String) -> wasmtime::Error {
        if let Some(Reel::Replaying(replayer)) = self.reel().as_deref_mut() {
            replayer.mismatch.get_or_insert_with(|| text.clone());
        }
        wasmtime::Error::new(ReplayMismatch(text))
    }

    /// The limit the replayed attempt broke when it was recorded, if the replay made every
    /// call the recorded attempt made (and so met the answer that broke it).
    pub fn recorded_violation(&self) -> Option<String> {
        match &*self.reel()? {
            Reel::Replaying(replayer) if replayer.used.iter().all(|used| *used) => {
                replayer.attempt.end.as_ref()?.violation.clone()
            }
            _ => None,
        }
    }

    /// Whether the replay asked for a call past the place where the run's budget cut the
    /// recording: it cannot be told from a changed call there.
    pub fn reached_cut(&self) -> bool {
        matches!(self.reel().as_deref(), Some(Reel::Replaying(replayer)) if replayer.past_cut)
    }

    /// The first request of a replay the recording could not answer.
    pub fn first_mismatch(&self) -> Option<String> {
        match &*self.reel()? {
            Reel::Replaying(replayer) => replayer.mismatch.clone(),
            Reel::Recording(_) => None,
        }
    }

    /// Records a log line as the plugin wrote it (the log capability redacted it already).
    pub fn log(&self, level: &str, message: &str) {
        if let Some(Reel::Recording(recorder)) = self.reel().as_deref_mut() {
            let line = Line::Log(LogEntry {
                level: level.to_owned(),
                message: message.to_owned(),
            });
            recorder.push(None, &line, false);
        }
    }

    /// Ends the attempt's recording with its outcome and returns it, or `None` when the tape
    /// was not recording.
    pub fn finish(&self, end: AttemptEnd) -> Option<AttemptRecording> {
        match self.reel().as_deref_mut() {
            Some(Reel::Recording(recorder)) => {
                let mut end = end;
                if !recorder.fits(&Line::Outcome(end.clone())) {
                    // The outcome is what a replay is judged against: it is kept, without
                    // its output and with a short message when the budget has no room.
                    end.output = None;
                    if let Some(message) = &mut end.message {
                        super::log::truncate_utf8(message, CUT_MESSAGE_BYTES);
                    }
                }
                // Calls still waiting for their answer: recorded as asked, unanswered.
                for index in 0..recorder.lines.len() {
                    if let Slot::Waiting { call, request } = &mut recorder.lines[index] {
                        let line = Line::Call(Exchange {
                            call: std::mem::take(call),
                            request: request.take(),
                            response: serde_json::json!({
                                "Pending": "no answer by the end of the attempt"
                            }),
                        });
                        recorder.lines[index] = Slot::Kept;
                        recorder.push(Some(index), &line, false);
                    }
                }
                recorder.push(None, &Line::Outcome(end), true);
                // A budget spent here ends the run's recording (the runner records no later
                // attempt), and this one says so, so that a replay knows where it stops.
                if recorder.budget == 0 && !recorder.cut {
                    recorder.cut_at(None);
                }
                let mut lines = String::new();
                for slot in recorder.lines.drain(..) {
                    if let Slot::Line(line) = slot {
                        lines.push_str(&line);
                        lines.push('\n');
                    }
                }
                Some(AttemptRecording {
                    compressed: compress(&lines),
                    lines,
                    cut: recorder.cut,
                })
            }
            _ => None,
        }
    }
}

/// One attempt's recording: its lines, and whether the run's budget ran out during it, which
/// ends the run's recording there.
#[derive(Debug, Clone, Default)]
pub struct AttemptRecording {
    pub lines: String,
    pub cut: bool,
    /// `lines` as stored ([`compress`]), made by [`Tape::finish`] on the plugin call's thread
    /// rather than on the host's, which a large recording would hold up for milliseconds.
    pub compressed: Option<Vec<u8>>,
}

/// What of an outcome's message a recording keeps once its budget is spent.
const CUT_MESSAGE_BYTES: usize = 1024;

/// `value` as JSON text, or `None` once it passes `max_bytes`, without writing more.
fn capped_json<T: Serialize>(value: &T, max_bytes: usize) -> Option<Json> {
    struct Capped {
        bytes: Vec<u8>,
        max: usize,
    }
    impl std::io::Write for Capped {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if self.bytes.len() + data.len() > self.max {
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            self.bytes.extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut writer = Capped {
        bytes: Vec::new(),
        max: max_bytes,
    };
    serde_json::to_writer(&mut writer, value).ok()?;
    serde_json::from_slice(&writer.bytes).ok()
}

impl Recorder {
    fn line_text(&self, line: &Line) -> String {
        let mut value = serde_json::to_value(line).unwrap_or(Json::Null);
        redact(&mut value, &self.secrets);
        value.to_string()
    }

    fn fits(&self, line: &Line) -> bool {
        (self.line_text(line).len() as u64) < self.budget
    }

    /// Puts `line` at `slot` (a call's kept place), or after the others, when the budget has
    /// room (`always`: the attempt's own first and last lines, a few hundred bytes), else cuts
    /// the recording there.
    fn push(&mut self, slot: Option<usize>, line: &Line, always: bool) {
        if self.cut && !always {
            return;
        }
        let text = self.line_text(line);
        let size = text.len() as u64 + 1;
        if size > self.budget && !always {
            self.cut_at(slot);
            return;
        }
        self.budget = self.budget.saturating_sub(size);
        self.place(slot, text);
    }

    /// Cuts the recording at `slot` (or after the last line) with a line saying why.
    fn cut_at(&mut self, slot: Option<usize>) {
        if self.cut {
            return;
        }
        self.cut = true;
        let cut = self.line_text(&Line::Cut(
            "the run's recording budget (run_recording_bytes) is spent: what follows is not \
             recorded"
                .into(),
        ));
        self.budget = self.budget.saturating_sub(cut.len() as u64 + 1);
        self.place(slot, cut);
    }

    fn place(&mut self, slot: Option<usize>, text: String) {
        match slot.and_then(|slot| self.lines.get_mut(slot)) {
            Some(kept) => *kept = Slot::Line(text),
            None => self.lines.push(Slot::Line(text)),
        }
    }
}

impl Replayer {
    fn answer(&mut self, call: &str, request: &Json) -> Result<Json, String> {
        let calls = &self.attempt.calls;
        let next = self.used.iter().position(|used| !used);
        let exact =
            |index: &usize| !self.used[*index] && same_request(&calls[*index], call, request);
        let chosen = if self.lenient {
            // The nearest match: the same request not yet answered, else the next unanswered
            // call of the same kind, else the last of that kind.
            (0..calls.len())
                .find(exact)
                .or_else(|| (0..calls.len()).find(|&i| !self.used[i] && calls[i].call == call))
                .or_else(|| (0..calls.len()).rev().find(|&i| calls[i].call == call))
        } else {
            next.filter(exact)
        };
        if let Some(index) = chosen {
            self.used[index] = true;
            return Ok(calls[index].response.clone());
        }
        let asked = describe(call, request);
        let label = &self.label;
        Err(match next.map(|index| &calls[index]) {
            Some(recorded) => format!(
                "{label} {}, the recording has {}",
                asked_for(call, request, recorded),
                describe(&recorded.call, &recorded.request)
            ),
            None if self.attempt.cut_at.is_some() => {
                self.past_cut = true;
                format!(
                    "{label} asked {asked}; the recording was cut before it (run_recording_bytes)"
                )
            }
            None => {
                format!("{label} asked {asked}; the recording has no more calls for this attempt")
            }
        })
    }
}

/// Whether `recorded` is the call `call` asking `request`. An HTTP request recorded without
/// its body (it failed, or had no answer, before the host had read it) is the same request
/// whatever its body.
fn same_request(recorded: &Exchange, call: &str, request: &Json) -> bool {
    if recorded.call != call {
        return false;
    }
    if recorded.request == *request {
        return true;
    }
    call == "http"
        && recorded.request.get("body").is_none()
        && request.as_object().is_some_and(|asked| {
            let mut asked = asked.clone();
            asked.remove("body");
            recorded.request.as_object() == Some(&asked)
        })
}

/// "asked `SELECT …` with ["evt-9"]", naming only what differs when the recorded call is the
/// same statement with other parameters.
fn asked_for(call: &str, request: &Json, recorded: &Exchange) -> String {
    if call == "sql.query"
        && recorded.call == call
        && recorded.request["statement"] == request["statement"]
        && recorded.request["source"] == request["source"]
    {
        return format!(
            "asked `{}` with {}",
            request["statement"].as_str().unwrap_or_default(),
            plain_params(&request["params"])
        );
    }
    format!("asked {}", describe(call, request))
}

/// A call as a person reads it: `sql.query on warehouse: `SELECT …` with ["evt-1"]`,
/// `http GET http://…`, else the call and its request as JSON.
pub fn describe(call: &str, request: &Json) -> String {
    match call {
        "sql.query" => format!(
            "sql.query on {}: `{}` with {}",
            request["source"].as_str().unwrap_or_default(),
            request["statement"].as_str().unwrap_or_default(),
            plain_params(&request["params"])
        ),
        "http" => format!(
            "http {} {}",
            request["method"].as_str().unwrap_or_default(),
            request["url"].as_str().unwrap_or_default()
        ),
        _ => format!("{call} {request}"),
    }
}

/// SQL parameters without their variant tags: `["evt-1", 42]`.
fn plain_params(params: &Json) -> String {
    let plain: Vec<Json> = params
        .as_array()
        .map(|params| {
            params
                .iter()
                .map(|param| match param {
                    Json::Object(tagged) if tagged.len() == 1 => {
                        tagged.values().next().cloned().unwrap_or(Json::Null)
                    }
                    other => other.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Json::Array(plain).to_string()
}

/// Takes every secret's value out of `value`: from its strings, and from its lists of small
/// integers read as the bytes they are (a key-value reply, a message's payload).
fn redact(value: &mut Json, secrets: &SecretSet) {
    if secrets.is_empty() {
        return;
    }
    match value {
        Json::String(text) => {
            if let Cow::Owned(redacted) = secrets.redact(text) {
                *text = redacted;
            }
        }
        Json::Array(items) if !items.is_empty() && items.iter().all(is_byte) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(|item| item.as_u64().map(|byte| byte as u8))
                .collect();
            if let Cow::Owned(redacted) = secrets.redact_bytes(&bytes) {
                *items = redacted.into_iter().map(Json::from).collect();
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|item| redact(item, secrets)),
        Json::Object(fields) => fields.values_mut().for_each(|field| redact(field, secrets)),
        _ => {}
    }
}

fn is_byte(value: &Json) -> bool {
    value.as_u64().is_some_and(|byte| byte <= 255)
}

/// A body as recorded: `{"text": …}` when it is UTF-8, else `{"base64": …}`.
pub fn body_json(bytes: &[u8]) -> Json {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::json!({ "text": text }),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
    }
}

/// The bytes of a body recorded by [`body_json`].
pub fn body_bytes(body: &Json) -> Vec<u8> {
    use base64::Engine;
    if let Some(text) = body["text"].as_str() {
        return text.as_bytes().to_vec();
    }
    body["base64"]
        .as_str()
        .and_then(|encoded| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::secrets::Secret;

    fn start() -> AttemptStart {
        AttemptStart {
            step: "warehouse".into(),
            attempt: 3,
            elapsed_ms: 10,
            clock_ms: 1_000,
        }
    }

    fn header() -> String {
        serde_json::to_string(&Line::Recording(Header {
            format: FORMAT.into(),
            version: VERSION,
            run_id: "r".into(),
            plugin: "p".into(),
            plugin_version: "v".into(),
            params: serde_json::json!({}),
            created_at_ms: 0,
        }))
        .expect("header")
    }

    /// Records one call made and answered at once (nothing once the recording is cut).
    fn record_call(tape: &Tape, call: &str, request: Json, response: Json) {
        if let Some(slot) = tape.reserve() {
            tape.fill(slot, call, request, response);
        }
    }

    fn query(params: &str) -> Json {
        serde_json::json!({"source": "warehouse", "statement": "SELECT 1 WHERE id = ?", "params": [{"Text": params}]})
    }

    #[test]
    fn recorded_calls_replay_in_order_and_a_changed_one_is_named() {
        let secrets = Arc::new(
            SecretSet::new(vec![Secret {
                name: "token".into(),
                value: "hunter2-secret-value".into(),
                hosts: Vec::new(),
                place: None,
            }])
            .expect("secrets"),
        );
        let tape = Tape::recording(start(), 1 << 20, secrets);
        record_call(
            &tape,
            "sql.query",
            query("evt-1"),
            serde_json::json!({"Ok": {"columns": ["a"], "rows": [[{"Text": "hunter2-secret-value"}]]}}),
        );
        record_call(
            &tape,
            "kv",
            serde_json::json!({}),
            serde_json::json!({"Ok": {"Bulk": b"x hunter2-secret-value".to_vec()}}),
        );
        let end = AttemptEnd {
            outcome: "failed".into(),
            message: Some("no".into()),
            output: None,
            violation: None,
        };
        let text = format!(
            "{}\n{}",
            header(),
            tape.finish(end).expect("recorded").lines
        );
        assert!(!text.contains("hunter2"), "{text}");
        let bytes: Vec<u8> = b"hunter2".to_vec();
        let as_numbers = serde_json::to_string(&bytes).expect("json");
        assert!(
            !text.contains(as_numbers.trim_matches(['[', ']'])),
            "{text}"
        );

        let recording = Recording::parse(&text).expect("parse");
        let attempt = recording.attempts[0].clone();
        assert_eq!(attempt.calls.len(), 2);
        let replay = Tape::replaying(attempt.clone(), false);
        assert!(replay.answer("sql.query", &query("evt-1")).is_ok());
        let replay = Tape::replaying(attempt, false);
        let error = replay
            .answer("sql.query", &query("evt-9"))
            .expect_err("mismatch");
        let text = error.to_string();
        assert!(
            text.contains("attempt 3 of step warehouse asked `SELECT 1 WHERE id = ?` with [\"evt-9\"], the recording has sql.query on warehouse: `SELECT 1 WHERE id = ?` with [\"evt-1\"]"),
            "{text}"
        );
        assert_eq!(replay.first_mismatch(), Some(text));
    }

    #[test]
    fn the_budget_cuts_a_recording_once_and_keeps_the_outcome() {
        let tape = Tape::recording(start(), 300, Arc::default());
        for _ in 0..10 {
            record_call(
                &tape,
                "http",
                serde_json::json!({"url": "x".repeat(50)}),
                Json::Null,
            );
        }
        let end = AttemptEnd {
            outcome: "pending".into(),
            message: None,
            output: Some(serde_json::json!("y".repeat(1000))),
            violation: None,
        };
        let recorded = tape.finish(end).expect("recorded");
        assert!(recorded.cut);
        let text = recorded.lines;
        assert_eq!(text.matches("\"cut\"").count(), 1, "{text}");
        assert!(text.len() < 600, "{}", text.len());
        let recording = Recording::parse(&format!("{}\n{text}", header())).expect("parse");
        assert!(recording.attempts[0].cut);
        assert_eq!(
            recording.attempts[0]
                .end
                .as_ref()
                .map(|end| end.outcome.as_str()),
            Some("pending")
        );
    }

    #[test]
    fn an_unanswered_request_is_recorded_as_asked_and_matches_any_body_when_it_has_none() {
        let tape = Tape::recording(start(), 1 << 20, Arc::default());
        let head = serde_json::json!({"method": "POST", "url": "http://a/", "headers": []});
        tape.reserve_waiting("http", head.clone());
        let failed = tape.reserve().expect("a slot");
        tape.fill(
            failed,
            "http",
            head.clone(),
            serde_json::json!({"Err": "ConnectionRefused"}),
        );
        let end = AttemptEnd {
            outcome: "errored".into(),
            message: Some("time limit".into()),
            output: None,
            violation: None,
        };
        let text = format!(
            "{}\n{}",
            header(),
            tape.finish(end).expect("recorded").lines
        );
        let recording = Recording::parse(&text).expect("parse");
        let attempt = recording.attempts[0].clone();
        assert!(attempt.calls[0].response.get("Pending").is_some(), "{text}");
        assert_eq!(attempt.cut_at, None);
        let replay = Tape::replaying(attempt, false);
        let mut asked = head.clone();
        asked["body"] = serde_json::json!({"text": "a body the host never read"});
        assert!(replay.answer("http", &asked).is_ok());
        assert!(replay.answer("http", &asked).is_ok());
        asked["url"] = "http://b/".into();
        assert!(replay.answer("http", &asked).is_err());
        assert!(!replay.reached_cut());
    }

    #[test]
    fn another_format_or_version_is_refused() {
        assert!(Recording::parse("{\"attempt\": {}}").is_err());
        let newer = header().replace("\"version\":1", "\"version\":99");
        let error = Recording::parse(&newer).expect_err("newer");
        assert!(error.to_string().contains("version 99"), "{error}");
    }
}
