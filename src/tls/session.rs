//! The session cache, partitioned across cores by session key.
//!
//! SO_REUSEPORT sends a returning client to whichever core its new 4-tuple hashes to, so a
//! cache private to each core would resume about one client in N. A shared cache behind a
//! lock is what limits nginx and HAProxy. Instead every session has a *home core*, chosen by
//! its key: the core that issues a session posts it home, and the core that sees a
//! resumption attempt asks the home core for it before rustls needs it (see
//! [`crate::tls::accept`]). Each partition is owned by one core and touched only by it.
//!
//! TLS 1.3 sessions are taken, not read: each ticket resumes once, which is also what makes
//! 0-RTT replay-safe across cores (a replayed first flight finds its ticket gone, wherever it
//! lands). Keys of taken tickets are remembered for the session lifetime (bounded) so that a
//! second use is counted as a replay rather than as an unknown ticket.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::shard::SessionMiss;

/// Fixed cost charged per entry on top of key and value bytes: the LRU node, the hash table
/// slot and the allocation headers. Keeps the byte bound honest for small sessions.
const ENTRY_OVERHEAD: usize = 96;

struct Entry {
    value: Vec<u8>,
    issued: Instant,
}

/// A bounded set of recently seen key fingerprints, oldest forgotten first.
struct RecentKeys {
    set: HashSet<u64>,
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl RecentKeys {
    fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
            ttl,
        }
    }

    fn add(&mut self, fingerprint: u64) {
        let now = Instant::now();
        while let Some((old, at)) = self.order.front().copied() {
            if self.order.len() < self.capacity && now.duration_since(at) < self.ttl {
                break;
            }
            self.order.pop_front();
            self.set.remove(&old);
        }
        if self.set.insert(fingerprint) {
            self.order.push_back((fingerprint, now));
        }
    }

    fn contains(&self, fingerprint: u64) -> bool {
        self.set.contains(&fingerprint)
    }
}

/// One core's share of the session cache.
pub struct SessionPartition {
    entries: LruCache<Vec<u8>, Entry>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    lifetime: Duration,
    fingerprints: RandomState,
    taken: RecentKeys,
    evicted: RecentKeys,
}

