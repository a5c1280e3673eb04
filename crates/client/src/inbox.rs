//! Hands delivered messages from a subscription's reader task to the
//! consumer a frame at a time: one channel operation per delivery frame
//! (often hundreds of messages), not one per message. How many may be in
//! flight is bounded by the subscription's credits or prefetch, not here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::sync::mpsc;

use super::ClientError;

/// The reader task's end.
pub(super) struct InboxSender<T> {
    tx: mpsc::UnboundedSender<Result<Vec<T>, ClientError>>,
    queued: Arc<AtomicUsize>,
}

/// The consumer's end: messages in arrival order, then the error that
/// ended the stream, if any.
pub(super) struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<Result<Vec<T>, ClientError>>,
    batch: VecDeque<T>,
    /// Messages sent but still in the channel (not yet in `batch`).
    queued: Arc<AtomicUsize>,
}

pub(super) fn inbox<T>() -> (InboxSender<T>, Inbox<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        InboxSender {
            tx,
            queued: queued.clone(),
        },
        Inbox {
            rx,
            batch: VecDeque::new(),
            queued,
        },
    )
}

impl<T> InboxSender<T> {
    /// Passes on one frame's messages; false once the consumer is gone.
    pub(super) fn send(&self, batch: Vec<T>) -> bool {
        self.queued.fetch_add(batch.len(), Ordering::Relaxed);
        self.tx.send(Ok(batch)).is_ok()
    }

    /// Ends the stream with `e`, after the messages already sent.
    pub(super) fn fail(&self, e: ClientError) {
        let _ = self.tx.send(Err(e));
    }
}

impl<T> Inbox<T> {
    /// The next message, or the error that ended the stream, or `None`.
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<T, ClientError>>> {
        loop {
            if let Some(m) = self.batch.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(batch)) => {
                    self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                    self.batch.extend(batch);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }

    /// Messages received but not yet taken.
    pub(super) fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.batch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_come_out_in_order_then_the_error_and_are_counted() {
        let (tx, mut rx) = inbox::<u32>();
        assert!(tx.send(vec![1, 2, 3]));
        assert!(tx.send(Vec::new()));
        assert!(tx.send(vec![4]));
        tx.fail(ClientError::ConnectionLost("gone".into()));
        drop(tx);
        assert_eq!(rx.len(), 4);
        let first = std::future::poll_fn(|cx| rx.poll_next(cx)).await;
        assert!(matches!(first, Some(Ok(1))));
        assert_eq!(rx.len(), 3, "taken ones are no longer counted");
        let mut got = vec![1];
        let err = loop {
            match std::future::poll_fn(|cx| rx.poll_next(cx)).await {
                Some(Ok(m)) => got.push(m),
                Some(Err(e)) => break e,
                None => panic!("ended without the error"),
            }
        };
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(matches!(err, ClientError::ConnectionLost(_)));
        assert_eq!(rx.len(), 0);
        assert!(std::future::poll_fn(|cx| rx.poll_next(cx)).await.is_none());
    }
}
