//! Shared helpers for ferrule's integration tests.
//!
//! Everything here talks to real peers over loopback: the real `ferrule` binary as a child
//! process, a recording HTTP/1.1 origin on a std `TcpListener`, rustls clients, and the
//! `openssl` and `curl` command-line tools. Every blocking operation has a time limit, so a
//! broken ferrule fails a test instead of hanging the suite.

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, SupportedProtocolVersion};

/// Upper bound for any single network wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a ferrule process may take to start listening.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A hash of some bytes, for comparing large bodies in assertion messages.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Deterministic, non-repeating-looking bytes (so an offset error changes the content).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A unique string for request paths, so requests of one test are recognisable.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{tag}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---- files ---------------------------------------------------------------------------------

/// A temporary directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferrule-it-{}", unique(tag)));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A CA and a `localhost`/`127.0.0.1` server certificate it signed, written as PEM files.
pub struct Pki {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

        let dir = TempDir::new("pki");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ferrule test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");

        let ca_pem = dir.join("ca.pem");
        let cert_pem = dir.join("cert.pem");
        let key_pem = dir.join("key.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca.pem");
        std::fs::write(&cert_pem, cert.pem()).expect("write cert.pem");
        std::fs::write(&key_pem, key.serialize_pem()).expect("write key.pem");
        Self {
            ca_der: ca.der().clone(),
            dir,
            ca_pem,
            cert_pem,
            key_pem,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

// ---- the ferrule process -------------------------------------------------------------------

pub fn ferrule_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrule")
}

/// A port nobody listens on right now (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Runs a command to completion with `stdin`, killing it after `limit`.
pub fn run_with_timeout(command: &mut Command, stdin: &[u8], limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command {command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `ferrule ARGS...` to completion (for `ticket-keys`, bad configurations and such).
pub fn run_ferrule(args: &[OsString]) -> Output {
    let mut command = Command::new(ferrule_bin());
    command.args(args).env("RUST_LOG", "info");
    run_with_timeout(&mut command, b"", TIMEOUT)
}

/// Options for a `ferrule serve` child process.
pub struct Launch {
    args: Vec<OsString>,
}

impl Launch {
    /// `serve` on 127.0.0.1:0 with both cores, this PKI, one backend and an admin endpoint
    /// on a port the kernel picks (ferrule logs both addresses).
    pub fn new(pki: &Pki, backend: SocketAddr) -> Self {
        Self::without_backend(pki)
            .arg("--backend")
            .arg(backend.to_string())
    }

    /// `serve` on 127.0.0.1:0 with both cores and an admin endpoint, everything else
    /// (certificates, backends) from the configuration file at `path`.
    pub fn with_config_file(path: &Path) -> Self {
        Self::serve().config_file(path)
    }

    /// Like [`new`](Self::new), for a configuration file that names the backends.
    pub fn without_backend(pki: &Pki) -> Self {
        Self::serve()
            .arg("--cert")
            .arg(&pki.cert_pem)
            .arg("--key")
            .arg(&pki.key_pem)
    }

    /// `serve` on 127.0.0.1:0 with both cores and an admin endpoint on a kernel-picked port.
    fn serve() -> Self {
        let args = ["serve", "--listen", "127.0.0.1:0", "--cores", "2"];
        Self {
            args: args.iter().map(OsString::from).collect(),
        }
        .arg("--admin")
        .arg("127.0.0.1:0")
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Passes a TOML configuration file with this content.
    pub fn config(self, dir: &TempDir, toml: &str) -> Self {
        let path = dir.join(&format!("{}.toml", unique("config")));
        std::fs::write(&path, toml).expect("write config");
        self.config_file(&path)
    }

    pub fn config_file(self, path: &Path) -> Self {
        self.arg("--config").arg(path)
    }

    pub fn command_line(&self) -> Vec<OsString> {
        self.args.clone()
    }

    /// Starts ferrule and waits until it reports its listening address.
    pub fn start(self) -> Ferrule {
        Ferrule::spawn(self.args)
    }
}

enum Started {
    Admin(Option<u16>),
    Listening(Option<u16>),
}

/// A running `ferrule serve`; killed on drop.
pub struct Ferrule {
    child: Child,
    pub port: u16,
    pub admin: Option<u16>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Ferrule {
    fn spawn(args: Vec<OsString>) -> Self {
        // FERRULE_TEST_LOG (e.g. `debug`) raises ferrule's log level for a failing test.
        let level = std::env::var("FERRULE_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut child = Command::new(ferrule_bin())
            .args(&args)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrule");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let address = |marker: &str, end: char| {
                    let rest = line.split(marker).nth(1)?;
                    let text = rest.split(end).next()?;
                    text.parse::<SocketAddr>().ok().map(|a| a.port())
                };
                if line.contains("admin endpoint on http://") {
                    let _ = tx.send(Started::Admin(address("admin endpoint on http://", '/')));
                }
                if line.contains("ferrule listening on ") {
                    let _ = tx.send(Started::Listening(address("ferrule listening on ", ' ')));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut ferrule = Self {
            child,
            port: 0,
            admin: None,
            log,
        };
        // Start-up is bounded generously: on a loaded 2-core machine several ferrules start
        // at once, each spawning an executor per core.
        let deadline = Instant::now() + STARTUP;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Started::Listening(Some(port))) => {
                    ferrule.port = port;
                    break;
                }
                Ok(Started::Admin(Some(port))) => ferrule.admin = Some(port),
                Ok(_) => panic!("unparsable address line:\n{}", ferrule.log_text()),
                Err(_) => {}
            }
            if let Ok(Some(status)) = ferrule.child.try_wait() {
                panic!(
                    "ferrule exited ({status}) before listening:\n{}",
                    ferrule.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferrule did not listen within {STARTUP:?}:\n{}",
                ferrule.log_text()
            );
        }
        if ferrule.admin.is_some() {
            let deadline = Instant::now() + TIMEOUT;
            while let Err(e) = ferrule.try_metrics() {
                assert!(
                    Instant::now() < deadline,
                    "admin endpoint {:?}: {e}\n{}",
                    ferrule.admin,
                    ferrule.log_text()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        ferrule
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything ferrule logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the pid of our own child process and a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to exit; panics (and kills it) after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "ferrule did not exit within {limit:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_metrics(&self) -> io::Result<Metrics> {
        let port = self.admin.expect("started without an admin endpoint");
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other("no head"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(head.to_string()));
        }
        Ok(Metrics::parse(body))
    }

    pub fn metrics(&self) -> Metrics {
        self.try_metrics().expect("GET /metrics")
    }

    /// Waits until `sum(name, labels)` satisfies `ok`; returns the metrics then.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        ok: impl Fn(f64) -> bool,
    ) -> Metrics {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let metrics = self.metrics();
            if ok(metrics.sum(name, labels)) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "metric {name}{labels:?} stuck at {}",
                metrics.sum(name, labels)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ferrule {
    fn drop(&mut self) {
        // A failing test shows ferrule's state and log, often the only clue to a race.
        if std::thread::panicking() {
            if let Some(m) = self.admin.and_then(|_| self.try_metrics().ok()) {
                eprintln!("--- ferrule metrics (port {}) ---", self.port);
                for line in m.text.lines().filter(|l| !l.starts_with('#')) {
                    if line.starts_with("ferrule_connections")
                        || line.starts_with("ferrule_handshake")
                        || line.starts_with("ferrule_requests_total")
                        || line.starts_with("ferrule_internal")
                    {
                        eprintln!("{line}");
                    }
                }
            }
            if let Ok(ss) = Command::new("ss")
                .args([
                    "-tnie",
                    "state",
                    "all",
                    &format!("( sport = :{0} or dport = :{0} )", self.port),
                ])
                .output()
            {
                eprintln!("--- ss ---\n{}", String::from_utf8_lossy(&ss.stdout));
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- ferrule log (port {}) ---", self.port);
                for line in log.iter() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// One Prometheus sample: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parsed Prometheus text from `/metrics`.
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.trim_end_matches('}');
                    let labels = inner
                        .split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            samples.push((name, labels, value));
        }
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// Sum of every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

// ---- the origin ----------------------------------------------------------------------------

/// A request as the origin received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Which accepted origin connection carried it (0-based).
    pub connection: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the origin does with its connection after a handler ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
}

/// Answers one request; writes to `conn.get_mut()`, may read more from `conn`.
pub type Handler =
    dyn Fn(&Request, &mut BufReader<TcpStream>) -> io::Result<After> + Send + Sync + 'static;

/// A threaded HTTP/1.1 origin on 127.0.0.1 that records what it receives.
pub struct Backend {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(
        handler: impl Fn(&Request, &mut BufReader<TcpStream>) -> io::Result<After>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (c, r, s) = (connections.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let index = c.fetch_add(1, Ordering::SeqCst);
                let (r, handler) = (r.clone(), handler.clone());
                std::thread::spawn(move || serve_origin(stream, index, &r, &*handler));
            }
        });
        Self {
            addr,
            connections,
            requests,
            stop,
        }
    }

    /// An origin that answers 200 with the request body (or `ok` when there is none).
    pub fn echo() -> Self {
        Self::start(|request, conn| {
            let body = if request.body.is_empty() {
                b"ok".to_vec()
            } else {
                request.body.clone()
            };
            respond(conn.get_mut(), 200, &[], &body)?;
            Ok(After::KeepAlive)
        })
    }

    /// Origin connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests received whose target is `target`.
    pub fn requests_to(&self, target: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.target == target)
            .collect()
    }

    /// Waits until at least `n` requests to `target` have arrived.
    pub fn wait_requests_to(&self, target: &str, n: usize) -> Vec<Request> {
        wait_until(TIMEOUT, &format!("{n} request(s) to {target}"), || {
            let found = self.requests_to(target);
            (found.len() >= n).then_some(found)
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Writes a complete response with `Content-Length`.
pub fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    out.write_all(&all)?;
    out.flush()
}

fn serve_origin(
    stream: TcpStream,
    index: usize,
    requests: &Mutex<Vec<Request>>,
    handler: &Handler,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let request = match read_request(&mut conn, index) {
            Ok(Some(request)) => request,
            _ => return,
        };
        requests.lock().unwrap().push(request.clone());
        match handler(&request, &mut conn) {
            Ok(After::KeepAlive) => {}
            _ => {
                let _ = conn.get_ref().shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Reads header lines up to the empty line; `None` at a clean end of stream.
fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn parse_headers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Decodes a chunked body (trailers skipped).
pub fn read_chunked<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let digits = line.trim_end().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(digits, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                if r.read_line(&mut trailer)? == 0 || trailer.trim_end().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk end"));
        }
    }
}

fn read_request<R: BufRead>(r: &mut R, connection: usize) -> io::Result<Option<Request>> {
    let Some(lines) = read_head(r)? else {
        return Ok(None);
    };
    let mut parts = lines[0].split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let headers = parse_headers(&lines[1..]);
    let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let body = if chunked {
        read_chunked(r)?
    } else if let Some(len) = header(&headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "content-length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        body
    } else {
        Vec::new()
    };
    Ok(Some(Request {
        method,
        target,
        version,
        headers,
        body,
        chunked,
        connection,
    }))
}

// ---- the client side -----------------------------------------------------------------------

/// A response as a client received it.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (interim 1xx responses included) to a request of `method`.
pub fn read_response<R: BufRead>(r: &mut R, method: &str) -> io::Result<Response> {
    let lines = read_head(r)?.ok_or(io::ErrorKind::UnexpectedEof)?;
    let status_line = lines[0].clone();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line.clone()))?;
    let headers = parse_headers(&lines[1..]);
    let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let body = if method == "HEAD" || status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if chunked {
        read_chunked(r)?
    } else if let Some(len) = header(&headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "content-length"))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        body
    };
    Ok(Response {
        status,
        status_line,
        headers,
        body,
        chunked,
    })
}

/// Reads responses until a final (non-1xx) one.
pub fn read_final_response<R: BufRead>(r: &mut R, method: &str) -> io::Result<Response> {
    loop {
        let response = read_response(r, method)?;
        if response.status >= 200 {
            return Ok(response);
        }
    }
}

/// True if the peer closed the stream (EOF or an error) within the read timeout.
pub fn closed_by_peer<R: Read>(r: &mut R) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A client config trusting the test CA, for the given protocol versions.
pub fn client_config(
    pki: &Pki,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("add CA");
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

pub fn tls13(pki: &Pki) -> Arc<ClientConfig> {
    client_config(pki, &[&rustls::version::TLS13])
}

pub fn tls12(pki: &Pki) -> Arc<ClientConfig> {
    client_config(pki, &[&rustls::version::TLS12])
}

/// A TLS 1.3 client config that sends early data when it can.
pub fn tls13_early(pki: &Pki) -> Arc<ClientConfig> {
    let mut config = (*tls13(pki)).clone();
    config.enable_early_data = true;
    Arc::new(config)
}

pub fn tcp_connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), TIMEOUT)
        .expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

pub type Tls = rustls::StreamOwned<ClientConnection, TcpStream>;

fn server_name() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("server name")
}

/// Connects and completes the TLS handshake.
pub fn tls_connect(port: u16, config: &Arc<ClientConfig>) -> Tls {
    let mut conn = ClientConnection::new(config.clone(), server_name()).expect("client conn");
    let mut sock = tcp_connect(port);
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("TLS handshake");
    }
    rustls::StreamOwned::new(conn, sock)
}

/// A TLS connection with a read buffer, for request/response exchanges.
pub struct Client {
    pub io: BufReader<Tls>,
}

impl Client {
    pub fn connect(port: u16, config: &Arc<ClientConfig>) -> Self {
        Self {
            io: BufReader::with_capacity(64 * 1024, tls_connect(port, config)),
        }
    }

    pub fn conn(&self) -> &ClientConnection {
        &self.io.get_ref().conn
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let tls = self.io.get_mut();
        tls.write_all(bytes).expect("write request");
        tls.flush().expect("flush request");
    }

    pub fn response(&mut self, method: &str) -> Response {
        read_final_response(&mut self.io, method).expect("read response")
    }

    pub fn try_response(&mut self, method: &str) -> io::Result<Response> {
        read_final_response(&mut self.io, method)
    }

    /// Sends `request` and reads the final response to it.
    pub fn exchange(&mut self, request: &[u8]) -> Response {
        let method = String::from_utf8_lossy(request)
            .split(' ')
            .next()
            .unwrap_or("GET")
            .to_string();
        self.send(request);
        self.response(&method)
    }

    /// True if ferrule closes this connection (EOF) within the read timeout.
    pub fn is_closed_by_peer(&mut self) -> bool {
        closed_by_peer(&mut self.io)
    }
}

/// `GET target` with `Connection: close` on a new connection.
pub fn get(port: u16, config: &Arc<ClientConfig>, target: &str) -> Response {
    let mut client = Client::connect(port, config);
    client.exchange(
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Runs `f` with the calling thread (and processes it spawns) pinned to CPU
/// `index % CPUs`, then restores the thread's CPU mask.
///
/// ferrule sets SO_INCOMING_CPU on its listeners, so a loopback connection lands on the
/// shard of the CPU the client ran on: alternating the client's CPU alternates the shard.
pub fn on_cpu<T>(index: usize, f: impl FnOnce() -> T) -> T {
    // SAFETY: cpu_set_t is plain data; sched_{get,set}affinity(0, ...) act on this thread
    // with a correctly sized set.
    unsafe {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, size, &mut saved), 0);
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &saved))
            .collect();
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus[index % cpus.len()], &mut one);
        assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
        let result = f();
        assert_eq!(libc::sched_setaffinity(0, size, &saved), 0);
        result
    }
}
