//! TLS termination: certificates, rustls configs per core, sessions, tickets, early data.
//!
//! Loading happens twice, on purpose. The main thread reads and checks every file into a
//! [`TlsMaterial`] (so a bad file is reported before anything starts, and a bad reload is
//! rejected whole). Each shard then builds its own [`ServerContext`] from that material on
//! its own thread: its rustls configs, its certificate maps, its ticket sealer.

pub mod accept;
pub mod certs;
pub mod hello;
pub mod ocsp;
pub mod random;
pub mod session;
pub mod stream;
pub mod tickets;

use std::sync::Arc;

use log::info;
use rustls::crypto::ring as ring_provider;
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};

use crate::config::{ClientAuth, Config, Mode, Resumption};
use certs::{CertFile, CertResolver};
use tickets::{TicketKeyMaterial, Ticketer};

/// AES and carry-less multiply instructions decide whether AES-GCM beats ChaCha20 here.
#[derive(Clone, Copy, Debug)]
pub struct CpuFeatures {
    pub aes: bool,
    pub pclmulqdq: bool,
    pub vaes: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                aes: std::arch::is_x86_feature_detected!("aes"),
                pclmulqdq: std::arch::is_x86_feature_detected!("pclmulqdq"),
                vaes: std::arch::is_x86_feature_detected!("vaes"),
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            let aes = std::arch::is_aarch64_feature_detected!("aes");
            Self {
                aes,
                pclmulqdq: std::arch::is_aarch64_feature_detected!("pmull"),
                vaes: false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Self {
                aes: false,
                pclmulqdq: false,
                vaes: false,
            }
        }
    }

    /// AES-GCM runs in hardware: both AES rounds and GHASH are accelerated.
    pub fn fast_aes_gcm(&self) -> bool {
        self.aes && self.pclmulqdq
    }
}

/// Everything read from disk for TLS, checked, ready for each core to build from.
#[derive(Clone)]
pub struct TlsMaterial {
    pub certs: Vec<CertFile>,
    /// Roots that client certificates must chain to (empty: client certificates are off).
    pub client_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub ticket_keys: Vec<TicketKeyMaterial>,
    pub cpu: CpuFeatures,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs: show what is loaded, not what it contains.
        f.debug_struct("TlsMaterial")
            .field("certs", &self.certs.len())
            .field("ticket_keys", &self.ticket_keys.len())
            .finish()
    }
}

impl TlsMaterial {
    /// Reads certificates, keys, OCSP responses and client CAs named by `config`.
    /// `ticket_keys` is the key set in force. Any unreadable or inconsistent file fails the
    /// whole load, so that a reload either applies completely or not at all.
    pub fn load(config: &Config, ticket_keys: Vec<TicketKeyMaterial>) -> Result<Self, String> {
        let mut certs = Vec::new();
        for pair in &config.tls.certificates {
            let mut file = CertFile::load(&pair.cert, &pair.key)?;
            let (ocsp, explicit) = match &pair.ocsp {
                Some(path) => (path.clone(), true),
                None => (pair.cert.with_extension("ocsp"), false),
            };
            if let Some(warning) = file.attach_ocsp(&ocsp, explicit) {
                log::warn!("{warning}");
            }
            certs.push(file);
        }
        if let Some(dir) = &config.tls.cert_dir {
            certs.extend(load_cert_dir(dir)?);
        }
        if certs.is_empty() {
            return Err("no certificate configured".into());
        }

        let mut client_roots = Vec::new();
        if let Some(path) = &config.tls.client_ca {
            let pem =
                std::fs::read(path).map_err(|e| format!("client_ca {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                client_roots.push(cert.map_err(|e| format!("client_ca {}: {e}", path.display()))?);
            }
            if client_roots.is_empty() {
                return Err(format!("client_ca {}: no certificates", path.display()));
            }
        }
        Ok(Self {
            certs,
            client_roots,
            ticket_keys,
            cpu: CpuFeatures::detect(),
        })
    }

    /// Certificate facts for the metrics page (expiry, staple age), in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP ferrule_certificate_expiry_days Days until the certificate expires.\n\
             # TYPE ferrule_certificate_expiry_days gauge"
        );
        for cert in &self.certs {
            let name = cert.primary_name();
            let _ = writeln!(
                out,
                "ferrule_certificate_expiry_days{{cert=\"{name}\"}} {}",
                cert.days_left()
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferrule_ocsp_staple_age_seconds Age of the stapled OCSP response \
             (thisUpdate to now); absent when nothing is stapled.\n\
             # TYPE ferrule_ocsp_staple_age_seconds gauge"
        );
        for cert in &self.certs {
            if let Some((_, produced)) = cert.ocsp {
                let age = ocsp::now_seconds() - produced;
                let name = cert.primary_name();
                let _ = writeln!(
                    out,
                    "ferrule_ocsp_staple_age_seconds{{cert=\"{name}\"}} {age}"
                );
            }
        }
    }

    pub fn log_summary(&self) {
        let cpu = self.cpu;
        info!(
            "CPU crypto: AES-NI {}, PCLMULQDQ {}, VAES {}; preferring {} unless the client \
             prefers ChaCha20",
            cpu.aes,
            cpu.pclmulqdq,
            cpu.vaes,
            if cpu.fast_aes_gcm() {
                "AES-GCM"
            } else {
                "ChaCha20-Poly1305"
            }
        );
        for cert in &self.certs {
            let days = cert.days_left();
            if days < 0 {
                log::warn!(
                    "certificate {} EXPIRED {} days ago",
                    cert.cert_path.display(),
                    -days
                );
            } else if days < 14 {
                log::warn!(
                    "certificate {} expires in {days} days",
                    cert.cert_path.display()
                );
            }
        }
    }
}

