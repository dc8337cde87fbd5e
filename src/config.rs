//! The one typed configuration of ferrule.
//!
//! A TOML file (optional) is read first, command-line flags override it, and the result is
//! validated once, up front, before any core starts. Every field has a documented default in
//! [`Config::default`] and in the README's configuration table; units are part of the key
//! names (`_ms`, `_seconds`, `_bytes`).
//!
//! Errors name the file, the line and the dotted key so that an operator can fix the file
//! without reading code. Unknown keys are errors, not warnings: a misspelt limit silently
//! falling back to its default is how outages start.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What ferrule does with the plaintext after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Parse HTTP/1.1, pool origin connections, add forwarding headers.
    Http,
    /// Copy bytes both ways to one origin connection per client connection.
    Tcp,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Self::Http),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown mode {other:?} (expected \"http\" or \"tcp\")"
            )),
        }
    }
}

/// How TLS sessions are remembered for resumption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resumption {
    /// Stateful: sessions live in a store partitioned across cores (needed for 0-RTT).
    Cache,
    /// Stateless: sessions are sealed into tickets with keys every core holds a copy of.
    Tickets,
    /// No resumption at all.
    Off,
}

impl std::str::FromStr for Resumption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cache" => Ok(Self::Cache),
            "tickets" => Ok(Self::Tickets),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown resumption mode {other:?} (expected \"cache\", \"tickets\" or \"off\")"
            )),
        }
    }
}

/// One origin server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    /// Re-encrypt towards this origin; `None` speaks plain HTTP (or plain TCP) to it.
    pub tls: Option<OriginTls>,
}

impl Backend {
    pub fn plain(address: SocketAddr) -> Self {
        Self { address, tls: None }
    }
}

/// TLS towards an origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginTls {
    /// Name sent as SNI and checked against the origin's certificate.
    pub server_name: String,
    /// CA certificates (PEM) that sign the origin's certificate; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) presented to the origin (mutual TLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A certificate chain, its key and, optionally, a stapled OCSP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DER OCSP response; `None` looks for `<cert>.ocsp` beside the certificate.
    pub ocsp: Option<PathBuf>,
}

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Handshakes without a valid client certificate fail.
    Require,
    /// A client certificate is verified if sent; clients without one are served too.
    Request,
}

/// The full, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where clients connect. Each selected core binds its own SO_REUSEPORT socket here.
    pub listen: SocketAddr,
    pub mode: Mode,
    /// CPUs to run one shard on each; empty means every CPU the process may run on.
    pub cores: Vec<usize>,
    /// Admin endpoint (`/metrics`); `None` disables it.
    pub admin: Option<SocketAddr>,
    pub backends: Vec<Backend>,
    pub tls: Tls,
    pub limits: Limits,
    pub pool: Pool,
    pub socket: Socket,
    pub early_data: EarlyData,
}

/// Certificates and session handling.
#[derive(Clone, Debug)]
pub struct Tls {
    /// Certificates with their keys (PEM; keys PKCS#8, SEC1 or PKCS#1). The first one is the
    /// default for clients without SNI or with an unknown name.
    pub certificates: Vec<CertPair>,
    /// A directory of `NAME.pem` chains with `NAME.key` keys (and optional `NAME.ocsp`).
    pub cert_dir: Option<PathBuf>,
    /// How often OCSP responses are fetched from each certificate's responder and written
    /// to its OCSP file; `None` (the default) leaves the files to the operator.
    pub ocsp_refresh: Option<Duration>,
    /// CA certificates (PEM) that sign client certificates; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Request header carrying the verified client certificate's subject to the origin.
    /// A client-sent header of this name is always removed.
    pub client_cert_header: String,
    /// Refuse clients whose SNI names no configured certificate (`unrecognized_name` alert)
    /// instead of serving them the default certificate.
    pub strict_sni: bool,
    pub resumption: Resumption,
    /// How long a session may be resumed after it was issued.
    pub session_lifetime: Duration,
    /// TLS 1.3 tickets sent after each full handshake (each is single-use in `cache` mode).
    pub tls13_tickets: usize,
    /// Sessions each core keeps in its partition of the cache (LRU beyond it).
    pub cache_entries_per_core: usize,
    /// Bytes of session state each core keeps at most (LRU beyond it).
    pub cache_bytes_per_core: usize,
    /// Shared ticket key file (`tickets` mode); `None` generates and rotates keys in memory.
    pub ticket_key_file: Option<PathBuf>,
    /// How often a fresh ticket encryption key is generated when no key file is given.
    pub ticket_rotation: Duration,
}

