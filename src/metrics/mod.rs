//! Per-core counters and histograms, merged only when somebody asks.
//!
//! Each shard owns a [`CoreMetrics`] in a thread-local: plain integers behind `Cell`s, no
//! atomics, no cache lines bouncing between cores. The admin endpoint asks every shard for a
//! [`Snapshot`] by message and renders the Prometheus text format from the replies, so the
//! cost of metrics on the data path is one thread-local increment.

pub mod admin;
pub mod process;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Every metric family ferrule exports: name, type, help text.
///
/// Labelled counters are keyed by a pre-rendered label string (`kind="full",version="1.3"`)
/// so that the data path never formats or allocates to count something.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "ferrule_connections_accepted_total",
        "counter",
        "Client TCP connections accepted.",
    ),
    (
        "ferrule_connections_active",
        "gauge",
        "Client connections open now.",
    ),
    (
        "ferrule_handshakes_total",
        "counter",
        "Completed TLS handshakes by kind and version.",
    ),
    (
        "ferrule_handshake_failures_total",
        "counter",
        "Client connections that ended before or during the handshake, by reason.",
    ),
    (
        "ferrule_handshakes_by_certificate_total",
        "counter",
        "Completed handshakes by the certificate served.",
    ),
    (
        "ferrule_tls_cipher_suites_total",
        "counter",
        "Completed handshakes by negotiated cipher suite.",
    ),
    (
        "ferrule_requests_total",
        "counter",
        "HTTP responses sent to clients, by status code.",
    ),
    (
        "ferrule_upstream_connects_total",
        "counter",
        "New connections opened to origins.",
    ),
    (
        "ferrule_upstream_connect_failures_total",
        "counter",
        "Origin connections that failed, by reason.",
    ),
    (
        "ferrule_upstream_reuses_total",
        "counter",
        "Requests sent on a pooled origin connection.",
    ),
    (
        "ferrule_upstream_tls_handshakes_total",
        "counter",
        "TLS handshakes with origins, full or resumed.",
    ),
    (
        "ferrule_upstream_retries_total",
        "counter",
        "Idempotent requests retried on a fresh connection after a pooled one failed.",
    ),
    (
        "ferrule_bytes_total",
        "counter",
        "Plaintext bytes moved, by direction.",
    ),
    (
        "ferrule_resumption_fallbacks_total",
        "counter",
        "Resumption attempts that fell back to a full handshake, by reason.",
    ),
    (
        "ferrule_session_cache_entries",
        "gauge",
        "Sessions held in this core's partition of the session cache.",
    ),
    (
        "ferrule_session_cache_bytes",
        "gauge",
        "Bytes of session state held in this core's partition.",
    ),
    (
        "ferrule_session_cache_evictions_total",
        "counter",
        "Sessions evicted from this core's partition to stay within its bounds.",
    ),
    (
        "ferrule_session_lookups_total",
        "counter",
        "Session lookups by where the session lives (local or remote core).",
    ),
    (
        "ferrule_ticket_key_rotations_total",
        "counter",
        "Ticket key sets installed on this core.",
    ),
    (
        "ferrule_early_data_total",
        "counter",
        "TLS 1.3 early data attempts and their outcome.",
    ),
    (
        "ferrule_early_requests_total",
        "counter",
        "Requests that arrived as early data, by what ferrule did with them.",
    ),
    (
        "ferrule_internal_errors_total",
        "counter",
        "Bugs caught and survived (a panicking connection task), by kind. Should stay 0.",
    ),
    (
        "ferrule_reloads_total",
        "counter",
        "Configuration reloads by result.",
    ),
];

/// Handshake kinds and versions, as they appear in labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    Full,
    Resumed,
}

thread_local! {
    static CORE: CoreMetrics = CoreMetrics::new();
}

