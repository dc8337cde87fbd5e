//! The server side of a handshake, from the first byte to a stream HTTP can use.
//!
//! 1. Read the ClientHello with rustls's `Acceptor`, keeping the raw bytes.
//! 2. Inspect them ([`crate::tls::hello`]) for the session the client presents.
//! 3. Fetch that session from its home core (`cache` mode), asynchronously.
//! 4. Pick a config: cipher preference for this client and CPU, and whether this
//!    connection may have 0-RTT (fresh, single-use session; early data enabled).
//! 5. Let rustls consume the ClientHello with the prefetched session in place.
//! 6. Without early data, finish the handshake here; with it, hand the stream over at once
//!    so the early request can be answered before the client's Finished arrives.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::server::Acceptor;
use rustls::ServerConnection;

use super::stream::TlsStream;
use crate::config::Config;
use crate::metrics::{self, HandshakeKind};
use crate::shard::{with_timeout, Message, SessionMiss, Shard};

/// The client-facing stream type.
pub type ServerStream = TlsStream<TcpStream, ServerConnection>;

/// Plaintext bytes rustls may queue per connection (see where it is set).
const PLAINTEXT_BUFFER_LIMIT: usize = 64 * 1024;

/// Largest ClientHello accepted (several records; post-quantum key shares are ~1.2 KiB).
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// A connection whose ClientHello rustls has accepted.
pub struct AcceptedConn {
    pub stream: ServerStream,
    /// rustls accepted 0-RTT data on this connection.
    pub early_data: bool,
    /// Subject of the client's verified certificate, once the handshake has completed.
    pub client_subject: Option<String>,
    /// The resumption mode in force when the connection was accepted.
    resumption: crate::config::Resumption,
    /// Metric label of the certificate chosen for this client.
    cert_label: &'static str,
    started: Instant,
    recorded: bool,
}

impl AcceptedConn {
    /// Counts the handshake once it has completed (callers poll this as they go).
    pub fn record_handshake(&mut self) {
        if self.recorded || self.stream.conn().is_handshaking() {
            return;
        }
        self.recorded = true;
        let conn = self.stream.conn();
        let kind = match conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => HandshakeKind::Resumed,
            _ => HandshakeKind::Full,
        };
        let version = conn
            .protocol_version()
            .unwrap_or(rustls::ProtocolVersion::TLSv1_3);
        metrics::handshake(kind, version, self.resumption, self.started.elapsed());
        metrics::inc("ferrule_handshakes_by_certificate_total", self.cert_label);
        self.client_subject = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| {
                use x509_parser::prelude::FromDer;
                let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
                Some(parsed.subject().to_string())
            });
        if let Some(suite) = conn.negotiated_cipher_suite() {
            metrics::inc(
                "ferrule_tls_cipher_suites_total",
                suite_label(suite.suite()),
            );
        }
    }

    /// Waits for the handshake to complete (after early data has been dealt with).
    pub async fn finish_handshake(&mut self, limit: Duration) -> io::Result<()> {
        let remaining = limit.saturating_sub(self.started.elapsed());
        match with_timeout(remaining, self.stream.handshake()).await {
            Some(result) => result?,
            None => return Err(io::ErrorKind::TimedOut.into()),
        }
        self.record_handshake();
        Ok(())
    }
}

fn suite_label(suite: rustls::CipherSuite) -> &'static str {
    use rustls::CipherSuite::*;
    match suite {
        TLS13_AES_128_GCM_SHA256 => r#"suite="TLS13_AES_128_GCM_SHA256""#,
        TLS13_AES_256_GCM_SHA384 => r#"suite="TLS13_AES_256_GCM_SHA384""#,
        TLS13_CHACHA20_POLY1305_SHA256 => r#"suite="TLS13_CHACHA20_POLY1305_SHA256""#,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            r#"suite="TLS12_AES_128_GCM""#
        }
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            r#"suite="TLS12_AES_256_GCM""#
        }
        _ => r#"suite="TLS12_CHACHA20_POLY1305""#,
    }
}

/// Why a connection ended before its handshake completed; the label of the failure metric.
#[derive(Clone, Copy, Debug)]
pub enum HandshakeFailure {
    Timeout,
    ClosedByPeer,
    NotTls,
    Rejected,
    UnrecognizedName,
    Io,
}

