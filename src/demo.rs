//! `ferrule demo`: the whole product on this machine in a few seconds.
//!
//! Generates a throwaway CA and `localhost` certificate, starts a small origin on loopback
//! and ferrule on every core in front of it, drives it with the built-in rustls load
//! generator, and prints what it measured, including ferrule's own CPU time per handshake
//! and per request (read from `/proc` for the shard threads only, so the load generator and
//! the origin running on the same cores do not count).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Backend, Config};
use crate::loadgen::{self, Mode};

const BODY: &[u8] = b"hello from the demo origin\n";

pub fn run(seconds: u64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ferrule-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, seconds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, seconds: u64) -> anyhow::Result<()> {
    let ca = write_certificates(dir)?;
    let origin = start_origin()?;

    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        admin: None,
        backends: vec![Backend::plain(origin)],
        ..Config::default()
    };
    config.tls.certificates.push(crate::config::CertPair {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ocsp: None,
    });
    let running = crate::server::start(config)?;
    let shards = running.thread_ids.clone();
    println!(
        "ferrule demo: {} shards on 127.0.0.1:{}, origin on {origin}, {seconds} s per row\n",
        shards.len(),
        running.address.port()
    );

    let rows = [
        ("full handshake (TLS 1.3)", Mode::Full, "1.3"),
        ("resumed handshake (TLS 1.3)", Mode::Resumed, "1.3"),
        ("resumed handshake (TLS 1.2)", Mode::Resumed, "1.2"),
        ("0-RTT request (TLS 1.3)", Mode::ZeroRtt, "1.3"),
        ("keep-alive requests", Mode::Keepalive, "1.3"),
    ];
    println!(
        "{:<30} {:>10} {:>9} {:>9} {:>14} {:>10}",
        "row", "ops/s", "p50 ms", "p99 ms", "server µs/op", "resumed"
    );
    for (name, mode, version) in rows {
        let args = loadgen::Args {
            connect: running.address,
            host: "localhost".into(),
            path: "/".into(),
            mode,
            tls: version.into(),
            concurrency: 8,
            seconds: seconds as f64,
            max_requests: 5_000_000,
            ca: Some(ca.clone()),
            insecure: false,
        };
        let before = shard_cpu_seconds(&shards);
        let report = loadgen::run(&args).with_context(|| format!("row {name}"))?;
        let cpu = shard_cpu_seconds(&shards) - before;
        let per_op = cpu * 1e6 / report.requests.max(1) as f64;
        let resumed = match mode {
            Mode::Keepalive => "-".to_string(),
            Mode::ZeroRtt => format!(
                "{:.0}% (0-RTT {:.0}%)",
                percent(report.resumed, report.requests),
                percent(report.early_accepted, report.requests)
            ),
            _ => format!("{:.0}%", percent(report.resumed, report.requests)),
        };
        println!(
            "{:<30} {:>10.0} {:>9.2} {:>9.2} {:>14.1} {:>10}{}",
            name,
            report.rate(),
            report.quantile_ms(0.5),
            report.quantile_ms(0.99),
            per_op,
            resumed,
            if report.errors > 0 {
                format!("  ({} errors)", report.errors)
            } else {
                String::new()
            }
        );
    }
    println!("\nserver µs/op: CPU time of ferrule's shard threads divided by operations.");
    running.stop()
}

fn percent(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole.max(1) as f64
}

/// CPU seconds consumed so far by the given threads of this process.
fn shard_cpu_seconds(tids: &[i32]) -> f64 {
    tids.iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok())
        .filter_map(|stat| crate::metrics::process::cpu_seconds_from_stat(&stat))
        .sum()
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` (ECDSA P-256, for localhost and 127.0.0.1).
fn write_certificates(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferrule demo CA");
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(dir.join("ca.pem"))
}

/// A minimal keep-alive HTTP/1.1 origin on loopback: a thread per connection, a fixed body.
fn start_origin() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || origin_connection(stream));
        }
    });
    Ok(address)
}

fn origin_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let response = [
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            BODY.len()
        )
        .as_bytes(),
        BODY,
    ]
    .concat();
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stream.write_all(&response).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
