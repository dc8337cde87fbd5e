//! Certificates: loading from PEM, reading their names, and choosing one per handshake.
//!
//! Every shard builds its own [`CertResolver`] at load time: a hash map from exact names and
//! from wildcard parents to candidates, so a handshake costs one or two lookups whatever the
//! number of certificates. Candidates for one name are ordered ECDSA first; the client's
//! signature schemes pick the first that fits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;

/// A certificate chain and its key, read and checked, not yet bound to a core.
pub struct CertFile {
    pub cert_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// DNS names from the subjectAltName extension (lower case; may start with `*.`).
    pub names: Vec<String>,
    /// Seconds since the epoch after which the certificate is invalid.
    pub not_after: i64,
    pub is_ecdsa: bool,
    /// Serial number (big-endian, no leading zero), to match OCSP responses.
    pub serial: Vec<u8>,
    /// A checked OCSP response to staple, and when it was produced (epoch seconds).
    pub ocsp: Option<(Vec<u8>, i64)>,
}

impl Clone for CertFile {
    fn clone(&self) -> Self {
        Self {
            cert_path: self.cert_path.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            names: self.names.clone(),
            not_after: self.not_after,
            is_ecdsa: self.is_ecdsa,
            serial: self.serial.clone(),
            ocsp: self.ocsp.clone(),
        }
    }
}

impl CertFile {
    /// Reads a PEM chain and its PEM key (PKCS#8, SEC1 or PKCS#1) and checks they match.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let chain_pem = std::fs::read(cert_path)
            .map_err(|e| format!("certificate {}: {e}", cert_path.display()))?;
        let key_pem =
            std::fs::read(key_path).map_err(|e| format!("key {}: {e}", key_path.display()))?;
        Self::from_pem(cert_path, &chain_pem, key_path, &key_pem)
    }

    pub fn from_pem(
        cert_path: &Path,
        chain_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<Self, String> {
        let chain = rustls_pemfile::certs(&mut &chain_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate {}: bad PEM: {e}", cert_path.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "certificate {}: no CERTIFICATE block",
                cert_path.display()
            ));
        }
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| format!("key {}: bad PEM: {e}", key_path.display()))?
            .ok_or_else(|| format!("key {}: no private key block", key_path.display()))?;

        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("key {}: unsupported key: {e}", key_path.display()))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        match certified.keys_match() {
            Ok(()) => {}
            // Keys that ring cannot derive a public key from are checked at first use instead.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(format!(
                    "key {} does not belong to certificate {}",
                    key_path.display(),
                    cert_path.display()
                ))
            }
        }

        let described =
            describe(&chain[0]).map_err(|e| format!("certificate {}: {e}", cert_path.display()))?;
        if described.names.is_empty() {
            return Err(format!(
                "certificate {}: no DNS or IP names in subjectAltName, so no client could \
                 validate it",
                cert_path.display()
            ));
        }
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            chain,
            key,
            names: described.names,
            not_after: described.not_after,
            is_ecdsa: described.is_ecdsa,
            serial: described.serial,
            ocsp: None,
        })
    }

    /// Reads the OCSP response at `path` (when it exists) and keeps it if it is current and
    /// about this certificate. Problems come back as warnings: the certificate is served
    /// either way, without a staple.
    pub fn attach_ocsp(&mut self, path: &Path, explicit: bool) -> Option<String> {
        let der = match std::fs::read(path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return None,
            Err(e) => return Some(format!("OCSP response {}: {e}", path.display())),
        };
        match super::ocsp::check(&der, &self.serial) {
            Ok(info) => {
                self.ocsp = Some((der, info.this_update));
                None
            }
            Err(e) => Some(format!("OCSP response {} not stapled: {e}", path.display())),
        }
    }

    /// The name used for this certificate in logs and metric labels.
    pub fn primary_name(&self) -> &str {
        self.names.first().map_or("unnamed", String::as_str)
    }

    /// Days until the certificate expires (negative once it has).
    pub fn days_left(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        (self.not_after - now).div_euclid(86_400)
    }

    fn certified_key(&self) -> Result<Arc<CertifiedKey>, String> {
        let signing = rustls::crypto::ring::sign::any_supported_type(&self.key)
            .map_err(|e| format!("{}: {e}", self.cert_path.display()))?;
        let mut certified = CertifiedKey::new(self.chain.clone(), signing);
        certified.ocsp = self.ocsp.as_ref().map(|(der, _)| der.clone());
        Ok(Arc::new(certified))
    }
}

