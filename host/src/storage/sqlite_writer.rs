//! SQLite's hot path: one thread owns a connection of its own (rusqlite) and does every write
//! the engine makes per run and per tick — new runs, claims (which read the claimed runs too),
//! lease renewals, tick results — and the due-time lookup between claims. Requests queue on a
//! channel; the thread takes everything waiting, and what queues while it writes that, does
//! it in one transaction, commits once, then answers (claims, renewals and the due-time
//! lookup as soon as they are done: `Request::answers_before_commit`). A failure answers only
//! its own request: one that fails after writing part of itself has the batch done again
//! with a savepoint per request (`write_batch`).
//!
//! Why a thread and not sqlx: through sqlx every statement is a hand-off to the connection's
//! worker thread and back (about 0.1 ms here, most of it in the kernel), and a tick was about
//! ten statements. Here a request costs one hand-off in and one out, whatever it writes, and
//! the statements are prepared once. PostgreSQL keeps sqlx: there a round trip is the
//! network's, and concurrent transactions commit in parallel.
//!
//! What a new run and a tick write is described once, in `runs.rs` and `outbox.rs`, as
//! statements any [`Tx`] runs: this thread only batches the requests and runs their writes
//! on its connection ([`Writing`]). It takes the process's write turn (`Writes`) for each
//! batch, like every other writer.

