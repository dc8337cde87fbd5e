//! Origin connections: choosing a backend, dialling it, and keeping idle connections warm.
//!
//! Each shard has its own [`Upstreams`]: one idle pool per backend, reused by any client of
//! that core. Nothing here is shared between cores; a backend that another core found down
//! is rediscovered by this core's own connect attempt.
//!
//! A backend may be reached over TLS. Each shard then holds its own rustls client config
//! per origin, and with it its own client session cache, so that new origin connections
//! from that core resume instead of paying for a full handshake.

pub mod origin_tls;
pub mod tcp;
pub mod tunnel;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;

use crate::config::Config;
use crate::metrics;

/// Why no origin connection could be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// Every backend refused or failed (502).
    Refused,
    /// A backend did not answer within the connect timeout (504).
    TimedOut,
}

/// The transport to an origin: plain TCP, or TLS over it.
pub enum OriginStream {
    Plain(TcpStream),
    Tls(Box<crate::tls::stream::TlsStream<TcpStream, rustls::ClientConnection>>),
}

/// An open connection to one backend.
pub struct OriginConn {
    pub stream: OriginStream,
    pub backend: usize,
    pub created: Instant,
    /// Came from the idle pool (and may have been closed by the origin meanwhile).
    pub reused: bool,
}

/// How long an idle pooled connection is reused without first checking that it is open.
const TRUST_IDLE_FOR: Duration = Duration::from_secs(1);

struct Idle {
    conn: OriginConn,
    since: Instant,
}

struct Backend {
    address: SocketAddr,
    /// This core's TLS client config for the origin (with its session cache), and the name
    /// to verify it by.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    down_until: Cell<Option<Instant>>,
    idle: RefCell<VecDeque<Idle>>,
}

/// This core's view of the backends.
pub struct Upstreams {
    backends: RefCell<Vec<Backend>>,
    next: Cell<usize>,
    settings: RefCell<Settings>,
}

struct Settings {
    max_idle: usize,
    max_idle_time: Duration,
    max_age: Duration,
    connect_timeout: Duration,
    backoff: Duration,
}

impl Settings {
    fn from(config: &Config) -> Self {
        Self {
            max_idle: config.pool.max_idle_per_backend,
            max_idle_time: config.pool.max_idle_time,
            max_age: config.pool.max_age,
            connect_timeout: config.limits.upstream_connect_timeout,
            backoff: config.limits.backend_backoff,
        }
    }
}

fn backends_of(config: &Config) -> anyhow::Result<Vec<Backend>> {
    let mut backends = Vec::new();
    for b in &config.backends {
        let tls = match &b.tls {
            Some(tls) => Some(origin_tls::client_config(tls)?),
            None => None,
        };
        backends.push(Backend {
            address: b.address,
            tls,
            down_until: Cell::new(None),
            idle: RefCell::new(VecDeque::new()),
        });
    }
    Ok(backends)
}

