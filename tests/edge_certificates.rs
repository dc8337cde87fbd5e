//! Edge certificate behaviour against real peers: SNI selection, strict SNI, ECDSA/RSA choice,
//! OCSP stapling, hot reload, origin TLS with resumption and client certificates.
//!
//! Certificates are made with the `openssl` command line (also needed for the OCSP response),
//! clients are `openssl s_client` and `curl`, origins are real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, wait_until, Ferrule, Launch, TempDir, TIMEOUT};

// ---- fixtures ------------------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`, `ca.key`) in `dir`.
fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=edge test CA",
        ],
    );
}

/// A leaf `NAME.pem`/`NAME.key` signed by the CA, for `names` (first is the CN).
fn make_leaf(dir: &Path, file: &str, names: &[&str], rsa: bool) {
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    std::fs::write(
        dir.join(format!("{file}.ext")),
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\n",
            san.join(",")
        ),
    )
    .unwrap();
    let key = format!("{file}.key");
    let csr = format!("{file}.csr");
    let subject = format!("/CN={}", names[0]);
    let mut req = vec![
        "req", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject,
    ];
    if rsa {
        req.extend(["-newkey", "rsa:2048"]);
    } else {
        req.extend(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    openssl(dir, &req);
    let pem = format!("{file}.pem");
    let ext = format!("{file}.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "30",
            "-extfile",
            &ext,
        ],
    );
}

/// Starts ferrule with `config` (TOML) on ports the kernel picks, with both cores.
fn start(dir: &TempDir, config: &str) -> Ferrule {
    let path = dir.join("ferrule.toml");
    std::fs::write(&path, config).unwrap();
    Launch::with_config_file(&path).start()
}

/// A plain HTTP origin answering 200 with a body naming the request's client-cert header.
fn origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || serve_origin(stream, &log));
        }
    });
    (address, seen)
}

