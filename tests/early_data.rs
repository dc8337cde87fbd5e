//! TLS 1.3 0-RTT (default `cache` resumption): early requests answered and marked, unsafe
//! ones held until the handshake completes, 425 retried, and replayed first flights
//! reaching the origin at most once.

mod common;

use std::io::{BufReader, Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

/// A fresh connection whose TLS 1.3 tickets land in `config`'s session store.
fn collect_ticket(port: u16, config: &Arc<ClientConfig>) {
    let mut client = Client::connect(port, config);
    let response =
        client.exchange(b"GET /ticket HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(response.status, 200);
}

/// A client connection (not yet on any socket) with `request` written as early data.
fn early_connection(config: &Arc<ClientConfig>, request: &[u8]) -> ClientConnection {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut early = conn
        .early_data()
        .expect("the stored ticket should allow early data");
    early
        .write_all(request)
        .expect("request fits in the early data limit");
    conn
}

/// The first flight (ClientHello plus early data) of a 0-RTT connection carrying `request`,
/// as an attacker on the path would record it.
fn first_flight(config: &Arc<ClientConfig>, request: &[u8]) -> Vec<u8> {
    let mut conn = early_connection(config, request);
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    flight
}

/// Sends `flight` raw over `times` new connections at once, from both CPUs, reading each
/// connection until it closes or `read_timeout` passes.
fn replay(port: u16, flight: Vec<u8>, times: usize, read_timeout: Duration) {
    let flight = Arc::new(flight);
    let replays: Vec<_> = (0..times)
        .map(|i| {
            let flight = flight.clone();
            std::thread::spawn(move || {
                on_cpu(i, || {
                    let mut raw = tcp_connect(port);
                    raw.set_read_timeout(Some(read_timeout)).unwrap();
                    raw.write_all(&flight).unwrap();
                    let mut sink = Vec::new();
                    let _ = raw.read_to_end(&mut sink);
                })
            })
        })
        .collect();
    for replay in replays {
        replay.join().unwrap();
    }
}

fn start(backend: &Backend) -> (Pki, Ferrule) {
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr).start();
    (pki, ferrule)
}

#[test]
fn early_get_is_answered_and_marked_for_the_origin() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);

    let target = format!("/{}", unique("early-get"));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let conn = early_connection(&config, request.as_bytes());
    let mut tls = rustls::StreamOwned::new(conn, tcp_connect(ferrule.port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    assert!(
        tls.conn.is_early_data_accepted(),
        "ferrule refused the early data"
    );
    let response = read_final_response(&mut BufReader::new(tls), "GET").expect("response");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"ok");
    let seen = backend.requests_to(&target);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("Early-Data"), Some("1"));
    let metrics = ferrule.metrics();
    assert_eq!(
        metrics.sum("ferrule_early_data_total", &[("result", "accepted")]),
        1.0
    );
    assert_eq!(
        metrics.sum(
            "ferrule_early_requests_total",
            &[("action", "forwarded_early")]
        ),
        1.0
    );
}

