//! HTTP/1.1 proxying through a real ferrule to a real origin: bodies, framing, connection
//! handling and header rewriting.

mod common;

use std::io::{BufRead, Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;

fn start(backend: &Backend) -> (Pki, Ferrule) {
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr).start();
    (pki, ferrule)
}

#[test]
fn get_and_post_arrive_byte_exact() {
    let body = pattern(1 << 20, 7);
    let reply = body.clone();
    let backend = Backend::start(move |request, conn| {
        let out = if request.method == "GET" {
            reply.clone()
        } else {
            request.body.clone()
        };
        respond(conn.get_mut(), 200, &[("X-Origin", "yes")], &out)?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));

    let got = client.exchange(b"GET /get?q=1 HTTP/1.1\r\nHost: localhost\r\nX-Test: a b\r\n\r\n");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("X-Origin"), Some("yes"));
    assert_eq!(digest(&got.body), digest(&body), "GET body differs");

    let mut post = format!(
        "POST /post HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(&body);
    let echoed = client.exchange(&post);
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.body.len(), body.len());
    assert!(echoed.body == body, "POST echo differs");

    let seen = backend.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("GET", "/get?q=1")
    );
    assert_eq!(seen[0].header("X-Test"), Some("a b"));
    assert_eq!(seen[0].header("Host"), Some("localhost"));
    assert_eq!(seen[1].method, "POST");
    assert!(
        seen[1].body == body,
        "the origin received a different POST body"
    );
}

#[test]
fn a_64_mib_body_crosses_both_ways_intact() {
    const SIZE: usize = 64 << 20;
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let body = pattern(SIZE, 64);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let mut request =
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n")
            .into_bytes();
    request.extend_from_slice(&body);
    let response = client.exchange(&request);
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), SIZE);
    assert_eq!(
        digest(&response.body),
        digest(&body),
        "downloaded bytes differ"
    );
    let seen = backend.requests_to("/upload");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        digest(&seen[0].body),
        digest(&body),
        "uploaded bytes differ"
    );
}

