//! Socket buffers for smoltcp from a recycling pool.
//!
//! Every TCP connection needs a receive and a send buffer (256 KiB each by
//! default). `vec![0; n]` from malloc is zeroed with a full memset whenever
//! glibc serves it from its free lists, which at 10 000+ connections per
//! second was a fifth of the daemon's CPU. Here buffers are anonymous
//! mappings: new ones are fresh zero pages (nothing to clear, only touched
//! pages become resident) and a closed connection's buffers go back to the
//! pool as they are (smoltcp never reads bytes it has not written).
//!
//! A buffer is lent to smoltcp as `&'static mut [u8]`; the pool takes it
//! back only through [`Pool::recycle`], which consumes (drops) the socket
//! set holding it first, so no reference outlives the loan.

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;
use std::collections::HashMap;
use std::ptr::NonNull;

/// Buffers kept for reuse, at most (the rest is unmapped).
const MAX_SPARE_BYTES: usize = 256 << 20;

/// The buffers lent to one socket set; give them back with
/// [`Pool::recycle`]. Dropping a lease instead leaks its buffers (safe).
#[derive(Debug)]
pub struct Lease {
    bufs: [(NonNull<u8>, usize); 2],
}

/// A pool of page-backed buffers.
#[derive(Default)]
pub struct Pool {
    spare: HashMap<usize, Vec<NonNull<u8>>>,
    spare_bytes: usize,
    /// Buffers lent out (stats).
    pub lent: usize,
    /// Buffers mapped over the pool's life (stats).
    pub mapped: usize,
}

// SAFETY: the pool exclusively owns the mappings it holds (spare ones are
// referenced nowhere else); moving it to another thread moves that
// ownership. Lent buffers travel with their socket sets.
unsafe impl Send for Pool {}
// SAFETY: as above; a `Lease` is only a claim ticket with no access.
unsafe impl Send for Lease {}

fn page_round(n: usize) -> usize {
    n.div_ceil(4096).max(1) * 4096
}

impl Pool {
    fn take(&mut self, len: usize) -> Option<NonNull<u8>> {
        let size = page_round(len);
        if let Some(p) = self.spare.get_mut(&size).and_then(|v| v.pop()) {
            self.spare_bytes -= size;
            return Some(p);
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected. Failure is reported as MAP_FAILED and handled.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        self.mapped += 1;
        NonNull::new(p.cast())
    }

    fn give(&mut self, p: NonNull<u8>, len: usize) {
        let size = page_round(len);
        if self.spare_bytes + size > MAX_SPARE_BYTES {
            // SAFETY: `p` is a mapping of `size` bytes made by `take` whose
            // loan has ended (see `recycle`): nothing refers to it.
            unsafe { libc::munmap(p.as_ptr().cast(), size) };
            return;
        }
        self.spare_bytes += size;
        self.spare.entry(size).or_default().push(p);
    }

    /// A receive and a send buffer of `rx` and `tx` bytes for one TCP
    /// socket, and the lease to return them with. Falls back to heap
    /// buffers (no lease) if mapping fails.
    pub fn tcp_buffers(
        &mut self,
        rx: usize,
        tx: usize,
    ) -> (
        tcp::SocketBuffer<'static>,
        tcp::SocketBuffer<'static>,
        Option<Lease>,
    ) {
        match (self.take(rx), self.take(tx)) {
            (Some(a), Some(b)) => {
                self.lent += 2;
                // SAFETY: `a` and `b` are distinct live mappings of at least
                // `rx` / `tx` bytes, initialised (zero pages or bytes written
                // earlier), referenced by nothing else until `recycle` takes
                // them back after dropping the socket set they are lent to.
                let (ra, rb) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(a.as_ptr(), rx),
                        std::slice::from_raw_parts_mut(b.as_ptr(), tx),
                    )
                };
                (
                    tcp::SocketBuffer::new(ra),
                    tcp::SocketBuffer::new(rb),
                    Some(Lease {
                        bufs: [(a, rx), (b, tx)],
                    }),
                )
            }
            (a, b) => {
                for (p, n) in [(a, rx), (b, tx)] {
                    if let Some(p) = p {
                        self.give(p, n);
                    }
                }
                (
                    tcp::SocketBuffer::new(vec![0; rx]),
                    tcp::SocketBuffer::new(vec![0; tx]),
                    None,
                )
            }
        }
    }

    /// Drop `set` (the sockets holding the lease's buffers), then take the
    /// buffers back.
    pub fn recycle(&mut self, set: SocketSet<'static>, lease: Lease) {
        drop(set);
        for (p, n) in lease.bufs {
            self.lent -= 1;
            self.give(p, n);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (size, v) in self.spare.drain() {
            for p in v {
                // SAFETY: spare mappings are referenced by nothing.
                unsafe { libc::munmap(p.as_ptr().cast(), size) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_without_new_mappings() {
        let mut pool = Pool::default();
        let mut set = SocketSet::new(Vec::new());
        let (rx, tx, lease) = pool.tcp_buffers(262_144, 100_000);
        let h = set.add(tcp::Socket::new(rx, tx));
        assert_eq!(set.get::<tcp::Socket>(h).recv_capacity(), 262_144);
        assert_eq!(set.get::<tcp::Socket>(h).send_capacity(), 100_000);
        assert_eq!((pool.mapped, pool.lent), (2, 2));
        pool.recycle(set, lease.unwrap());
        assert_eq!(pool.lent, 0);
        for _ in 0..100 {
            let (rx, tx, lease) = pool.tcp_buffers(262_144, 100_000);
            let mut set = SocketSet::new(Vec::new());
            set.add(tcp::Socket::new(rx, tx));
            pool.recycle(set, lease.unwrap());
        }
        assert_eq!(pool.mapped, 2, "reused, not mapped again");
    }
}
