//! Reading frames from a byte stream: the one piece of I/O the server and
//! the client share. The codec itself is in [`crate`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{DecodeError, Frame, decode};

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The bytes are not a valid frame: a protocol violation.
    #[error("protocol violation: {0}")]
    Decode(#[from] DecodeError),
    /// The stream failed or was reset.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Buffering this frame would exceed the memory budget for partially
    /// received frames (the connection's, or the router's).
    #[error(
        "a frame of {frame} bytes would take the partially received frames past their budget of {limit} bytes; send fewer large frames at once"
    )]
    OverBudget {
        /// The frame's size.
        frame: usize,
        /// The budget that would be exceeded.
        limit: usize,
    },
    /// A frame started but did not finish within the frame timeout.
    #[error("a frame stopped arriving: not complete {0:?} after its first byte")]
    Stalled(Duration),
}

/// Bytes of partially received frames a connection (or the whole router,
/// as the parent) may hold. A frame's whole announced length is charged
/// once its header is read, since that is what is allocated for it.
#[derive(Debug)]
pub struct Budget {
    held: AtomicUsize,
    limit: usize,
    parent: Option<Arc<Budget>>,
}

impl Budget {
    /// A budget of `limit` bytes, charged to `parent` too if given.
    pub fn new(limit: usize, parent: Option<Arc<Budget>>) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            limit,
            parent,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn try_add(&self, n: usize) -> Result<(), usize> {
        let mut cur = self.held.load(Ordering::Relaxed);
        loop {
            if cur + n > self.limit {
                return Err(self.limit);
            }
            match self
                .held
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if let Some(p) = &self.parent
            && let Err(limit) = p.try_add(n)
        {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return Err(limit);
        }
        Ok(())
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        if let Some(p) = &self.parent {
            p.release(n);
        }
    }
}

/// The limits a server-side reader enforces on partial frames.
struct Limits {
    budget: Arc<Budget>,
    charged: usize,
    timeout: Duration,
    started: Option<tokio::time::Instant>,
}

/// Buffers a byte stream and yields whole frames.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame: usize,
    limits: Option<Limits>,
}

impl<R> Drop for FrameReader<R> {
    fn drop(&mut self) {
        if let Some(l) = &self.limits {
            l.budget.release(l.charged);
        }
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`, refusing frames over `max_frame` bytes.
    pub fn new(inner: R, max_frame: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 << 10),
            max_frame,
            limits: None,
        }
    }

    /// Charges partially received frames to `budget`, and fails a frame
    /// that is not complete `timeout` after its first byte: what a server
    /// needs against peers that start frames and never finish them.
    pub fn with_limits(mut self, budget: Arc<Budget>, timeout: Duration) -> Self {
        self.limits = Some(Limits {
            budget,
            charged: 0,
            timeout,
            started: None,
        });
        self
    }

    /// Charges what the partial frame in the buffer will take, and notes
    /// when it started. Called with no whole frame in the buffer.
    fn charge(&mut self) -> Result<(), ReadFrameError> {
        let Some(l) = &mut self.limits else {
            return Ok(());
        };
        let want = if self.buf.len() >= 4 {
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            4 + (len as usize).min(self.max_frame)
        } else {
            self.buf.len()
        };
        if want > l.charged {
            l.budget
                .try_add(want - l.charged)
                .map_err(|limit| ReadFrameError::OverBudget { frame: want, limit })?;
            l.charged = want;
        }
        if self.buf.is_empty() {
            l.started = None;
        } else if l.started.is_none() {
            l.started = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// A whole frame left the buffer: what remains is charged afresh.
    fn settle(&mut self) {
        if let Some(l) = &mut self.limits {
            l.budget.release(l.charged);
            l.charged = 0;
            l.started = None;
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadFrameError> {
        loop {
            if let Some(f) = decode(&mut self.buf, self.max_frame)? {
                self.settle();
                return Ok(Some(f));
            }
            self.charge()?;
            if self.buf.capacity() - self.buf.len() < 16 << 10 {
                self.buf.reserve(64 << 10);
            }
            let deadline = self
                .limits
                .as_ref()
                .and_then(|l| l.started.map(|s| (s + l.timeout, l.timeout)));
            let read = match deadline {
                None => self.inner.read_buf(&mut self.buf).await?,
                Some((at, timeout)) => {
                    match tokio::time::timeout_at(at, self.inner.read_buf(&mut self.buf)).await {
                        Ok(r) => r?,
                        Err(_) => return Err(ReadFrameError::Stalled(timeout)),
                    }
                }
            };
            if read == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadFrameError::Truncated)
                };
            }
        }
    }

    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}
