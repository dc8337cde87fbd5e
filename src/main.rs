//! ferrule: a thread-per-core TLS terminator on io_uring.
//!
//! This file is the command line only: parse arguments, load the configuration, start the
//! shards (see [`server`]). Exit codes: 0 after a clean shutdown, 2 for a configuration or
//! usage error, 1 for anything else.

mod config;
mod demo;
mod doctor;
mod http;
mod loadgen;
mod metrics;
mod net;
mod server;
mod shard;
mod tls;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::{Config, Overrides};

#[derive(Parser)]
#[command(
    name = "ferrule",
    version,
    about = "Thread-per-core TLS terminator on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Terminate TLS and proxy to backends until SIGTERM or SIGINT (SIGHUP reloads).
    Serve(ServeArgs),
    /// Run ferrule on every core in front of a built-in origin, load it, print a table.
    Demo {
        /// Seconds of load per row of the table.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Validate a configuration file (and the files it names) and exit.
    CheckConfig { file: PathBuf },
    /// Manage session ticket key files.
    TicketKeys {
        #[command(subcommand)]
        action: TicketKeysAction,
    },
    /// Drive a TLS server with ferrule's own client (for bench/): prints one JSON line.
    Loadgen(loadgen::Args),
    /// Compare this host with tuning/ (sysctls, limits, CPU, io_uring, NUMA); changes nothing.
    Doctor,
}

#[derive(Subcommand)]
enum TicketKeysAction {
    /// Write a fresh 80-byte key (mode 0600); `--keep N` keeps N older keys from the file.
    Generate {
        file: PathBuf,
        #[arg(long, default_value_t = 0)]
        keep: usize,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (default 0.0.0.0:8443).
    #[arg(long)]
    listen: Option<String>,
    /// Origin address; repeat for round robin.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Certificate chain (PEM); repeat with --key for more names (the first is the default).
    #[arg(long = "cert")]
    certs: Vec<PathBuf>,
    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1), one per --cert, in the same order.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// Directory of NAME.pem chains with NAME.key keys (and optional NAME.ocsp staples).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Core count, CPU list (`0-3,8`) or NUMA node (`numa:0`); default: every CPU available.
    #[arg(long)]
    cores: Option<String>,
    /// Admin endpoint address, or `off` (default 127.0.0.1:9900).
    #[arg(long)]
    admin: Option<String>,
    /// `http` (parse and pool) or `tcp` (copy bytes).
    #[arg(long)]
    mode: Option<String>,
    /// `cache` (default; needed for 0-RTT), `tickets` or `off`.
    #[arg(long)]
    resumption: Option<String>,
    /// Shared ticket key file for `tickets` mode.
    #[arg(long)]
    ticket_key_file: Option<PathBuf>,
    /// Most 0-RTT bytes accepted per connection; 0 turns early data off.
    #[arg(long)]
    early_data_max: Option<u32>,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            backends: self.backends.clone(),
            certs: self.certs.clone(),
            keys: self.keys.clone(),
            cert_dir: self.cert_dir.clone(),
            cores: self.cores.clone(),
            admin: self.admin.clone(),
            mode: self.mode.clone(),
            resumption: self.resumption.clone(),
            ticket_key_file: self.ticket_key_file.clone(),
            early_data_max: self.early_data_max,
        }
    }
}

fn main() -> ExitCode {
    // rustls logs peer quirks (an IP address sent as SNI, say) at warn for every connection;
    // at the edge that is a flood, not news. RUST_LOG=rustls=warn brings them back.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,rustls=error"),
    )
    .format_target(false)
    .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo { seconds } => report(demo::run(seconds)),
        Command::CheckConfig { file } => check_config(&file),
        Command::TicketKeys {
            action: TicketKeysAction::Generate { file, keep },
        } => report(generate_ticket_keys(&file, keep)),
        Command::Loadgen(args) => report(loadgen::main(args)),
        Command::Doctor => report(doctor::run()),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrule: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = args.overrides();
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferrule: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let signals = match server::control_signals() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("ferrule: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let running = match server::start(config) {
        Ok(running) => running,
        Err(e) => {
            eprintln!("ferrule: {e:#}");
            return ExitCode::from(2);
        }
    };
    report(running.run_until_signalled(signals, args.config, overrides))
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let config = match Config::load(Some(file), &Overrides::default()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferrule: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = match &config.tls.ticket_key_file {
        Some(path) => match tls::tickets::read_key_file(path) {
            Ok(keys) => keys,
            Err(e) => {
                eprintln!("ferrule: {e}");
                return ExitCode::from(2);
            }
        },
        None => Vec::new(),
    };
    match tls::TlsMaterial::load(&config, keys) {
        Ok(material) => {
            for cert in &material.certs {
                println!(
                    "certificate {}: names {:?}, {} days left",
                    cert.cert_path.display(),
                    cert.names,
                    cert.days_left()
                );
            }
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrule: {e}");
            ExitCode::from(2)
        }
    }
}

fn generate_ticket_keys(file: &std::path::Path, keep: usize) -> anyhow::Result<()> {
    let mut keys = vec![tls::tickets::TicketKeyMaterial::generate().map_err(anyhow::Error::msg)?];
    if keep > 0 && file.exists() {
        let old = tls::tickets::read_key_file(file).map_err(anyhow::Error::msg)?;
        keys.extend(old.into_iter().take(keep));
    }
    tls::tickets::write_key_file(file, &keys).map_err(anyhow::Error::msg)?;
    println!("wrote {} ticket key(s) to {}", keys.len(), file.display());
    Ok(())
}
