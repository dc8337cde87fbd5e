//! ferrule's own TLS load generator, built on the rustls client.
//!
//! h2load and wrk cannot choose a TLS version, force or forbid resumption, or send 0-RTT, so
//! the demo and bench/ use this instead where those matter. Each worker is a plain thread
//! with blocking sockets: the generator should be simple and predictable, not clever.
//! Every run is bounded by a duration and a request count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// New connection and full handshake per request.
    Full,
    /// New connection per request, resuming the previous session.
    Resumed,
    /// New connection per request, resuming and sending the request as 0-RTT data.
    ZeroRtt,
    /// Requests one after another on persistent connections.
    Keepalive,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Server address (IP:PORT).
    #[arg(long)]
    pub connect: SocketAddr,
    /// SNI name and Host header.
    #[arg(long, default_value = "localhost")]
    pub host: String,
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long, value_enum, default_value = "full")]
    pub mode: Mode,
    /// `1.2` or `1.3`.
    #[arg(long, default_value = "1.3")]
    pub tls: String,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Stop after this many requests in total.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
    /// PEM file of the CA that signed the server certificate.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Skip certificate verification (benchmarking against throwaway certificates only).
    #[arg(long)]
    pub insecure: bool,
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub resumed: u64,
    pub early_accepted: u64,
    pub seconds: f64,
    pub latency_us: Option<Histogram<u64>>,
}

impl Report {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn json(&self, mode: Mode) -> String {
        format!(
            "{{\"mode\":\"{mode:?}\",\"requests\":{},\"errors\":{},\"resumed\":{},\
             \"early_accepted\":{},\"seconds\":{:.3},\"rate\":{:.1},\"p50_ms\":{:.3},\
             \"p99_ms\":{:.3},\"p999_ms\":{:.3}}}",
            self.requests,
            self.errors,
            self.resumed,
            self.early_accepted,
            self.seconds,
            self.rate(),
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999)
        )
    }
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let report = run(&args)?;
    println!("{}", report.json(args.mode));
    Ok(())
}

/// Accepts any certificate: for `--insecure` benchmarking only.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the client config for `args` (one per worker, so session caches are private).
pub fn client_config(args: &Args) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let version: &[&rustls::SupportedProtocolVersion] = match args.tls.as_str() {
        "1.2" => &[&rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => anyhow::bail!("--tls {other}: expected 1.2 or 1.3"),
    };
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(version)?;
    let mut config = if args.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let Some(ca) = &args.ca else {
            anyhow::bail!("--ca FILE or --insecure is required")
        };
        let pem = std::fs::read(ca)?;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(cert?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    match args.mode {
        Mode::Full => config.resumption = rustls::client::Resumption::disabled(),
        Mode::ZeroRtt => config.enable_early_data = true,
        Mode::Resumed | Mode::Keepalive => {}
    }
    Ok(config)
}

/// Runs the load and merges the workers' results.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let per_worker = (args.max_requests / args.concurrency.max(1) as u64).max(1);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let config = Arc::new(client_config(args)?);
        let args = args.clone();
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            worker(&args, config, deadline, per_worker, &stop)
        }));
    }
    let mut total = Report::default();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for worker in workers {
        let report = worker
            .join()
            .map_err(|_| anyhow::anyhow!("load worker panicked"))?;
        total.requests += report.requests;
        total.errors += report.errors;
        total.resumed += report.resumed;
        total.early_accepted += report.early_accepted;
        if let Some(h) = &report.latency_us {
            histogram.add(h)?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    total.seconds = started.elapsed().as_secs_f64();
    total.latency_us = Some(histogram);
    Ok(total)
}

fn worker(
    args: &Args,
    config: Arc<ClientConfig>,
    deadline: Instant,
    max: u64,
    stop: &AtomicBool,
) -> Report {
    let mut report = Report::default();
    // Invariant: these bounds are static and valid for hdrhistogram.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let close = args.mode != Mode::Keepalive;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{}\r\n",
        args.path,
        args.host,
        if close { "Connection: close\r\n" } else { "" }
    );
    let mut kept: Option<(TcpStream, ClientConnection)> = None;
    while Instant::now() < deadline
        && report.requests + report.errors < max
        && !stop.load(Ordering::Relaxed)
    {
        let began = Instant::now();
        let outcome = if close {
            one_connection(args, &config, request.as_bytes())
        } else {
            one_keepalive(args, &config, request.as_bytes(), &mut kept)
                .map(|(resumed, early)| (resumed, early, began.elapsed()))
        };
        match outcome {
            Ok((resumed, early, latency)) => {
                report.requests += 1;
                report.resumed += u64::from(resumed);
                report.early_accepted += u64::from(early);
                histogram.saturating_record(latency.as_micros().max(1) as u64);
            }
            Err(_) => {
                report.errors += 1;
                kept = None;
            }
        }
    }
    report.latency_us = Some(histogram);
    report
}

