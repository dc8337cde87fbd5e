//! Buffered connection halves and streaming message bodies.
//!
//! Bodies are never held whole: they pass through a fixed buffer per side, decoded from the
//! sender's framing and re-encoded in the receiver's (a chunked upload stays chunked; a
//! close-delimited response becomes chunked for an HTTP/1.1 client). Chunk sizes are parsed
//! strictly; a malformed one ends the exchange and the origin connection is discarded, so
//! nothing after it can be read as a second request.

use std::io::{self, IoSlice};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::head::Framing;
use crate::shard::with_timeout;

/// Largest read buffer a side grows to while a body flows. Measured on 1 MiB responses:
/// 32 KiB took 6–9% less CPU per response than 16 KiB (two runs), and 64 KiB took 18–19%
/// more than 16 KiB (two runs; 30% more than 32 KiB in the one that had all three), for a
/// reason not pinned down.
const READ_CHUNK: usize = 32 * 1024;
/// First read buffer of a connection side: a typical request head fits.
const FIRST_READ: usize = 2 * 1024;
/// Bytes read into the task's own state while a side holds no buffer (see `fill`).
const FIRST_INLINE: usize = 512;
/// Queued output is written once it reaches this size (or at the end of a step).
const FLUSH_AT: usize = 32 * 1024;
/// Body pieces at least this long are written from the read buffer, not copied to the queue.
const WRITE_THROUGH_MIN: usize = 4 * 1024;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// One side of a proxied exchange: a stream with a read buffer and a write queue.
pub struct Buffered<S> {
    pub io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// Release the read buffer between messages and wait for the next one without it (a
    /// client side, which may idle for minutes); an origin side keeps a small buffer.
    release_idle: bool,
    /// Plaintext bytes read from and written to this side.
    pub read_total: u64,
    pub written_total: u64,
}