impl HandshakeFailure {
    fn label(self) -> &'static str {
        match self {
            Self::Timeout => r#"reason="timeout""#,
            Self::ClosedByPeer => r#"reason="closed_by_peer""#,
            Self::NotTls => r#"reason="bad_client_hello""#,
            Self::Rejected => r#"reason="handshake_error""#,
            Self::UnrecognizedName => r#"reason="unrecognized_name""#,
            Self::Io => r#"reason="io_error""#,
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

fn fail(reason: HandshakeFailure) -> HandshakeFailure {
    metrics::inc("ferrule_handshake_failures_total", reason.label());
    reason
}

/// Accepts one TLS connection on `shard`.
pub async fn accept(
    shard: &Rc<Shard>,
    mut tcp: TcpStream,
    config: &Config,
) -> Result<Box<AcceptedConn>, HandshakeFailure> {
    let started = Instant::now();
    let limit = config.limits.handshake_timeout;

    // 1. ClientHello.
    let hello = with_timeout(limit, read_client_hello(&mut tcp)).await;
    let (accepted, raw) = match hello {
        None => return Err(fail(HandshakeFailure::Timeout)),
        Some(Err(reason)) => return Err(fail(reason)),
        Some(Ok(hello)) => hello,
    };

    // 2. SNI policy and cipher preference.
    let context = shard.tls.borrow().clone();
    let client_hello = accepted.client_hello();
    if config.tls.strict_sni {
        let known = client_hello
            .server_name()
            .is_some_and(|n| context.resolver.knows(n));
        if !known {
            // unrecognized_name(112), fatal, in a plaintext alert record (RFC 8446, 6.2).
            let _ = tcp.write_all(&[21, 3, 3, 0, 2, 2, 112]).await;
            return Err(fail(HandshakeFailure::UnrecognizedName));
        }
    }
    let cert_label = context.resolver.label(client_hello.server_name());
    let chacha_first =
        !context.cpu.fast_aes_gcm() || super::client_prefers_chacha(client_hello.cipher_suites());

    // 3. Session from its home core; 4. may this connection have 0-RTT? The 0-RTT config is
    // the normal one (its tickets advertise early data); the other is only for refusing
    // early data on a resumption that must not have it.
    let summary = super::hello::inspect(&raw).unwrap_or_default();
    let mut refuse_early = false;
    if summary.offers_early_data && context.early_data_enabled() {
        metrics::inc("ferrule_early_data_total", r#"result="attempted""#);
    }
    if let Some((key, take)) = summary.session_key() {
        match resolve_session(shard, key, take).await {
            Ok((value, age)) => {
                super::session::prefetch(key.to_vec(), value);
                if summary.offers_early_data
                    && context.early_data_enabled()
                    && age > config.early_data.max_ticket_age
                {
                    refuse_early = true;
                    metrics::inc(
                        "ferrule_early_data_total",
                        r#"result="refused",reason="stale""#,
                    );
                }
            }
            Err(miss) => {
                metrics::inc("ferrule_resumption_fallbacks_total", miss.label());
                if summary.offers_early_data && context.early_data_enabled() {
                    let label = match miss {
                        SessionMiss::Replayed => r#"result="refused",reason="replayed""#,
                        _ => r#"result="refused",reason="unknown_session""#,
                    };
                    metrics::inc("ferrule_early_data_total", label);
                }
            }
        }
    }

    // 5. rustls consumes the ClientHello (and reads the prefetched session, if any).
    let server_config = context.pick(chacha_first, !refuse_early);
    let converted = accepted.into_connection(server_config);
    super::session::clear_prefetch();
    let mut conn = match converted {
        Ok(conn) => conn,
        Err((_, mut alert)) => {
            let mut out = Vec::new();
            let _ = alert.write_all(&mut out);
            let _ = tcp.write_all(&out).await;
            return Err(fail(HandshakeFailure::Rejected));
        }
    };
    // Records that arrived together with the ClientHello (the client's 0-RTT data, above
    // all, sent right behind the hello in one segment, or in the SYN with TCP Fast Open) are
    // still buffered, unprocessed, in rustls: `into_connection` handles only the ClientHello.
    // Process them now; otherwise the early request is not seen until the client's next
    // flight (its Finished) arrives, and 0-RTT degrades to 1-RTT.
    if conn.process_new_packets().is_err() {
        let mut out = Vec::new();
        while conn.wants_write() && conn.write_tls(&mut out).is_ok() {}
        let _ = tcp.write_all(&out).await;
        return Err(fail(HandshakeFailure::Rejected));
    }

    // Plaintext rustls may hold for this connection before writes push back: two of the
    // proxy's 32 KiB write batches, so a batch never waits on the previous one's records.
    conn.set_buffer_limit(Some(PLAINTEXT_BUFFER_LIMIT));

    // 6. Hand over now (0-RTT), or finish the handshake first.
    // Boxed: the connection outlives the handshake's future, and the request loop that
    // takes it over then holds a pointer instead of the whole rustls state.
    let mut accepted = Box::new(AcceptedConn {
        stream: TlsStream::new(tcp, conn),
        early_data: false,
        client_subject: None,
        resumption: config.tls.resumption,
        cert_label,
        started,
        recorded: false,
    });
    accepted.early_data = accepted.stream.conn_mut().early_data().is_some();
    if accepted.early_data {
        metrics::inc("ferrule_early_data_total", r#"result="accepted""#);
        // Send the server's flight now: the early request's answer follows it as 0.5-RTT
        // data, but the client's handshake must not wait for the origin to answer.
        if accepted.stream.flush().await.is_err() {
            return Err(fail(HandshakeFailure::Io));
        }
        return Ok(accepted);
    }
    match accepted.finish_handshake(limit).await {
        Ok(()) => Ok(accepted),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(fail(HandshakeFailure::Timeout)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(fail(HandshakeFailure::ClosedByPeer))
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(fail(HandshakeFailure::Rejected)),
        Err(_) => Err(fail(HandshakeFailure::Io)),
    }
}

/// Reads until rustls's `Acceptor` has a whole ClientHello; returns it with the raw bytes.
async fn read_client_hello(
    tcp: &mut TcpStream,
) -> Result<(rustls::server::Accepted, Vec<u8>), HandshakeFailure> {
    let mut acceptor = Acceptor::default();
    let mut raw = Vec::with_capacity(2048);
    let mut buf = [0u8; 4096];
    loop {
        let n = match tcp.read(&mut buf).await {
            Ok(0) => return Err(HandshakeFailure::ClosedByPeer),
            Ok(n) => n,
            Err(_) => return Err(HandshakeFailure::Io),
        };
        raw.extend_from_slice(&buf[..n]);
        let mut input = &buf[..n];
        while !input.is_empty() {
            if acceptor.read_tls(&mut input).is_err() {
                return Err(HandshakeFailure::NotTls);
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((accepted, raw)),
            Ok(None) if raw.len() < MAX_CLIENT_HELLO => {}
            Ok(None) => return Err(HandshakeFailure::NotTls),
            Err((_, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = tcp.write_all(&out).await;
                return Err(HandshakeFailure::NotTls);
            }
        }
    }
}

/// How long a lookup that found nothing waits before asking once more. A session issued
/// on another core may still be on its way home: a client can reconnect faster than the
/// issuing core's message is handled, above all on a busy machine. Only lookups of unknown
/// sessions pay this; a replayed ticket is recognised at once.
const UNKNOWN_SESSION_RETRY: Duration = Duration::from_millis(2);

/// Fetches a session from its home core (or from this core's own partition).
async fn resolve_session(
    shard: &Rc<Shard>,
    key: &[u8],
    take: bool,
) -> Result<(Vec<u8>, Duration), SessionMiss> {
    match lookup_once(shard, key, take).await {
        Err(SessionMiss::Unknown) => {
            glommio::timer::sleep(UNKNOWN_SESSION_RETRY).await;
            lookup_once(shard, key, take).await
        }
        other => other,
    }
}

async fn lookup_once(
    shard: &Rc<Shard>,
    key: &[u8],
    take: bool,
) -> Result<(Vec<u8>, Duration), SessionMiss> {
    let home = super::session::home_core(key, shard.shards);
    if home == shard.index {
        metrics::inc("ferrule_session_lookups_total", r#"where="local""#);
        return shard.lookup_session(key, take);
    }
    metrics::inc("ferrule_session_lookups_total", r#"where="remote""#);
    let asked = Instant::now();
    let key = key.to_vec();
    let reply = shard
        .ask(home, |id| Message::SessionLookup { id, key, take })
        .await;
    metrics::cross_core_lookup(asked.elapsed());
    match reply {
        Some(Message::SessionReply { result, .. }) => result,
        _ => Err(SessionMiss::Unknown),
    }
}