impl Upstreams {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            backends: RefCell::new(backends_of(config)?),
            next: Cell::new(0),
            settings: RefCell::new(Settings::from(config)),
        })
    }

    /// Takes a new configuration. Pools of backends that stay are kept.
    pub fn reconfigure(&self, config: &Config) -> anyhow::Result<()> {
        let mut fresh = backends_of(config)?;
        let mut old = self.backends.borrow_mut();
        for backend in &mut fresh {
            if let Some(kept) = old.iter().find(|b| b.address == backend.address) {
                backend.idle = RefCell::new(kept.idle.take());
            }
        }
        *old = fresh;
        *self.settings.borrow_mut() = Settings::from(config);
        Ok(())
    }

    /// Whether backend `index` is out of back-off at `now`.
    fn is_up(&self, index: usize, now: Instant) -> bool {
        self.backends
            .borrow()
            .get(index)
            .is_some_and(|b| b.down_until.get().is_none_or(|until| until <= now))
    }

    /// A pooled connection if a live one is at hand (unless `fresh`), otherwise a new one.
    ///
    /// Backends are tried in round-robin order, skipping those in back-off while any other
    /// is available. When every backend is in back-off, all are tried anyway: back-off is a
    /// preference, and refusing all traffic because of a stale mark would turn a blip into
    /// an outage.
    pub async fn checkout(&self, fresh: bool) -> Result<OriginConn, ConnectError> {
        let count = self.backends.borrow().len();
        let start = self.next.get();
        self.next.set(start.wrapping_add(1));
        let now = Instant::now();
        let any_up = (0..count).any(|i| self.is_up(i, now));
        let mut last = ConnectError::Refused;
        for index in (0..count).map(|i| (start + i) % count) {
            if any_up && !self.is_up(index, now) {
                continue;
            }
            if !fresh {
                if let Some(conn) = self.pooled(index).await {
                    metrics::inc("ferrule_upstream_reuses_total", "");
                    return Ok(conn);
                }
            }
            // Boxed: dialing (and an origin TLS handshake) is the largest state a request
            // can be in, and most requests take a pooled connection instead.
            match Box::pin(self.connect(index)).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A new connection to the backend `index`, marking the backend down if it fails.
    async fn connect(&self, index: usize) -> Result<OriginConn, ConnectError> {
        let (address, tls, timeout, backoff) = {
            let backends = self.backends.borrow();
            let settings = self.settings.borrow();
            let Some(backend) = backends.get(index) else {
                return Err(ConnectError::Refused);
            };
            let tls = backend.tls.clone();
            (
                backend.address,
                tls,
                settings.connect_timeout,
                settings.backoff,
            )
        };
        let dial = async {
            let tcp = TcpStream::connect(address).await?;
            let _ = tcp.set_nodelay(true);
            match tls {
                None => Ok(OriginStream::Plain(tcp)),
                Some((config, name)) => origin_tls::handshake(tcp, config, name).await,
            }
        };
        let attempt = crate::shard::with_timeout(timeout, dial).await;
        let mark_down = |label| {
            metrics::inc("ferrule_upstream_connect_failures_total", label);
            if let Some(backend) = self.backends.borrow().get(index) {
                backend.down_until.set(Some(Instant::now() + backoff));
            }
        };
        match attempt {
            Some(Ok(stream)) => {
                metrics::inc("ferrule_upstream_connects_total", "");
                if let Some(backend) = self.backends.borrow().get(index) {
                    backend.down_until.set(None);
                }
                Ok(OriginConn {
                    stream,
                    backend: index,
                    created: Instant::now(),
                    reused: false,
                })
            }
            Some(Err(e)) => {
                log::warn!("origin {address}: connect failed: {e}");
                mark_down(r#"reason="refused""#);
                Err(ConnectError::Refused)
            }
            None => {
                log::warn!("origin {address}: connect timed out after {timeout:?}");
                mark_down(r#"reason="timeout""#);
                Err(ConnectError::TimedOut)
            }
        }
    }

    async fn pooled(&self, index: usize) -> Option<OriginConn> {
        let (max_idle_time, max_age) = {
            let settings = self.settings.borrow();
            (settings.max_idle_time, settings.max_age)
        };
        // Most recently used first: it is the likeliest to be alive and in cache.
        loop {
            let entry = self
                .backends
                .borrow()
                .get(index)?
                .idle
                .borrow_mut()
                .pop_back()?;
            let now = Instant::now();
            let fresh = now.duration_since(entry.since) < max_idle_time
                && now.duration_since(entry.conn.created) < max_age;
            let mut conn = entry.conn;
            // A connection idle for less than a second is trusted without a syscall: an origin
            // almost never closes that fast without saying so, and if one does, the request
            // is retried on a fresh connection when that is safe (see `http::exchange`).
            let recent = now.duration_since(entry.since) < TRUST_IDLE_FOR;
            if fresh && (recent || conn.stream.is_idle_and_open().await) {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Returns a connection whose last response was fully read, for reuse.
    pub fn checkin(&self, conn: OriginConn) {
        let backends = self.backends.borrow();
        let settings = self.settings.borrow();
        let Some(backend) = backends.get(conn.backend) else {
            return;
        };
        if conn.created.elapsed() >= settings.max_age {
            return;
        }
        let mut idle = backend.idle.borrow_mut();
        let now = Instant::now();
        idle.retain(|e| now.duration_since(e.since) < settings.max_idle_time);
        if idle.len() >= settings.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
    }
}

impl OriginStream {
    /// True when an idle pooled connection can carry a request: reading would block.
    ///
    /// End-of-file, an error or application data all mean it cannot. For TLS, records the
    /// origin sent while idle (a TLS 1.3 NewSessionTicket, say) are processed by the same
    /// read without being taken for data.
    async fn is_idle_and_open(&mut self) -> bool {
        match (peek_socket(self.fd()), &*self) {
            (Peek::Empty, _) => true,
            (Peek::Closed, _) | (Peek::Data, OriginStream::Plain(_)) => false,
            (Peek::Data, OriginStream::Tls(_)) => {
                // Let rustls process what arrived; only application data or EOF disqualify.
                let mut byte = [0u8; 1];
                futures_lite::future::poll_once(self.read(&mut byte))
                    .await
                    .is_none()
            }
        }
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            OriginStream::Plain(tcp) => tcp.as_raw_fd(),
            OriginStream::Tls(tls) => tls.io().as_raw_fd(),
        }
    }
}

enum Peek {
    Empty,
    Data,
    Closed,
}

/// Looks at an idle socket without waiting or consuming: one non-blocking syscall, far
/// cheaper than arming and cancelling an io_uring poll for every pooled request.
fn peek_socket(fd: std::os::fd::RawFd) -> Peek {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer for the duration of the call; MSG_DONTWAIT
    // makes it non-blocking and MSG_PEEK leaves any data in the socket.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        n if n > 0 => Peek::Data,
        _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => {
            Peek::Empty
        }
        _ => Peek::Closed,
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            OriginStream::Plain($s) => {
                let $s = Pin::new($s);
                $call
            }
            OriginStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $call
            }
        }
    };
}

impl AsyncRead for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
            OriginStream::Plain(tcp) => crate::net::send::poll_write_vectored(tcp, cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_close(cx))
    }
}

impl AsyncRead for OriginConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for OriginConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}