/// Time and size limits on one connection.
#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// Time allowed for a complete request head after the first byte of it (408 beyond it).
    pub request_header_timeout: Duration,
    /// Idle time between requests on a keep-alive client connection.
    pub idle_timeout: Duration,
    /// Largest request head (request line plus headers); 431 beyond it.
    pub max_header_bytes: usize,
    /// Longest request line; 414 beyond it.
    pub max_request_line_bytes: usize,
    /// Most headers in one request or response head.
    pub max_headers: usize,
    /// Requests served on one client connection before ferrule closes it.
    pub max_requests_per_connection: u64,
    /// Connections one core serves at once; beyond it, new connections wait in the backlog.
    pub max_connections_per_core: usize,
    pub upstream_connect_timeout: Duration,
    /// Time allowed for the origin's response head (504 beyond it).
    pub upstream_response_timeout: Duration,
    /// How long a shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a backend that refused a connection is skipped.
    pub backend_backoff: Duration,
}

/// Per-core pool of idle origin connections.
#[derive(Clone, Debug)]
pub struct Pool {
    pub max_idle_per_backend: usize,
    pub max_idle_time: Duration,
    pub max_age: Duration,
}

/// Socket options for the listener and accepted connections.
#[derive(Clone, Debug)]
pub struct Socket {
    pub backlog: i32,
    pub nodelay: bool,
    /// Seconds the kernel may hold a connection until data arrives (TCP_DEFER_ACCEPT).
    pub defer_accept_seconds: u32,
    /// TCP Fast Open queue length; 0 disables it.
    pub fastopen_queue: u32,
    /// `None` leaves buffer sizes to kernel autotuning.
    pub recv_buffer_bytes: Option<usize>,
    pub send_buffer_bytes: Option<usize>,
    pub keepalive_idle: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// Accept a connection on the core whose CPU its packets arrived on (SO_INCOMING_CPU).
    /// Off by default: it only helps when the NIC's interrupts are spread over ferrule's
    /// cores (see tuning/); with every interrupt on one CPU it would put every connection
    /// on one shard.
    pub incoming_cpu: bool,
}

/// TLS 1.3 0-RTT (early data) policy, RFC 8446 section 8 and RFC 8470.
#[derive(Clone, Debug)]
pub struct EarlyData {
    /// Most early-data bytes accepted per connection; 0 turns 0-RTT off.
    pub max_bytes: u32,
    /// A ticket older than this gets no 0-RTT (it still resumes).
    pub max_ticket_age: Duration,
    /// Methods answered before the handshake completes.
    pub safe_methods: Vec<String>,
    /// A request with a `Cookie` header waits for the handshake.
    pub deny_cookie: bool,
    /// Query parameters that make a request wait for the handshake.
    pub deny_query_params: Vec<String>,
    /// When not empty, only paths under these prefixes are answered early.
    pub allow_path_prefixes: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            mode: Mode::Http,
            cores: Vec::new(),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9900))),
            backends: Vec::new(),
            tls: Tls {
                certificates: Vec::new(),
                cert_dir: None,
                ocsp_refresh: None,
                client_ca: None,
                client_auth: ClientAuth::Require,
                client_cert_header: "X-Client-Cert-Subject".into(),
                strict_sni: false,
                resumption: Resumption::Cache,
                session_lifetime: Duration::from_secs(2 * 3600),
                tls13_tickets: 2,
                cache_entries_per_core: 100_000,
                cache_bytes_per_core: 64 << 20,
                ticket_key_file: None,
                ticket_rotation: Duration::from_secs(3600),
            },
            limits: Limits {
                handshake_timeout: Duration::from_secs(10),
                request_header_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                max_header_bytes: 32 * 1024,
                max_request_line_bytes: 8 * 1024,
                max_headers: 100,
                max_requests_per_connection: 10_000,
                max_connections_per_core: 50_000,
                upstream_connect_timeout: Duration::from_secs(3),
                upstream_response_timeout: Duration::from_secs(60),
                drain_timeout: Duration::from_secs(30),
                backend_backoff: Duration::from_secs(5),
            },
            pool: Pool {
                max_idle_per_backend: 64,
                max_idle_time: Duration::from_secs(30),
                max_age: Duration::from_secs(600),
            },
            socket: Socket {
                backlog: 4096,
                nodelay: true,
                defer_accept_seconds: 0,
                fastopen_queue: 256,
                recv_buffer_bytes: None,
                send_buffer_bytes: None,
                keepalive_idle: Some(Duration::from_secs(60)),
                keepalive_interval: Duration::from_secs(10),
                keepalive_count: 6,
                incoming_cpu: false,
            },
            early_data: EarlyData {
                max_bytes: 16 * 1024,
                max_ticket_age: Duration::from_secs(600),
                safe_methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
                deny_cookie: false,
                deny_query_params: Vec::new(),
                allow_path_prefixes: Vec::new(),
            },
        }
    }
}