/// Why a body could not be moved.
#[derive(Debug)]
pub enum BodyError {
    /// The sending side failed, timed out or ended early.
    Read,
    /// The receiving side failed.
    Write,
    /// The chunked encoding was malformed.
    Malformed(&'static str),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Buffered<S> {
    /// An origin side.
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            out: Vec::new(),
            release_idle: false,
            read_total: 0,
            written_total: 0,
        }
    }

    /// A client side, which holds no read buffer while it waits for a request.
    pub fn client(io: S) -> Self {
        Self {
            release_idle: true,
            ..Self::new(io)
        }
    }

    /// Bytes received and not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes after those buffered; `Ok(0)` at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.release_idle && self.buf.capacity() == 0 {
            // Idle keep-alive connections wait here, most of their lives. Waiting with a
            // small inline buffer instead of a heap one means an idle connection holds no
            // read buffer at all; the buffer is allocated once bytes have arrived. A longer
            // head is read on by the next call, from what TLS has already decrypted.
            let mut first = [0u8; FIRST_INLINE];
            let n = self.io.read(&mut first).await?;
            if n > 0 {
                self.buf.resize(FIRST_READ, 0);
                self.buf[..n].copy_from_slice(&first[..n]);
                self.start = 0;
                self.end = n;
                self.read_total += n as u64;
            }
            return Ok(n);
        }
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() == self.end {
            // Start small: an idle keep-alive connection then holds 2 KiB, not 16.
            let grown = (self.buf.len() * 2).max(FIRST_READ);
            self.buf
                .resize(grown.min(READ_CHUNK).max(self.end + FIRST_READ), 0);
        }
        let space = self.buf.len() - self.end;
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == space && self.buf.len() < READ_CHUNK {
            // Reads fill the buffer: a body is flowing, so read in larger pieces from now on.
            self.buf.resize((self.buf.len() * 2).min(READ_CHUNK), 0);
        }
        self.end += n;
        self.read_total += n as u64;
        Ok(n)
    }

    /// Like [`fill`](Self::fill) with a time limit; a timeout is an `io::ErrorKind::TimedOut`.
    pub async fn fill_within(&mut self, limit: Duration) -> io::Result<usize> {
        with_timeout(limit, self.fill())
            .await
            .unwrap_or(Err(io::ErrorKind::TimedOut.into()))
    }

    /// Queues bytes for [`flush`](Self::flush).
    pub fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Writes the queue and flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.written_total += self.out.len() as u64;
            self.out.clear();
        }
        self.io.flush().await
    }

    /// Writes what is queued and then `piece`, in one vectored write where the stream takes
    /// one, without copying `piece` into the queue. Does not flush the stream.
    pub async fn write_through(&mut self, piece: &[u8]) -> io::Result<()> {
        let (mut queued, mut passed) = (0, 0);
        while queued < self.out.len() || passed < piece.len() {
            let n = if queued < self.out.len() {
                let bufs = [
                    IoSlice::new(&self.out[queued..]),
                    IoSlice::new(&piece[passed..]),
                ];
                self.io.write_vectored(&bufs).await?
            } else {
                self.io.write(&piece[passed..]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_queue = n.min(self.out.len() - queued);
            queued += from_queue;
            passed += n - from_queue;
        }
        self.written_total += (self.out.len() + piece.len()) as u64;
        self.out.clear();
        Ok(())
    }

    async fn flush_if_large(&mut self) -> io::Result<()> {
        if self.out.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Releases the buffers between keep-alive requests: an idle client connection holds
    /// none (the next `fill` waits with an inline buffer), and no side keeps a buffer that
    /// grew for a large message.
    pub fn shrink(&mut self) {
        if self.start == self.end && (self.release_idle || self.buf.capacity() > FIRST_READ) {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
        if self.out.is_empty() && self.out.capacity() > FIRST_READ {
            self.out = Vec::new();
        }
    }
}

/// Moves one body from `from` to `to`, decoding `framing` and encoding chunked if `chunked_out`.
pub async fn forward<R, W>(
    from: &mut Buffered<R>,
    to: &mut Buffered<W>,
    framing: Framing,
    chunked_out: bool,
    read_limit: Duration,
) -> Result<(), BodyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(n) => copy_exact(from, to, n, chunked_out, read_limit).await,
        Framing::UntilClose => copy_until_close(from, to, chunked_out, read_limit).await,
        Framing::Chunked => copy_chunked(from, to, chunked_out, read_limit).await,
    }?;
    if chunked_out {
        to.queue(b"0\r\n\r\n");
    }
    to.flush().await.map_err(|_| BodyError::Write)
}

async fn more<R: AsyncRead + AsyncWrite + Unpin>(
    from: &mut Buffered<R>,
    limit: Duration,
) -> Result<usize, BodyError> {
    from.fill_within(limit).await.map_err(|_| BodyError::Read)
}

/// Passes one piece of a body on: a large one straight from the read buffer it is in, small
/// ones through the queue, so that they leave together.
async fn pass_piece<W: AsyncRead + AsyncWrite + Unpin>(
    to: &mut Buffered<W>,
    piece: &[u8],
    chunked: bool,
) -> Result<(), BodyError> {
    let written = if chunked {
        to.queue(format!("{:x}\r\n", piece.len()).as_bytes());
        to.queue(piece);
        to.queue(b"\r\n");
        to.flush_if_large().await
    } else if piece.len() >= WRITE_THROUGH_MIN {
        to.write_through(piece).await
    } else {
        to.queue(piece);
        to.flush_if_large().await
    };
    written.map_err(|_| BodyError::Write)
}

async fn copy_exact<R, W>(
    from: &mut Buffered<R>,
    to: &mut Buffered<W>,
    mut remaining: u64,
    chunked: bool,
    limit: Duration,
) -> Result<(), BodyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    while remaining > 0 {
        if from.data().is_empty() && more(from, limit).await? == 0 {
            return Err(BodyError::Read);
        }
        let take = from.data().len().min(remaining as usize);
        pass_piece(to, &from.data()[..take], chunked).await?;
        from.consume(take);
        remaining -= take as u64;
    }
    Ok(())
}

async fn copy_until_close<R, W>(
    from: &mut Buffered<R>,
    to: &mut Buffered<W>,
    chunked: bool,
    limit: Duration,
) -> Result<(), BodyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        if from.data().is_empty() && more(from, limit).await? == 0 {
            return Ok(());
        }
        let take = from.data().len();
        pass_piece(to, &from.data()[..take], chunked).await?;
        from.consume(take);
    }
}

