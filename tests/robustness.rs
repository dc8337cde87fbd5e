//! Failures and hostile input: dead origins, malformed and oversized requests, smuggling
//! shapes, non-TLS clients and slow clients. ferrule must answer with the right status,
//! close what must be closed, forward nothing it refused, and keep serving.

mod common;

use std::io::{self, Write};
use std::time::{Duration, Instant};

use common::*;

fn start(backend: &Backend) -> (Pki, Ferrule) {
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr).start();
    (pki, ferrule)
}

/// Sends `request` on a new connection; returns the response and whether ferrule then
/// closed the connection.
fn send_raw(ferrule: &Ferrule, pki: &Pki, request: &[u8]) -> (Response, bool) {
    let mut client = Client::connect(ferrule.port, &tls13(pki));
    client.send(request);
    let response = client.response("GET");
    let closed = client.is_closed_by_peer();
    (response, closed)
}

#[test]
fn connections_land_on_every_core() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13(&pki);
    // Client threads on different CPUs, as real clients' packets arrive on different CPUs.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let config = config.clone();
            let port = ferrule.port;
            std::thread::spawn(move || {
                on_cpu(t, || {
                    for _ in 0..50 {
                        assert_eq!(get(port, &config, "/core").status, 200);
                    }
                })
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let metrics = ferrule.metrics();
    let per_core: Vec<f64> = ["0", "1"]
        .iter()
        .map(|core| metrics.sum("ferrule_connections_accepted_total", &[("core", core)]))
        .collect();
    assert_eq!(per_core.iter().sum::<f64>(), 200.0, "{per_core:?}");
    assert!(
        per_core.iter().all(|n| *n > 0.0),
        "200 connections should reach both cores, got {per_core:?}"
    );
}

#[test]
fn unreachable_backend_gets_502() {
    let pki = Pki::new();
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ferrule = Launch::new(&pki, dead).start();
    let response = get(ferrule.port, &tls13(&pki), "/nobody-home");
    assert_eq!(response.status, 502);
    let failures = ferrule
        .metrics()
        .sum("ferrule_upstream_connect_failures_total", &[]);
    assert!(failures >= 1.0);
}

#[test]
fn backend_dying_mid_response_closes_the_client_connection() {
    let backend = Backend::start(|request, conn| {
        if request.target == "/die" {
            let out = conn.get_mut();
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")?;
            out.write_all(&[b'x'; 1000])?;
            return Ok(After::Close);
        }
        respond(conn.get_mut(), 200, &[], b"alive")?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let config = tls13(&pki);
    let mut client = Client::connect(ferrule.port, &config);
    client.send(b"GET /die HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let started = Instant::now();
    let error = client
        .try_response("GET")
        .expect_err("a truncated body cannot be a complete response");
    assert!(
        !matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "the client connection hung instead of closing: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let next = get(ferrule.port, &config, "/after");
    assert_eq!(next.status, 200);
    assert_eq!(next.body, b"alive");
}

#[test]
fn malformed_request_gets_400_and_close() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let (response, closed) = send_raw(&ferrule, &pki, b"GET /x HT TP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(response.status, 400);
    assert!(closed, "ferrule should close after a malformed request");
    let (response, closed) = send_raw(&ferrule, &pki, b"NOT A REQUEST\r\n\r\n");
    assert_eq!(response.status, 400);
    assert!(closed);
    assert_eq!(backend.connections(), 0, "nothing should reach the origin");
}

#[test]
fn content_length_with_transfer_encoding_gets_400_and_never_reaches_the_backend() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let (response, closed) = send_raw(
        &ferrule,
        &pki,
        b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /inner HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(response.status, 400);
    assert!(closed);
    assert_eq!(backend.connections(), 0, "the origin must receive nothing");
    assert!(backend.requests().is_empty());
}

#[test]
fn two_different_content_lengths_get_400() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let (response, closed) = send_raw(
        &ferrule,
        &pki,
        b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    );
    assert_eq!(response.status, 400);
    assert!(closed);
    assert_eq!(backend.connections(), 0);
}

#[test]
fn bad_chunk_size_gets_400_and_is_not_forwarded_as_a_second_request() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    for bad_size in ["zz", "-1", "0x5", " 5"] {
        let request = format!(
            "POST /chunky HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n{bad_size}\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let (response, closed) = send_raw(&ferrule, &pki, request.as_bytes());
        assert_eq!(response.status, 400, "chunk size {bad_size:?}");
        assert!(closed, "chunk size {bad_size:?}");
    }
    // Whatever the origin may have seen of the broken bodies, it must never see the
    // bytes after them as a request of their own.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        backend.requests_to("/smuggled").is_empty(),
        "{:?}",
        backend.requests()
    );
    assert!(
        backend.requests_to("/chunky").is_empty(),
        "a broken body was completed"
    );
}

#[test]
fn request_line_too_long_gets_414() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let request = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
    let (response, closed) = send_raw(&ferrule, &pki, request.as_bytes());
    assert_eq!(response.status, 414);
    assert!(closed);
    assert_eq!(backend.connections(), 0);
}

#[test]
fn header_too_large_gets_431() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(33_000)
    );
    let (response, closed) = send_raw(&ferrule, &pki, request.as_bytes());
    assert_eq!(response.status, 431);
    assert!(closed);
    let many = format!(
        "GET /many HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X-A: b\r\n".repeat(150)
    );
    let (response, _) = send_raw(&ferrule, &pki, many.as_bytes());
    assert_eq!(response.status, 431);
    assert_eq!(backend.connections(), 0);
}