/// One core's metrics.
pub struct CoreMetrics {
    counters: RefCell<HashMap<(&'static str, &'static str), u64>>,
    status_codes: RefCell<[u64; 600]>,
    active_connections: Cell<i64>,
    /// Handshake durations in microseconds, from the first ClientHello byte to Finished.
    handshake_us: RefCell<Histogram<u64>>,
    /// Round-trip time of asking another core for a session, in microseconds.
    cross_core_lookup_us: RefCell<Histogram<u64>>,
    gauges: RefCell<HashMap<(&'static str, &'static str), i64>>,
}

impl CoreMetrics {
    fn new() -> Self {
        let histogram = || {
            // Invariant: 1 µs to 60 s at 3 significant digits is a valid hdrhistogram range.
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
        };
        Self {
            counters: RefCell::new(HashMap::new()),
            status_codes: RefCell::new([0; 600]),
            active_connections: Cell::new(0),
            handshake_us: RefCell::new(histogram()),
            cross_core_lookup_us: RefCell::new(histogram()),
            gauges: RefCell::new(HashMap::new()),
        }
    }
}

/// Adds `n` to the counter `name{labels}` of this core.
pub fn add(name: &'static str, labels: &'static str, n: u64) {
    CORE.with(|m| *m.counters.borrow_mut().entry((name, labels)).or_insert(0) += n);
}

/// Adds one to the counter `name{labels}` of this core.
pub fn inc(name: &'static str, labels: &'static str) {
    add(name, labels, 1);
}

/// Sets the gauge `name{labels}` of this core.
pub fn set_gauge(name: &'static str, labels: &'static str, value: i64) {
    CORE.with(|m| {
        m.gauges.borrow_mut().insert((name, labels), value);
    });
}

/// Counts one response sent to a client.
pub fn response(code: u16) {
    CORE.with(|m| {
        if let Some(slot) = m.status_codes.borrow_mut().get_mut(code as usize) {
            *slot += 1;
        }
    });
}

pub fn connection_opened() {
    inc("ferrule_connections_accepted_total", "");
    CORE.with(|m| m.active_connections.set(m.active_connections.get() + 1));
}

pub fn connection_closed() {
    CORE.with(|m| m.active_connections.set(m.active_connections.get() - 1));
}

/// `ferrule_handshakes_total` labels by [kind][version: 1.2, 1.3][resumption mode].
const HANDSHAKE_LABELS: [[[&str; 3]; 2]; 2] = [
    [
        [
            r#"kind="full",version="1.2",resumption="cache""#,
            r#"kind="full",version="1.2",resumption="tickets""#,
            r#"kind="full",version="1.2",resumption="off""#,
        ],
        [
            r#"kind="full",version="1.3",resumption="cache""#,
            r#"kind="full",version="1.3",resumption="tickets""#,
            r#"kind="full",version="1.3",resumption="off""#,
        ],
    ],
    [
        [
            r#"kind="resumed",version="1.2",resumption="cache""#,
            r#"kind="resumed",version="1.2",resumption="tickets""#,
            r#"kind="resumed",version="1.2",resumption="off""#,
        ],
        [
            r#"kind="resumed",version="1.3",resumption="cache""#,
            r#"kind="resumed",version="1.3",resumption="tickets""#,
            r#"kind="resumed",version="1.3",resumption="off""#,
        ],
    ],
];

/// Records a completed handshake.
pub fn handshake(
    kind: HandshakeKind,
    version: rustls::ProtocolVersion,
    mode: crate::config::Resumption,
    took: Duration,
) {
    let kind = usize::from(kind == HandshakeKind::Resumed);
    let version = usize::from(version == rustls::ProtocolVersion::TLSv1_3);
    let mode = match mode {
        crate::config::Resumption::Cache => 0,
        crate::config::Resumption::Tickets => 1,
        crate::config::Resumption::Off => 2,
    };
    inc(
        "ferrule_handshakes_total",
        HANDSHAKE_LABELS[kind][version][mode],
    );
    CORE.with(|m| m.handshake_us.borrow_mut().saturating_record(micros(took)));
}

