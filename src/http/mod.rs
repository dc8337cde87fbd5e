//! HTTP/1.1 towards clients and origins: the request loop of one client connection.
//!
//! Requests on a connection are handled one after another, in order; pipelined requests wait
//! in the read buffer and are answered in the order they came. Each request is sent to an
//! origin connection from this core's pool, its body streamed, the response streamed back,
//! and the origin connection returned to the pool when both messages ended cleanly.
//!
//! Error mapping follows who is at fault: a malformed request is the client's (400, 408,
//! 414, 431, and the connection is closed), an origin that refuses, times out or breaks its
//! framing before the response began is the origin's (502 or 504); after a response has
//! begun, the only honest signal left is to close the client connection.

pub mod body;
pub mod head;
pub mod policy;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

use crate::config::Config;
use crate::metrics;
use crate::shard::Shard;
use crate::tls::accept::AcceptedConn;
use crate::upstream::{ConnectError, OriginConn};
use body::{BodyError, Buffered};
use head::{Framing, Parsed, RequestHead};

impl AsyncRead for AcceptedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AcceptedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

type Client = Buffered<Box<AcceptedConn>>;

/// Largest last response whose records wait to leave together with close_notify.
const HOLD_LAST_RESPONSE_MAX: u64 = 16 * 1024;
type Origin = Buffered<OriginConn>;

/// What to do with the client connection after one exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Serves HTTP/1.1 requests on one client connection until it closes.
pub async fn serve(
    shard: &Rc<Shard>,
    accepted: Box<AcceptedConn>,
    peer: Option<SocketAddr>,
    config: &Config,
) {
    let mut client = Buffered::client(accepted);
    let mut served: u64 = 0;
    loop {
        let next = match next_request(shard, &mut client, peer, config, served).await {
            Some(Ok(mut head)) => {
                // The last response on this connection says so, so that the client does not
                // send another request into a closing connection.
                if served + 1 >= config.limits.max_requests_per_connection
                    || shard.drain.is_draining()
                {
                    head.keep_alive = false;
                }
                exchange(shard, &mut client, head, config).await
            }
            Some(Err(reject)) => {
                respond(&mut client, reject.status, reject.reason, true).await;
                Next::Close
            }
            None => Next::Close,
        };
        served += 1;
        if next == Next::Close
            || served >= config.limits.max_requests_per_connection
            || shard.drain.is_draining()
        {
            break;
        }
        client.shrink();
    }
    metrics::add(
        "ferrule_bytes_total",
        r#"direction="client_in""#,
        client.read_total,
    );
    metrics::add(
        "ferrule_bytes_total",
        r#"direction="client_out""#,
        client.written_total,
    );
    let _ = client.flush().await;
    // A connection answered from early data may be done before the client's Finished has
    // arrived. Complete the handshake first: closing now would cut off the client's
    // handshake and the tickets it needs to come back with 0-RTT again.
    if client.io.stream.conn().is_handshaking() {
        let limit = config.limits.handshake_timeout;
        let _ = client.io.finish_handshake(limit).await;
    }
    let _ = client.io.stream.close().await;
}

