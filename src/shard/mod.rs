//! One shard per CPU: a pinned glommio executor that owns everything its connections touch.
//!
//! # Why thread-per-core
//! A TLS terminator's work is short, CPU-bound bursts per connection. Work-stealing runtimes
//! move those bursts between cores and pay for it with shared queues, atomics and cold
//! caches. Here a connection is accepted, handshaken and proxied on the core whose
//! SO_REUSEPORT socket the kernel gave it to, and never leaves.
//!
//! # What a shard owns
//! Its listener socket, its rustls configs, its partition of the session cache, its origin
//! connection pools and its metrics. Nothing on the data path is shared with another core.
//!
//! # What crosses cores
//! Only messages. Sessions travel to their home core through its inbox, a lock-free queue
//! that does not wake it ([`SessionInboxes`]). Session lookups and their replies, and metric
//! snapshots, go over glommio's channel mesh ([`Message`]). Control from the main
//! thread (drain, new ticket keys, reloads) arrives on a crossbeam channel per shard, which
//! the shard checks on a short timer: control is rare and may wait a few milliseconds.

mod drain;
mod inbox;
mod messages;
mod timeout;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use log::{debug, info, warn};

use crate::config::Config;
use crate::tls::session::SessionPartition;
use crate::tls::ServerContext;
use crate::upstream::Upstreams;
pub use drain::DrainSignal;
pub use inbox::SessionInboxes;
pub use messages::{Control, Message, SessionMiss};
pub use timeout::with_timeout;

/// Depth of each core-to-core channel. Sessions are small; 4096 in flight per pair is far
/// beyond what a burst of handshakes produces between two control ticks.
pub const MESH_CHANNEL_DEPTH: usize = 4096;

/// How often a shard looks at its control channel from the main thread.
const CONTROL_TICK: Duration = Duration::from_millis(20);

/// Everything a shard needs at start, built by the main thread.
pub struct ShardPlan {
    pub index: usize,
    pub cpu: usize,
    pub shards: usize,
    pub config: Arc<Config>,
    pub tls: Arc<crate::tls::TlsMaterial>,
    pub listener_fd: std::os::fd::OwnedFd,
    pub control: crossbeam_channel::Receiver<Control>,
    pub mesh: MeshBuilder<Message, glommio::channels::channel_mesh::Full>,
    pub inboxes: SessionInboxes,
    /// Reports the shard's thread id, for per-thread CPU accounting.
    pub started: crossbeam_channel::Sender<(usize, i32)>,
}