/// Reads one CRLF-terminated line (without the CRLF) from the front of `from`'s buffer.
async fn line<R: AsyncRead + AsyncWrite + Unpin>(
    from: &mut Buffered<R>,
    limit: Duration,
) -> Result<Vec<u8>, BodyError> {
    loop {
        if let Some(end) = from.data().windows(2).position(|w| w == b"\r\n") {
            let line = from.data()[..end].to_vec();
            from.consume(end + 2);
            return Ok(line);
        }
        if from.data().len() > MAX_CHUNK_LINE {
            return Err(BodyError::Malformed("chunk line too long"));
        }
        if more(from, limit).await? == 0 {
            return Err(BodyError::Read);
        }
    }
}

/// Parses a chunk-size line: hex digits, optionally followed by `;extensions`.
pub fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.split(|b| *b == b';').next().unwrap_or(&[]);
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(BodyError::Malformed("bad chunk size"));
    }
    if line.contains(&b'\n') || line.contains(&b'\r') {
        return Err(BodyError::Malformed("bare line break in chunk size"));
    }
    // Invariant: at most 15 hex digits, all checked above, always fit in a u64.
    let text = std::str::from_utf8(digits).map_err(|_| BodyError::Malformed("bad chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| BodyError::Malformed("bad chunk size"))
}

async fn copy_chunked<R, W>(
    from: &mut Buffered<R>,
    to: &mut Buffered<W>,
    chunked: bool,
    limit: Duration,
) -> Result<(), BodyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let size = chunk_size(&line(from, limit).await?)?;
        if size == 0 {
            // Trailer section: read up to the empty line. Trailers are not forwarded; ferrule
            // re-frames the body and fields after it are rarely meaningful to an origin.
            while !line(from, limit).await?.is_empty() {}
            return Ok(());
        }
        copy_exact(from, to, size, chunked, limit).await?;
        if !line(from, limit).await?.is_empty() {
            return Err(BodyError::Malformed("chunk data longer than its size"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A stream that takes at most `step` bytes per write, from several buffers at once
    /// when `vectored`, as a socket with little room does.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
        vectored: bool,
        writes: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            let mut room = this.step;
            for buf in bufs.iter().filter(|b| !b.is_empty()) {
                let n = buf.len().min(room);
                this.written.extend_from_slice(&buf[..n]);
                room -= n;
                if room == 0 || !this.vectored {
                    break;
                }
            }
            Poll::Ready(Ok(this.step - room))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn write_through_sends_the_queue_then_the_piece_across_short_writes() {
        let piece: Vec<u8> = (0..100u8).collect();
        for (step, vectored) in [(3, true), (3, false), (7, true), (1000, true)] {
            let mut side = Buffered::new(Trickle {
                written: Vec::new(),
                step,
                vectored,
                writes: 0,
            });
            side.queue(b"HTTP/1.1 200 OK\r\n\r\n");
            futures_lite::future::block_on(side.write_through(&piece)).unwrap();

            let mut expected = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            expected.extend_from_slice(&piece);
            assert_eq!(
                side.io.written, expected,
                "step {step}, vectored {vectored}"
            );
            assert_eq!(side.written_total, expected.len() as u64);
            assert!(side.out.is_empty());
        }

        // With room for everything, the head and the piece leave in one write.
        let mut side = Buffered::new(Trickle {
            written: Vec::new(),
            step: 1 << 20,
            vectored: true,
            writes: 0,
        });
        side.queue(b"head");
        futures_lite::future::block_on(side.write_through(b"body")).unwrap();
        assert_eq!(side.io.writes, 1);
    }

    #[test]
    fn chunk_sizes_are_parsed_strictly() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"10;name=value").unwrap(), 16);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b" 1").is_err());
        assert!(chunk_size(b"-1").is_err());
        assert!(chunk_size(b"0x10").is_err());
        assert!(chunk_size(b"ffffffffffffffffff").is_err());
    }
}