#[test]
fn garbage_instead_of_client_hello_is_counted_and_closed() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00],
    ] {
        let mut raw = tcp_connect(ferrule.port);
        raw.write_all(&garbage).unwrap();
        assert!(
            closed_by_peer(&mut raw),
            "ferrule kept a non-TLS connection open"
        );
    }
    ferrule.wait_metric(
        "ferrule_handshake_failures_total",
        &[("reason", "bad_client_hello")],
        |n| n >= 2.0,
    );
    let response = get(ferrule.port, &tls13(&pki), "/still-serving");
    assert_eq!(response.status, 200);
}

#[test]
fn slow_request_head_gets_408() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .config(&pki.dir, "[limits]\nrequest_header_timeout_ms = 300\n")
        .start();
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let started = Instant::now();
    client.send(b"GET /slowloris HTTP/1.1\r\nHost: a\r\n");
    let response = client.response("GET");
    assert_eq!(response.status, 408);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "408 after {took:?}"
    );
    assert!(client.is_closed_by_peer());
    assert_eq!(backend.connections(), 0);
}

#[test]
fn origin_closing_without_a_response_gets_502() {
    let backend = Backend::start(|_, _| Ok(After::Close));
    let (pki, ferrule) = start(&backend);
    let response = get(ferrule.port, &tls13(&pki), "/hang-up");
    assert_eq!(response.status, 502);
}

#[test]
fn slow_origin_gets_504() {
    let backend = Backend::start(|_, conn| {
        std::thread::sleep(Duration::from_millis(2000));
        respond(conn.get_mut(), 200, &[], b"late")?;
        Ok(After::KeepAlive)
    });
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .config(&pki.dir, "[limits]\nupstream_response_timeout_ms = 300\n")
        .start();
    let started = Instant::now();
    let response = get(ferrule.port, &tls13(&pki), "/slow-origin");
    assert_eq!(response.status, 504);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn silent_client_is_dropped_at_the_handshake_timeout() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .config(&pki.dir, "[limits]\nhandshake_timeout_ms = 300\n")
        .start();
    let mut raw = tcp_connect(ferrule.port);
    let started = Instant::now();
    assert!(
        closed_by_peer(&mut raw),
        "a client that sends nothing was kept"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    ferrule.wait_metric(
        "ferrule_handshake_failures_total",
        &[("reason", "timeout")],
        |n| n >= 1.0,
    );
}

#[test]
fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .config(&pki.dir, "[limits]\nidle_timeout_ms = 300\n")
        .start();
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response = client.exchange(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(response.status, 200);
    let started = Instant::now();
    assert!(
        client.is_closed_by_peer(),
        "the idle connection stayed open"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn last_response_on_a_connection_announces_the_close() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .config(&pki.dir, "[limits]\nmax_requests_per_connection = 3\n")
        .start();
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    for i in 1..=3 {
        let response = client.exchange(b"GET /limited HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(response.status, 200);
        let expected = if i == 3 { Some("close") } else { None };
        assert_eq!(response.header("Connection"), expected, "response {i}");
    }
    assert!(client.is_closed_by_peer());
}

#[test]
fn ambiguous_request_framings_get_400_and_never_reach_the_backend() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let shapes: [&[u8]; 8] = [
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
          Transfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ];
    for shape in shapes {
        let (response, closed) = send_raw(&ferrule, &pki, shape);
        let shown = String::from_utf8_lossy(shape);
        assert_eq!(response.status, 400, "{shown}");
        assert!(closed, "{shown}");
    }
    assert_eq!(backend.connections(), 0, "{:?}", backend.requests());
}

#[test]
fn origin_with_conflicting_content_lengths_gets_502() {
    let backend = Backend::start(|_, conn| {
        conn.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\nok")?;
        Ok(After::Close)
    });
    let (pki, ferrule) = start(&backend);
    let response = get(ferrule.port, &tls13(&pki), "/split");
    assert_eq!(response.status, 502);
}
