//! The process as an operator sees it: configuration errors, graceful drain, TCP mode.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Runs `ferrule serve` with a config file holding `text`; returns the file, the exit code
/// and stderr.
fn serve_with_config(
    pki: &Pki,
    name: &str,
    text: &str,
) -> (std::path::PathBuf, Option<i32>, String) {
    let config = pki.dir.join(name);
    std::fs::write(&config, text).unwrap();
    let mut args = Launch::new(pki, "127.0.0.1:9".parse().unwrap()).command_line();
    args.push("--config".into());
    args.push(config.clone().into());
    let out = run_ferrule(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (config, out.status.code(), stderr)
}

#[test]
fn misspelt_config_key_exits_2_naming_the_key_and_line() {
    let pki = Pki::new();
    let (config, code, stderr) =
        serve_with_config(&pki, "bad.toml", "[limits]\nidle_timout_ms = 5\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("idle_timout_ms"),
        "the key is not named: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:2:", config.display())),
        "file and line 2 are not named: {stderr}"
    );
}

#[test]
fn out_of_range_value_exits_2_naming_the_dotted_key_and_line() {
    let pki = Pki::new();
    let text = "# limits\n\n[limits]\nidle_timeout_ms = 0\n";
    let (_, code, stderr) = serve_with_config(&pki, "zero.toml", text);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(":4: limits.idle_timeout_ms"), "{stderr}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let body = pattern(200_000, 5);
    let reply = body.clone();
    let backend = Backend::start(move |request, conn| {
        if request.target == "/slow" {
            std::thread::sleep(Duration::from_millis(1500));
        }
        respond(conn.get_mut(), 200, &[], &reply)?;
        Ok(After::KeepAlive)
    });
    let pki = Pki::new();
    let mut ferrule = Launch::new(&pki, backend.addr).start();
    let config = tls13(&pki);
    let port = ferrule.port;
    let client = std::thread::spawn(move || {
        let mut client = Client::connect(port, &config);
        client.send(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let response = client.try_response("GET");
        let closed = client.is_closed_by_peer();
        (response, closed)
    });
    backend.wait_requests_to("/slow", 1);
    ferrule.signal(libc::SIGTERM);
    let (response, closed) = client.join().expect("client thread");
    let response = response.expect("the in-flight request should complete during the drain");
    assert_eq!(response.status, 200);
    assert!(response.body == body, "the drained response was cut short");
    assert_eq!(
        response.header("Connection"),
        Some("close"),
        "the drain is announced"
    );
    assert!(
        closed,
        "a draining ferrule closes the keep-alive connection"
    );
    let status = ferrule.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", ferrule.log_text());
}

#[test]
fn sigterm_during_start_up_drains_instead_of_killing() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;

    // A supervisor may stop or reload ferrule the moment it starts. The signal is sent at
    // ferrule's first log line, while the certificates load and before the shards exist.
    let backend = Backend::echo();
    let pki = Pki::new();
    let mut child = std::process::Command::new(ferrule_bin())
        .args(Launch::new(&pki, backend.addr).command_line())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferrule");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    // SAFETY: kill(2) with the pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);

    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    let log = format!("{first}\n{}", rest.join("\n"));
    assert_eq!(status.signal(), None, "killed by the signal:\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("draining"), "{log}");
}

#[test]
fn tcp_mode_copies_bytes_both_ways() {
    // A non-HTTP origin: greets first, then answers every byte transformed, and records
    // everything it received.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.write_all(b"HELLO\n").unwrap();
        let mut buf = vec![0u8; 65536];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    let answer: Vec<u8> = buf[..n].iter().map(|b| b ^ 0x55).collect();
                    if stream.write_all(&answer).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, origin).args(["--mode", "tcp"]).start();
    let mut client = Client::connect(ferrule.port, &tls13(&pki));
    let mut greeting = [0u8; 6];
    client.io.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"HELLO\n");
    let sent = pattern(1 << 20, 99);
    for piece in sent.chunks(64 * 1024) {
        client.send(piece);
        let mut back = vec![0u8; piece.len()];
        client
            .io
            .read_exact(&mut back)
            .expect("bytes back through the tunnel");
        let expected: Vec<u8> = piece.iter().map(|b| b ^ 0x55).collect();
        assert!(back == expected, "the origin's bytes changed on the way");
    }
    assert!(
        *received.lock().unwrap() == sent,
        "the client's bytes changed on the way"
    );
}