/// Waits for and parses the next request head. `None`: the connection should just close.
async fn next_request(
    shard: &Rc<Shard>,
    client: &mut Client,
    peer: Option<SocketAddr>,
    config: &Config,
    served: u64,
) -> Option<Result<RequestHead, head::Reject>> {
    // Between requests: wait for the first byte, for at most the idle timeout, and give up
    // at once when the shard starts draining.
    if client.data().is_empty() {
        let read = futures_lite::future::or(
            async { Some(client.fill_within(config.limits.idle_timeout).await) },
            async {
                shard.drain.wait().await;
                None
            },
        )
        .await;
        match read {
            Some(Ok(n)) if n > 0 => {}
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut && served == 0 => {
                return Some(Err(head::Reject {
                    status: 408,
                    reason: "no request",
                }))
            }
            _ => return None,
        }
    }
    client.io.record_handshake();

    // The rest of the head must arrive within the request-header timeout.
    let deadline = std::time::Instant::now() + config.limits.request_header_timeout;
    let subject = client.io.client_subject.clone();
    let forwarding = head::Forwarding {
        client_ip: peer.map(|p| p.ip()),
        cert_header: &config.tls.client_cert_header,
        cert_subject: subject.as_deref(),
    };
    loop {
        match head::parse_request(client.data(), &config.limits, &forwarding) {
            Ok(Parsed::Complete(head)) => {
                client.consume(head.len);
                return Some(Ok(head));
            }
            Ok(Parsed::Partial) => {}
            Err(reject) => return Some(Err(reject)),
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match client.fill_within(left).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Some(Err(head::Reject {
                    status: 408,
                    reason: "request head too slow",
                }))
            }
            Err(_) => return None,
        }
    }
}

/// Sends a response ferrule generated itself.
async fn respond(client: &mut Client, status: u16, reason: &str, close: bool) {
    metrics::response(status);
    client.queue(&head::simple_response(status, reason, close));
    let _ = client.flush().await;
}