/// Loads every `NAME.pem` with its `NAME.key` (and `NAME.ocsp` if present) from `dir`, in
/// name order. A `.pem` without a key is an error: it is almost always a deployment mistake.
fn load_cert_dir(dir: &std::path::Path) -> Result<Vec<CertFile>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cert_dir {}: {e}", dir.display()))?;
    let mut pems: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    pems.sort();
    let mut certs = Vec::new();
    for pem in pems {
        let key = pem.with_extension("key");
        if !key.exists() {
            return Err(format!(
                "cert_dir: {} has no key {}",
                pem.display(),
                key.display()
            ));
        }
        let mut file = CertFile::load(&pem, &key)?;
        if let Some(warning) = file.attach_ocsp(&pem.with_extension("ocsp"), false) {
            log::warn!("{warning}");
        }
        certs.push(file);
    }
    Ok(certs)
}

/// Cipher suites in preference order, AES-GCM first or ChaCha20 first.
fn cipher_order(chacha_first: bool) -> Vec<SupportedCipherSuite> {
    use ring_provider::cipher_suite::*;
    let aes = [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let chacha = [
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    if chacha_first {
        chacha.into_iter().chain(aes).collect()
    } else {
        aes.into_iter().chain(chacha).collect()
    }
}

/// True when the client lists a ChaCha20 suite before any AES-GCM suite: the usual sign of
/// a client without AES hardware (phones, older ARM), for which ChaCha20 is much cheaper.
pub fn client_prefers_chacha(suites: &[CipherSuite]) -> bool {
    for suite in suites {
        let name = format!("{suite:?}");
        if name.contains("CHACHA20") {
            return true;
        }
        if name.contains("AES_128_GCM") || name.contains("AES_256_GCM") {
            return false;
        }
    }
    false
}

/// One core's rustls configs: {AES-GCM first, ChaCha20 first} x {0-RTT allowed, refused},
/// all sharing the same certificates, session store and ticket sealer.
pub struct ServerContext {
    configs: [Arc<ServerConfig>; 4],
    pub resolver: Arc<CertResolver>,
    pub cpu: CpuFeatures,
    material: Arc<TlsMaterial>,
    config: Arc<Config>,
}

impl ServerContext {
    pub fn build(config: &Arc<Config>, material: &Arc<TlsMaterial>) -> anyhow::Result<Self> {
        let resolver = Arc::new(CertResolver::build(&material.certs).map_err(anyhow::Error::msg)?);
        let lifetime = config
            .tls
            .session_lifetime
            .as_secs()
            .min(u64::from(u32::MAX)) as u32;
        let ticketer: Option<Arc<dyn rustls::server::ProducesTickets>> = match config.tls.resumption
        {
            Resumption::Tickets => Some(Arc::new(Ticketer::new(&material.ticket_keys, lifetime))),
            _ => None,
        };

        let make = |chacha_first: bool, early: bool| -> anyhow::Result<Arc<ServerConfig>> {
            let provider = CryptoProvider {
                cipher_suites: cipher_order(chacha_first),
                ..random::provider()
            };
            let provider = Arc::new(provider);
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
            let builder = if material.client_roots.is_empty() {
                builder.with_no_client_auth()
            } else {
                let mut roots = rustls::RootCertStore::empty();
                for cert in &material.client_roots {
                    roots.add(cert.clone())?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = match config.tls.client_auth {
                    ClientAuth::Require => verifier.build()?,
                    ClientAuth::Request => verifier.allow_unauthenticated().build()?,
                };
                builder.with_client_cert_verifier(verifier)
            };
            let mut server = builder.with_cert_resolver(resolver.clone());
            server.ignore_client_order = true;
            if config.mode == Mode::Http {
                server.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            match config.tls.resumption {
                Resumption::Off => {
                    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
                    server.send_tls13_tickets = 0;
                }
                Resumption::Cache | Resumption::Tickets => {
                    server.session_storage = Arc::new(session::ShardSessionStore);
                    server.send_tls13_tickets = config.tls.tls13_tickets;
                }
            }
            if let Some(ticketer) = &ticketer {
                server.ticketer = ticketer.clone();
            }
            if early && config.tls.resumption == Resumption::Cache {
                server.max_early_data_size = config.early_data.max_bytes;
                // Answer safe early requests before the client's Finished (0.5-RTT data).
                server.send_half_rtt_data = true;
            }
            // Plaintext rustls may queue per connection before it pushes back on us.
            server.max_fragment_size = None;
            Ok(Arc::new(server))
        };

        Ok(Self {
            configs: [
                make(false, false)?,
                make(false, true)?,
                make(true, false)?,
                make(true, true)?,
            ],
            resolver,
            cpu: material.cpu,
            material: material.clone(),
            config: config.clone(),
        })
    }

    /// The same context with a new ticket key set.
    pub fn with_ticket_keys(&self, keys: &[TicketKeyMaterial]) -> anyhow::Result<Self> {
        let mut material = (*self.material).clone();
        material.ticket_keys = keys.to_vec();
        Self::build(&self.config, &Arc::new(material))
    }

    /// Picks the config for one connection.
    pub fn pick(&self, chacha_first: bool, early_data: bool) -> Arc<ServerConfig> {
        self.configs[usize::from(chacha_first) * 2 + usize::from(early_data)].clone()
    }

    pub fn material(&self) -> &TlsMaterial {
        &self.material
    }

    /// Whether 0-RTT is possible at all with this configuration.
    pub fn early_data_enabled(&self) -> bool {
        self.config.tls.resumption == Resumption::Cache && self.config.early_data.max_bytes > 0
    }
}
