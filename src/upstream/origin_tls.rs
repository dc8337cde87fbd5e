//! TLS towards origins: client configs (trust, client certificates) and the handshake.

use std::sync::Arc;

use glommio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::OriginStream;
use crate::config::OriginTls;
use crate::metrics;
use crate::tls::stream::TlsStream;

/// Sessions remembered per origin per core; each resumes one new origin connection.
const ORIGIN_SESSIONS: usize = 256;

/// Builds a client config for one origin. Called on each shard, so every core gets its own
/// session cache; also called once up front to validate the files.
pub fn client_config(tls: &OriginTls) -> anyhow::Result<(Arc<ClientConfig>, ServerName<'static>)> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("backend ca_file {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                roots.add(cert?)?;
            }
            if roots.is_empty() {
                anyhow::bail!("backend ca_file {}: no certificates", path.display());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                anyhow::bail!("no system CA certificates found; set ca_file for TLS backends");
            }
        }
    }

    let provider = Arc::new(crate::tls::random::provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let file = crate::tls::certs::CertFile::load(cert, key).map_err(anyhow::Error::msg)?;
            builder.with_client_auth_cert(file.chain, file.key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::in_memory_sessions(ORIGIN_SESSIONS);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|_| anyhow::anyhow!("backend sni {:?} is not a valid name", tls.server_name))?;
    Ok((Arc::new(config), name))
}

/// Runs the client handshake over a fresh TCP connection.
pub async fn handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<OriginStream> {
    let conn = ClientConnection::new(config, name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stream = TlsStream::new(tcp, conn);
    stream.handshake().await?;
    let label = match stream.conn().handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => r#"kind="resumed""#,
        _ => r#"kind="full""#,
    };
    metrics::inc("ferrule_upstream_tls_handshakes_total", label);
    Ok(OriginStream::Tls(Box::new(stream)))
}
