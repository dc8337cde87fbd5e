//! The admin endpoint: `GET /metrics` (Prometheus text) and `GET /healthz`.
//!
//! It runs as a task on the first shard and collects every core's snapshot by message when
//! scraped, so scraping costs the data path nothing between scrapes. It listens on loopback
//! unless configured otherwise: metrics reveal traffic patterns and are not for the public.

use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;

pub fn spawn(address: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .map_err(|e| anyhow::anyhow!("admin endpoint {address}: cannot listen: {e}"))?;
    // With port 0 the kernel picks the port: log the address actually bound.
    let bound = listener.local_addr().unwrap_or(address);
    log::info!("admin endpoint on http://{bound}/metrics");
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(serve(stream)).detach();
                }
                Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .detach();
    Ok(())
}

async fn serve(mut stream: TcpStream) {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        let read = crate::shard::with_timeout(Duration::from_secs(5), stream.read(&mut buf));
        match read.await {
            Some(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
            _ => break false,
        }
        if request.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if request.len() > MAX_REQUEST {
            break false;
        }
    };
    if !complete {
        return;
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match crate::shard::current() {
            Some(shard) => {
                shard.refresh_gauges();
                let snapshots = shard.collect_metrics().await;
                let mut text = super::render(&snapshots);
                shard.tls.borrow().material().render_metrics(&mut text);
                ("200 OK", "text/plain; version=0.0.4", text)
            }
            None => (
                "503 Service Unavailable",
                "text/plain",
                "not running\n".to_string(),
            ),
        },
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}