/// The state one core owns. Reached through [`current`] from code running on that core.
pub struct Shard {
    pub index: usize,
    pub cpu: usize,
    pub shards: usize,
    pub config: RefCell<Arc<Config>>,
    pub tls: RefCell<Rc<ServerContext>>,
    pub sessions: RefCell<SessionPartition>,
    pub upstreams: Upstreams,
    pub drain: DrainSignal,
    /// This shard's listening socket, owned by the glommio listener in `run`, which drops
    /// it only after draining has started.
    listener_fd: std::os::fd::RawFd,
    senders: Senders<Message>,
    inboxes: SessionInboxes,
    pending: RefCell<HashMap<u64, LocalSender<Message>>>,
    next_request: Cell<u64>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// The shard running on this thread, if any.
pub fn current() -> Option<Rc<Shard>> {
    CURRENT.with(|c| c.borrow().clone())
}

impl Shard {
    /// Sends a session to its home core `peer` without waiting and without waking it.
    ///
    /// Called from rustls callbacks, which cannot wait. The session goes into `peer`'s inbox,
    /// which `peer` collects before any lookup (see [`inbox`]). A full inbox falls back to a
    /// channel message; a full channel drops the session, which only costs that client a
    /// full handshake next time, and the drop is counted.
    pub fn post_session(&self, peer: usize, key: Vec<u8>, value: Vec<u8>) {
        let Err(entry) = self.inboxes.post(peer, (key, value)) else {
            return;
        };
        let message = Message::SessionPut(vec![entry]);
        if self.senders.try_send_to(peer, message).is_err() {
            crate::metrics::inc("ferrule_session_lookups_total", r#"result="dropped""#);
        }
    }

    /// Moves the sessions other cores left in this core's inbox into its partition.
    fn collect_sessions(&self) {
        let mut sessions = self.sessions.borrow_mut();
        self.inboxes
            .collect(self.index, |(key, value)| sessions.insert(key, value));
    }

    /// Looks a session up in this core's partition (`take` removes it), after collecting the
    /// inbox: a session the client already holds a ticket for may still be waiting there.
    pub fn lookup_session(
        &self,
        key: &[u8],
        take: bool,
    ) -> Result<(Vec<u8>, Duration), SessionMiss> {
        self.collect_sessions();
        self.sessions.borrow_mut().lookup(key, take)
    }

    /// Sends a request built by `make` (given its id) to `peer` and waits for the reply.
    pub async fn ask(&self, peer: usize, make: impl FnOnce(u64) -> Message) -> Option<Message> {
        let id = self.next_request.get();
        self.next_request.set(id + 1);
        let (tx, rx) = local_channel::new_bounded(1);
        self.pending.borrow_mut().insert(id, tx);
        if self.senders.send_to(peer, make(id)).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return None;
        }
        rx.recv().await
    }

    /// Completes a pending [`ask`](Self::ask).
    fn complete(&self, id: u64, reply: Message) {
        if let Some(tx) = self.pending.borrow_mut().remove(&id) {
            let _ = tx.try_send(reply);
        }
    }

    /// Asks every core (this one included) for its metrics.
    pub async fn collect_metrics(&self) -> Vec<crate::metrics::Snapshot> {
        let mut all = vec![crate::metrics::snapshot(self.index)];
        for peer in (0..self.shards).filter(|p| *p != self.index) {
            let reply = self.ask(peer, |id| Message::MetricsRequest {
                id,
                from: self.index,
            });
            if let Some(Message::MetricsReply { snapshot, .. }) = reply.await {
                all.push(*snapshot);
            }
        }
        all.sort_by_key(|s| s.core);
        all
    }

    /// Handles a message from another core.
    async fn handle(&self, from: usize, message: Message) {
        match message {
            Message::MetricsRequest { id, from } => {
                self.refresh_gauges();
                let snapshot = Box::new(crate::metrics::snapshot(self.index));
                let _ = self
                    .senders
                    .send_to(from, Message::MetricsReply { id, snapshot })
                    .await;
            }
            Message::SessionPut(batch) => {
                let mut sessions = self.sessions.borrow_mut();
                for (key, value) in batch {
                    sessions.insert(key, value);
                }
            }
            Message::SessionLookup { id, key, take } => {
                let result = self.lookup_session(&key, take);
                let _ = self
                    .senders
                    .send_to(from, Message::SessionReply { id, result })
                    .await;
            }
            reply @ (Message::MetricsReply { .. } | Message::SessionReply { .. }) => {
                let id = reply.reply_id();
                self.complete(id, reply);
            }
        }
    }

    /// Publishes gauges that are cheaper to read on demand than to maintain.
    pub fn refresh_gauges(&self) {
        self.collect_sessions();
        let sessions = self.sessions.borrow();
        crate::metrics::set_gauge("ferrule_session_cache_entries", "", sessions.len() as i64);
        crate::metrics::set_gauge("ferrule_session_cache_bytes", "", sessions.bytes() as i64);
    }

