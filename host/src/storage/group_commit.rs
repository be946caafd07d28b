//! Group commit: writes that arrive while the previous transaction is committing wait in a
//! queue, and one task writes everything waiting in the next transaction and answers each. One
//! commit (one fsync on SQLite, one WAL flush on PostgreSQL) then serves many requests, and no
//! write waits for a timer: an idle queue writes a single item at once.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::{Error, Result};

/// Items written in one transaction at most; bounds the statement size and the latency of the
/// first request in a batch.
const MAX_BATCH: usize = 256;

type Request<W, R> = (W, oneshot::Sender<Result<R>>);

pub(super) struct GroupCommit<W, R> {
    sender: mpsc::UnboundedSender<Request<W, R>>,
}

impl<W: Send + 'static, R: Send + 'static> GroupCommit<W, R> {
    /// Starts the writer task. `write` writes a batch and returns one result per item, in
    /// order; it is called again with nothing new until the queue has more.
    pub(super) fn start<F, Fut>(write: F) -> GroupCommit<W, R>
    where
        F: Fn(Vec<W>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<R>>> + Send,
    {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Request<W, R>>();
        tokio::spawn(async move {
            while let Some((item, reply)) = receiver.recv().await {
                let (mut items, mut replies) = (vec![item], vec![reply]);
                while items.len() < MAX_BATCH
                    && let Ok((item, reply)) = receiver.try_recv()
                {
                    items.push(item);
                    replies.push(reply);
                }
                let results = write(items).await;
                debug_assert_eq!(results.len(), replies.len());
                for (reply, result) in replies.into_iter().zip(results) {
                    // The requester may have gone (a client hung up); the write stands.
                    let _ = reply.send(result);
                }
            }
        });
        GroupCommit { sender }
    }

    /// Queues `item` for the next transaction and waits until it is committed.
    pub(super) async fn submit(&self, item: W) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((item, reply))
            .map_err(|_| Error::WriterStopped)?;
        answer.await.map_err(|_| Error::WriterStopped)?
    }
}