struct Described {
    names: Vec<String>,
    not_after: i64,
    is_ecdsa: bool,
    serial: Vec<u8>,
}

/// Names, expiry, key type and serial number of an end-entity certificate.
fn describe(cert: &CertificateDer<'_>) -> Result<Described, String> {
    use x509_parser::prelude::*;

    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| format!("bad X.509: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) if ip.len() == 4 => {
                    names.push(format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]))
                }
                _ => {}
            }
        }
    }
    let not_after = parsed.validity().not_after.timestamp();
    let is_ecdsa = parsed.public_key().algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1";
    let serial = match parsed.raw_serial() {
        [0, rest @ ..] if !rest.is_empty() => rest.to_vec(),
        other => other.to_vec(),
    };
    Ok(Described {
        names,
        not_after,
        is_ecdsa,
        serial,
    })
}

/// Picks the certificate for a handshake from its SNI name and signature schemes.
#[derive(Debug)]
pub struct CertResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Keyed by the parent of a `*.` name: `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Vec<Arc<CertifiedKey>>,
    /// Metric label of the certificate each configured name selects.
    labels: HashMap<String, &'static str>,
    default_label: &'static str,
}

impl CertResolver {
    /// Builds the lookup maps. The first file is the default certificate, together with any
    /// later file of another key type that serves the same names.
    pub fn build(files: &[CertFile]) -> Result<Self, String> {
        let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut default = Vec::new();
        let mut labels = HashMap::new();
        let default_label = files.first().map_or("", |f| cert_label(f.primary_name()));
        let mut ordered: Vec<&CertFile> = files.iter().collect();
        // ECDSA before RSA within each name, so capable clients get the cheaper signature.
        ordered.sort_by_key(|f| !f.is_ecdsa);
        for file in ordered {
            let key = file.certified_key()?;
            let is_default = std::ptr::eq(file, &files[0])
                || (!files.is_empty() && file.names == files[0].names);
            if is_default {
                default.push(key.clone());
            }
            let label = cert_label(file.primary_name());
            for name in &file.names {
                labels.entry(name.clone()).or_insert(label);
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_default(),
                    None => exact.entry(name.clone()).or_default(),
                }
                .push(key.clone());
            }
        }
        Ok(Self {
            exact,
            wildcard,
            default,
            labels,
            default_label,
        })
    }

    /// Candidates for `name`: exact match first, then a one-label wildcard.
    pub fn candidates(&self, name: &str) -> Option<&[Arc<CertifiedKey>]> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Some(found);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }

    pub fn knows(&self, name: &str) -> bool {
        self.candidates(name).is_some()
    }

    /// The metric label (`cert="..."`) of the certificate served for `name`.
    pub fn label(&self, name: Option<&str>) -> &'static str {
        let Some(name) = name else {
            return self.default_label;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(label) = self.labels.get(&name) {
            return label;
        }
        let wildcard = name
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        wildcard
            .and_then(|w| self.labels.get(&w).copied())
            .unwrap_or(self.default_label)
    }
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let candidates = hello
            .server_name()
            .and_then(|name| self.candidates(name))
            .unwrap_or(&self.default);
        let schemes = hello.signature_schemes();
        candidates
            .iter()
            .find(|ck| ck.key.choose_scheme(schemes).is_some())
            .or_else(|| candidates.first())
            .cloned()
    }
}

/// Interns `cert="NAME"` as a static label. Certificate names are few and change only on
/// reload, so each distinct name is allocated once for the life of the process.
fn cert_label(name: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};

    static LABELS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let rendered = format!("cert=\"{}\"", name.replace(['"', '\\'], "_"));
    // Only certificate loading takes this lock, never a handshake.
    let mut labels = LABELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = labels.get(rendered.as_str()) {
        return existing;
    }
    let leaked: &'static str = Box::leak(rendered.into_boxed_str());
    labels.insert(leaked);
    leaked
}
