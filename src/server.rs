//! The process lifecycle: start the shards, run the control plane, stop cleanly.
//!
//! The main thread does no connection work. It owns what is global by nature (signals, the
//! ticket key schedule, configuration reloads) and tells every shard about changes by
//! message. Shards never wait for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use glommio::channels::channel_mesh::MeshBuilder;
use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, Overrides, Resumption};
use crate::shard::{self, Control, ShardPlan};
use crate::tls::tickets::{self, TicketKeyMaterial};
use crate::tls::TlsMaterial;

/// A running set of shards.
pub struct Running {
    pub address: std::net::SocketAddr,
    /// Kernel thread ids of the shards, for CPU accounting from `/proc`.
    pub thread_ids: Vec<i32>,
    controls: Vec<crossbeam_channel::Sender<Control>>,
    handles: Vec<glommio::ExecutorJoinHandle<anyhow::Result<()>>>,
    keys: KeySchedule,
    config: Arc<Config>,
}

/// Where ticket keys come from, and the key set in force.
struct KeySchedule {
    file: Option<(PathBuf, Option<SystemTime>)>,
    keys: Vec<(TicketKeyMaterial, Instant)>,
    rotation: Duration,
    lifetime: Duration,
    last_rotation: Instant,
}

impl KeySchedule {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let mut schedule = Self {
            file: None,
            keys: Vec::new(),
            rotation: config.tls.ticket_rotation,
            lifetime: config.tls.session_lifetime,
            last_rotation: Instant::now(),
        };
        match &config.tls.ticket_key_file {
            Some(path) => {
                let keys = tickets::read_key_file(path).map_err(anyhow::Error::msg)?;
                schedule.keys = keys.into_iter().map(|k| (k, Instant::now())).collect();
                schedule.file = Some((path.clone(), modified(path)));
            }
            None => {
                let key = TicketKeyMaterial::generate().map_err(anyhow::Error::msg)?;
                schedule.keys.push((key, Instant::now()));
            }
        }
        Ok(schedule)
    }

    fn current(&self) -> Vec<TicketKeyMaterial> {
        self.keys.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Advances the schedule; returns the new key set if it changed.
    fn tick(&mut self, force_reread: bool) -> Option<Vec<TicketKeyMaterial>> {
        if let Some((path, seen)) = &mut self.file {
            let now = modified(path);
            if !force_reread && now == *seen {
                return None;
            }
            *seen = now;
            return match tickets::read_key_file(path) {
                Ok(keys) => {
                    info!(
                        "ticket key file {} re-read: {} keys",
                        path.display(),
                        keys.len()
                    );
                    self.keys = keys.into_iter().map(|k| (k, Instant::now())).collect();
                    Some(self.current())
                }
                Err(e) => {
                    error!("{e}; the keys in service stay");
                    None
                }
            };
        }
        if self.last_rotation.elapsed() < self.rotation {
            return None;
        }
        // A new sealing key; old ones stay for opening until no ticket they sealed can
        // still be valid.
        let key = TicketKeyMaterial::generate().ok()?;
        self.last_rotation = Instant::now();
        let keep = self.rotation + self.lifetime;
        self.keys.retain(|(_, born)| born.elapsed() < keep);
        self.keys.insert(0, (key, Instant::now()));
        Some(self.current())
    }
}

/// Files whose change triggers a reload, with the modification time last seen.
struct Watch {
    files: Vec<(PathBuf, Option<SystemTime>)>,
    last_check: Instant,
}

impl Watch {
    /// How often the files are looked at. A stat per file per second costs nothing and
    /// needs no inotify plumbing through symlink swaps.
    const PERIOD: Duration = Duration::from_secs(1);