#[test]
fn sighup_applies_a_good_config_and_keeps_serving_through_a_bad_one() {
    let old = Backend::start(|_, conn| {
        respond(conn.get_mut(), 200, &[], b"old")?;
        Ok(After::KeepAlive)
    });
    let new = Backend::start(|_, conn| {
        respond(conn.get_mut(), 200, &[], b"new")?;
        Ok(After::KeepAlive)
    });
    let pki = Pki::new();
    let config = pki.dir.join("reload.toml");
    let backend_toml = |addr: std::net::SocketAddr| format!("[[backend]]\naddress = \"{addr}\"\n");
    std::fs::write(&config, backend_toml(old.addr)).unwrap();
    let ferrule = Launch::without_backend(&pki).config_file(&config).start();
    let client = tls13(&pki);
    assert_eq!(get(ferrule.port, &client, "/r").body, b"old");

    std::fs::write(&config, "[limits]\nidle_timout_ms = 5\n").unwrap();
    ferrule.signal(libc::SIGHUP);
    for core in ["0", "1"] {
        ferrule.wait_metric(
            "ferrule_reloads_total",
            &[("core", core), ("result", "failed")],
            |n| n >= 1.0,
        );
    }
    assert_eq!(get(ferrule.port, &client, "/r").body, b"old");

    std::fs::write(&config, backend_toml(new.addr)).unwrap();
    ferrule.signal(libc::SIGHUP);
    for core in ["0", "1"] {
        ferrule.wait_metric(
            "ferrule_reloads_total",
            &[("core", core), ("result", "ok")],
            |n| n >= 1.0,
        );
    }
    for i in 0..10 {
        on_cpu(i, || {
            assert_eq!(get(ferrule.port, &client, "/r").body, b"new", "request {i}");
        });
    }
}

#[test]
fn tcp_mode_passes_a_half_close_and_ends_with_close_notify() {
    // The origin reads until the client is done sending, then answers and closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        let _ = stream.write_all(format!("GOT {}\n", got.len()).as_bytes());
    });
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, origin).args(["--mode", "tcp"]).start();
    let mut tls = tls_connect(ferrule.port, &tls13(&pki));
    tls.write_all(&[7u8; 5000]).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    let mut answer = Vec::new();
    let read = tls.read_to_end(&mut answer);
    assert_eq!(String::from_utf8_lossy(&answer), "GOT 5000\n");
    assert!(
        read.is_ok(),
        "the stream should end with close_notify, not a bare TCP close: {read:?}"
    );
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_without_waiting_for_the_drain_timeout() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let mut ferrule = Launch::new(&pki, backend.addr).start();
    let config = tls13(&pki);
    let mut idle: Vec<Client> = (0..4)
        .map(|i| {
            on_cpu(i, || {
                let mut client = Client::connect(ferrule.port, &config);
                let response = client.exchange(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n");
                assert_eq!(response.status, 200);
                client
            })
        })
        .collect();
    let started = std::time::Instant::now();
    ferrule.signal(libc::SIGTERM);
    let status = ferrule.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections held the drain for {:?}",
        started.elapsed()
    );
    for client in &mut idle {
        assert!(client.is_closed_by_peer());
    }
}

/// What `ss` says of ferrule's side of the TCP connection that `client` opened.
fn server_side_socket(ferrule_port: u16, client: &std::net::TcpStream) -> String {
    let client_port = client.local_addr().unwrap().port();
    let filter = format!("( sport = :{ferrule_port} and dport = :{client_port} )");
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn accepted_connections_inherit_keepalive_from_the_listener_and_follow_a_reload() {
    let backend = Backend::start(|_, conn| {
        respond(conn.get_mut(), 200, &[], b"ok")?;
        Ok(After::KeepAlive)
    });
    let pki = Pki::new();
    let config = pki.dir.join("sockets.toml");
    std::fs::write(&config, "[socket]\nkeepalive_idle_seconds = 300\n").unwrap();
    let ferrule = Launch::new(&pki, backend.addr).config_file(&config).start();

    // A connection still in its handshake is enough: the options come with accept().
    let first = std::net::TcpStream::connect(ferrule.addr()).unwrap();
    let line = wait_until(TIMEOUT, "ferrule's side of the connection", || {
        let line = server_side_socket(ferrule.port, &first);
        (!line.is_empty()).then_some(line)
    });
    assert!(
        line.contains("timer:(keepalive,4min") || line.contains("timer:(keepalive,5min"),
        "expected a 300 s keepalive timer: {line}"
    );

    std::fs::write(&config, "[socket]\nkeepalive_idle_seconds = 0\n").unwrap();
    ferrule.signal(libc::SIGHUP);
    for core in ["0", "1"] {
        ferrule.wait_metric(
            "ferrule_reloads_total",
            &[("core", core), ("result", "ok")],
            |n| n >= 1.0,
        );
    }
    for _ in 0..4 {
        let later = std::net::TcpStream::connect(ferrule.addr()).unwrap();
        let line = wait_until(TIMEOUT, "ferrule's side of the connection", || {
            let line = server_side_socket(ferrule.port, &later);
            (!line.is_empty()).then_some(line)
        });
        assert!(
            !line.contains("keepalive"),
            "keepalive still on after the reload: {line}"
        );
    }
}