    fn apply_control(&self, control: Control) {
        match control {
            Control::Drain => self.drain.start(),
            Control::TicketKeys(keys) => {
                let context = self.tls.borrow().with_ticket_keys(&keys);
                match context {
                    Ok(context) => {
                        *self.tls.borrow_mut() = Rc::new(context);
                        crate::metrics::inc("ferrule_ticket_key_rotations_total", "");
                    }
                    Err(e) => warn!("core {}: new ticket keys rejected: {e}", self.cpu),
                }
            }
            Control::ReloadFailed => {
                crate::metrics::inc("ferrule_reloads_total", r#"result="failed""#)
            }
            Control::Reload { config, tls } => match ServerContext::build(&config, &tls) {
                Ok(context) => {
                    *self.tls.borrow_mut() = Rc::new(context);
                    if let Err(e) = self.upstreams.reconfigure(&config) {
                        warn!("core {}: backends not reconfigured: {e:#}", self.cpu);
                    }
                    if !self.drain.is_draining() {
                        // SAFETY: the listener is dropped only after draining has started
                        // (accept_loop returns on drain alone), and this runs on the same
                        // thread, so the fd is still the open listener.
                        let retuned = unsafe {
                            crate::net::retune_listener(self.listener_fd, &config.socket)
                        };
                        if let Err(e) = retuned {
                            warn!("core {}: socket options not applied: {e}", self.cpu);
                        }
                    }
                    *self.config.borrow_mut() = config;
                    crate::metrics::inc("ferrule_reloads_total", r#"result="ok""#);
                }
                Err(e) => {
                    warn!(
                        "core {}: reload rejected, old configuration stays: {e}",
                        self.cpu
                    );
                    crate::metrics::inc("ferrule_reloads_total", r#"result="failed""#);
                }
            },
        }
    }
}

/// Starts one pinned executor per planned shard and returns their join handles.
pub fn spawn(
    plans: Vec<ShardPlan>,
) -> anyhow::Result<Vec<glommio::ExecutorJoinHandle<anyhow::Result<()>>>> {
    let mut handles = Vec::with_capacity(plans.len());
    for plan in plans {
        let name = format!("ferrule-core{}", plan.cpu);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&name)
            // glommio pre-registers this much memory for io_uring buffers per executor;
            // ferrule reads into its own buffers, so a small pool is enough.
            .io_memory(1 << 20)
            .spawn(move || run(plan))
            .map_err(|e| anyhow::anyhow!("cannot start shard executor: {e}"))?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn run(plan: ShardPlan) -> anyhow::Result<()> {
    // Pin first, so that everything below is allocated from this core's NUMA node.
    if !core_affinity::set_for_current(core_affinity::CoreId { id: plan.cpu }) {
        warn!(
            "could not pin shard {} to CPU {}; running unpinned",
            plan.index, plan.cpu
        );
    }
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };

    let (senders, receivers) = plan
        .mesh
        .join()
        .await
        .map_err(|_| anyhow::anyhow!("core {}: could not join the core mesh", plan.cpu))?;
    let config = plan.config.clone();
    let sessions = SessionPartition::new(&config.tls);
    let tls = ServerContext::build(&config, &plan.tls)?;
    let shard = Rc::new(Shard {
        index: plan.index,
        cpu: plan.cpu,
        shards: plan.shards,
        upstreams: Upstreams::new(&config)?,
        config: RefCell::new(config.clone()),
        tls: RefCell::new(Rc::new(tls)),
        sessions: RefCell::new(sessions),
        drain: DrainSignal::default(),
        senders,
        inboxes: plan.inboxes,
        pending: RefCell::new(HashMap::new()),
        next_request: Cell::new(0),
        listener_fd: std::os::fd::AsRawFd::as_raw_fd(&plan.listener_fd),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(shard.clone()));

    let mut receivers = receivers;
    for (peer, receiver) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(message) = receiver.recv().await {
                let handled = std::panic::AssertUnwindSafe(shard.handle(peer, message));
                if futures_lite::FutureExt::catch_unwind(handled)
                    .await
                    .is_err()
                {
                    log::error!(
                        "core {}: handling a message from core {peer} panicked",
                        shard.cpu
                    );
                    crate::metrics::inc("ferrule_internal_errors_total", r#"kind="panic""#);
                }
            }
        })
        .detach();
    }
    spawn_control_loop(shard.clone(), plan.control);
    if shard.index == 0 {
        if let Some(admin) = config.admin {
            crate::metrics::admin::spawn(admin)?;
        }
    }

    // SAFETY: the fd is an open, bound, listening TCP socket that this shard now owns alone;
    // into_raw_fd hands its ownership to the glommio listener, which closes it on drop.
    let listener = unsafe {
        use std::os::fd::{FromRawFd, IntoRawFd};
        TcpListener::from_raw_fd(plan.listener_fd.into_raw_fd())
    };
    let _ = plan.started.send((plan.index, tid));
    // The bound address, not the configured one: with port 0 the kernel picked the port.
    let serving = listener.local_addr().unwrap_or(config.listen);
    info!("core {}: serving on {serving}", plan.cpu);

    accept_loop(&shard, &listener).await;
    drop(listener);
    shard.drain.wait_idle(config.limits.drain_timeout).await;
    CURRENT.with(|c| c.borrow_mut().take());
    debug!("core {}: stopped", plan.cpu);
    Ok(())
}

fn spawn_control_loop(shard: Rc<Shard>, control: crossbeam_channel::Receiver<Control>) {
    glommio::spawn_local(async move {
        loop {
            while let Ok(message) = control.try_recv() {
                // A bug in applying one control message must not end the loop that
                // delivers drains and reloads to this core: log it, count it, go on.
                let apply = std::panic::AssertUnwindSafe(|| shard.apply_control(message));
                if std::panic::catch_unwind(apply).is_err() {
                    log::error!("core {}: applying a control message panicked", shard.cpu);
                    crate::metrics::inc("ferrule_internal_errors_total", r#"kind="panic""#);
                }
            }
            // Sessions for this core may sit in its inbox while no client asks for them;
            // the tick bounds how long they stay out of the cache's bounds and gauges.
            shard.collect_sessions();
            glommio::timer::sleep(CONTROL_TICK).await;
        }
    })
    .detach();
}

async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener) {
    let slots = Rc::new(glommio::sync::Semaphore::new(
        shard.config.borrow().limits.max_connections_per_core as u64,
    ));
    loop {
        // At the connection limit, stop accepting: the kernel's backlog holds new clients
        // until a slot frees, instead of accepting them only to starve them.
        let permit = match futures_lite::future::or(
            async { slots.clone().acquire_static_permit(1).await.ok() },
            async {
                shard.drain.wait().await;
                None
            },
        )
        .await
        {
            Some(permit) => permit,
            None => return,
        };
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.drain.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    // A bug must cost one connection, never the core and all its clients:
                    // a panic unwinds to here, is logged and counted, and the shard goes on.
                    let serve = std::panic::AssertUnwindSafe(serve_connection(&shard, stream));
                    if let Err(panic) = futures_lite::FutureExt::catch_unwind(serve).await {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        log::error!("core {}: connection task panicked: {what}", shard.cpu);
                        crate::metrics::inc("ferrule_internal_errors_total", r#"kind="panic""#);
                        shard.drain.connection_finished();
                        crate::metrics::connection_closed();
                    }
                    drop(permit);
                })
                .detach();
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly rather than spin on the error.
                warn!("core {}: accept failed: {e}", shard.cpu);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(shard: &Rc<Shard>, stream: TcpStream) {
    crate::metrics::connection_opened();
    shard.drain.connection_started();
    let peer = stream.peer_addr().ok();
    let config = shard.config.borrow().clone();

    // The handshake's future is large (ClientHello buffers, session lookup, rustls's
    // acceptor) and done with once the connection is established: on the heap, it is freed
    // then instead of sizing every connection task for the rest of its life.
    match Box::pin(crate::tls::accept::accept(shard, stream, &config)).await {
        Ok(accepted) => match config.mode {
            crate::config::Mode::Http => crate::http::serve(shard, accepted, peer, &config).await,
            crate::config::Mode::Tcp => crate::upstream::tcp::serve(shard, accepted, &config).await,
        },
        Err(reason) => debug!(
            "core {}: handshake with {peer:?} failed: {reason}",
            shard.cpu
        ),
    }

    shard.drain.connection_finished();
    crate::metrics::connection_closed();
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use glommio::{LocalExecutorBuilder, Placement};

    /// ferrule's glommio ends a task queue's time slice by reading the clock instead of
    /// arming a timeout in the latency ring on every pass (vendor/glommio/FERRULE.md). A
    /// task that computes and calls `yield_if_needed` must still give the CPU to the other
    /// tasks of its queue about once per slice.
    #[test]
    fn a_computing_task_yields_once_per_time_slice() {
        const SLICE: Duration = Duration::from_millis(10);
        const COMPUTE: Duration = Duration::from_millis(400);

        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .preempt_timer(SLICE)
            .make()
            .unwrap();

        executor.run(async {
            let done = Rc::new(Cell::new(false));
            let turns = Rc::new(Cell::new(0u32));
            let (stop, count) = (done.clone(), turns.clone());
            let other = glommio::spawn_local(async move {
                while !stop.get() {
                    count.set(count.get() + 1);
                    glommio::executor().yield_now().await;
                }
            });

            let started = Instant::now();
            while started.elapsed() < COMPUTE {
                glommio::yield_if_needed().await;
            }
            done.set(true);
            other.await;

            // 40 slices fit in the computation; a shared, noisy machine may stretch a few.
            // Without time slices the other task gets the CPU once or twice.
            assert!(
                turns.get() >= 10,
                "the other task ran {} times",
                turns.get()
            );
        });
    }

    /// ferrule's glommio hands a sleeping executor's next timer to the wait itself as its
    /// timeout (vendor/glommio/FERRULE.md). With nothing else to wake it, the executor must
    /// still wake up for the timer.
    #[test]
    fn an_executor_with_nothing_else_to_do_wakes_up_for_its_timer() {
        const NAP: Duration = Duration::from_millis(50);

        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let executor = LocalExecutorBuilder::new(Placement::Unbound)
                .make()
                .unwrap();
            let slept = executor.run(async {
                let started = Instant::now();
                glommio::timer::sleep(NAP).await;
                started.elapsed()
            });
            let _ = done.send(slept);
        });

        // A thread that sleeps through its timer is left behind; the process ends with the
        // test run.
        let slept = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the executor slept through its timer");
        assert!(slept >= NAP);
    }

    /// Polls this process has armed in io_uring and not seen complete, from the kernel's
    /// own listing (`/proc/self/fdinfo` of every io_uring descriptor).
    fn armed_io_uring_polls() -> usize {
        const IORING_OP_POLL_ADD: &str = "op=6,";

        let mut polls = 0;
        for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_ring = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[io_uring]");
            if !is_ring {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            polls += info
                .lines()
                .filter(|line| line.trim_start().starts_with(IORING_OP_POLL_ADD))
                .count();
        }
        polls
    }

    /// Each time an executor sleeps, glommio polls its latency ring from its main ring so
    /// that either can wake it. ferrule's glommio keeps that poll until it fires
    /// (vendor/glommio/FERRULE.md); one per sleep would pile up in the kernel while the
    /// latency ring has nothing to complete.
    #[test]
    fn sleeping_again_and_again_leaves_no_polls_behind_in_the_kernel() {
        const NAPS: usize = 300;

        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .make()
            .unwrap();
        let armed = executor.run(async {
            for _ in 0..NAPS {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            armed_io_uring_polls()
        });

        // The test harness runs other executors beside this one; each holds a few polls.
        assert!(armed < NAPS / 3, "{armed} polls armed after {NAPS} sleeps");
    }
}
