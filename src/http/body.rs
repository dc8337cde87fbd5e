//! Buffered connection halves and streaming message bodies.
//!
//! Bodies are never held whole: they pass through a fixed buffer per side, decoded from the
//! sender's framing and re-encoded in the receiver's (a chunked upload stays chunked; a
//! close-delimited response becomes chunked for an HTTP/1.1 client). Chunk sizes are parsed
//! strictly; a malformed one ends the exchange and the origin connection is discarded, so
//! nothing after it can be read as a second request.

use std::io;
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::head::Framing;
use crate::shard::with_timeout;

const READ_CHUNK: usize = 16 * 1024;
/// First read buffer of a connection side: a typical request head fits.
const FIRST_READ: usize = 2 * 1024;
/// Bytes read into the task's own state while a side holds no buffer (see `fill`).
const FIRST_INLINE: usize = 512;
/// Queued output is written once it reaches this size (or at the end of a step).
const FLUSH_AT: usize = 32 * 1024;
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

fn queue_piece<W: AsyncRead + AsyncWrite + Unpin>(
    to: &mut Buffered<W>,
    piece: &[u8],
    chunked: bool,
) {
    if chunked {
        to.queue(format!("{:x}\r\n", piece.len()).as_bytes());
        to.queue(piece);
        to.queue(b"\r\n");
    } else {
        to.queue(piece);
    }
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
        queue_piece(to, &from.data()[..take], chunked);
        from.consume(take);
        remaining -= take as u64;
        to.flush_if_large().await.map_err(|_| BodyError::Write)?;
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
        queue_piece(to, &from.data()[..take], chunked);
        from.consume(take);
        to.flush_if_large().await.map_err(|_| BodyError::Write)?;
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