impl SessionPartition {
    pub fn new(tls: &crate::config::Tls) -> Self {
        let remembered = tls.cache_entries_per_core.min(1 << 20);
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
            max_entries: tls.cache_entries_per_core,
            max_bytes: tls.cache_bytes_per_core,
            lifetime: tls.session_lifetime,
            fingerprints: RandomState::new(),
            taken: RecentKeys::new(remembered, tls.session_lifetime),
            evicted: RecentKeys::new(remembered, tls.session_lifetime),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes charged to this partition (keys, values and per-entry overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn cost(key: &[u8], value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }

    fn fingerprint(&self, key: &[u8]) -> u64 {
        self.fingerprints.hash_one(key)
    }

    /// Stores a session, evicting the least recently used ones to stay within bounds.
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let cost = Self::cost(&key, &value);
        if cost > self.max_bytes {
            return;
        }
        let entry = Entry {
            value,
            issued: Instant::now(),
        };
        if let Some((old_key, old)) = self.entries.push(key, entry) {
            self.bytes -= Self::cost(&old_key, &old.value);
        }
        self.bytes += cost;
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((key, old)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= Self::cost(&key, &old.value);
            let fingerprint = self.fingerprint(&key);
            self.evicted.add(fingerprint);
            crate::metrics::inc("ferrule_session_cache_evictions_total", "");
        }
    }

    /// Finds a session; `take` removes it. Returns the session and its age.
    pub fn lookup(&mut self, key: &[u8], take: bool) -> Result<(Vec<u8>, Duration), SessionMiss> {
        let found = if take {
            self.entries.pop(key).map(|e| {
                self.bytes -= Self::cost(key, &e.value);
                (e.value, e.issued)
            })
        } else {
            self.entries.get(key).map(|e| (e.value.clone(), e.issued))
        };
        let fingerprint = self.fingerprint(key);
        let Some((value, issued)) = found else {
            return Err(if self.taken.contains(fingerprint) {
                SessionMiss::Replayed
            } else if self.evicted.contains(fingerprint) {
                SessionMiss::Evicted
            } else {
                SessionMiss::Unknown
            });
        };
        if take {
            self.taken.add(fingerprint);
        }
        let age = issued.elapsed();
        if age > self.lifetime {
            if let Some(e) = self.entries.pop(key) {
                self.bytes -= Self::cost(key, &e.value);
            }
            return Err(SessionMiss::Expired);
        }
        Ok((value, age))
    }
}

/// The core a session lives on: a hash of its key, so every core computes the same answer.
///
/// Keys are random (rustls makes them), but a client chooses what it presents, so the hash
/// must still spread arbitrary bytes; FNV-1a over the key does, and costs nothing.
pub fn home_core(key: &[u8], shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

thread_local! {
    /// The session fetched for the handshake being processed right now on this core.
    ///
    /// Set by the accept path immediately before `Accepted::into_connection` and cleared
    /// right after; rustls reads it from inside that call. There is no await point between,
    /// so no other connection on this core can observe it.
    static PREFETCHED: RefCell<Option<(Vec<u8>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Makes `value` the answer for `key` during the next handshake step on this core.
pub fn prefetch(key: Vec<u8>, value: Vec<u8>) {
    PREFETCHED.with(|p| *p.borrow_mut() = Some((key, value)));
}

pub fn clear_prefetch() {
    PREFETCHED.with(|p| p.borrow_mut().take());
}

/// The rustls session store of a shard: issuing routes sessions home, lookups are answered
/// from the session prefetched for this handshake.
#[derive(Debug, Default)]
pub struct ShardSessionStore;

impl ShardSessionStore {
    fn prefetched(key: &[u8]) -> Option<Vec<u8>> {
        PREFETCHED.with(|p| {
            let mut slot = p.borrow_mut();
            match slot.as_ref() {
                Some((k, _)) if k == key => slot.take().map(|(_, v)| v),
                _ => None,
            }
        })
    }
}

impl rustls::server::StoresServerSessions for ShardSessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let Some(shard) = crate::shard::current() else {
            return false;
        };
        let home = home_core(&key, shard.shards);
        if home == shard.index {
            shard.sessions.borrow_mut().insert(key, value);
            true
        } else {
            shard.post_session(home, key, value);
            true
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        Self::prefetched(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        Self::prefetched(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(entries: usize, bytes: usize) -> SessionPartition {
        let mut tls = crate::config::Config::default().tls;
        tls.cache_entries_per_core = entries;
        tls.cache_bytes_per_core = bytes;
        SessionPartition::new(&tls)
    }

    #[test]
    fn tls13_sessions_resume_once_then_count_as_replayed() {
        let mut p = partition(10, 1 << 20);
        p.insert(b"k".to_vec(), b"v".to_vec());
        assert_eq!(p.lookup(b"k", true).unwrap().0, b"v");
        assert_eq!(p.lookup(b"k", true).unwrap_err(), SessionMiss::Replayed);
        assert_eq!(p.lookup(b"other", true).unwrap_err(), SessionMiss::Unknown);
    }

    #[test]
    fn tls12_sessions_are_read_not_taken() {
        let mut p = partition(10, 1 << 20);
        p.insert(b"id".to_vec(), b"v".to_vec());
        assert!(p.lookup(b"id", false).is_ok());
        assert!(p.lookup(b"id", false).is_ok());
    }

    #[test]
    fn partition_stays_within_entry_and_byte_bounds() {
        let mut p = partition(100, 20_000);
        for i in 0..10_000u32 {
            p.insert(i.to_be_bytes().to_vec(), vec![0; 100]);
        }
        assert!(p.len() <= 100);
        assert!(p.bytes() <= 20_000);
        assert_eq!(
            p.lookup(&9_850u32.to_be_bytes(), true).unwrap_err(),
            SessionMiss::Evicted
        );
    }

    #[test]
    fn a_million_sessions_stay_within_the_configured_bound() {
        let bound = 16 << 20;
        let mut p = partition(1_000_000, bound);
        let value = vec![7u8; 200];
        for i in 0..1_000_000u64 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&i.to_be_bytes());
            p.insert(key.to_vec(), value.clone());
            assert!(p.bytes() <= bound);
        }
        // 328 bytes charged per entry: the byte bound, not the entry bound, is what holds.
        assert_eq!(p.len(), bound / (32 + 200 + ENTRY_OVERHEAD));
    }

    #[test]
    fn home_core_is_stable_and_in_range() {
        for shards in 1..8 {
            let home = home_core(b"some ticket", shards);
            assert!(home < shards);
            assert_eq!(home, home_core(b"some ticket", shards));
        }
    }
}