use std::path::Path;
use std::sync::{Arc, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::backend::Backend;
use super::leases::{claim_sql, renew_sql};
use super::runs::{
    DUE_RUNS, NEXT_DUE_SQL, RunRow, STEPS_SQL, StepRow, insert_runs, load_tick_sql, write_tick,
};
use super::statement::{Tx, Value, one_row};
use super::store::SqlBatch;
use super::{ClaimedRun, Error, LoadedTick, NewRun, Result, TickWrite};
use crate::model::{RunId, UnixMillis};

/// Requests done in one transaction at most: bounds how long the first one waits.
const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T>>;

enum Request {
    Enqueue(Box<NewRun>, Reply<()>),
    Claim {
        owner: String,
        now: UnixMillis,
        lease_ms: i64,
        limit: usize,
        reply: Reply<Vec<ClaimedRun>>,
    },
    Renew {
        id: RunId,
        lease_token: i64,
        lease_ms: i64,
        reply: Reply<bool>,
    },
    Tick(Vec<TickWrite>, Reply<()>),
    NextDue {
        after: UnixMillis,
        reply: Reply<Option<UnixMillis>>,
    },
    /// Statements that go together (retention's deletions, bounded by their `LIMIT`s; the status
    /// rollups): done in a batch like a tick.
    Batch(SqlBatch, Reply<Vec<u64>>),
    /// A request already answered, before its batch committed (`answers_before_commit`):
    /// a batch done again skips it.
    Answered,
}

/// What a request came to, sent once its batch has committed.
enum Outcome {
    Done,
    Claimed(Vec<ClaimedRun>),
    Renewed(bool),
    Due(Option<UnixMillis>),
    Changed(Vec<u64>),
}

impl Request {
    /// Does the request inside the batch's transaction.
    fn perform(&self, connection: &Connection, statements: &Statements) -> Result<Outcome> {
        match self {
            Request::Enqueue(run, _) => at_once(insert_runs(
                &mut Writing(connection),
                std::slice::from_ref(run),
            ))
            .map(|()| Outcome::Done),
            Request::Tick(writes, _) => at_once(write_tick(
                &mut Writing(connection),
                Backend::Sqlite,
                writes,
            ))
            .map(|()| Outcome::Done),
            Request::Claim {
                owner,
                now,
                lease_ms,
                limit,
                ..
            } => {
                claim(connection, statements, owner, *now, *lease_ms, *limit).map(Outcome::Claimed)
            }
            Request::Renew {
                id,
                lease_token,
                lease_ms,
                ..
            } => {
                let renewed = connection
                    .prepare_cached(&statements.renew)?
                    .execute(params![lease_ms, id.as_str(), lease_token])?;
                Ok(Outcome::Renewed(renewed == 1))
            }
            Request::NextDue { after, .. } => {
                let due = connection
                    .prepare_cached(NEXT_DUE_SQL)?
                    .query_row(params![after], |row| row.get(0))
                    .optional()?;
                Ok(Outcome::Due(due))
            }
            Request::Batch(batch, _) => {
                let mut changed = Vec::with_capacity(batch.len());
                for (sql, values) in batch {
                    changed.push(run_statement(connection, sql, values)?);
                }
                Ok(Outcome::Changed(changed))
            }
            Request::Answered => Ok(Outcome::Done),
        }
    }

    /// Whether the request is answered as soon as it is done, before its batch commits.
    /// Claims, renewals and the due-time lookup promise nothing durable: a lease that a
    /// failed commit takes back fences off the writes of the node that held it, as an
    /// expired one does, and a claim's call does not wait for a sync. What 202 and a
    /// tick's result promise (new runs, results, deletions) is answered after the commit.
    fn answers_before_commit(&self) -> bool {
        matches!(
            self,
            Request::Claim { .. } | Request::Renew { .. } | Request::NextDue { .. }
        )
    }

    /// Whether the request writes with more than one statement, so that a failure may leave
    /// part of it behind.
    fn writes_several(&self) -> bool {
        matches!(
            self,
            Request::Enqueue(..) | Request::Tick(..) | Request::Batch(..)
        )
    }

    /// Sends what the request came to. A requester that has gone (a client hung up) does not
    /// undo what was written.
    fn answer(self, outcome: Result<Outcome>) {
        /// `pick` takes the value out of the outcome a request of its kind gets.
        fn send<T>(reply: Reply<T>, outcome: Result<Outcome>, pick: fn(Outcome) -> Option<T>) {
            let value = outcome.and_then(|outcome| {
                pick(outcome).ok_or_else(|| {
                    Error::Sqlite("the writer's answer does not match its request".into())
                })
            });
            let _ = reply.send(value);
        }
        match self {
            Request::Enqueue(_, reply) | Request::Tick(_, reply) => {
                send(reply, outcome, |_| Some(()))
            }
            Request::Claim { reply, .. } => send(reply, outcome, |outcome| match outcome {
                Outcome::Claimed(claims) => Some(claims),
                _ => None,
            }),
            Request::Renew { reply, .. } => send(reply, outcome, |outcome| match outcome {
                Outcome::Renewed(renewed) => Some(renewed),
                _ => None,
            }),
            Request::NextDue { reply, .. } => send(reply, outcome, |outcome| match outcome {
                Outcome::Due(due) => Some(due),
                _ => None,
            }),
            Request::Batch(_, reply) => send(reply, outcome, |outcome| match outcome {
                Outcome::Changed(changed) => Some(changed),
                _ => None,
            }),
            Request::Answered => {}
        }
    }
}

/// The handle to the writer thread; the thread ends when the last handle is dropped.
pub(super) struct SqliteWriter {
    requests: mpsc::Sender<Request>,
}

impl SqliteWriter {
    /// Opens `path` (migrated already) and starts the thread. It writes only while holding
    /// `turn`, the lock that SQLite's other writers in this process (sqlx) take too.
    pub(super) fn start(path: &Path, turn: Arc<tokio::sync::Mutex<()>>) -> Result<SqliteWriter> {
        let connection = Connection::open(path)?;
        // `temp_store = MEMORY`: a savepoint keeps the pages it changes in a statement journal,
        // which is otherwise a temp file: hundreds of writes per batch for nothing durable.
        connection.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY;",
        )?;
        connection.set_prepared_statement_cache_capacity(64);
        let statements = Statements::new();
        let (requests, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("stepwise-sqlite-writer".into())
            .spawn(move || serve(&connection, &statements, &queue, &turn))
            .map_err(|error| Error::Sqlite(format!("starting the writer thread: {error}")))?;
        Ok(SqliteWriter { requests })
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .map_err(|_| Error::WriterStopped)?;
        answer.await.map_err(|_| Error::WriterStopped)?
    }

    pub(super) async fn enqueue(&self, run: NewRun) -> Result<()> {
        self.ask(|reply| Request::Enqueue(Box::new(run), reply))
            .await
    }

    pub(super) async fn claim(
        &self,
        owner: &str,
        now: UnixMillis,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedRun>> {
        let owner = owner.to_owned();
        self.ask(|reply| Request::Claim {
            owner,
            now,
            lease_ms,
            limit,
            reply,
        })
        .await
    }

    pub(super) async fn renew(&self, id: RunId, lease_token: i64, lease_ms: i64) -> Result<bool> {
        self.ask(|reply| Request::Renew {
            id,
            lease_token,
            lease_ms,
            reply,
        })
        .await
    }

    pub(super) async fn tick(&self, writes: Vec<TickWrite>) -> Result<()> {
        self.ask(|reply| Request::Tick(writes, reply)).await
    }

    pub(super) async fn next_due(&self, after: UnixMillis) -> Result<Option<UnixMillis>> {
        self.ask(|reply| Request::NextDue { after, reply }).await
    }

    /// Runs the statements together; returns the rows each changed.
    pub(super) async fn run_batch(&self, batch: SqlBatch) -> Result<Vec<u64>> {
        self.ask(|reply| Request::Batch(batch, reply)).await
    }
}

/// The SQL texts that are built at run time, built once.
struct Statements {
    claim: String,
    load: String,
    renew: String,
}

impl Statements {
    fn new() -> Statements {
        Statements {
            claim: claim_sql(Backend::Sqlite, &DUE_RUNS),
            load: load_tick_sql(),
            renew: renew_sql(Backend::Sqlite, "runs"),
        }
    }
}

/// The writer's connection, inside its batch's transaction, running the writes that
/// `runs` and `outbox` describe. Nothing here waits: each call is done when it returns.
struct Writing<'c>(&'c Connection);

impl Tx for Writing<'_> {
    async fn execute(&mut self, sql: &str, values: &[Value<'_>]) -> Result<u64> {
        let changed = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(values))?;
        Ok(changed as u64)
    }

    async fn query_pair(&mut self, sql: &str, values: &[Value<'_>]) -> Result<(i64, i64)> {
        Ok(self
            .0
            .prepare_cached(sql)?
            .query_row(rusqlite::params_from_iter(values), |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?)
    }

    /// One prepared statement per row: with a cached statement, a row costs one step.
    async fn insert(
        &mut self,
        head: &'static str,
        columns: usize,
        values: &[Value<'_>],
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut statement = self.0.prepare_cached(&one_row(head, columns))?;
        for row in values.chunks(columns) {
            statement.execute(rusqlite::params_from_iter(row))?;
        }
        Ok(())
    }
}

/// The outcome of a write on [`Writing`], whose futures are ready when first polled.
fn at_once<T>(write: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use futures::FutureExt;
    write
        .now_or_never()
        .unwrap_or_else(|| Err(Error::Sqlite("a write on the writer thread waited".into())))
}

fn serve(
    connection: &Connection,
    statements: &Statements,
    queue: &mpsc::Receiver<Request>,
    turn: &tokio::sync::Mutex<()>,
) {
    let mut revoked = Vec::new();
    while let Ok(first) = queue.recv() {
        let _turn = turn.blocking_lock();
        // The transaction takes in whatever else is queued, then and while it writes.
        write_batch(
            connection,
            statements,
            &mut revoked,
            vec![first],
            Some(queue),
        );
    }
}

/// A run's lease as a claim handed it out: the run's id and the fencing token.
type Lease = (String, i64);

/// Moves each lease's token past the one handed out, so that it fences off its holder and is
/// never handed out again. For leases answered before a commit that did not happen: the
/// rollback took the token back, and the next claim would have handed the same one out again.
/// (`?N` binds the Nth parameter wherever it stands; a `$N` would bind in order of appearance.)
const REVOKE_SQL: &str = "UPDATE runs SET lease_token = max(lease_token, ?2) + 1 WHERE id = ?1";

/// How a batch's transaction ended.
enum Batch {
    /// Committed, with each request's own outcome (a request that failed left nothing).
    Committed(Vec<Result<Outcome>>),
    /// Nothing of the batch stands.
    Failed(String),
    /// A request failed after writing part of itself, without a savepoint to undo it: the
    /// batch was rolled back, to be done again with savepoints.
    Redo,
}

/// Does a batch in one transaction and answers each request after the commit (claims,
/// renewals and lookups as soon as they are done: `answers_before_commit`). Most batches
/// run without savepoints: a savepoint copies every page it first changes into a statement
/// journal, about a tenth of this thread's time. A request that fails after writing part of
/// itself (never in normal operation: a lost lease is found by the first statement, which
/// writes nothing) rolls the batch back, and it is done again with a savepoint per request.
fn write_batch(
    connection: &Connection,
    statements: &Statements,
    revoked: &mut Vec<Lease>,
    mut batch: Vec<Request>,
    more: Option<&mpsc::Receiver<Request>>,
) {
    let ended = match transaction(connection, statements, revoked, &mut batch, more, false) {
        Batch::Redo => transaction(connection, statements, revoked, &mut batch, None, true),
        ended => ended,
    };
    match ended {
        Batch::Committed(outcomes) => {
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                request.answer(outcome);
            }
        }
        Batch::Failed(message) => {
            for request in batch {
                request.answer(Err(Error::Sqlite(message.clone())));
            }
        }
        Batch::Redo => {
            for request in batch {
                request.answer(Err(Error::Sqlite("the batch could not be written".into())));
            }
        }
    }
}

/// Does `batch` in one transaction. With `more`, the requests that queue meanwhile join it
/// (up to `MAX_BATCH`): a commit writes every page the batch changed and syncs the log, so
/// on a busy node most of the writer's time went to commits of a few ticks each, and the
/// pages that ticks share (the ends of the append-only tables and indexes) were written
/// again with every one. `revoked` holds the leases answered before a commit that failed:
/// they are revoked first, and the ones this transaction answers join them if it fails.
fn transaction(
    connection: &Connection,
    statements: &Statements,
    revoked: &mut Vec<Lease>,
    batch: &mut Vec<Request>,
    more: Option<&mpsc::Receiver<Request>>,
    savepoints: bool,
) -> Batch {
    if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
        return Batch::Failed(Error::from(error).to_string());
    }
    if let Err(error) = revoke(connection, revoked) {
        let _ = connection.execute_batch("ROLLBACK");
        return Batch::Failed(error.to_string());
    }
    let mut answered: Vec<Lease> = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    loop {
        for request in &mut batch[outcomes.len()..] {
            let outcome = if savepoints && request.writes_several() {
                in_savepoint(connection, || request.perform(connection, statements))
            } else {
                request.perform(connection, statements)
            };
            if let Err(error) = &outcome
                && !savepoints
                && request.writes_several()
                && !matches!(error, Error::LeaseLost(_))
            {
                let _ = connection.execute_batch("ROLLBACK");
                revoked.append(&mut answered);
                return Batch::Redo;
            }
            if request.answers_before_commit() {
                if let Ok(Outcome::Claimed(claims)) = &outcome {
                    answered.extend(
                        claims
                            .iter()
                            .map(|claim| (claim.id.as_str().to_owned(), claim.lease_token)),
                    );
                }
                std::mem::replace(request, Request::Answered).answer(outcome);
                outcomes.push(Ok(Outcome::Done));
            } else {
                outcomes.push(outcome);
            }
        }
        let Some(queue) = more else { break };
        while batch.len() < MAX_BATCH
            && let Ok(request) = queue.try_recv()
        {
            batch.push(request);
        }
        if outcomes.len() == batch.len() {
            break;
        }
    }
    match connection.execute_batch("COMMIT") {
        Ok(()) => {
            revoked.clear();
            Batch::Committed(outcomes)
        }
        Err(error) => {
            // Nothing of the batch stands; a later request starts a new transaction.
            let _ = connection.execute_batch("ROLLBACK");
            revoked.append(&mut answered);
            Batch::Failed(Error::from(error).to_string())
        }
    }
}

/// Revokes `leases` (see [`REVOKE_SQL`]) in the caller's transaction.
fn revoke(connection: &Connection, leases: &[Lease]) -> Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let mut revoke = connection.prepare_cached(REVOKE_SQL)?;
    for (id, lease_token) in leases {
        revoke.execute(params![id, lease_token])?;
    }
    Ok(())
}