    fn new(config: &Config, config_path: Option<&std::path::Path>) -> Self {
        let mut paths: Vec<PathBuf> = config_path.into_iter().map(PathBuf::from).collect();
        for pair in &config.tls.certificates {
            paths.push(pair.cert.clone());
            paths.push(pair.key.clone());
            paths.push(
                pair.ocsp
                    .clone()
                    .unwrap_or_else(|| pair.cert.with_extension("ocsp")),
            );
        }
        if let Some(dir) = &config.tls.cert_dir {
            paths.push(dir.clone());
            if let Ok(entries) = std::fs::read_dir(dir) {
                paths.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
        paths.extend(config.tls.client_ca.clone());
        let files = paths
            .into_iter()
            .map(|p| (p.clone(), modified(&p)))
            .collect();
        Self {
            files,
            last_check: Instant::now(),
        }
    }

    /// True when any watched file changed since the last call.
    fn changed(&mut self) -> bool {
        if self.last_check.elapsed() < Self::PERIOD {
            return false;
        }
        self.last_check = Instant::now();
        let mut changed = false;
        for (path, seen) in &mut self.files {
            let now = modified(path);
            if now != *seen {
                *seen = now;
                changed = true;
            }
        }
        changed
    }
}

/// Fetches OCSP responses from each certificate's responder on a timer and writes them to
/// the certificate's OCSP file. The file watch then reloads them like any other change, so
/// a fetched response goes through exactly the checks an operator-provided one does.
struct OcspRefresher {
    period: Duration,
    last: Option<Instant>,
}

impl OcspRefresher {
    const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

    fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|last| last.elapsed() >= self.period);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }

    /// One round over every certificate that names an HTTP responder.
    fn refresh(config: &Config) {
        let mut targets: Vec<(PathBuf, PathBuf, PathBuf)> = config
            .tls
            .certificates
            .iter()
            .map(|p| {
                let ocsp = p
                    .ocsp
                    .clone()
                    .unwrap_or_else(|| p.cert.with_extension("ocsp"));
                (p.cert.clone(), p.key.clone(), ocsp)
            })
            .collect();
        if let Some(dir) = &config.tls.cert_dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for pem in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                    if pem.extension().is_some_and(|x| x == "pem") {
                        targets.push((
                            pem.clone(),
                            pem.with_extension("key"),
                            pem.with_extension("ocsp"),
                        ));
                    }
                }
            }
        }
        for (cert, key, ocsp) in targets {
            if let Err(e) = Self::refresh_one(&cert, &key, &ocsp) {
                warn!("OCSP refresh for {}: {e}", cert.display());
            }
        }
    }

    fn refresh_one(
        cert: &std::path::Path,
        key: &std::path::Path,
        ocsp: &std::path::Path,
    ) -> Result<(), String> {
        let file = crate::tls::certs::CertFile::load(cert, key)?;
        let Some(plan) = crate::tls::ocsp::plan(&file.chain) else {
            return Ok(()); // No responder named, or no issuer in the chain: nothing to do.
        };
        let response = crate::tls::ocsp::fetch(&plan, Self::FETCH_TIMEOUT)?;
        crate::tls::ocsp::check(&response, &file.serial)?;
        let tmp = ocsp.with_extension("ocsp.tmp-ferrule");
        std::fs::write(&tmp, &response).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, ocsp).map_err(|e| format!("{}: {e}", ocsp.display()))?;
        info!(
            "OCSP response for {} refreshed from {}",
            cert.display(),
            plan.url
        );
        Ok(())
    }
}

/// Builds every TLS backend's client config once, so that a bad CA or client certificate
/// is reported before the shards start (or before a reload is sent to them).
fn validate_backends(config: &Config) -> anyhow::Result<()> {
    for backend in &config.backends {
        if let Some(tls) = &backend.tls {
            crate::upstream::origin_tls::client_config(tls)
                .with_context(|| format!("backend {}", backend.address))?;
        }
    }
    Ok(())
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Catches SIGTERM, SIGINT and SIGHUP from now on, for [`Running::run_until_signalled`].
///
/// Call it before [`start`]: once ferrule listens, a supervisor may reload or stop it at
/// any moment, and until the handlers exist those signals kill the process instead.
pub fn control_signals() -> anyhow::Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")
}

