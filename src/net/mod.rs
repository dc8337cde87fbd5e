//! Listening sockets, per-connection socket options, and sends of several buffers at once.
//!
//! Listeners are created by the main thread, one per shard, all bound to the same address
//! with SO_REUSEPORT, so that a bad address is reported before any shard starts and every
//! shard gets the same port even when the configured port is 0.

pub mod send;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::config;

/// Creates `count` listening sockets on `addr` (SO_REUSEPORT), tuned per `opts`.
///
/// Returns the sockets and the bound address (with the real port when `addr` had port 0).
pub fn listeners(
    addr: SocketAddr,
    count: usize,
    cpus: &[usize],
    opts: &config::Socket,
) -> std::io::Result<(Vec<OwnedFd>, SocketAddr)> {
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(count);
    for index in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        set_inherited_options(&socket, opts)?;
        if let Some(size) = opts.recv_buffer_bytes {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(size) = opts.send_buffer_bytes {
            socket.set_send_buffer_size(size)?;
        }
        if opts.defer_accept_seconds > 0 {
            set_int(
                &socket,
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                opts.defer_accept_seconds,
            )?;
        }
        if opts.fastopen_queue > 0 {
            // Best effort: a kernel with net.ipv4.tcp_fastopen lacking the server bit refuses
            // nothing here, it just never uses the queue. `ferrule doctor` reports that.
            let _ = set_int(
                &socket,
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN,
                opts.fastopen_queue,
            );
        }
        if opts.incoming_cpu {
            // Hint the kernel to pick this socket for packets processed on this shard's CPU,
            // so a connection's softirq work and its handshake share one cache.
            if let Some(cpu) = cpus.get(index) {
                let _ = set_int(
                    &socket,
                    libc::SOL_SOCKET,
                    libc::SO_INCOMING_CPU,
                    *cpu as u32,
                );
            }
        }
        socket.bind(&bound.into())?;
        socket.listen(opts.backlog)?;
        if index == 0 {
            bound = socket.local_addr()?.as_socket().unwrap_or(addr);
        }
        sockets.push(OwnedFd::from(socket));
    }
    Ok((sockets, bound))
}

fn set_int(socket: &Socket, level: i32, name: i32, value: u32) -> std::io::Result<()> {
    let value = value as libc::c_int;
    // SAFETY: the fd is a valid socket for the lifetime of `socket`; the option value is a
    // properly aligned c_int whose size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the options that accepted connections inherit from their listener: TCP_NODELAY and
/// TCP keepalive with its timers. Set once on the listener, they cost no syscall per
/// connection (a handshake otherwise paid five `setsockopt`s).
pub fn set_inherited_options(listener: &Socket, opts: &config::Socket) -> std::io::Result<()> {
    listener.set_nodelay(opts.nodelay)?;
    match opts.keepalive_idle {
        Some(idle) => listener.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(opts.keepalive_interval)
                .with_retries(opts.keepalive_count),
        ),
        None => listener.set_keepalive(false),
    }
}

/// [`set_inherited_options`] on a listener that a shard's glommio listener owns, for
/// connections accepted after a reload.
///
/// # Safety
/// `fd` must be an open listening socket for the duration of the call.
pub unsafe fn retune_listener(fd: RawFd, opts: &config::Socket) -> std::io::Result<()> {
    // SAFETY: the caller guarantees the fd is open; ManuallyDrop keeps socket2 from closing
    // a descriptor it does not own.
    let socket = std::mem::ManuallyDrop::new(unsafe { Socket::from_raw_fd(fd) });
    set_inherited_options(&socket, opts)
}