/// One statement of a batch; returns the rows it changed. Not cached: the texts vary with
/// the number of ids, and each is far cheaper to prepare than to run.
fn run_statement(connection: &Connection, sql: &str, values: &[Value<'_>]) -> Result<u64> {
    let mut statement = connection.prepare(sql)?;
    for (index, value) in values.iter().enumerate() {
        statement.raw_bind_parameter(index + 1, value)?;
    }
    // A pragma such as `incremental_vacuum` may answer with rows; step through them.
    let mut rows = statement.raw_query();
    while rows.next()?.is_some() {}
    Ok(connection.changes())
}

/// Runs `write` so that on failure nothing of it stays in the batch's transaction.
fn in_savepoint<T>(connection: &Connection, write: impl FnOnce() -> Result<T>) -> Result<T> {
    connection
        .prepare_cached("SAVEPOINT request")?
        .execute([])?;
    match write() {
        Ok(value) => {
            connection.prepare_cached("RELEASE request")?.execute([])?;
            Ok(value)
        }
        Err(error) => {
            connection.execute_batch("ROLLBACK TO request; RELEASE request")?;
            Err(error)
        }
    }
}

/// Claims due runs and reads each claimed one, so that a tick needs no query of its own.
fn claim(
    connection: &Connection,
    statements: &Statements,
    owner: &str,
    now: UnixMillis,
    lease_ms: i64,
    limit: usize,
) -> Result<Vec<ClaimedRun>> {
    let claimed: Vec<(String, i64, i64)> = connection
        .prepare_cached(&statements.claim)?
        .query_map(params![owner, lease_ms, now, limit as i64], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut load = connection.prepare_cached(&statements.load)?;
    let mut steps = connection.prepare_cached(STEPS_SQL)?;
    let mut claims = Vec::with_capacity(claimed.len());
    for (id, lease_token, due_at) in claimed {
        let (run, grant_toml) = load.query_row(params![id], |row| {
            Ok((RunRow::from_sqlite(row)?, row.get("grant_toml")?))
        })?;
        let mut run = run.into_record()?;
        run.steps = steps
            .query_map(params![id], StepRow::from_sqlite)?
            .map(|row| row.map_err(Error::from).and_then(StepRow::into_record))
            .collect::<Result<_>>()?;
        claims.push(ClaimedRun {
            id: RunId::from_stored(id),
            owner: owner.to_owned(),
            lease_token,
            due_at,
            loaded: Some(Arc::new(LoadedTick { run, grant_toml })),
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RunStatus, now_millis};
    use crate::storage::runs::tests::{one_step_run, passing_tick, store_with_plugin};

    /// A connection of the test's own to the store's database in `dir`, as the writer's.
    fn connection_to(dir: &Path) -> Connection {
        let connection = Connection::open(dir.join("db.sqlite")).expect("opening");
        connection
            .execute_batch("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;")
            .expect("pragmas");
        connection
    }

    /// Requests that queue while a batch is written are done in its transaction and answered
    /// by its commit.
    #[tokio::test]
    async fn requests_queued_while_a_batch_is_written_join_its_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (first, second) = (one_step_run(None), one_step_run(None));
        let connection = connection_to(dir.path());
        let (queued, queue) = mpsc::channel();
        let (second_reply, second_answer) = oneshot::channel();
        queued
            .send(Request::Enqueue(Box::new(second.clone()), second_reply))
            .expect("queued");
        let (first_reply, first_answer) = oneshot::channel();
        write_batch(
            &connection,
            &Statements::new(),
            &mut Vec::new(),
            vec![Request::Enqueue(Box::new(first.clone()), first_reply)],
            Some(&queue),
        );
        assert!(
            queue.try_recv().is_err(),
            "the queued request was left behind"
        );
        first_answer.await.expect("answered").expect("written");
        second_answer.await.expect("answered").expect("written");
        for run in [&first, &second] {
            let stored = store.find_run(&run.id).await.expect("reading");
            assert!(stored.is_some(), "{} was not written", run.id);
        }
    }

    /// A request that fails after writing part of itself is undone, and the requests batched
    /// with it are written exactly once: without savepoints the batch is rolled back and done
    /// again with them.
    #[tokio::test]
    async fn a_request_failing_half_written_leaves_nothing_and_its_batch_stands() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (good, bad) = (one_step_run(None), one_step_run(None));
        store.enqueue_run(&good).await.expect("enqueuing");
        store.enqueue_run(&bad).await.expect("enqueuing");
        let now = now_millis();
        let claims = store
            .claim_due_runs("node", now, 60_000, 2)
            .await
            .expect("claiming");
        let claim_of = |id: &RunId| {
            claims
                .iter()
                .find(|claim| &claim.id == id)
                .expect("claimed")
        };
        // No step 7: the run row is written, then the step is not found.
        let mut broken = passing_tick(claim_of(&bad.id), now);
        broken.step.position = 7;
        let connection = connection_to(dir.path());
        let (good_reply, good_answer) = oneshot::channel();
        let (bad_reply, bad_answer) = oneshot::channel();
        write_batch(
            &connection,
            &Statements::new(),
            &mut Vec::new(),
            vec![
                Request::Tick(vec![passing_tick(claim_of(&good.id), now)], good_reply),
                Request::Tick(vec![broken], bad_reply),
            ],
            None,
        );
        let refused = bad_answer.await.expect("answered");
        assert!(
            matches!(refused, Err(Error::Conflict { .. })),
            "{refused:?}"
        );
        good_answer
            .await
            .expect("answered")
            .expect("the other write stands");

        let written = store
            .find_run(&good.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(written.status, RunStatus::Passed);
        let attempts = store
            .list_attempts(&good.id, crate::storage::AttemptPage::first(10))
            .await
            .expect("listing")
            .attempts;
        assert_eq!(attempts.len(), 1, "written once: {attempts:?}");
        let untouched = store
            .find_run(&bad.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_ne!(untouched.status, RunStatus::Passed, "{untouched:?}");
        assert!(untouched.finished_at.is_none(), "{untouched:?}");
    }

    /// A claim is answered before its batch commits; when the batch does not commit as it
    /// was (here a request fails half written, and the batch is done again), the lease it
    /// handed out is revoked: its holder is fenced off, even once the run is claimed again.
    #[tokio::test]
    async fn a_lease_answered_before_a_commit_that_failed_fences_off_its_holder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let (victim, bad) = (one_step_run(None), one_step_run(None));
        store.enqueue_run(&bad).await.expect("enqueuing");
        let now = now_millis();
        let bad_claim = store
            .claim_due_runs("node", now, 60_000, 1)
            .await
            .expect("claiming")
            .pop()
            .expect("due");
        store.enqueue_run(&victim).await.expect("enqueuing");
        let mut broken = passing_tick(&bad_claim, now);
        broken.step.position = 7;
        let connection = connection_to(dir.path());
        let (claim_reply, claim_answer) = oneshot::channel();
        let (bad_reply, bad_answer) = oneshot::channel();
        let mut revoked = Vec::new();
        write_batch(
            &connection,
            &Statements::new(),
            &mut revoked,
            vec![
                Request::Claim {
                    owner: "node".into(),
                    now: now_millis(),
                    lease_ms: 60_000,
                    limit: 10,
                    reply: claim_reply,
                },
                Request::Tick(vec![broken], bad_reply),
            ],
            None,
        );
        assert!(bad_answer.await.expect("answered").is_err());
        assert!(revoked.is_empty(), "revoked in the batch done again");
        let mut stale = claim_answer.await.expect("answered").expect("claimed");
        let stale = stale.pop().expect("the victim was claimed");
        assert_eq!(stale.id, victim.id);

        let fresh = store
            .claim_due_runs("node", now_millis(), 60_000, 10)
            .await
            .expect("claiming")
            .pop()
            .expect("the victim is due again: its lease was not committed");
        assert_eq!(fresh.id, victim.id);
        assert_ne!(
            fresh.lease_token, stale.lease_token,
            "a token handed out twice"
        );
        let refused = store.record_tick(vec![passing_tick(&stale, now)]).await;
        assert!(matches!(refused, Err(Error::LeaseLost(_))), "{refused:?}");
        store
            .record_tick(vec![passing_tick(&fresh, now)])
            .await
            .expect("the holder of the lease writes");
    }

    /// A tick that leaves a running run running writes it without status, start or finish,
    /// and is fenced as every tick is: by the lease token, and by the run still running.
    #[tokio::test]
    async fn a_run_that_stays_running_keeps_its_start_and_its_fences() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_plugin(dir.path()).await;
        let run = one_step_run(None);
        store.enqueue_run(&run).await.expect("enqueuing");
        let pending = |claim: &ClaimedRun, now: UnixMillis, before: RunStatus| {
            let mut write = passing_tick(claim, now);
            write.step.status = crate::model::StepStatus::Pending;
            write.step.output = None;
            write.step.passed_after_ms = None;
            write.run.status = RunStatus::Running;
            write.run.status_before = before;
            write.run.started_at = now;
            write.run.message = Some(format!("waiting since {now}"));
            write.run.next_tick_at = Some(now);
            write
        };
        let claim_one = || async {
            let mut claims = store
                .claim_due_runs("node", now_millis() + 60_000, 60_000, 1)
                .await
                .expect("claiming");
            claims.pop().expect("the run is due")
        };

        let started = now_millis();
        let first = claim_one().await;
        store
            .record_tick(vec![pending(&first, started, RunStatus::Queued)])
            .await
            .expect("the first tick");
        let second = claim_one().await;
        let later = started + 5_000;
        let mut still_running = pending(&second, later, RunStatus::Running);
        still_running.run.next_tick_at = Some(later + 1_000);
        still_running.attempt = None;
        store
            .record_tick(vec![still_running.clone()])
            .await
            .expect("the second tick");
        let stored = store
            .find_run(&run.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(stored.status, RunStatus::Running);
        assert_eq!(stored.started_at, Some(started), "the start moved");
        assert_eq!(stored.next_tick_at, Some(later + 1_000));
        assert_eq!(stored.message, Some(format!("waiting since {later}")));

        let mut stale = still_running.clone();
        stale.lease_token -= 1;
        let refused = store.record_tick(vec![stale]).await;
        assert!(matches!(refused, Err(Error::LeaseLost(_))), "{refused:?}");
        store
            .cancel_run(&run.id, later, "test")
            .await
            .expect("cancelling");
        let refused = store.record_tick(vec![still_running]).await;
        assert!(matches!(refused, Err(Error::LeaseLost(_))), "{refused:?}");
        let stored = store
            .find_run(&run.id)
            .await
            .expect("reading")
            .expect("stored");
        assert_eq!(stored.status, RunStatus::Cancelled);
    }
}
