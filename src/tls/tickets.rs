//! Stateless session tickets: key files, rotation and the per-core ticket sealer.
//!
//! # Key file format
//! A ticket key file is a sequence of fixed-size binary records, newest first: the first
//! record's key seals new tickets, every record's key opens them. Each record is nginx's
//! `ssl_session_ticket_key` layout, so existing rotation tooling can write it:
//!
//! * 80 bytes: 16-byte key name, 32 bytes HMAC secret, 32 bytes AES secret;
//! * 48 bytes: 16-byte key name, 16 bytes HMAC secret, 16 bytes AES secret.
//!
//! A file whose size is a multiple of 80 is read as 80-byte records, otherwise as 48-byte
//! records. ferrule seals tickets with AES-256-GCM under a key derived from the record's
//! secrets with HKDF-SHA256, so the tickets themselves are not nginx-compatible (ring has no
//! AES-CBC), but one file serves a mixed fleet during a migration. The file must not be
//! readable by other users.
//!
//! # Ticket layout
//! `key name (16) || nonce (12) || AES-256-GCM(session state) || tag (16)`, with the key name
//! as additional data. A ticket whose name matches no key, or that fails to open, is a miss:
//! the handshake goes on as a full one.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

pub const NAME_LEN: usize = 16;
const RECORD_LONG: usize = 80;
const RECORD_SHORT: usize = 48;
const TAG_LEN: usize = 16;

/// One key record as read from a key file or generated in memory.
#[derive(Clone)]
pub struct TicketKeyMaterial {
    pub name: [u8; NAME_LEN],
    secret: Vec<u8>,
}

impl fmt::Debug for TicketKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "TicketKey({})", hex(&self.name[..4]))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TicketKeyMaterial {
    /// A fresh random 80-byte record.
    pub fn generate() -> Result<Self, String> {
        let mut record = [0u8; RECORD_LONG];
        SystemRandom::new()
            .fill(&mut record)
            .map_err(|_| "no system randomness".to_string())?;
        Ok(Self::from_record(&record))
    }

    fn from_record(record: &[u8]) -> Self {
        let mut name = [0u8; NAME_LEN];
        name.copy_from_slice(&record[..NAME_LEN]);
        Self {
            name,
            secret: record[NAME_LEN..].to_vec(),
        }
    }

    fn record(&self) -> Vec<u8> {
        [&self.name[..], &self.secret].concat()
    }

    fn sealing_key(&self) -> LessSafeKey {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ferrule session ticket key v1");
        let prk = salt.extract(&self.secret);
        let info: [&[u8]; 1] = [&self.name];
        // Invariant: a 32-byte output is well within HKDF-SHA256's 255 * 32 byte limit.
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("HKDF output length is valid");
        LessSafeKey::new(UnboundKey::from(okm))
    }
}

/// Parses the contents of a key file (see the module docs for the layout).
pub fn parse_key_file(bytes: &[u8]) -> Result<Vec<TicketKeyMaterial>, String> {
    let record = if !bytes.is_empty() && bytes.len() % RECORD_LONG == 0 {
        RECORD_LONG
    } else if !bytes.is_empty() && bytes.len() % RECORD_SHORT == 0 {
        RECORD_SHORT
    } else {
        return Err(format!(
            "{} bytes is not a whole number of 80-byte (or 48-byte) ticket key records",
            bytes.len()
        ));
    };
    Ok(bytes
        .chunks(record)
        .map(TicketKeyMaterial::from_record)
        .collect())
}

/// Reads and checks a key file: it must exist, be a regular file that other users cannot
/// read, and hold whole records.
pub fn read_key_file(path: &Path) -> Result<Vec<TicketKeyMaterial>, String> {
    use std::os::unix::fs::PermissionsExt;

    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("ticket key file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("ticket key file {shown}: not a regular file"));
    }
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "ticket key file {shown} is readable by every user; run `chmod 600 {shown}`"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("ticket key file {shown}: {e}"))?;
    parse_key_file(&bytes).map_err(|e| format!("ticket key file {shown}: {e}"))
}

/// Writes a key file holding `keys` with mode 0600, replacing `path` atomically.
pub fn write_key_file(path: &Path, keys: &[TicketKeyMaterial]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;

    let tmp = path.with_extension("tmp-ferrule");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    for key in keys {
        file.write_all(&key.record())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Seals and opens tickets with one core's copy of the current key set.
pub struct Ticketer {
    keys: Vec<([u8; NAME_LEN], LessSafeKey)>,
    lifetime: u32,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Ticketer {
    /// Builds a sealer from `keys` (the first seals); `lifetime` is advertised to clients.
    pub fn new(keys: &[TicketKeyMaterial], lifetime: u32) -> Self {
        Self {
            keys: keys.iter().map(|k| (k.name, k.sealing_key())).collect(),
            lifetime,
        }
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (name, key) = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        // A random 96-bit nonce per ticket, from the shard's block of kernel randomness.
        rustls::crypto::SecureRandom::fill(&super::random::BLOCK_RANDOM, &mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut ticket[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            crate::metrics::inc(
                "ferrule_resumption_fallbacks_total",
                r#"reason="malformed""#,
            );
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let Some((_, key)) = self.keys.iter().find(|(n, _)| n[..] == *name) else {
            crate::metrics::inc(
                "ferrule_resumption_fallbacks_total",
                r#"reason="wrong_key""#,
            );
            return None;
        };
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = sealed.to_vec();
        match key.open_in_place(nonce, Aad::from(name), &mut buffer) {
            Ok(plain) => Some(plain.to_vec()),
            Err(_) => {
                crate::metrics::inc("ferrule_resumption_fallbacks_total", r#"reason="tampered""#);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_sealed_ticket_opens_with_the_same_keys_only() {
        let a = TicketKeyMaterial::generate().unwrap();
        let b = TicketKeyMaterial::generate().unwrap();
        let sealer = Ticketer::new(std::slice::from_ref(&a), 3600);
        let ticket = sealer.encrypt(b"session state").unwrap();
        assert_eq!(sealer.decrypt(&ticket).unwrap(), b"session state");
        assert_eq!(
            Ticketer::new(&[b.clone(), a], 3600)
                .decrypt(&ticket)
                .unwrap(),
            b"session state"
        );
        assert!(Ticketer::new(&[b], 3600).decrypt(&ticket).is_none());
    }

    #[test]
    fn tampered_and_truncated_tickets_are_misses() {
        let sealer = Ticketer::new(&[TicketKeyMaterial::generate().unwrap()], 3600);
        let mut ticket = sealer.encrypt(b"state").unwrap();
        assert!(sealer.decrypt(&ticket[..20]).is_none());
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert!(sealer.decrypt(&ticket).is_none());
    }

    #[test]
    fn key_files_take_whole_nginx_records() {
        assert_eq!(parse_key_file(&[7; 160]).unwrap().len(), 2);
        assert_eq!(parse_key_file(&[7; 48]).unwrap().len(), 1);
        assert!(parse_key_file(&[7; 79]).is_err());
        assert!(parse_key_file(&[]).is_err());
    }
}