/// Loads TLS material and starts one shard per configured CPU.
pub fn start(config: Config) -> anyhow::Result<Running> {
    let config = Arc::new(config);
    let keys = KeySchedule::new(&config)?;
    let material =
        Arc::new(TlsMaterial::load(&config, keys.current()).map_err(anyhow::Error::msg)?);
    material.log_summary();
    validate_backends(&config)?;

    let cpus = config.shard_cpus();
    let (fds, address) = crate::net::listeners(config.listen, cpus.len(), &cpus, &config.socket)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let mesh = MeshBuilder::full(cpus.len(), shard::MESH_CHANNEL_DEPTH);
    let inboxes = shard::SessionInboxes::new(cpus.len());
    let (started_tx, started_rx) = crossbeam_channel::unbounded();
    let mut controls = Vec::new();
    let mut plans = Vec::new();
    for (index, (cpu, fd)) in cpus.iter().zip(fds).enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded();
        controls.push(tx);
        plans.push(ShardPlan {
            index,
            cpu: *cpu,
            shards: cpus.len(),
            config: config.clone(),
            tls: material.clone(),
            listener_fd: fd,
            control: rx,
            mesh: mesh.clone(),
            inboxes: inboxes.clone(),
            started: started_tx.clone(),
        });
    }
    let handles = shard::spawn(plans)?;

    let mut thread_ids = vec![0; cpus.len()];
    for _ in 0..cpus.len() {
        let (index, tid) = started_rx
            .recv_timeout(Duration::from_secs(10))
            .context("a shard did not start within 10 s")?;
        thread_ids[index] = tid;
    }
    info!(
        "ferrule listening on {address} with {} shards (CPUs {cpus:?})",
        cpus.len()
    );
    Ok(Running {
        address,
        thread_ids,
        controls,
        handles,
        keys,
        config,
    })
}

impl Running {
    fn broadcast(&self, control: Control) {
        for tx in &self.controls {
            let _ = tx.send(control.clone());
        }
    }

    /// Advances the ticket key schedule and sends new keys to every shard.
    fn rotate_keys(&mut self, force_reread: bool) {
        if self.config.tls.resumption != Resumption::Tickets {
            return;
        }
        if let Some(keys) = self.keys.tick(force_reread) {
            self.broadcast(Control::TicketKeys(Arc::new(keys)));
        }
    }

    /// Re-reads configuration and files; on success every shard swaps to them.
    fn reload(&mut self, path: Option<&std::path::Path>, overrides: &Overrides) {
        let loaded = Config::load(path, overrides)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                validate_backends(&config).map_err(|e| format!("{e:#}"))?;
                TlsMaterial::load(&config, self.keys.current()).map(|tls| (config, tls))
            });
        match loaded {
            Ok((config, tls)) => {
                if config.listen != self.config.listen
                    || config.shard_cpus() != self.config.shard_cpus()
                {
                    warn!("listen address and cores change only on restart; other changes apply");
                }
                info!("configuration reloaded");
                let config = Arc::new(config);
                self.config = config.clone();
                self.broadcast(Control::Reload {
                    config,
                    tls: Arc::new(tls),
                });
                self.rotate_keys(true);
            }
            Err(e) => {
                error!("reload failed, the running configuration stays: {e}");
                self.broadcast(Control::ReloadFailed);
            }
        }
    }

    /// Asks every shard to drain and waits for them to finish.
    pub fn stop(self) -> anyhow::Result<()> {
        self.broadcast(Control::Drain);
        for handle in self.handles {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("a shard failed: {e:#}"),
                Err(e) => error!("a shard panicked: {e:?}"),
            }
        }
        Ok(())
    }

    /// Runs the control plane until SIGTERM or SIGINT, then drains. `signals` comes from
    /// [`control_signals`], called before the shards started.
    pub fn run_until_signalled(
        mut self,
        mut signals: Signals,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> anyhow::Result<()> {
        let mut watch = Watch::new(&self.config, config_path.as_deref());
        let mut ocsp = self
            .config
            .tls
            .ocsp_refresh
            .map(|period| OcspRefresher { period, last: None });
        loop {
            if let Some(refresher) = &mut ocsp {
                if refresher.due() {
                    OcspRefresher::refresh(&self.config);
                }
            }
            if watch.changed() {
                info!("a watched file changed: reloading");
                self.reload(config_path.as_deref(), &overrides);
                watch = Watch::new(&self.config, config_path.as_deref());
            }
            for signal in signals.pending() {
                match signal {
                    SIGHUP => {
                        self.reload(config_path.as_deref(), &overrides);
                        watch = Watch::new(&self.config, config_path.as_deref());
                    }
                    _ => {
                        info!(
                            "signal {signal}: draining (up to {:?})",
                            self.config.limits.drain_timeout
                        );
                        return self.stop();
                    }
                }
            }
            self.rotate_keys(false);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
