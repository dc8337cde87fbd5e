//! What travels between cores, and from the main thread to cores.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::Snapshot;
use crate::tls::tickets::TicketKeyMaterial;
use crate::tls::TlsMaterial;

/// Why a session lookup found nothing usable; each reason is counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionMiss {
    /// Never seen by its home core (or forgotten long ago).
    Unknown,
    /// Found, but older than the session lifetime.
    Expired,
    /// Dropped to keep the partition within its bounds.
    Evicted,
    /// A single-use TLS 1.3 ticket presented again: a replay or a client bug.
    Replayed,
}

impl SessionMiss {
    pub fn label(self) -> &'static str {
        match self {
            Self::Unknown => r#"reason="unknown""#,
            Self::Expired => r#"reason="expired""#,
            Self::Evicted => r#"reason="evicted""#,
            Self::Replayed => r#"reason="replayed""#,
        }
    }
}

/// A session key and its encoded state, as rustls hands them to the store.
pub type SessionEntry = (Vec<u8>, Vec<u8>);

/// A message from one core to another over the channel mesh.
#[derive(Debug)]
pub enum Message {
    MetricsRequest {
        id: u64,
        from: usize,
    },
    MetricsReply {
        id: u64,
        snapshot: Box<Snapshot>,
    },
    /// Sessions issued on another core, travelling to their home core.
    SessionPut(Vec<SessionEntry>),
    /// Asks the home core for a session; `take` removes it (TLS 1.3 tickets are single-use).
    SessionLookup {
        id: u64,
        key: Vec<u8>,
        take: bool,
    },
    /// The home core's answer: the session and its age, or why there is none.
    SessionReply {
        id: u64,
        result: Result<(Vec<u8>, Duration), SessionMiss>,
    },
}

impl Message {
    /// The request id a reply answers (0 for requests, which are not replies).
    pub fn reply_id(&self) -> u64 {
        match self {
            Self::MetricsReply { id, .. } | Self::SessionReply { id, .. } => *id,
            _ => 0,
        }
    }
}

/// A message from the main thread to every core.
#[derive(Clone, Debug)]
pub enum Control {
    /// Stop accepting, finish in-flight requests, exit.
    Drain,
    /// Install this ticket key set (first key encrypts, all decrypt).
    TicketKeys(Arc<Vec<TicketKeyMaterial>>),
    /// Swap to a new, already validated configuration between handshakes.
    Reload {
        config: Arc<Config>,
        tls: Arc<TlsMaterial>,
    },
    /// A reload was attempted and rejected before reaching the shards (counted per core).
    ReloadFailed,
}