#[test]
fn openssl_early_data_is_accepted() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let session = pki.dir.join("early.pem");
    let target = format!("/{}", unique("ossl-early"));
    let request = pki.dir.join("request.txt");
    std::fs::write(
        &request,
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
    .unwrap();
    let s_client = |extra: &[&std::ffi::OsStr], stdin: &[u8]| {
        let mut command = Command::new("openssl");
        command
            .arg("s_client")
            .args(["-connect", &format!("127.0.0.1:{}", ferrule.port)])
            .args(["-servername", "localhost", "-tls1_3", "-ign_eof"])
            .args(["-verify_return_error", "-CAfile"])
            .arg(&pki.ca_pem)
            .args(extra);
        let out = run_with_timeout(&mut command, stdin, TIMEOUT);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = s_client(
        &["-sess_out".as_ref(), session.as_os_str()],
        b"GET /ticket HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(first.contains("HTTP/1.1 200"), "{first}");
    let second = s_client(
        &[
            "-sess_in".as_ref(),
            session.as_os_str(),
            "-early_data".as_ref(),
            request.as_os_str(),
        ],
        b"",
    );
    assert!(second.contains("Early data was accepted"), "{second}");
    assert!(second.contains("HTTP/1.1 200"), "{second}");
    let seen = backend.requests_to(&target);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("Early-Data"), Some("1"));
}

#[test]
fn replayed_first_flight_reaches_the_backend_once() {
    const REPLAYS: usize = 50;
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);

    // The first flight of a 0-RTT connection, as an attacker on the path would record it.
    let target = format!("/{}", unique("replay"));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let flight = first_flight(&config, request.as_bytes());

    // Replay it, all at once, from both CPUs.
    replay(ferrule.port, flight, REPLAYS, Duration::from_secs(2));
    let seen = backend.wait_requests_to(&target, 1);
    let metrics = ferrule.wait_metric("ferrule_connections_accepted_total", &[], |n| {
        n >= (REPLAYS + 1) as f64
    });
    assert_eq!(
        seen.len(),
        1,
        "a replayed early request reached the origin {} times",
        seen.len()
    );
    assert_eq!(backend.requests_to(&target).len(), 1);
    assert_eq!(
        metrics.sum("ferrule_early_data_total", &[("result", "accepted")]),
        1.0,
        "{}",
        metrics.text
    );
    assert_eq!(
        metrics.sum(
            "ferrule_early_data_total",
            &[("result", "refused"), ("reason", "replayed")]
        ),
        (REPLAYS - 1) as f64
    );
}

#[test]
fn early_post_waits_for_the_handshake_and_arrives_once_unmarked() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);

    let target = format!("/{}", unique("early-post"));
    let request = format!(
        "POST {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
         Connection: close\r\n\r\nhello"
    );
    let mut conn = early_connection(&config, request.as_bytes());
    let mut sock = tcp_connect(ferrule.port);
    // First flight out, server flight in; keep the client's Finished back for now.
    while conn.wants_write() {
        conn.write_tls(&mut sock).unwrap();
    }
    while conn.is_handshaking() {
        let n = conn.read_tls(&mut sock).expect("server flight");
        assert!(n > 0, "ferrule closed during the handshake");
        conn.process_new_packets().expect("server flight is valid");
    }
    assert!(conn.is_early_data_accepted());
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(500) {
        assert!(
            backend.requests_to(&target).is_empty(),
            "an early POST reached the origin before the handshake completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Now finish the handshake: the POST must go through, once, as an ordinary request.
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.flush().unwrap();
    let response = read_final_response(&mut BufReader::new(tls), "POST").expect("response");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello");
    let seen = backend.requests_to(&target);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("Early-Data"), None);
    assert_eq!(seen[0].body, b"hello");
    let held = ferrule
        .metrics()
        .sum("ferrule_early_requests_total", &[("action", "held")]);
    assert_eq!(held, 1.0);
}