/// One request and its response.
async fn exchange(
    shard: &Rc<Shard>,
    client: &mut Client,
    request: RequestHead,
    config: &Config,
) -> Next {
    // Early data (RFC 8470): answer now only what is safe to replay-proof; hold the rest
    // until the handshake has completed.
    let mut early = client.io.stream.conn().is_handshaking();
    if early {
        let safe =
            request.framing == Framing::Empty && policy::safe_early(&request, &config.early_data);
        metrics::inc(
            "ferrule_early_requests_total",
            if safe {
                r#"action="forwarded_early""#
            } else {
                r#"action="held""#
            },
        );
        if !safe {
            if client
                .io
                .finish_handshake(config.limits.handshake_timeout)
                .await
                .is_err()
            {
                return Next::Close;
            }
            early = false;
        }
    }

    let mut retried = false;
    let mut retried_too_early = false;
    loop {
        // A retry after a pooled connection turned out stale goes to a fresh connection:
        // the next pooled one may well have been closed by the same origin timeout.
        let mut origin = match shard.upstreams.checkout(retried).await {
            Ok(conn) => Buffered::new(conn),
            Err(e) => {
                let status = if e == ConnectError::TimedOut {
                    504
                } else {
                    502
                };
                respond(client, status, "no origin available", !request.keep_alive).await;
                return if request.keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
        };
        let outcome = attempt(client, &mut origin, &request, early, config, &shard.drain).await;
        metrics::add(
            "ferrule_bytes_total",
            r#"direction="upstream_out""#,
            origin.written_total,
        );
        metrics::add(
            "ferrule_bytes_total",
            r#"direction="upstream_in""#,
            origin.read_total,
        );
        match outcome {
            Attempt::Done { next, reusable } => {
                if reusable {
                    origin.shrink();
                    shard.upstreams.checkin(origin.io);
                }
                return next;
            }
            Attempt::StalePooled
                if !retried && request.idempotent() && request.framing == Framing::Empty =>
            {
                retried = true;
                metrics::inc("ferrule_upstream_retries_total", "");
            }
            Attempt::TooEarly if !retried_too_early => {
                // The origin wants this request after the handshake (RFC 8470, 5.2): wait
                // for the client's Finished and send it again, without Early-Data.
                retried_too_early = true;
                metrics::inc(
                    "ferrule_early_requests_total",
                    r#"action="retried_after_425""#,
                );
                if client
                    .io
                    .finish_handshake(config.limits.handshake_timeout)
                    .await
                    .is_err()
                {
                    return Next::Close;
                }
                early = false;
            }
            Attempt::StalePooled | Attempt::TooEarly | Attempt::OriginFailed(_) => {
                let status = match outcome {
                    Attempt::OriginFailed(status) => status,
                    _ => 502,
                };
                respond(client, status, "origin failed", true).await;
                return Next::Close;
            }
            Attempt::ClientFailed(reject) => {
                if let Some(reject) = reject {
                    respond(client, reject.status, reject.reason, true).await;
                }
                return Next::Close;
            }
        }
    }
}

enum Attempt {
    /// The exchange finished; `reusable` says whether the origin connection can be pooled.
    Done { next: Next, reusable: bool },
    /// A pooled connection turned out to be closed before any response byte.
    StalePooled,
    /// The origin answered 425 to an early request.
    TooEarly,
    /// The origin failed before the response began: answer with this status.
    OriginFailed(u16),
    /// The client broke the exchange; answer with this rejection if it is still possible.
    ClientFailed(Option<head::Reject>),
}

async fn attempt(
    client: &mut Client,
    origin: &mut Origin,
    request: &RequestHead,
    early: bool,
    config: &Config,
    drain: &crate::shard::DrainSignal,
) -> Attempt {
    let reused = origin.io.reused;
    let read_limit = config.limits.idle_timeout;

    // Request head, and the body.
    origin.queue(&request.upstream);
    if early {
        origin.queue(b"Early-Data: 1\r\n");
    }
    origin.queue(b"\r\n");
    if request.expect_continue && request.framing != Framing::Empty {
        // ferrule takes the body either way, so it answers the expectation itself; the
        // origin never sees `Expect`.
        client.queue(b"HTTP/1.1 100 Continue\r\n\r\n");
        if client.flush().await.is_err() {
            return Attempt::ClientFailed(None);
        }
    }
    let chunked_up = request.framing == Framing::Chunked;
    match body::forward(client, origin, request.framing, chunked_up, read_limit).await {
        Ok(()) => {}
        Err(BodyError::Write) if reused && request.framing == Framing::Empty => {
            return Attempt::StalePooled
        }
        Err(BodyError::Write) => return Attempt::OriginFailed(502),
        Err(BodyError::Malformed(reason)) => {
            return Attempt::ClientFailed(Some(head::Reject {
                status: 400,
                reason,
            }))
        }
        Err(BodyError::Read) => return Attempt::ClientFailed(None),
    }

    // Response head (skipping and relaying interim responses).
    let response = loop {
        let response = match read_response_head(origin, &request.method, config).await {
            Ok(response) => response,
            Err(ResponseError::ClosedEarly) if reused => return Attempt::StalePooled,
            Err(ResponseError::ClosedEarly) | Err(ResponseError::Invalid) => {
                return Attempt::OriginFailed(502)
            }
            Err(ResponseError::TimedOut) => return Attempt::OriginFailed(504),
        };
        match response.status {
            101 if request.upgrade.is_some() => {
                let protocol = request.upgrade.as_deref().unwrap_or_default();
                return tunnel(client, origin, response, protocol).await;
            }
            100 => continue,
            102..=199 => {
                client.queue(&response.client);
                client.queue(b"\r\n");
                if client.flush().await.is_err() {
                    return Attempt::ClientFailed(None);
                }
            }
            425 if early => return Attempt::TooEarly,
            _ => break response,
        }
    };

    // Response to the client, in the framing the client understands.
    // A drain that started while this request was in flight is announced on its response.
    let keep_alive = request.keep_alive && !drain.is_draining();
    let chunked_down = match response.framing {
        Framing::Chunked | Framing::UntilClose => request.minor == 1,
        _ => false,
    };
    let next = if keep_alive && (chunked_down || !matches!(response.framing, Framing::UntilClose)) {
        Next::KeepAlive
    } else {
        Next::Close
    };
    // The last response on the connection, when it is small and complete in itself, leaves
    // in one send with the close_notify that follows it. A streamed or large body is
    // flushed as it goes, so that a slow origin's bytes are not held back.
    let small_body = match response.framing {
        Framing::Empty => true,
        Framing::Length(n) => n <= HOLD_LAST_RESPONSE_MAX,
        _ => false,
    };
    if next == Next::Close && small_body {
        client.io.stream.flush_at_close();
    }
    client.queue(&response.client);
    match response.framing {
        Framing::Length(n) => client.queue(format!("Content-Length: {n}\r\n").as_bytes()),
        Framing::Chunked | Framing::UntilClose if chunked_down => {
            client.queue(b"Transfer-Encoding: chunked\r\n")
        }
        Framing::Empty => match response.content_length {
            // HEAD and 304: the length of the representation the origin would have sent.
            Some(n) if response.status != 204 => {
                client.queue(format!("Content-Length: {n}\r\n").as_bytes())
            }
            _ if request.method != "HEAD"
                && response.status >= 200
                && response.status != 204
                && response.status != 304 =>
            {
                client.queue(b"Content-Length: 0\r\n")
            }
            _ => {}
        },
        _ => {}
    }
    client.queue(if next == Next::KeepAlive {
        if request.minor == 0 {
            b"Connection: keep-alive\r\n\r\n".as_slice()
        } else {
            b"\r\n"
        }
    } else {
        b"Connection: close\r\n\r\n"
    });
    metrics::response(response.status);
    match body::forward(
        origin,
        client,
        response.framing,
        chunked_down,
        config.limits.upstream_response_timeout,
    )
    .await
    {
        Ok(()) => Attempt::Done {
            next,
            reusable: response.reusable,
        },
        Err(_) => Attempt::Done {
            next: Next::Close,
            reusable: false,
        },
    }
}

enum ResponseError {
    ClosedEarly,
    Invalid,
    TimedOut,
}

async fn read_response_head(
    origin: &mut Origin,
    method: &str,
    config: &Config,
) -> Result<head::ResponseHead, ResponseError> {
    let deadline = std::time::Instant::now() + config.limits.upstream_response_timeout;
    loop {
        if !origin.data().is_empty() {
            match head::parse_response(origin.data(), method, config.limits.max_headers) {
                Ok(Parsed::Complete(response)) => {
                    origin.consume(response.len);
                    return Ok(response);
                }
                Ok(Parsed::Partial) if origin.data().len() > config.limits.max_header_bytes => {
                    return Err(ResponseError::Invalid)
                }
                Ok(Parsed::Partial) => {}
                Err(_) => return Err(ResponseError::Invalid),
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match origin.fill_within(left).await {
            Ok(0) if origin.data().is_empty() => return Err(ResponseError::ClosedEarly),
            Ok(0) => return Err(ResponseError::Invalid),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(ResponseError::TimedOut),
            Err(_) if origin.data().is_empty() => return Err(ResponseError::ClosedEarly),
            Err(_) => return Err(ResponseError::Invalid),
        }
    }
}

/// After `101 Switching Protocols`: relay the head, then bytes both ways until both close.
async fn tunnel(
    client: &mut Client,
    origin: &mut Origin,
    response: head::ResponseHead,
    protocol: &str,
) -> Attempt {
    metrics::response(101);
    client.queue(&response.client);
    client.queue(format!("Connection: upgrade\r\nUpgrade: {protocol}\r\n\r\n").as_bytes());
    // Bytes either side sent after the heads are already buffered: pass them on first.
    let pending_up = origin.data().to_vec();
    origin.consume(pending_up.len());
    client.queue(&pending_up);
    let pending_down = client.data().to_vec();
    client.consume(pending_down.len());
    origin.queue(&pending_down);
    if client.flush().await.is_err() || origin.flush().await.is_err() {
        return Attempt::Done {
            next: Next::Close,
            reusable: false,
        };
    }
    let _ = crate::upstream::tunnel::copy_bidirectional(&mut client.io, &mut origin.io).await;
    Attempt::Done {
        next: Next::Close,
        reusable: false,
    }
}
