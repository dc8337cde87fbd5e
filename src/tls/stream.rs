//! An async TLS stream over any `AsyncRead + AsyncWrite` transport, driven by ferrule itself.
//!
//! Off-the-shelf wrappers finish the whole handshake before they hand out the stream, which
//! throws away the round trip that TLS 1.3 early data saves. This one exposes the connection
//! from the moment rustls has consumed the ClientHello: reads return 0-RTT data first, while
//! the handshake is still in progress, and writes made before the client's Finished go out as
//! 0.5-RTT data when the server config allows it.
//!
//! The same type serves both sides (`rustls::ServerConnection` towards clients,
//! `rustls::ClientConnection` towards TLS origins).

use std::io::{self, IoSlice, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use rustls::{ConnectionCommon, SideData};

/// Plaintext bytes that arrived as TLS 1.3 early data, for one connection.
pub trait EarlyDataSource {
    /// Reads early data into `buf`; `None` when no early data was accepted or all is read.
    fn read_early(&mut self, buf: &mut [u8]) -> Option<usize>;
}

impl EarlyDataSource for rustls::ServerConnection {
    fn read_early(&mut self, buf: &mut [u8]) -> Option<usize> {
        let mut early = self.early_data()?;
        match early.read(buf) {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        }
    }
}

impl EarlyDataSource for rustls::ClientConnection {
    fn read_early(&mut self, _buf: &mut [u8]) -> Option<usize> {
        None
    }
}

/// A TLS connection over an async transport.
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// The transport returned end-of-file; rustls has been told.
    transport_eof: bool,
    /// Writes stay queued in rustls until `close`, which sends them with close_notify.
    flush_at_close: bool,
}

/// Adapts a polled transport to the blocking `io::Read`/`io::Write` that rustls expects;
/// `Pending` becomes `WouldBlock`, which rustls passes straight back to us.
struct Adapter<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncRead + Unpin> Read for Adapter<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_read(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<IO: AsyncWrite + AsRawFd + Unpin> Write for Adapter<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// rustls hands over every queued record at once: a handshake flight is three to six
    /// of them, a last response is followed by close_notify, a large response is a run of
    /// 16 KiB records. They leave in one `sendmsg` (see `net::send`), instead of a send, a
    /// packet and a wake-up of the peer per record; rustls consumes whatever part was sent.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match crate::net::send::poll_write_vectored(self.io, self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<IO, C, S> TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + AsRawFd + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + EarlyDataSource + Unpin,
    S: SideData,
{
    pub fn new(io: IO, conn: C) -> Self {
        Self {
            io,
            conn,
            transport_eof: false,
            flush_at_close: false,
        }
    }

    pub fn conn(&self) -> &C {
        &self.conn
    }

    pub fn io(&self) -> &IO {
        &self.io
    }

    pub fn conn_mut(&mut self) -> &mut C {
        &mut self.conn
    }

    /// Holds what is written from now on until [`close`](Self::close), so that the last
    /// response of a connection and its close_notify leave in one send. Flushes become
    /// no-ops; a write that finds rustls's buffer full still sends, so a long body streams.
    pub fn flush_at_close(&mut self) {
        self.flush_at_close = true;
    }

    /// Writes queued TLS records to the transport until rustls has none left.
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut adapter = Adapter {
                io: &mut self.io,
                cx,
            };
            match self.conn.write_tls(&mut adapter) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads one batch of TLS records from the transport and processes them.
    ///
    /// Returns the number of transport bytes read (0 at end-of-file).
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut adapter = Adapter {
            io: &mut self.io,
            cx,
        };
        let n = match self.conn.read_tls(&mut adapter) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if n == 0 {
            self.transport_eof = true;
        }
        if let Err(error) = self.conn.process_new_packets() {
            if error
                == rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::TooMuchEarlyDataReceived)
            {
                crate::metrics::inc(
                    "ferrule_early_data_total",
                    r#"result="refused",reason="too_large""#,
                );
            }
            // Send the alert rustls queued for the peer, best effort: the connection is
            // over either way.
            let _ = self.poll_write_tls(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
        }
        Poll::Ready(Ok(n))
    }

    /// Drives the handshake to completion.
    ///
    /// What TLS 1.3 queues once the handshake is done (a server's session tickets, a
    /// client's Finished) is left for the next write or the next read that has to wait,
    /// both of which send it: it then shares a send with the first response or request
    /// instead of costing one of its own.
    pub fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.conn.is_handshaking()
                && self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
            {
                return Poll::Ready(Ok(()));
            }
            let flushed = self.poll_write_tls(cx)?;
            if !self.conn.is_handshaking() {
                return match flushed {
                    Poll::Ready(()) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                };
            }
            if self.transport_eof {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            match self.poll_read_tls(cx)? {
                Poll::Ready(_) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    pub async fn handshake(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| self.poll_handshake(cx)).await
    }

    /// Sends close_notify and flushes it.
    pub async fn close(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        futures_lite::future::poll_fn(|cx| self.poll_write_tls(cx)).await?;
        futures_lite::future::poll_fn(|cx| Pin::new(&mut self.io).poll_close(cx)).await
    }
}

impl<IO, C, S> AsyncRead for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + AsRawFd + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + EarlyDataSource + Unpin,
    S: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            // Early data comes first: it precedes everything sent after the handshake.
            if let Some(n) = this.conn.read_early(buf) {
                return Poll::Ready(Ok(n));
            }

            match this.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A peer that closes without close_notify: for HTTP/1.1 with explicit
                // framing this is an ordinary end of stream, so report it as one.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.transport_eof {
                return Poll::Ready(Ok(0));
            }

            // Handshake replies (and key updates) must leave before we wait for more input.
            if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                return Poll::Ready(Err(e));
            }
            match this.poll_read_tls(cx) {
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO, C, S> AsyncWrite for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + AsRawFd + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + EarlyDataSource + Unpin,
    S: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Encrypts the buffers into records together, as if they were one: a response head and
    /// the first piece of its body share a record instead of being copied into one buffer.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();

        // Queue first, then send once: records already waiting (the session tickets issued
        // as the handshake completed, the rest of an earlier write) leave in the same send
        // as these. rustls's buffer limit bounds what can wait, so a slow reader still
        // pushes back on whoever writes to us.
        let n = this.conn.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // rustls's buffer is full, or holds plaintext it may not send before the
            // handshake completes: send what it can and come back when that has moved.
            let progress = if this.conn.is_handshaking() {
                this.poll_handshake(cx)?
            } else {
                this.poll_write_tls(cx)?
            };
            return match progress {
                Poll::Ready(()) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            };
        }
        if this.flush_at_close {
            return Poll::Ready(Ok(n));
        }
        if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flush_at_close {
            return Poll::Ready(Ok(()));
        }
        match this.poll_write_tls(cx)? {
            Poll::Ready(()) => Pin::new(&mut this.io).poll_flush(cx),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Ending the write side of a TLS stream is close_notify, then the transport's
        // shutdown: a bare FIN is indistinguishable from a truncation attack, and clients
        // report it as an error. (rustls sends close_notify at most once.)
        this.conn.send_close_notify();
        match this.poll_write_tls(cx)? {
            Poll::Ready(()) => Pin::new(&mut this.io).poll_close(cx),
            Poll::Pending => Poll::Pending,
        }
    }
}