fn server_name(args: &Args) -> anyhow::Result<ServerName<'static>> {
    Ok(ServerName::try_from(args.host.clone())?)
}

/// One request on a new connection; returns (resumed, early data accepted, time from the
/// start of the connection to the whole response).
fn one_connection(
    args: &Args,
    config: &Arc<ClientConfig>,
    request: &[u8],
) -> anyhow::Result<(bool, bool, Duration)> {
    let began = Instant::now();
    let mut tcp = TcpStream::connect_timeout(&args.connect, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut conn = ClientConnection::new(config.clone(), server_name(args)?)?;
    let mut sent_early = false;
    if args.mode == Mode::ZeroRtt {
        if let Some(mut early) = conn.early_data() {
            if early.bytes_left() >= request.len() {
                early.write_all(request)?;
                sent_early = true;
            }
        }
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    // Drive the handshake so that early acceptance is known before deciding what to send.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(tls.sock)?;
    }
    let early = sent_early && tls.conn.is_early_data_accepted();
    if !early {
        tls.write_all(request)?;
    }
    read_one_response(&mut tls)?;
    let answered = began.elapsed();

    // Then wait for the server to close, outside the timing: a server that answered early
    // data may first wait for this client's Finished (to hand it new tickets), and that
    // round trip is not part of the time to the response.
    let mut rest = Vec::new();
    match tls.read_to_end(&mut rest) {
        Ok(_) => {}
        // Servers commonly close without close_notify after `Connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    Ok((resumed, early, answered))
}

/// One request on a persistent connection (opened on first use or after an error).
fn one_keepalive(
    args: &Args,
    config: &Arc<ClientConfig>,
    request: &[u8],
    kept: &mut Option<(TcpStream, ClientConnection)>,
) -> anyhow::Result<(bool, bool)> {
    if kept.is_none() {
        let tcp = TcpStream::connect_timeout(&args.connect, Duration::from_secs(5))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        *kept = Some((
            tcp,
            ClientConnection::new(config.clone(), server_name(args)?)?,
        ));
    }
    let Some((tcp, conn)) = kept.as_mut() else {
        unreachable!("set just above")
    };
    let mut tls = rustls::Stream::new(conn, tcp);
    tls.write_all(request)?;
    if read_one_response(&mut tls)? {
        // The server announced it closes (for example at its per-connection request limit).
        *kept = None;
    }
    Ok((false, false))
}

/// Reads one Content-Length-framed response; returns whether the server will close.
fn read_one_response(stream: &mut impl Read) -> anyhow::Result<bool> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                anyhow::bail!("unexpected response");
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("response without Content-Length"))?;
            let mut have = buf.len() - end - 4;
            while have < length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    anyhow::bail!("connection closed mid-body");
                }
                have += n;
            }
            return Ok(head.contains("\r\nconnection: close"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            anyhow::bail!("connection closed before the response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