pub fn cross_core_lookup(took: Duration) {
    CORE.with(|m| {
        m.cross_core_lookup_us
            .borrow_mut()
            .saturating_record(micros(took))
    });
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// A copy of one core's metrics, sent to whoever renders them.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub core: usize,
    pub counters: Vec<((&'static str, &'static str), u64)>,
    pub gauges: Vec<((&'static str, &'static str), i64)>,
    pub status_codes: Vec<(u16, u64)>,
    pub active_connections: i64,
    pub handshake_us: Histogram<u64>,
    pub cross_core_lookup_us: Histogram<u64>,
}

/// Takes a snapshot of this core's metrics.
pub fn snapshot(core: usize) -> Snapshot {
    CORE.with(|m| {
        let codes = m.status_codes.borrow();
        Snapshot {
            core,
            counters: m.counters.borrow().iter().map(|(k, v)| (*k, *v)).collect(),
            gauges: m.gauges.borrow().iter().map(|(k, v)| (*k, *v)).collect(),
            status_codes: (0..codes.len())
                .filter(|c| codes[*c] > 0)
                .map(|c| (c as u16, codes[c]))
                .collect(),
            active_connections: m.active_connections.get(),
            handshake_us: m.handshake_us.borrow().clone(),
            cross_core_lookup_us: m.cross_core_lookup_us.borrow().clone(),
        }
    })
}

/// Renders snapshots from every core in the Prometheus text exposition format.
pub fn render(snapshots: &[Snapshot]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for snap in snapshots {
            render_family(&mut out, snap, name);
        }
    }
    render_summary(
        &mut out,
        "ferrule_handshake_duration_seconds",
        "TLS handshake duration, from the first ClientHello byte to the handshake's end.",
        snapshots,
        |s| &s.handshake_us,
    );
    render_summary(
        &mut out,
        "ferrule_session_lookup_duration_seconds",
        "Time to fetch a session from its home core.",
        snapshots,
        |s| &s.cross_core_lookup_us,
    );
    process::render(&mut out);
    out
}

fn render_family(out: &mut String, snap: &Snapshot, name: &str) {
    let core = snap.core;
    let sep = |labels: &str| if labels.is_empty() { "" } else { "," };
    match name {
        "ferrule_connections_active" => {
            let _ = writeln!(out, "{name}{{core=\"{core}\"}} {}", snap.active_connections);
        }
        "ferrule_requests_total" => {
            for (code, n) in &snap.status_codes {
                let _ = writeln!(out, "{name}{{core=\"{core}\",code=\"{code}\"}} {n}");
            }
        }
        _ => {
            let mut rows: Vec<_> = snap
                .counters
                .iter()
                .filter(|((n, _), _)| *n == name)
                .collect();
            rows.sort();
            for ((_, labels), v) in rows {
                let _ = writeln!(out, "{name}{{core=\"{core}\"{}{labels}}} {v}", sep(labels));
            }
            let mut rows: Vec<_> = snap
                .gauges
                .iter()
                .filter(|((n, _), _)| *n == name)
                .collect();
            rows.sort();
            for ((_, labels), v) in rows {
                let _ = writeln!(out, "{name}{{core=\"{core}\"{}{labels}}} {v}", sep(labels));
            }
        }
    }
}

fn render_summary(
    out: &mut String,
    name: &str,
    help: &str,
    snapshots: &[Snapshot],
    pick: impl Fn(&Snapshot) -> &Histogram<u64>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for snap in snapshots {
        let h = pick(snap);
        let core = snap.core;
        for q in [0.5, 0.9, 0.99, 0.999] {
            let secs = h.value_at_quantile(q) as f64 / 1e6;
            let _ = writeln!(out, "{name}{{core=\"{core}\",quantile=\"{q}\"}} {secs}");
        }
        let sum = h.mean() * h.len() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{core=\"{core}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{core=\"{core}\"}} {}", h.len());
    }
}
