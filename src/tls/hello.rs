//! ClientHello inspection: what rustls does not tell us before it needs the answer.
//!
//! rustls asks its session store synchronously, from inside the handshake. A session whose
//! home is another core must be fetched by message first, so ferrule reads the raw
//! ClientHello (kept beside the bytes fed to rustls's `Acceptor`) with `tls-parser` and pulls
//! out the session key the client will present: the first TLS 1.3 PSK identity, or a TLS 1.2
//! session ID when no ticket is offered.

use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, TlsVersion};

/// What the ClientHello asks for, as far as session resumption and early data go.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HelloSummary {
    /// The client offers TLS 1.3 (supported_versions lists it).
    pub offers_tls13: bool,
    /// First PSK identity of a TLS 1.3 `pre_shared_key` extension.
    pub psk_identity: Option<Vec<u8>>,
    /// Legacy session ID (TLS 1.2 resumption, or TLS 1.3 middlebox compatibility noise).
    pub session_id: Option<Vec<u8>>,
    /// A non-empty TLS 1.2 session ticket.
    pub offers_ticket: bool,
    /// The client sends 0-RTT data after this ClientHello.
    pub offers_early_data: bool,
}

impl HelloSummary {
    /// The session-store key rustls will ask for, and whether it will `take` it (TLS 1.3
    /// tickets are single-use) or `get` it (TLS 1.2 session IDs).
    pub fn session_key(&self) -> Option<(&[u8], bool)> {
        if self.offers_tls13 {
            return self.psk_identity.as_deref().map(|id| (id, true));
        }
        if self.offers_ticket {
            return None;
        }
        self.session_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .map(|id| (id, false))
    }
}

/// Reassembles the handshake message carried by the leading handshake records of `raw`.
fn handshake_bytes(raw: &[u8]) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let mut rest = raw;
    while rest.len() >= 5 {
        let (content_type, len) = (rest[0], u16::from_be_bytes([rest[3], rest[4]]) as usize);
        if content_type != 22 || rest.len() < 5 + len {
            break;
        }
        message.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if message.len() >= 4 {
            let wanted = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize + 4;
            if message.len() >= wanted {
                message.truncate(wanted);
                return Some(message);
            }
        }
    }
    None
}

/// Reads the first identity out of a `pre_shared_key` extension body (RFC 8446, 4.2.11).
fn first_psk_identity(ext: &[u8]) -> Option<Vec<u8>> {
    let identities_len = u16::from_be_bytes([*ext.first()?, *ext.get(1)?]) as usize;
    let identities = ext.get(2..2 + identities_len)?;
    let id_len = u16::from_be_bytes([*identities.first()?, *identities.get(1)?]) as usize;
    identities.get(2..2 + id_len).map(<[u8]>::to_vec)
}

/// Summarises the ClientHello at the start of `raw`; `None` if it cannot be parsed (rustls
/// then decides what to do with it, and no session is prefetched).
pub fn inspect(raw: &[u8]) -> Option<HelloSummary> {
    let message = handshake_bytes(raw)?;
    let (_, parsed) = tls_parser::parse_tls_message_handshake(&message).ok()?;
    let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = parsed else {
        return None;
    };
    let mut summary = HelloSummary {
        session_id: hello.session_id.map(<[u8]>::to_vec),
        ..HelloSummary::default()
    };
    let extensions = match hello.ext {
        Some(ext) => tls_parser::parse_tls_client_hello_extensions(ext).ok()?.1,
        None => Vec::new(),
    };
    for extension in extensions {
        match extension {
            TlsExtension::SupportedVersions(versions) => {
                summary.offers_tls13 = versions.contains(&TlsVersion::Tls13);
            }
            TlsExtension::PreSharedKey(body) => summary.psk_identity = first_psk_identity(body),
            TlsExtension::SessionTicket(ticket) => summary.offers_ticket = !ticket.is_empty(),
            TlsExtension::EarlyData(_) => summary.offers_early_data = true,
            _ => {}
        }
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_client_hello() {
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(inspect(&[22, 3, 1, 0, 4, 1, 0, 0, 200]), None);
        assert_eq!(inspect(&[]), None);
    }

    #[test]
    fn psk_identity_is_read_from_the_extension_body() {
        // identities: len 7 = (id len 1, id 0xAB, age 4 bytes); binders follow.
        let ext = [0, 7, 0, 1, 0xAB, 0, 0, 0, 1, 0, 0];
        assert_eq!(first_psk_identity(&ext), Some(vec![0xAB]));
        assert_eq!(first_psk_identity(&[0, 9, 0, 50]), None);
    }
}
