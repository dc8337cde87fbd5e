//! The random bytes rustls asks for (server randoms, session ids, ticket ids, nonces and age
//! offsets), drawn from the kernel in blocks instead of one system call per request.
//!
//! rustls's ring provider answers every request with its own `getrandom` call. A full TLS 1.3
//! handshake that issues two session tickets asks seven times, for 168 bytes in all; a
//! resumed one asks just as often. Each shard thread keeps a block of kernel randomness and
//! hands it out front to back, so the kernel is entered about once per twenty handshakes.
//!
//! What this does not change: the bytes still come from the kernel's CSPRNG through ring
//! (`getrandom`), unmodified and never handed out twice; each byte is overwritten as it is
//! handed out, so the block holds only bytes no caller has seen yet. The block belongs to
//! one thread (no lock, nothing shared) and ferrule never forks, which is the case where a
//! copied block would repeat itself. Key shares and ECDSA nonces are drawn by ring itself
//! and are not affected.

use std::cell::RefCell;

use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::crypto::{GetRandomFailed, SecureRandom};

/// Bytes drawn from the kernel per refill: enough for about twenty full handshakes.
const BLOCK: usize = 4096;

/// Requests at least this large bypass the block and go to the kernel directly.
const DIRECT: usize = BLOCK / 4;

struct Block {
    bytes: Box<[u8; BLOCK]>,
    /// Bytes before this offset have been handed out (and zeroed).
    used: usize,
}

thread_local! {
    static BLOCK_OF_THIS_THREAD: RefCell<Block> = RefCell::new(Block {
        bytes: Box::new([0; BLOCK]),
        used: BLOCK,
    });
}

/// The rustls random source of every ferrule TLS config.
#[derive(Debug)]
pub struct BlockRandom;

/// The one instance providers point at (`CryptoProvider::secure_random` is `&'static`).
pub static BLOCK_RANDOM: BlockRandom = BlockRandom;

impl SecureRandom for BlockRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), GetRandomFailed> {
        if out.len() >= DIRECT {
            return SystemRandom::new().fill(out).map_err(|_| GetRandomFailed);
        }

        BLOCK_OF_THIS_THREAD.with(|block| {
            let mut block = block.borrow_mut();
            if BLOCK - block.used < out.len() {
                SystemRandom::new()
                    .fill(&mut block.bytes[..])
                    .map_err(|_| GetRandomFailed)?;
                block.used = 0;
            }

            let start = block.used;
            let taken = &mut block.bytes[start..start + out.len()];
            out.copy_from_slice(taken);
            taken.fill(0);
            block.used += out.len();
            Ok(())
        })
    }
}

/// rustls's ring provider with ferrule's random source.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::CryptoProvider {
        secure_random: &BLOCK_RANDOM,
        ..rustls::crypto::ring::default_provider()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bytes_are_handed_out_twice_across_refills() {
        // 32-byte draws across several refills: any repeat of a whole draw would mean the
        // block was reused. (A chance collision of 256 random bits does not happen.)
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(3 * BLOCK / 32 + 7) {
            let mut draw = [0u8; 32];
            BLOCK_RANDOM.fill(&mut draw).unwrap();
            assert!(seen.insert(draw), "a 32-byte draw repeated");
        }
    }

    #[test]
    fn handed_out_bytes_are_zeroed_in_the_block() {
        let mut draw = [0u8; 48];
        BLOCK_RANDOM.fill(&mut draw).unwrap();
        BLOCK_OF_THIS_THREAD.with(|block| {
            let block = block.borrow();
            assert!(block.bytes[..block.used].iter().all(|b| *b == 0));
        });
    }

    #[test]
    fn odd_sizes_and_large_requests_are_filled() {
        for len in [0, 1, 3, 31, 33, 1000, DIRECT, 3 * BLOCK] {
            let mut out = vec![0u8; len];
            BLOCK_RANDOM.fill(&mut out).unwrap();
            if len >= 16 {
                assert!(out.iter().any(|b| *b != 0), "{len} bytes all zero");
            }
        }
    }
}
