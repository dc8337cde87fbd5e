//! Sessions on their way to their home core, delivered without waking it.
//!
//! A full TLS 1.3 handshake issues two tickets by default, and with N cores the home of
//! each is another core N-1 times in N. Sent as channel messages, each of them woke a
//! sleeping home core through its eventfd. On the 2-core bench machine that was 0.7 eventfd
//! writes, one `io_uring_enter` and 0.4 context switches per full handshake, and 1.5-10% of
//! its CPU in alternating runs.
//!
//! A session is not needed until a client presents it, so it waits in its home core's inbox
//! instead, and the home core collects the inbox before every session lookup it answers
//! (local or asked for by another core) and on its control tick. That is enough for every
//! lookup to find it. rustls stores a session before it writes what lets the client use it:
//! the TLS 1.3 ticket, or the Finished that completes a TLS 1.2 session. So the push happens
//! before the client can resume, and any lookup of that key is caused by a later event. The
//! queue's push (release) and pop (acquire) carry the entry across.
//!
//! An inbox is a lock-free bounded queue (crossbeam's `ArrayQueue`) per home core, written by
//! every other core and read only by its owner. When it is full the caller falls back to a
//! channel message, which wakes the home core as before: nothing is dropped at this step.
//! Entries waiting here are not yet counted in the cache's entry and byte gauges; at most
//! [`INBOX_DEPTH`] of them wait per core, and for at most one control tick.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::messages::SessionEntry;

/// Sessions that may wait for one home core. A home core drains its inbox at every lookup
/// and every control tick (20 ms). Filling 4096 slots between two ticks with no lookup takes
/// 200,000 sessions a second for one core: 100,000 full handshakes a second at two tickets
/// each, far beyond what one core sends its way.
pub const INBOX_DEPTH: usize = 4096;

/// One inbox per core, shared by all of them: core `c` pushes into `inboxes[home]` and only
/// core `home` pops from it.
#[derive(Clone)]
pub struct SessionInboxes {
    inboxes: Arc<[ArrayQueue<SessionEntry>]>,
}

impl SessionInboxes {
    pub fn new(shards: usize) -> Self {
        let inboxes = (0..shards).map(|_| ArrayQueue::new(INBOX_DEPTH)).collect();
        Self { inboxes }
    }

    /// Leaves a session for core `home`; gives it back if that inbox is full.
    pub fn post(&self, home: usize, entry: SessionEntry) -> Result<(), SessionEntry> {
        self.inboxes[home].push(entry)
    }

    /// Hands every session waiting for core `home` to `store`, oldest first.
    ///
    /// Bounded by what is queued when it starts, so a fast producer cannot keep the home core
    /// in this loop.
    pub fn collect(&self, home: usize, mut store: impl FnMut(SessionEntry)) {
        let inbox = &self.inboxes[home];
        for _ in 0..inbox.len() {
            match inbox.pop() {
                Some(entry) => store(entry),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> SessionEntry {
        (n.to_be_bytes().to_vec(), vec![n as u8])
    }

    #[test]
    fn sessions_reach_only_their_home_in_order() {
        let inboxes = SessionInboxes::new(3);
        for n in 0..5 {
            inboxes.post(1, entry(n)).unwrap();
        }
        inboxes.post(2, entry(99)).unwrap();

        let mut home0 = Vec::new();
        inboxes.collect(0, |e| home0.push(e));
        assert!(home0.is_empty());

        let mut home1 = Vec::new();
        inboxes.collect(1, |e| home1.push(e));
        assert_eq!(home1, (0..5).map(entry).collect::<Vec<_>>());

        let mut again = Vec::new();
        inboxes.collect(1, |e| again.push(e));
        assert!(
            again.is_empty(),
            "collected sessions are gone from the inbox"
        );

        let mut home2 = Vec::new();
        inboxes.collect(2, |e| home2.push(e));
        assert_eq!(home2, vec![entry(99)]);
    }

    #[test]
    fn a_full_inbox_gives_the_session_back() {
        let inboxes = SessionInboxes::new(2);
        for n in 0..INBOX_DEPTH as u32 {
            inboxes.post(0, entry(n)).unwrap();
        }
        assert_eq!(inboxes.post(0, entry(7)), Err(entry(7)));
        assert!(
            inboxes.post(1, entry(7)).is_ok(),
            "other inboxes are unaffected"
        );

        let mut collected = 0;
        inboxes.collect(0, |_| collected += 1);
        assert_eq!(collected, INBOX_DEPTH);
        assert!(inboxes.post(0, entry(7)).is_ok(), "collecting makes room");
    }

    #[test]
    fn sessions_posted_on_other_threads_are_collected_by_the_home_core() {
        let inboxes = SessionInboxes::new(2);
        let producers: Vec<_> = (0..4u32)
            .map(|t| {
                let inboxes = inboxes.clone();
                std::thread::spawn(move || {
                    for n in 0..500 {
                        inboxes.post(0, entry(t * 1000 + n)).unwrap();
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.join().unwrap();
        }

        let mut keys = Vec::new();
        inboxes.collect(0, |(key, _)| keys.push(key));
        keys.sort();
        let mut expected: Vec<_> = (0..4u32)
            .flat_map(|t| (0..500).map(move |n| (t * 1000 + n).to_be_bytes().to_vec()))
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
    }
}