fn serve_origin(mut stream: TcpStream, log: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            log.lock().unwrap().push(head);
            let body = b"origin ok\n";
            let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            if stream
                .write_all(response.as_bytes())
                .and_then(|_| stream.write_all(body))
                .is_err()
            {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Runs `openssl s_client` with `args` against ferrule and returns its output.
fn s_client(port: u16, args: &[&str]) -> String {
    let connect = format!("127.0.0.1:{port}");
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &connect])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn served_subject(port: u16, args: &[&str]) -> String {
    let out = s_client(port, args);
    out.lines()
        .find(|l| l.starts_with("subject="))
        .map(|l| l.trim_start_matches("subject=").trim().to_string())
        .unwrap_or_default()
}

fn curl(port: u16, dir: &Path, host: &str, extra: &[&str]) -> (bool, String) {
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "ca.pem",
            "--resolve",
            &resolve,
        ])
        .args(extra)
        .arg(&url)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn two_names(dir: &Path, origin: SocketAddr) -> String {
    make_ca(dir);
    make_leaf(dir, "a", &["a.test"], false);
    make_leaf(dir, "b", &["*.b.test"], false);
    format!(
        "[tls]\ncert = \"{d}/a.pem\"\nkey = \"{d}/a.key\"\n\
         [[tls.certificate]]\ncert = \"{d}/b.pem\"\nkey = \"{d}/b.key\"\n\
         [[backend]]\naddress = \"{origin}\"\n",
        d = dir.display()
    )
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn sni_picks_exact_wildcard_and_default_certificates() {
    let dir = TempDir::new("edge-sni");
    let (origin, _) = origin();
    let ferrule = start(&dir, &two_names(&dir, origin));

    assert!(served_subject(ferrule.port, &["-servername", "a.test"]).contains("a.test"));
    assert!(served_subject(ferrule.port, &["-servername", "x.b.test"]).contains("*.b.test"));
    // A wildcard covers one label only: deeper names get the default certificate.
    assert!(served_subject(ferrule.port, &["-servername", "y.x.b.test"]).contains("a.test"));
    assert!(served_subject(ferrule.port, &["-servername", "other.test"]).contains("a.test"));
    assert!(served_subject(ferrule.port, &["-noservername"]).contains("a.test"));

    let by_cert = ferrule.metrics().sum(
        "ferrule_handshakes_by_certificate_total",
        &[("cert", "*.b.test")],
    );
    assert!(by_cert >= 1.0);
}

#[test]
fn strict_sni_refuses_unknown_names_with_unrecognized_name() {
    let dir = TempDir::new("edge-strict");
    let (origin, _) = origin();
    let config = two_names(&dir, origin).replace("[tls]\n", "[tls]\nstrict_sni = true\n");
    let ferrule = start(&dir, &config);

    let refused = s_client(ferrule.port, &["-servername", "other.test"]);
    assert!(refused.contains("unrecognized name"), "{refused}");
    assert!(served_subject(ferrule.port, &["-servername", "a.test"]).contains("a.test"));
    let failures = ferrule.metrics().sum(
        "ferrule_handshake_failures_total",
        &[("reason", "unrecognized_name")],
    );
    assert!(failures >= 1.0);
}

#[test]
fn signature_algorithms_choose_between_ecdsa_and_rsa_certificates() {
    let dir = TempDir::new("edge-sigalgs");
    let (origin, _) = origin();
    make_ca(&dir);
    make_leaf(&dir, "ec", &["both.test"], false);
    make_leaf(&dir, "rsa", &["both.test"], true);
    let config = format!(
        "[tls]\ncert = \"{d}/ec.pem\"\nkey = \"{d}/ec.key\"\n\
         [[tls.certificate]]\ncert = \"{d}/rsa.pem\"\nkey = \"{d}/rsa.key\"\n\
         [[backend]]\naddress = \"{origin}\"\n",
        d = dir.display()
    );
    let ferrule = start(&dir, &config);

    let rsa = s_client(
        ferrule.port,
        &[
            "-servername",
            "both.test",
            "-sigalgs",
            "rsa_pss_rsae_sha256",
        ],
    );
    assert!(rsa.contains("Peer signature type: RSA-PSS"), "{rsa}");
    let ec = s_client(
        ferrule.port,
        &["-servername", "both.test", "-sigalgs", "ECDSA+SHA256"],
    );
    assert!(ec.contains("Peer signature type: ECDSA"), "{ec}");
}

/// Makes a DER OCSP response for `leaf.pem` with `openssl ocsp`, acting as the CA's responder.
fn ocsp_response(dir: &Path, leaf: &str, out: &str) {
    let serial = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in", leaf])
        .current_dir(dir)
        .output()
        .unwrap();
    let serial = String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string();
    let subject = Command::new("openssl")
        .args([
            "x509", "-noout", "-subject", "-nameopt", "compat", "-in", leaf,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    let subject = String::from_utf8_lossy(&subject.stdout)
        .trim()
        .trim_start_matches("subject=")
        .to_string();
    std::fs::write(
        dir.join("index.txt"),
        format!("V\t301231235959Z\t\t{serial}\tunknown\t{subject}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "ocsp",
            "-issuer",
            "ca.pem",
            "-cert",
            leaf,
            "-reqout",
            "req.der",
            "-no_nonce",
        ],
    );
    openssl(
        dir,
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-reqin",
            "req.der",
            "-respout",
            out,
            "-ndays",
            "2",
        ],
    );
}

#[test]
fn a_matching_ocsp_response_is_stapled_and_a_foreign_one_is_not() {
    let dir = TempDir::new("edge-ocsp");
    let (origin, _) = origin();
    let config = two_names(&dir, origin);
    // a.ocsp sits beside a.pem and matches it; b gets a response made for a.
    ocsp_response(&dir, "a.pem", "a.ocsp");
    std::fs::copy(dir.join("a.ocsp"), dir.join("b.ocsp")).unwrap();
    let ferrule = start(&dir, &config);

    let stapled = s_client(ferrule.port, &["-servername", "a.test", "-status"]);
    assert!(
        stapled.contains("OCSP Response Status: successful"),
        "{stapled}"
    );
    let foreign = s_client(ferrule.port, &["-servername", "x.b.test", "-status"]);
    assert!(
        foreign.contains("OCSP response: no response sent"),
        "{foreign}"
    );
    let metrics = ferrule.metrics();
    let text = &metrics.text;
    assert!(
        text.contains(r#"ferrule_ocsp_staple_age_seconds{cert="a.test"}"#),
        "{text}"
    );
    assert!(!text.contains(r#"ferrule_ocsp_staple_age_seconds{cert="*.b.test"}"#));
}

#[test]
fn reload_under_load_changes_the_certificate_without_failed_requests() {
    let dir = TempDir::new("edge-reload");
    let (origin, _) = origin();
    let config = two_names(&dir, origin);
    let ferrule = start(&dir, &config);
    assert!(served_subject(ferrule.port, &["-servername", "a.test"]).contains("CN = a.test"));

    // Load: sequential curl requests on a few threads for the duration of the swap.
    let stop = Arc::new(AtomicUsize::new(0));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let dir = dir.to_path_buf();
        let port = ferrule.port;
        workers.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while stop.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                let (success, body) = curl(port, &dir, "a.test", &[]);
                if success && body == "origin ok\n" {
                    &ok
                } else {
                    &failed
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));

    // A new certificate for the same name (new CN), swapped in by rename.
    make_leaf(&dir, "a2", &["a.test", "renewed.a.test"], false);
    std::fs::rename(dir.join("a2.key"), dir.join("a.key.new")).unwrap();
    std::fs::rename(dir.join("a2.pem"), dir.join("a.pem.new")).unwrap();
    std::fs::rename(dir.join("a.key.new"), dir.join("a.key")).unwrap();
    std::fs::rename(dir.join("a.pem.new"), dir.join("a.pem")).unwrap();
    ferrule.signal(libc::SIGHUP);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut renewed = false;
    while Instant::now() < deadline && !renewed {
        let out = s_client(ferrule.port, &["-servername", "a.test", "-showcerts"]);
        renewed = out.contains("renewed.a.test") || certificate_has_name(&out, "renewed.a.test");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(1, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(renewed, "the new certificate was never served");
    assert!(
        ok.load(Ordering::Relaxed) > 10,
        "too little load to prove anything"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );
    let reloads = ferrule
        .metrics()
        .sum("ferrule_reloads_total", &[("result", "ok")]);
    assert!(reloads >= 1.0);
}

/// True if the leaf certificate in `s_client -showcerts` output carries `name` in its SAN.
fn certificate_has_name(s_client_output: &str, name: &str) -> bool {
    let Some(start) = s_client_output.find("-----BEGIN CERTIFICATE-----") else {
        return false;
    };
    let Some(len) = s_client_output[start..].find("-----END CERTIFICATE-----") else {
        return false;
    };
    let pem = &s_client_output[start..start + len + 25];
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains(name)
}

#[test]
fn a_broken_reload_keeps_the_old_certificate_in_service() {
    let dir = TempDir::new("edge-badreload");
    let (origin, _) = origin();
    let ferrule = start(&dir, &two_names(&dir, origin));

    std::fs::write(
        dir.join("a.pem"),
        "-----BEGIN CERTIFICATE-----\nhalf written",
    )
    .unwrap();
    ferrule.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let failed = ferrule
            .metrics()
            .sum("ferrule_reloads_total", &[("result", "failed")]);
        if failed >= 1.0 || Instant::now() > deadline {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(failed >= 1.0, "the failed reload was not counted");
    assert!(served_subject(ferrule.port, &["-servername", "a.test"]).contains("a.test"));
    let (ok, body) = curl(ferrule.port, &dir, "a.test", &[]);
    assert!(ok && body == "origin ok\n");
}

#[test]
fn origin_connections_over_tls_resume_after_the_first() {
    let dir = TempDir::new("edge-origintls");
    make_ca(&dir);
    make_leaf(&dir, "front", &["front.test"], false);
    make_leaf(&dir, "origin", &["origin.test"], false);
    let origin_port = free_port();
    let accept = format!("127.0.0.1:{origin_port}");
    // `-www` answers each request with a status page and closes, so every request needs a
    // new origin connection: exactly what origin-side resumption is for.
    let mut s_server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &accept,
            "-cert",
            "origin.pem",
            "-key",
            "origin.key",
        ])
        .args(["-www", "-quiet"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(TIMEOUT, "the TLS origin's port", || {
        TcpStream::connect(("127.0.0.1", origin_port)).ok()
    });
    let config = format!(
        "[tls]\ncert = \"{d}/front.pem\"\nkey = \"{d}/front.key\"\n\
         [[backend]]\naddress = \"{accept}\"\ntls = true\nsni = \"origin.test\"\n\
         ca_file = \"{d}/ca.pem\"\n",
        d = dir.display()
    );
    let ferrule = start(&dir, &config);

    for _ in 0..8 {
        let (ok, _) = curl(ferrule.port, &dir, "front.test", &[]);
        assert!(ok, "request through the TLS origin failed");
    }
    let metrics = ferrule.metrics();
    let text = &metrics.text;
    let handshakes = "ferrule_upstream_tls_handshakes_total";
    let resumed = metrics.sum(handshakes, &[("kind", "resumed")]);
    let full = metrics.sum(handshakes, &[("kind", "full")]);
    let _ = s_server.kill();
    let _ = s_server.wait();
    // One full handshake per core at most; everything after resumes.
    assert!(full <= 2.0, "{text}");
    assert!(resumed >= 6.0, "{text}");
}

#[test]
fn client_certificates_are_required_and_their_subject_reaches_the_origin() {
    let dir = TempDir::new("edge-mtls");
    let (origin, seen) = origin();
    make_ca(&dir);
    make_leaf(&dir, "front", &["front.test"], false);
    make_leaf(&dir, "client", &["client.test"], false);
    let config = format!(
        "[tls]\ncert = \"{d}/front.pem\"\nkey = \"{d}/front.key\"\nclient_ca = \"{d}/ca.pem\"\n\
         [[backend]]\naddress = \"{origin}\"\n",
        d = dir.display()
    );
    let ferrule = start(&dir, &config);

    let (without, _) = curl(ferrule.port, &dir, "front.test", &[]);
    assert!(!without, "a client without a certificate was served");
    let forged = ["-H", "X-Client-Cert-Subject: CN=admin"];
    let (with, body) = curl(
        ferrule.port,
        &dir,
        "front.test",
        &[
            &["--cert", "client.pem", "--key", "client.key"][..],
            &forged[..],
        ]
        .concat(),
    );
    assert!(with && body == "origin ok\n");
    let heads = seen.lock().unwrap();
    let head = heads.last().expect("the origin saw the request");
    assert!(
        head.contains("X-Client-Cert-Subject: CN=client.test"),
        "{head}"
    );
    assert!(
        !head.contains("CN=admin"),
        "a client-sent subject header was forwarded: {head}"
    );
}

#[test]
fn ocsp_responses_are_fetched_from_the_responder_and_stapled() {
    let dir = TempDir::new("edge-ocspfetch");
    let (origin, _) = origin();
    make_ca(&dir);
    let responder_port = free_port();
    // A leaf whose Authority Information Access names a responder on loopback.
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=DNS:fetch.test\nbasicConstraints=CA:FALSE\n\
             authorityInfoAccess=OCSP;URI:http://127.0.0.1:{responder_port}\n"
        ),
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=fetch.test",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "30",
            "-extfile",
            "leaf.ext",
        ],
    );
    // The served chain carries the issuer, which the OCSP request needs.
    let chain = [
        std::fs::read(dir.join("leaf.pem")).unwrap(),
        std::fs::read(dir.join("ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("chain.pem"), chain).unwrap();
    ocsp_response(&dir, "leaf.pem", "unused.der");
    // `openssl ocsp -port` takes a bare port; only loopback clients (ferrule) talk to it.
    let port_arg = responder_port.to_string();
    let mut responder = Command::new("openssl")
        .args([
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            &port_arg,
            "-rsigner",
            "ca.pem",
        ])
        .args(["-rkey", "ca.key", "-CA", "ca.pem", "-ndays", "1"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The responder serves one connection at a time and stalls on one that sends nothing,
    // so a port probe would wedge it: wait for its own "waiting" line instead.
    let stderr = responder.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("waiting for OCSP client connections") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the OCSP responder did not start");
    let config = format!(
        "[tls]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/leaf.key\"\nocsp_refresh_seconds = 1\n\
         [[backend]]\naddress = \"{origin}\"\n",
        d = dir.display()
    );
    let ferrule = start(&dir, &config);

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stapled = String::new();
    while Instant::now() < deadline {
        stapled = s_client(ferrule.port, &["-servername", "fetch.test", "-status"]);
        if stapled.contains("OCSP Response Status: successful") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = responder.kill();
    let _ = responder.wait();
    assert!(
        stapled.contains("OCSP Response Status: successful"),
        "{stapled}"
    );
    assert!(
        dir.join("chain.ocsp").exists(),
        "the fetched response was not written"
    );
}