/// A configuration problem, located as precisely as the source allows.
#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => write!(f, "command line: ")?,
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn flag(key: &str, message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

/// Values given on the command line; each one overrides the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub backends: Vec<String>,
    pub certs: Vec<PathBuf>,
    pub keys: Vec<PathBuf>,
    pub cert_dir: Option<PathBuf>,
    pub cores: Option<String>,
    pub admin: Option<String>,
    pub mode: Option<String>,
    pub resumption: Option<String>,
    pub ticket_key_file: Option<PathBuf>,
    pub early_data_max: Option<u32>,
}

// ---- the file format ---------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    mode: Option<Mode>,
    cores: Option<CoresValue>,
    admin: Option<String>,
    #[serde(default)]
    backend: Vec<FileBackend>,
    tls: Option<FileTls>,
    limits: Option<FileLimits>,
    pool: Option<FilePool>,
    socket: Option<FileSocket>,
    early_data: Option<FileEarlyData>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CoresValue {
    Count(usize),
    Spec(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    address: String,
    #[serde(default)]
    tls: bool,
    sni: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCertificate {
    cert: PathBuf,
    key: PathBuf,
    ocsp: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ocsp: Option<PathBuf>,
    #[serde(default)]
    certificate: Vec<FileCertificate>,
    cert_dir: Option<PathBuf>,
    ocsp_refresh_seconds: Option<u64>,
    client_ca: Option<PathBuf>,
    client_auth: Option<ClientAuth>,
    client_cert_header: Option<String>,
    strict_sni: Option<bool>,
    resumption: Option<Resumption>,
    session_lifetime_seconds: Option<u64>,
    tls13_tickets: Option<usize>,
    cache_entries_per_core: Option<usize>,
    cache_bytes_per_core: Option<usize>,
    ticket_key_file: Option<PathBuf>,
    ticket_rotation_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    handshake_timeout_ms: Option<u64>,
    request_header_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_header_bytes: Option<usize>,
    max_request_line_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_requests_per_connection: Option<u64>,
    max_connections_per_core: Option<usize>,
    upstream_connect_timeout_ms: Option<u64>,
    upstream_response_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    backend_backoff_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePool {
    max_idle_per_backend: Option<usize>,
    max_idle_time_ms: Option<u64>,
    max_age_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSocket {
    backlog: Option<i32>,
    nodelay: Option<bool>,
    defer_accept_seconds: Option<u32>,
    fastopen_queue: Option<u32>,
    recv_buffer_bytes: Option<usize>,
    send_buffer_bytes: Option<usize>,
    keepalive_idle_seconds: Option<u64>,
    keepalive_interval_seconds: Option<u64>,
    keepalive_count: Option<u32>,
    incoming_cpu: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileEarlyData {
    max_bytes: Option<u32>,
    max_ticket_age_seconds: Option<u64>,
    safe_methods: Option<Vec<String>>,
    deny_cookie: Option<bool>,
    deny_query_params: Option<Vec<String>>,
    allow_path_prefixes: Option<Vec<String>>,
}

/// Where a key stands in the source text, for error messages after parsing.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// Finds the line of `key` inside `[table]` (or at top level when `table` is empty).
    fn line_of(&self, table: &str, key: &str) -> Option<usize> {
        let mut current = String::new();
        for (index, raw) in self.text.lines().enumerate() {
            let line = raw.trim();
            if let Some(header) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
                current = header.trim().to_string();
            } else if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                current = header.trim().to_string();
            } else if current == table {
                let name = line.split('=').next().unwrap_or("").trim();
                if name == key {
                    return Some(index + 1);
                }
            }
        }
        None
    }

    fn error(&self, table: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let dotted = if table.is_empty() {
            key.to_string()
        } else {
            format!("{table}.{key}")
        };
        ConfigError {
            file: Some(self.path.to_path_buf()),
            line: self.line_of(table, key),
            key: Some(dotted),
            message: message.into(),
        }
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn ms(value: Option<u64>, default: Duration) -> Duration {
    value.map(Duration::from_millis).unwrap_or(default)
}

fn secs(value: Option<u64>, default: Duration) -> Duration {
    value.map(Duration::from_secs).unwrap_or(default)
}

impl Config {
    /// Reads `path` (if any), applies `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides)?;
        config.validate(path)?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses TOML text; `path` is only used to name the file in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: e.span().map(|span| line_of_offset(text, span.start)),
            key: None,
            message: e.message().to_string(),
        })?;
        let source = Source { path, text };
        let mut config = Self::default();

        if let Some(listen) = &file.listen {
            config.listen = parse_addr(listen).map_err(|m| source.error("", "listen", m))?;
        }
        if let Some(mode) = file.mode {
            config.mode = mode;
        }
        match &file.cores {
            Some(CoresValue::Count(n)) => config.cores = first_cores(*n),
            Some(CoresValue::Spec(spec)) => {
                config.cores = parse_cores(spec).map_err(|m| source.error("", "cores", m))?
            }
            None => {}
        }
        if let Some(admin) = &file.admin {
            config.admin = parse_admin(admin).map_err(|m| source.error("", "admin", m))?;
        }
        for backend in &file.backend {
            let address =
                parse_addr(&backend.address).map_err(|m| source.error("backend", "address", m))?;
            if backend.client_cert.is_some() != backend.client_key.is_some() {
                return Err(source.error(
                    "backend",
                    "client_cert",
                    "client_cert and client_key go together",
                ));
            }
            let tls = backend.tls.then(|| OriginTls {
                server_name: backend
                    .sni
                    .clone()
                    .unwrap_or_else(|| address.ip().to_string()),
                ca_file: backend.ca_file.clone(),
                client_cert: backend.client_cert.clone(),
                client_key: backend.client_key.clone(),
            });
            config.backends.push(Backend { address, tls });
        }

        let tls = file.tls.unwrap_or_default();
        let t = &mut config.tls;
        match (tls.cert, tls.key) {
            (Some(cert), Some(key)) => t.certificates.push(CertPair {
                cert,
                key,
                ocsp: tls.ocsp,
            }),
            (None, None) => {}
            (Some(_), None) => return Err(source.error("tls", "cert", "tls.key is missing")),
            (None, Some(_)) => return Err(source.error("tls", "key", "tls.cert is missing")),
        }
        for c in tls.certificate {
            t.certificates.push(CertPair {
                cert: c.cert,
                key: c.key,
                ocsp: c.ocsp,
            });
        }
        t.cert_dir = tls.cert_dir;
        t.ocsp_refresh = tls
            .ocsp_refresh_seconds
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        t.client_ca = tls.client_ca;
        t.client_auth = tls.client_auth.unwrap_or(t.client_auth);
        if let Some(header) = tls.client_cert_header {
            let valid = !header.is_empty()
                && header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid {
                return Err(source.error("tls", "client_cert_header", "not a header name"));
            }
            t.client_cert_header = header;
        }
        t.strict_sni = tls.strict_sni.unwrap_or(t.strict_sni);
        t.resumption = tls.resumption.unwrap_or(t.resumption);
        t.session_lifetime = secs(tls.session_lifetime_seconds, t.session_lifetime);
        t.tls13_tickets = tls.tls13_tickets.unwrap_or(t.tls13_tickets);
        t.cache_entries_per_core = tls
            .cache_entries_per_core
            .unwrap_or(t.cache_entries_per_core);
        t.cache_bytes_per_core = tls.cache_bytes_per_core.unwrap_or(t.cache_bytes_per_core);
        t.ticket_key_file = tls.ticket_key_file.or(t.ticket_key_file.take());
        t.ticket_rotation = secs(tls.ticket_rotation_seconds, t.ticket_rotation);

        let limits = file.limits.unwrap_or_default();
        let l = &mut config.limits;
        l.handshake_timeout = ms(limits.handshake_timeout_ms, l.handshake_timeout);
        l.request_header_timeout = ms(limits.request_header_timeout_ms, l.request_header_timeout);
        l.idle_timeout = ms(limits.idle_timeout_ms, l.idle_timeout);
        l.max_header_bytes = limits.max_header_bytes.unwrap_or(l.max_header_bytes);
        l.max_request_line_bytes = limits
            .max_request_line_bytes
            .unwrap_or(l.max_request_line_bytes);
        l.max_headers = limits.max_headers.unwrap_or(l.max_headers);
        l.max_requests_per_connection = limits
            .max_requests_per_connection
            .unwrap_or(l.max_requests_per_connection);
        l.max_connections_per_core = limits
            .max_connections_per_core
            .unwrap_or(l.max_connections_per_core);
        l.upstream_connect_timeout = ms(
            limits.upstream_connect_timeout_ms,
            l.upstream_connect_timeout,
        );
        l.upstream_response_timeout = ms(
            limits.upstream_response_timeout_ms,
            l.upstream_response_timeout,
        );
        l.drain_timeout = ms(limits.drain_timeout_ms, l.drain_timeout);
        l.backend_backoff = ms(limits.backend_backoff_ms, l.backend_backoff);

        let pool = file.pool.unwrap_or_default();
        let p = &mut config.pool;
        p.max_idle_per_backend = pool.max_idle_per_backend.unwrap_or(p.max_idle_per_backend);
        p.max_idle_time = ms(pool.max_idle_time_ms, p.max_idle_time);
        p.max_age = ms(pool.max_age_ms, p.max_age);

        let socket = file.socket.unwrap_or_default();
        let s = &mut config.socket;
        s.backlog = socket.backlog.unwrap_or(s.backlog);
        s.nodelay = socket.nodelay.unwrap_or(s.nodelay);
        s.defer_accept_seconds = socket
            .defer_accept_seconds
            .unwrap_or(s.defer_accept_seconds);
        s.fastopen_queue = socket.fastopen_queue.unwrap_or(s.fastopen_queue);
        s.recv_buffer_bytes = socket.recv_buffer_bytes.or(s.recv_buffer_bytes);
        s.send_buffer_bytes = socket.send_buffer_bytes.or(s.send_buffer_bytes);
        if let Some(idle) = socket.keepalive_idle_seconds {
            s.keepalive_idle = (idle > 0).then(|| Duration::from_secs(idle));
        }
        s.keepalive_interval = secs(socket.keepalive_interval_seconds, s.keepalive_interval);
        s.keepalive_count = socket.keepalive_count.unwrap_or(s.keepalive_count);
        s.incoming_cpu = socket.incoming_cpu.unwrap_or(s.incoming_cpu);

        let early = file.early_data.unwrap_or_default();
        let e = &mut config.early_data;
        e.max_bytes = early.max_bytes.unwrap_or(e.max_bytes);
        e.max_ticket_age = secs(early.max_ticket_age_seconds, e.max_ticket_age);
        if let Some(methods) = early.safe_methods {
            e.safe_methods = methods
                .into_iter()
                .map(|m| m.to_ascii_uppercase())
                .collect();
        }
        e.deny_cookie = early.deny_cookie.unwrap_or(e.deny_cookie);
        e.deny_query_params = early.deny_query_params.unwrap_or_default();
        e.allow_path_prefixes = early.allow_path_prefixes.unwrap_or_default();

        config.check_ranges(&source)?;
        Ok(config)
    }

    /// Range checks with the key's location in the file.
    fn check_ranges(&self, source: &Source<'_>) -> Result<(), ConfigError> {
        let positive = [
            (
                "limits",
                "handshake_timeout_ms",
                self.limits.handshake_timeout.is_zero(),
            ),
            (
                "limits",
                "request_header_timeout_ms",
                self.limits.request_header_timeout.is_zero(),
            ),
            (
                "limits",
                "idle_timeout_ms",
                self.limits.idle_timeout.is_zero(),
            ),
            (
                "limits",
                "max_header_bytes",
                self.limits.max_header_bytes < 64,
            ),
            (
                "limits",
                "max_request_line_bytes",
                self.limits.max_request_line_bytes < 16,
            ),
            ("limits", "max_headers", self.limits.max_headers == 0),
            (
                "limits",
                "max_requests_per_connection",
                self.limits.max_requests_per_connection == 0,
            ),
            (
                "limits",
                "max_connections_per_core",
                self.limits.max_connections_per_core == 0,
            ),
            (
                "limits",
                "upstream_connect_timeout_ms",
                self.limits.upstream_connect_timeout.is_zero(),
            ),
            (
                "limits",
                "upstream_response_timeout_ms",
                self.limits.upstream_response_timeout.is_zero(),
            ),
            (
                "tls",
                "session_lifetime_seconds",
                self.tls.session_lifetime.is_zero(),
            ),
            (
                "tls",
                "cache_entries_per_core",
                self.tls.cache_entries_per_core == 0,
            ),
            (
                "tls",
                "ticket_rotation_seconds",
                self.tls.ticket_rotation.is_zero(),
            ),
            ("socket", "backlog", self.socket.backlog <= 0),
        ];
        for (table, key, bad) in positive {
            if bad {
                return Err(source.error(table, key, "must be greater than zero"));
            }
        }
        if self.limits.max_request_line_bytes > self.limits.max_header_bytes {
            return Err(source.error(
                "limits",
                "max_request_line_bytes",
                "must not exceed limits.max_header_bytes",
            ));
        }
        if self.tls.tls13_tickets > 8 {
            return Err(source.error("tls", "tls13_tickets", "at most 8 tickets per handshake"));
        }
        Ok(())
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(listen) = &o.listen {
            self.listen = parse_addr(listen).map_err(|m| ConfigError::flag("--listen", m))?;
        }
        if !o.backends.is_empty() {
            self.backends = o
                .backends
                .iter()
                .map(|b| parse_addr(b).map(Backend::plain))
                .collect::<Result<_, _>>()
                .map_err(|m| ConfigError::flag("--backend", m))?;
        }
        if o.certs.len() != o.keys.len() {
            return Err(ConfigError::flag(
                "--cert",
                format!(
                    "{} --cert but {} --key: give them in pairs",
                    o.certs.len(),
                    o.keys.len()
                ),
            ));
        }
        if !o.certs.is_empty() {
            self.tls.certificates = o
                .certs
                .iter()
                .zip(&o.keys)
                .map(|(cert, key)| CertPair {
                    cert: cert.clone(),
                    key: key.clone(),
                    ocsp: None,
                })
                .collect();
        }
        if o.cert_dir.is_some() {
            self.tls.cert_dir = o.cert_dir.clone();
        }
        if let Some(cores) = &o.cores {
            self.cores = parse_cores(cores).map_err(|m| ConfigError::flag("--cores", m))?;
        }
        if let Some(admin) = &o.admin {
            self.admin = parse_admin(admin).map_err(|m| ConfigError::flag("--admin", m))?;
        }
        if let Some(mode) = &o.mode {
            self.mode = mode
                .parse()
                .map_err(|m: String| ConfigError::flag("--mode", m))?;
        }
        if let Some(resumption) = &o.resumption {
            self.tls.resumption = resumption
                .parse()
                .map_err(|m: String| ConfigError::flag("--resumption", m))?;
        }
        if o.ticket_key_file.is_some() {
            self.tls.ticket_key_file = o.ticket_key_file.clone();
        }
        if let Some(max) = o.early_data_max {
            self.early_data.max_bytes = max;
        }
        Ok(())
    }

    /// Checks that need the whole picture (file and flags together).
    fn validate(&self, path: Option<&Path>) -> Result<(), ConfigError> {
        let whole = |key: &str, message: String| ConfigError {
            file: path.map(Path::to_path_buf),
            line: None,
            key: Some(key.into()),
            message,
        };
        if self.backends.is_empty() {
            return Err(whole(
                "backend",
                "no backend configured: add a [[backend]] table or --backend ADDR".into(),
            ));
        }
        if self.tls.certificates.is_empty() && self.tls.cert_dir.is_none() {
            return Err(whole(
                "tls.cert",
                "no certificate configured: set tls.cert and tls.key, pass --cert and --key, \
                 or --cert-dir (`ferrule demo` generates one for trying ferrule out)"
                    .into(),
            ));
        }
        let online = online_cpus();
        for core in &self.cores {
            if !online.contains(core) {
                return Err(whole(
                    "cores",
                    format!("CPU {core} is not available to this process (available: {online:?})"),
                ));
            }
        }
        Ok(())
    }

    /// The CPUs shards run on: the configured list, or every CPU available to the process.
    pub fn shard_cpus(&self) -> Vec<usize> {
        if self.cores.is_empty() {
            online_cpus()
        } else {
            self.cores.clone()
        }
    }
}

/// Accepts `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| format!("bad port in {text:?}"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is not an address of the form IP:PORT"))
}

