//! TLS session resumption with real clients: the partitioned session cache (`cache`) and
//! stateless tickets (`tickets`), TLS 1.3 and 1.2, rustls and `openssl s_client`.

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use rustls::{ClientConfig, HandshakeKind};

const RECONNECTS: usize = 200;

/// Connects, asserts the handshake kind, and makes one request (which also collects the
/// TLS 1.3 tickets the server sends after the handshake).
fn visit(port: u16, config: &Arc<ClientConfig>, expected: HandshakeKind, what: &str) {
    let mut client = Client::connect(port, config);
    assert_eq!(client.conn().handshake_kind(), Some(expected), "{what}");
    let response =
        client.exchange(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(response.status, 200, "{what}");
}

fn rustls_reconnects_all_resume(resumption: &str, version: &str) {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .args(["--resumption", resumption])
        .start();
    let config = if version == "1.3" {
        tls13(&pki)
    } else {
        tls12(&pki)
    };
    // Alternate the client's CPU, so that sessions issued on one core are resumed on both.
    on_cpu(0, || {
        visit(ferrule.port, &config, HandshakeKind::Full, "first")
    });
    for i in 1..RECONNECTS {
        let what = format!("reconnect {i} ({resumption}, TLS {version})");
        on_cpu(i, || {
            visit(ferrule.port, &config, HandshakeKind::Resumed, &what)
        });
    }
    let metrics = ferrule.wait_metric("ferrule_handshakes_total", &[("version", version)], |n| {
        n >= RECONNECTS as f64
    });
    let resumed = metrics.sum(
        "ferrule_handshakes_total",
        &[("kind", "resumed"), ("version", version)],
    );
    let full = metrics.sum("ferrule_handshakes_total", &[("kind", "full")]);
    assert_eq!(resumed, (RECONNECTS - 1) as f64, "{}", metrics.text);
    assert_eq!(full, 1.0);
    for core in ["0", "1"] {
        let accepted = metrics.sum("ferrule_connections_accepted_total", &[("core", core)]);
        let resumed_here = metrics.sum(
            "ferrule_handshakes_total",
            &[("core", core), ("kind", "resumed")],
        );
        assert!(
            accepted > 0.0 && resumed_here > 0.0,
            "core {core}: {accepted} accepted, {resumed_here} resumed; both cores must resume"
        );
    }
}

#[test]
fn cache_mode_resumes_every_tls13_reconnect() {
    rustls_reconnects_all_resume("cache", "1.3");
}

#[test]
fn cache_mode_resumes_every_tls12_reconnect() {
    rustls_reconnects_all_resume("cache", "1.2");
}

#[test]
fn tickets_mode_resumes_every_tls13_reconnect() {
    rustls_reconnects_all_resume("tickets", "1.3");
}

#[test]
fn tickets_mode_resumes_every_tls12_reconnect() {
    rustls_reconnects_all_resume("tickets", "1.2");
}

/// One `openssl s_client` connection that sends a GET and reads the response; returns
/// its stdout (which says `New, TLSv1.x` or `Reused, TLSv1.x`).
fn s_client(
    port: u16,
    pki: &Pki,
    version: &str,
    sess_in: Option<&Path>,
    sess_out: Option<&Path>,
) -> String {
    let mut command = Command::new("openssl");
    command
        .arg("s_client")
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-ign_eof",
        ])
        .arg(if version == "1.3" {
            "-tls1_3"
        } else {
            "-tls1_2"
        })
        .arg("-CAfile")
        .arg(&pki.ca_pem);
    if let Some(file) = sess_in {
        command.arg("-sess_in").arg(file);
    }
    if let Some(file) = sess_out {
        command.arg("-sess_out").arg(file);
    }
    let out = run_with_timeout(
        &mut command,
        b"GET /ossl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("HTTP/1.1 200"),
        "no response through s_client:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn openssl_reconnects_resume(resumption: &str, version: &str) {
    const RUNS: usize = 25;
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr)
        .args(["--resumption", resumption])
        .start();
    let session = pki.dir.join(&format!("sess-{resumption}-{version}.pem"));
    let out = on_cpu(0, || {
        s_client(ferrule.port, &pki, version, None, Some(&session))
    });
    assert!(out.contains(&format!("New, TLSv{version}")), "{out}");
    for i in 1..RUNS {
        // s_client inherits the CPU: successive sessions cross between the cores.
        let out = on_cpu(i, || {
            s_client(ferrule.port, &pki, version, Some(&session), Some(&session))
        });
        assert!(
            out.contains(&format!("Reused, TLSv{version}")),
            "reconnect {i} did not resume ({resumption}):\n{out}"
        );
    }
    let metrics = ferrule.metrics();
    let resumed = |core: &str| {
        metrics.sum(
            "ferrule_handshakes_total",
            &[("core", core), ("kind", "resumed"), ("version", version)],
        )
    };
    assert_eq!(resumed("0") + resumed("1"), (RUNS - 1) as f64);
    assert!(resumed("0") > 0.0 && resumed("1") > 0.0, "{}", metrics.text);
}

#[test]
fn openssl_reconnects_resume_in_cache_mode() {
    openssl_reconnects_resume("cache", "1.3");
    openssl_reconnects_resume("cache", "1.2");
}