#[test]
fn chunked_request_and_chunked_response_are_relayed() {
    let backend = Backend::start(|request, conn| {
        // Answer in chunks of odd sizes, with a chunk extension.
        let out = conn.get_mut();
        out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        for piece in request.body.chunks(1000) {
            write!(out, "{:x};ext=1\r\n", piece.len())?;
            out.write_all(piece)?;
            out.write_all(b"\r\n")?;
        }
        out.write_all(b"0\r\n\r\n")?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let body = pattern(100_000, 3);
    let mut request =
        b"POST /chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(7777) {
        request.extend_from_slice(format!("{:X}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response = client.exchange(&request);
    assert_eq!(response.status, 200);
    assert!(
        response.chunked,
        "an HTTP/1.1 client should get the chunked response chunked"
    );
    assert!(response.body == body, "chunked response body differs");
    let seen = backend.requests_to("/chunked");
    assert!(
        seen[0].chunked,
        "the upload should reach the origin chunked"
    );
    assert!(seen[0].body == body, "chunked request body differs");
    // The connection is still usable afterwards.
    let again =
        client.exchange(b"POST /chunked HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(again.body, b"hi");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let backend = Backend::start(|request, conn| {
        // Later requests answer faster, so out-of-order handling would show.
        let index: u64 = request
            .target
            .trim_start_matches("/p/")
            .parse()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(5 * (8 - index.min(8))));
        respond(conn.get_mut(), 200, &[], request.target.as_bytes())?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let mut batch = Vec::new();
    for i in 0..8 {
        batch.extend_from_slice(
            format!("GET /p/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        );
    }
    client.send(&batch);
    for i in 0..8 {
        let response = client.response("GET");
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), format!("/p/{i}"));
    }
}

#[test]
fn backend_sees_fewer_connections_than_requests() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let config = tls13(&pki);
    let mut requests = 0;
    for c in 0..4 {
        let mut client = Client::connect(ferrule.port, &config);
        for r in 0..25 {
            let path = format!("/ka/{c}/{r}");
            let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
            let response = client.exchange(req.as_bytes());
            assert_eq!(response.status, 200);
            assert_eq!(
                response.header("Connection"),
                None,
                "keep-alive needs no header"
            );
            requests += 1;
        }
    }
    assert_eq!(backend.requests().len(), requests);
    let connections = backend.connections();
    assert!(
        connections <= 4,
        "{requests} requests over 4 client connections used {connections} origin connections"
    );
    let reuses = ferrule.metrics().sum("ferrule_upstream_reuses_total", &[]);
    assert!(reuses >= (requests - 4) as f64, "pool reuses: {reuses}");
}

#[test]
fn http10_client_gets_a_close_delimited_body_not_chunks() {
    let backend = Backend::start(|_, conn| {
        conn.get_mut().write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    client.send(b"GET /old HTTP/1.0\r\n\r\n");
    let mut raw = Vec::new();
    client
        .io
        .read_to_end(&mut raw)
        .expect("HTTP/1.0 response until close");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    assert!(head.contains("Connection: close"), "{head}");
    assert_eq!(body, "hello world");
    let seen = backend.requests_to("/old");
    assert_eq!(seen.len(), 1);
}

#[test]
fn http10_keep_alive_client_gets_content_length_and_stays_open() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    for _ in 0..3 {
        let response = client.exchange(b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("Content-Length"), Some("2"));
        assert_eq!(response.header("Connection"), Some("keep-alive"));
        assert_eq!(response.body, b"ok");
    }
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    client.send(
        b"POST /expect HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\
          Content-Length: 11\r\n\r\n",
    );
    let interim = read_response(&mut client.io, "POST").expect("interim response");
    assert_eq!(interim.status, 100, "{}", interim.status_line);
    client.send(b"hello world");
    let response = client.response("POST");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello world");
    let seen = backend.requests_to("/expect");
    assert_eq!(seen[0].header("Expect"), None, "Expect is hop-by-hop here");
    assert_eq!(seen[0].body, b"hello world");
}

#[test]
fn upgrade_is_tunnelled_both_ways() {
    let backend = Backend::start(|request, conn| {
        assert_eq!(request.header("Upgrade"), Some("websocket"));
        conn.get_mut().write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\n\r\n",
        )?;
        // Echo whatever arrives, buffered bytes first, until the client closes.
        loop {
            let data = conn.fill_buf()?.to_vec();
            if data.is_empty() {
                return Ok(After::Close);
            }
            conn.consume(data.len());
            let mut upper = data.to_ascii_uppercase();
            upper.insert(0, b'<');
            conn.get_mut().write_all(&upper)?;
        }
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    client.send(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    let head = read_response(&mut client.io, "GET").expect("101");
    assert_eq!(head.status, 101);
    assert_eq!(head.header("Upgrade"), Some("websocket"));
    for word in ["ping", "frame-two", "third"] {
        client.send(word.as_bytes());
        let mut back = vec![0u8; word.len() + 1];
        client
            .io
            .read_exact(&mut back)
            .expect("echo through the tunnel");
        assert_eq!(back, format!("<{}", word.to_ascii_uppercase()).as_bytes());
    }
}

#[test]
fn hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let backend = Backend::start(|_, conn| {
        conn.get_mut().write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\n\
              Keep-Alive: timeout=5\r\nX-Resp-End: kept\r\n\r\nok",
        )?;
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response = client.exchange(
        b"GET /hop HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, X-Hop\r\n\
          X-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
          Proxy-Connection: keep-alive\r\nTrailer: X-T\r\n\
          X-Forwarded-Proto: http\r\nX-End: kept\r\n\r\n",
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.header("X-Resp-End"), Some("kept"));
    for gone in ["X-Resp-Hop", "Keep-Alive"] {
        assert_eq!(response.header(gone), None, "{gone} reached the client");
    }
    let seen = &backend.requests_to("/hop")[0];
    for gone in ["X-Hop", "Keep-Alive", "TE", "Proxy-Connection", "Trailer"] {
        assert_eq!(
            seen.header(gone),
            None,
            "{gone} reached the origin: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("X-End"), Some("kept"));
    assert_eq!(seen.header("X-Forwarded-For"), Some("127.0.0.1"));
    let protos: Vec<_> = seen
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-proto"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        protos,
        ["https"],
        "a client-sent X-Forwarded-Proto must be replaced"
    );
}

#[test]
fn curl_gets_and_posts_through_the_proxy() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let url = format!("https://localhost:{}/curl", ferrule.port);
    let resolve = format!("localhost:{}:127.0.0.1", ferrule.port);
    let data = pki.dir.join("upload.bin");
    let body = pattern(300_000, 11);
    std::fs::write(&data, &body).unwrap();
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(&pki.ca_pem)
        .args(["--resolve", &resolve, "--data-binary"])
        .arg(format!("@{}", data.display()))
        .arg(&url);
    let out = run_with_timeout(&mut command, b"", TIMEOUT);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == body,
        "curl got {} bytes back",
        out.stdout.len()
    );

    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&pki.ca_pem)
        .args(["--resolve", &resolve])
        .arg(&url);
    let out = run_with_timeout(&mut command, b"", TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let seen = backend.requests_to("/curl");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, "GET");
    assert_eq!(seen[0].header("X-Forwarded-Proto"), Some("https"));
}

#[test]
fn origin_closing_pooled_connections_is_invisible_to_clients() {
    // Every origin connection serves one response (without saying so) and is closed.
    let backend = Backend::start(|request, conn| {
        respond(conn.get_mut(), 200, &[], request.target.as_bytes())?;
        Ok(After::Close)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    for i in 0..30 {
        let target = format!("/stale/{i}");
        let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let response = client.exchange(request.as_bytes());
        assert_eq!(response.status, 200, "request {i}");
        assert_eq!(response.text(), target);
    }
    for i in 0..30 {
        assert_eq!(backend.requests_to(&format!("/stale/{i}")).len(), 1);
    }
}

#[test]
fn close_delimited_response_is_rechunked_for_http11_clients() {
    let body = pattern(50_000, 21);
    let reply = body.clone();
    let backend = Backend::start(move |_, conn| {
        conn.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\n")?;
        conn.get_mut().write_all(&reply)?;
        Ok(After::Close)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    for _ in 0..2 {
        let response = client.exchange(b"GET /eof HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(response.status, 200);
        assert!(response.chunked, "{:?}", response.headers);
        assert!(response.body == body, "close-delimited body differs");
    }
}

#[test]
fn head_response_without_body_keeps_the_connection_usable() {
    let backend = Backend::start(|request, conn| {
        if request.method == "HEAD" {
            conn.get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")?;
        } else {
            respond(conn.get_mut(), 200, &[], b"body")?;
        }
        Ok(After::KeepAlive)
    });
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let head = client.exchange(b"HEAD /h HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(head.status, 200);
    let get = client.exchange(b"GET /h HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(get.status, 200);
    assert_eq!(get.body, b"body");
}

#[test]
fn pipelined_requests_with_bodies_keep_their_boundaries() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let mut batch = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    batch.extend_from_slice(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst");
    batch.extend_from_slice(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          6\r\nsecond\r\n0\r\n\r\n",
    );
    batch.extend_from_slice(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n");
    client.send(&batch);
    for expected in ["ok", "first", "second", "ok"] {
        assert_eq!(client.response("GET").text(), expected);
    }
    let targets: Vec<_> = backend.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/a", "/b", "/c", "/d"]);
}

#[test]
fn client_x_forwarded_for_is_extended_not_replaced() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response = client
        .exchange(b"GET /xff HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n");
    assert_eq!(response.status, 200);
    let seen = &backend.requests_to("/xff")[0];
    assert_eq!(
        seen.header("X-Forwarded-For"),
        Some("203.0.113.9, 127.0.0.1")
    );
}

#[test]
fn http11_request_without_host_gets_400() {
    let backend = Backend::echo();
    let (pki, ferrule) = start(&backend);
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let response = client.exchange(b"GET /nohost HTTP/1.1\r\n\r\n");
    assert_eq!(response.status, 400);
    assert!(client.is_closed_by_peer());
    assert_eq!(backend.connections(), 0);
}
