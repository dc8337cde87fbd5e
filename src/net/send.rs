//! Sends of several buffers in one system call.
//!
//! glommio's streams send one buffer per call: their vectored write sends only the first
//! buffer it is given. ferrule often has several ready at once: rustls hands over every TLS
//! record it has queued (a handshake flight is three to six records, a large response
//! several 16 KiB ones), and the proxy writes a queued response head together with the first
//! piece of its body. Gathering them with one `sendmsg` costs one system call and no copy.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::AsyncWrite;

/// Most buffers passed to one `sendmsg`. Linux takes up to 1,024; rustls offers at most 64.
const MAX_BUFFERS: usize = 64;

/// Writes `bufs` to `stream`: several in one `sendmsg`; one, or any when the socket has no
/// room, through the stream's own write path, which sends or arms the wait for room.
pub fn poll_write_vectored<S: AsyncWrite + AsRawFd + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
        return Poll::Ready(Ok(0));
    };
    if bufs.len() > 1 {
        if let Some(result) = try_send_vectored(stream.as_raw_fd(), bufs) {
            return Poll::Ready(result);
        }
    }
    Pin::new(stream).poll_write(cx, first)
}

/// Sends `bufs`, in order, on the socket `fd` with one `sendmsg` that does not wait.
///
/// Returns `None` when the socket's send buffer is full, so that the caller waits for room
/// through glommio's own write path, which arms the readiness poll.
pub fn try_send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> Option<io::Result<usize>> {
    let count = bufs.len().min(MAX_BUFFERS);

    // SAFETY: `msghdr` is plain old data, and all zeroes is a valid value for it: no
    // address, no control data, no flags.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is documented to be ABI compatible with `struct iovec` on Unix, so a slice
    // of them is an iovec array. The kernel only reads through the pointer.
    message.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
    message.msg_iovlen = count as _;

    // SAFETY: `message` describes `count` iovecs borrowed from `bufs`, each pointing to
    // initialized bytes that stay borrowed for the duration of the call, and it names no
    // other memory. MSG_DONTWAIT keeps the call from blocking the shard; MSG_NOSIGNAL turns
    // a write to a reset connection into EPIPE instead of a signal.
    let sent = unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent >= 0 {
        return Some(Ok(sent as usize));
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
        _ => Some(Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    #[test]
    fn buffers_arrive_in_order_in_one_send() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();

        let bufs = [
            IoSlice::new(b"head "),
            IoSlice::new(b""),
            IoSlice::new(b"body"),
            IoSlice::new(b" tail"),
        ];
        let sent = try_send_vectored(sender.as_raw_fd(), &bufs)
            .unwrap()
            .unwrap();
        assert_eq!(sent, 14);

        drop(sender);
        let mut received = String::new();
        receiver.read_to_string(&mut received).unwrap();
        assert_eq!(received, "head body tail");
    }

    #[test]
    fn a_full_send_buffer_is_reported_as_none() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = socket2::Socket::from(
            std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap(),
        );
        let (receiver, _) = listener.accept().unwrap();
        sender.set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&receiver)
            .set_recv_buffer_size(4096)
            .unwrap();

        // Nobody reads: the loopback queues fill up and the send must not wait.
        let block = vec![7u8; 64 * 1024];
        let bufs = [IoSlice::new(&block), IoSlice::new(&block)];
        let mut outcome = None;
        for _ in 0..1000 {
            match try_send_vectored(sender.as_raw_fd(), &bufs) {
                Some(Ok(_)) => continue,
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        assert!(
            matches!(outcome, Some(None)),
            "expected a full buffer, got {outcome:?}"
        );
    }

    #[test]
    fn a_reset_connection_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        socket2::SockRef::from(&receiver)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(receiver);
        std::thread::sleep(std::time::Duration::from_millis(50));

        // The first send may still be accepted locally before the reset is seen.
        let bufs = [IoSlice::new(b"a"), IoSlice::new(b"b")];
        let mut failed = false;
        for _ in 0..10 {
            if let Some(Err(_)) = try_send_vectored(sender.as_raw_fd(), &bufs) {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(failed, "sending to a reset connection kept succeeding");
    }
}
