//! Copying bytes both ways between two streams until both directions have ended.
//!
//! Written as one poll function with a buffer per direction rather than as two racing
//! futures: a read future dropped by a `select` could lose bytes it had already taken from
//! the socket, while re-polling the same read with the same buffer cannot.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

const BUFFER: usize = 16 * 1024;

struct Direction {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_done: bool,
    shut: bool,
    moved: u64,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            read_done: false,
            shut: false,
            moved: 0,
        }
    }

    /// Moves what it can from `from` to `to`; Ready once `from` ended and `to` is shut.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.start == self.end && !self.read_done {
                match Pin::new(&mut *from).poll_read(cx, &mut self.buf)? {
                    Poll::Ready(0) => self.read_done = true,
                    Poll::Ready(n) => {
                        self.start = 0;
                        self.end = n;
                    }
                    Poll::Pending => {
                        // Nothing to read now: make sure what was written is on its way.
                        let _ = Pin::new(&mut *to).poll_flush(cx)?;
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                match Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end])? {
                    Poll::Ready(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(n) => {
                        self.start += n;
                        self.moved += n as u64;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.read_done {
                if !self.shut {
                    match Pin::new(&mut *to).poll_close(cx) {
                        Poll::Ready(_) => self.shut = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both sides have reached end-of-file or one fails.
/// Returns the bytes moved from `a` to `b` and from `b` to `a`.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    let mut a_done = false;
    let mut b_done = false;
    futures_lite::future::poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(result) = a_to_b.poll_copy(cx, a, b) {
                result?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(result) = b_to_a.poll_copy(cx, b, a) {
                result?;
                b_done = true;
            }
        }
        if a_done && b_done {
            Poll::Ready(Ok((a_to_b.moved, b_to_a.moved)))
        } else {
            Poll::Pending
        }
    })
    .await
}