#[test]
fn openssl_reconnects_resume_in_tickets_mode() {
    openssl_reconnects_resume("tickets", "1.3");
    openssl_reconnects_resume("tickets", "1.2");
}

#[test]
fn cache_mode_tls13_tickets_resume_only_once() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let ferrule = Launch::new(&pki, backend.addr).start();
    let session = pki.dir.join("once.pem");
    s_client(ferrule.port, &pki, "1.3", None, Some(&session));
    let first = s_client(ferrule.port, &pki, "1.3", Some(&session), None);
    assert!(first.contains("Reused, TLSv1.3"), "{first}");
    let second = s_client(ferrule.port, &pki, "1.3", Some(&session), None);
    assert!(
        second.contains("New, TLSv1.3"),
        "a single-use ticket resumed twice:\n{second}"
    );
    let replayed = ferrule.metrics().sum(
        "ferrule_resumption_fallbacks_total",
        &[("reason", "replayed")],
    );
    assert_eq!(replayed, 1.0);
}

fn generate_keys(file: &Path, keep: usize) {
    let args: Vec<OsString> = vec![
        "ticket-keys".into(),
        "generate".into(),
        file.into(),
        "--keep".into(),
        keep.to_string().into(),
    ];
    let out = run_ferrule(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn with_key_file(pki: &Pki, backend: &Backend, file: &Path) -> Ferrule {
    Launch::new(pki, backend.addr)
        .args(["--resumption", "tickets", "--ticket-key-file"])
        .arg(file)
        .start()
}

#[test]
fn shared_ticket_keys_resume_on_another_process_and_after_a_restart() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let keys = pki.dir.join("tickets.key");
    generate_keys(&keys, 0);
    for (version, config) in [("1.3", tls13(&pki)), ("1.2", tls12(&pki))] {
        let first = with_key_file(&pki, &backend, &keys);
        visit(first.port, &config, HandshakeKind::Full, "first process");
        let second = with_key_file(&pki, &backend, &keys);
        visit(
            second.port,
            &config,
            HandshakeKind::Resumed,
            &format!("TLS {version}: second process, same key file"),
        );
        drop(first);
        drop(second);
        let restarted = with_key_file(&pki, &backend, &keys);
        visit(
            restarted.port,
            &config,
            HandshakeKind::Resumed,
            &format!("TLS {version}: after a restart"),
        );
    }
}

/// Waits until every core has installed at least `n` ticket key sets.
fn wait_rotations(ferrule: &Ferrule, n: f64) {
    for core in ["0", "1"] {
        ferrule.wait_metric(
            "ferrule_ticket_key_rotations_total",
            &[("core", core)],
            |got| got >= n,
        );
    }
}

#[test]
fn tickets_sealed_with_a_retired_key_get_a_full_handshake() {
    let backend = Backend::echo();
    let pki = Pki::new();
    let keys = pki.dir.join("rotate.key");
    generate_keys(&keys, 0);
    let ferrule = with_key_file(&pki, &backend, &keys);
    for (version, config) in [("1.3", tls13(&pki)), ("1.2", tls12(&pki))] {
        let rotations = ferrule
            .metrics()
            .sum("ferrule_ticket_key_rotations_total", &[("core", "0")])
            .min(
                ferrule
                    .metrics()
                    .sum("ferrule_ticket_key_rotations_total", &[("core", "1")]),
            );
        visit(ferrule.port, &config, HandshakeKind::Full, "fresh client");
        visit(
            ferrule.port,
            &config,
            HandshakeKind::Resumed,
            "second visit",
        );

        // A new key with the old one kept for opening: old tickets still resume.
        generate_keys(&keys, 1);
        ferrule.signal(libc::SIGHUP);
        wait_rotations(&ferrule, rotations + 1.0);
        visit(
            ferrule.port,
            &config,
            HandshakeKind::Resumed,
            &format!("TLS {version}: old key kept"),
        );

        // A new key alone: the client's tickets were sealed with a retired key.
        generate_keys(&keys, 0);
        ferrule.signal(libc::SIGHUP);
        wait_rotations(&ferrule, rotations + 2.0);
        visit(
            ferrule.port,
            &config,
            HandshakeKind::Full,
            &format!("TLS {version}: key retired"),
        );
    }
    let wrong_key = ferrule.metrics().sum(
        "ferrule_resumption_fallbacks_total",
        &[("reason", "wrong_key")],
    );
    assert!(wrong_key >= 2.0, "retired-key tickets counted: {wrong_key}");
}

#[test]
fn world_readable_ticket_key_file_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;

    let pki = Pki::new();
    let keys = pki.dir.join("open.key");
    generate_keys(&keys, 0);
    let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ticket-keys generate should write mode 0600");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = Launch::new(&pki, "127.0.0.1:9".parse().unwrap()).command_line();
    args.extend([
        "--resumption".into(),
        "tickets".into(),
        "--ticket-key-file".into(),
    ]);
    args.push(keys.clone().into());
    let out = run_ferrule(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&keys.display().to_string()) && stderr.contains("readable"),
        "the message should name the file and the problem: {stderr}"
    );
}
