//! `--mode tcp`: after the handshake, plaintext is copied both ways to one origin connection
//! per client connection. For protocols ferrule does not parse.

use std::rc::Rc;

use crate::config::Config;
use crate::metrics;
use crate::shard::Shard;
use crate::tls::accept::AcceptedConn;

pub async fn serve(shard: &Rc<Shard>, mut client: Box<AcceptedConn>, config: &Config) {
    // Early data in TCP mode would be forwarded before the handshake proves it is not a
    // replay, and ferrule cannot judge an unknown protocol's safety: finish the handshake.
    if client
        .finish_handshake(config.limits.handshake_timeout)
        .await
        .is_err()
    {
        return;
    }
    let Ok(mut origin) = shard.upstreams.checkout(true).await else {
        let _ = client.stream.close().await;
        return;
    };
    if let Ok((up, down)) =
        super::tunnel::copy_bidirectional(&mut client.stream, &mut origin.stream).await
    {
        metrics::add("ferrule_bytes_total", r#"direction="client_in""#, up);
        metrics::add("ferrule_bytes_total", r#"direction="client_out""#, down);
    }
}