#[test]
fn origin_425_is_retried_once_after_the_handshake() {
    let backend = Backend::start(|request, conn| {
        if request.header("Early-Data") == Some("1") {
            respond(conn.get_mut(), 425, &[], b"too early")?;
        } else {
            respond(conn.get_mut(), 200, &[], b"now is fine")?;
        }
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);

    let target = format!("/{}", unique("too-early"));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let conn = early_connection(&config, request.as_bytes());
    let mut tls = rustls::StreamOwned::new(conn, tcp_connect(ferrule.port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    assert!(tls.conn.is_early_data_accepted());
    let response = read_final_response(&mut BufReader::new(tls), "GET").expect("response");
    assert_eq!(response.status, 200, "the client should never see the 425");
    assert_eq!(response.body, b"now is fine");
    let seen = backend.requests_to(&target);
    assert_eq!(seen.len(), 2, "one early attempt and one retry");
    assert_eq!(seen[0].header("Early-Data"), Some("1"));
    assert_eq!(seen[1].header("Early-Data"), None);
    let retried = ferrule.metrics().sum(
        "ferrule_early_requests_total",
        &[("action", "retried_after_425")],
    );
    assert_eq!(retried, 1.0);
}

#[test]
fn requests_after_the_handshake_are_not_marked_early() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);

    let early_target = format!("/{}", unique("first"));
    let request = format!("GET {early_target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let conn = early_connection(&config, request.as_bytes());
    let mut tls = rustls::StreamOwned::new(conn, tcp_connect(ferrule.port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    assert!(tls.conn.is_early_data_accepted());
    let mut client = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(client.response("GET").status, 200);
    let later = client.exchange(b"GET /later HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(later.status, 200);
    assert_eq!(
        backend.requests_to(&early_target)[0].header("Early-Data"),
        Some("1")
    );
    assert_eq!(backend.requests_to("/later")[0].header("Early-Data"), None);
}

#[test]
fn a_client_sent_early_data_header_is_not_trusted() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response =
        client.exchange(b"GET /forged HTTP/1.1\r\nHost: localhost\r\nEarly-Data: 1\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_eq!(backend.requests_to("/forged")[0].header("Early-Data"), None);
}

#[test]
fn no_0rtt_is_offered_in_tickets_mode_or_with_early_data_max_0() {
    let backend = Backend::echo();
    let pki = Pki::new();
    for flags in [["--resumption", "tickets"], ["--early-data-max", "0"]] {
        let ferrule = Launch::new(&pki, backend.addr).args(flags).start();
        let config = tls13_early(&pki);
        collect_ticket(ferrule.port, &config);
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = ClientConnection::new(config.clone(), name).unwrap();
        assert!(
            conn.early_data().is_none(),
            "{flags:?}: the ticket should not allow early data"
        );
        // It still resumes.
        let client = Client::connect(ferrule.port, &config);
        assert_eq!(
            client.conn().handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{flags:?}"
        );
    }
}

#[test]
fn early_data_is_accepted_whichever_core_issued_the_ticket() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    for i in 0..10 {
        // A fresh client each time: its only ticket comes from one CPU's connection, and
        // its early connection arrives on the other.
        let config = tls13_early(&pki);
        on_cpu(i, || collect_ticket(ferrule.port, &config));
        let target = format!("/{}", unique("cross"));
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let accepted = on_cpu(i + 1, || {
            let conn = early_connection(&config, request.as_bytes());
            let mut tls = rustls::StreamOwned::new(conn, tcp_connect(ferrule.port));
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).expect("handshake");
            }
            let accepted = tls.conn.is_early_data_accepted();
            let response = read_final_response(&mut BufReader::new(tls), "GET").unwrap();
            assert_eq!(response.status, 200);
            accepted
        });
        assert!(accepted, "iteration {i}: early data refused");
        assert_eq!(
            backend.requests_to(&target)[0].header("Early-Data"),
            Some("1")
        );
    }
    let metrics = ferrule.metrics();
    for core in ["0", "1"] {
        let accepted = metrics.sum(
            "ferrule_early_data_total",
            &[("core", core), ("result", "accepted")],
        );
        assert!(accepted > 0.0, "core {core} accepted no early data");
    }
}

#[test]
fn replayed_early_post_never_reaches_the_backend() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    collect_ticket(ferrule.port, &config);
    let target = format!("/{}", unique("replay-post"));
    let request =
        format!("POST {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nbuy");
    let flight = first_flight(&config, request.as_bytes());
    replay(ferrule.port, flight, 20, Duration::from_secs(1));
    ferrule.wait_metric("ferrule_early_requests_total", &[("action", "held")], |n| {
        n >= 1.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        backend.requests_to(&target).is_empty(),
        "a POST from a replayed first flight reached the origin"
    );
}

#[test]
fn slow_origin_does_not_delay_the_handshake_of_an_early_request() {
    let backend = Backend::start(|_, conn| {
        std::thread::sleep(Duration::from_millis(1500));
        respond(conn.get_mut(), 200, &[], b"slow")?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let config = tls13_early(&pki);
    on_cpu(0, || collect_ticket(ferrule.port, &config));
    let target = format!("/{}", unique("slow-early"));
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let conn = early_connection(&config, request.as_bytes());
    let started = Instant::now();
    let mut tls = rustls::StreamOwned::new(conn, tcp_connect(ferrule.port));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    let handshake = started.elapsed();
    assert!(tls.conn.is_early_data_accepted());
    let response = read_final_response(&mut BufReader::new(tls), "GET").unwrap();
    assert_eq!(response.body, b"slow");
    assert!(
        handshake < Duration::from_millis(1000),
        "the server's handshake flight waited for the origin: {handshake:?}"
    );
}