fn parse_admin(text: &str) -> Result<Option<SocketAddr>, String> {
    match text {
        "off" | "none" | "" => Ok(None),
        other => parse_addr(other).map(Some),
    }
}

fn first_cores(n: usize) -> Vec<usize> {
    online_cpus().into_iter().take(n.max(1)).collect()
}

/// Parses `--cores`: a count (`4`), a list (`0-3,8`), or a NUMA node (`numa:1`).
pub fn parse_cores(spec: &str) -> Result<Vec<usize>, String> {
    let spec = spec.trim();
    if let Some(node) = spec.strip_prefix("numa:") {
        let node: usize = node
            .parse()
            .map_err(|_| format!("bad NUMA node in {spec:?}"))?;
        let path = format!("/sys/devices/system/node/node{node}/cpulist");
        let list = std::fs::read_to_string(&path)
            .map_err(|e| format!("NUMA node {node} not found ({path}: {e})"))?;
        return parse_cpu_list(list.trim());
    }
    if let Ok(count) = spec.parse::<usize>() {
        if count == 0 {
            return Err("a core count must be at least 1".into());
        }
        let online = online_cpus();
        if count > online.len() {
            return Err(format!(
                "{count} cores asked for, {} available",
                online.len()
            ));
        }
        return Ok(first_cores(count));
    }
    parse_cpu_list(spec)
}

/// Parses the kernel's CPU list format (`0-3,8,10-11`).
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a CPU number or range (like 0-3,8)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err("empty CPU list".into());
    }
    Ok(cpus)
}

/// CPUs this process may run on (its affinity mask, which honours taskset and cgroups).
pub fn online_cpus() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), text)
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse("listen = \"127.0.0.1:1\"\n[limits]\nidle_timout_ms = 5\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().contains("idle_timout_ms"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let err = parse("\n\n[limits]\nidle_timeout_ms = 0\n").unwrap_err();
        assert_eq!(err.line, Some(4));
        assert_eq!(err.key.as_deref(), Some("limits.idle_timeout_ms"));
    }

    #[test]
    fn bad_backend_address_is_located() {
        let err = parse("[[backend]]\naddress = \"nowhere\"\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert_eq!(err.key.as_deref(), Some("backend.address"));
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let mut config = parse("listen = \"127.0.0.1:1\"\n").unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        config.apply(&overrides).unwrap();
        assert_eq!(config.listen.port(), 2);
    }
}
