//! Single-producer single-consumer byte FIFO in shared memory.
//!
//! A FIFO is a [`FifoHeader`] ([`FIFO_HEADER_SIZE`] bytes, `#[repr(C)]`,
//! native little-endian) followed by `cap` data bytes. Offsets are relative to
//! the FIFO's own offset in the segment:
//!
//! | offset | written by | field |
//! | --- | --- | --- |
//! | 0   | consumer | `head: u32`, free-running read index (wraps at `u32`) |
//! | 4   | both | `want_deq_ntf: u32`: producer sets 1, consumer swaps to 0 |
//! | 64  | producer | `tail: u32`, free-running write index (wraps at `u32`) |
//! | 68  | both | `has_event: u32`: producer swaps to 1, consumer stores 0 |
//! | 72  | producer | `base: u32`: index that maps to data offset 0 |
//! | 128 | creator | `size: u32` (capacity), `session: u32`, `magic: u32` |
//! | 192 | data | `cap` bytes; index `i` lives at `192 + ((i - base) & (cap - 1))` |
//!
//! `tail - head` (wrapping) is the number of readable bytes; it is always in
//! `0..=cap` for a healthy FIFO.
//!
//! # Rewind
//!
//! A producer that finds the FIFO empty moves `base` to `tail` before it
//! writes, so the next bytes land at offset 0 again. A request/response
//! stream then keeps reusing the first cache lines and pages of its FIFOs
//! instead of walking the whole ring: with 32 connections the FIFO data of
//! a keep-alive benchmark no longer falls out of the cache between requests,
//! and with 10 000 connections pages are no longer faulted in one by one as
//! the indices advance. `base` changes only while nothing is readable (the
//! consumer has published `head == tail`), and it is stored before the
//! `tail` that publishes the new bytes, so a consumer that loads `tail`
//! (`Acquire`) and then `base` maps every readable index right.
//!
//! # Untrusted peer
//!
//! Each handle keeps a private shadow of the index it owns and never reads it
//! back from shared memory; the other side's index is validated on every read
//! (`tail - head <= cap`, else [`FifoError::Corrupt`]). Data offsets are
//! `index & (cap - 1)` with `cap` supplied by the trusted caller (the `size`
//! field in shared memory is informational only), so nothing the peer writes
//! can move one of our accesses outside the FIFO. A peer scribbling over the
//! data area concurrently can only garble the bytes it is exchanging with us.
//!
//! # Memory ordering
//!
//! The producer copies data, then publishes `tail` with `Release`; the
//! consumer loads `tail` with `Acquire` before copying out, then publishes
//! `head` with `Release`, which the producer loads with `Acquire` before
//! reusing the space. The two notification flags use Dekker-style `SeqCst`
//! fences on both sides (see [`FifoProducer::set_event`] and
//! [`FifoProducer::request_dequeue_notification`]) so no notification is lost.

use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Bytes of header before the data area.
pub const FIFO_HEADER_SIZE: usize = 192;
/// Smallest capacity [`fifo_init`] is meant to be used with.
pub const FIFO_MIN_CAP: u32 = 64;
/// Value of [`FifoHeader::magic`] ("FIFH" little-endian).
pub const FIFO_MAGIC: u32 = u32::from_le_bytes(*b"FIFH");

/// Shared FIFO header. Every field is an atomic, so a reference to it stays
/// sound whatever the peer writes; padding keeps each owner's fields on its
/// own 64-byte cache line.
#[repr(C)]
pub struct FifoHeader {
    /// Free-running read index, written by the consumer only.
    pub head: AtomicU32,
    /// 1 when the producer wants to hear that the consumer freed space.
    pub want_deq_ntf: AtomicU32,
    _pad0: [AtomicU32; 14],
    /// Free-running write index, written by the producer only.
    pub tail: AtomicU32,
    /// 1 while an unconsumed "data pending" event is outstanding.
    pub has_event: AtomicU32,
    /// Index at data offset 0, written by the producer only (see Rewind).
    pub base: AtomicU32,
    _pad1: [AtomicU32; 13],
    /// Capacity in bytes as written by the creator (never trusted by handles).
    pub size: AtomicU32,
    /// Opaque tag (the session handle) written by the creator.
    pub session: AtomicU32,
    /// [`FIFO_MAGIC`].
    pub magic: AtomicU32,
    _pad2: [AtomicU32; 13],
}

const _: () = {
    assert!(std::mem::size_of::<FifoHeader>() == FIFO_HEADER_SIZE);
    assert!(std::mem::offset_of!(FifoHeader, head) == 0);
    assert!(std::mem::offset_of!(FifoHeader, want_deq_ntf) == 4);
    assert!(std::mem::offset_of!(FifoHeader, tail) == 64);
    assert!(std::mem::offset_of!(FifoHeader, has_event) == 68);
    assert!(std::mem::offset_of!(FifoHeader, base) == 72);
    assert!(std::mem::offset_of!(FifoHeader, size) == 128);
    assert!(std::mem::offset_of!(FifoHeader, session) == 132);
    assert!(std::mem::offset_of!(FifoHeader, magic) == 136);
};

/// FIFO errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum FifoError {
    /// The peer's index is impossible (`tail - head > cap`): the FIFO is
    /// corrupt and the session should be torn down.
    #[error("FIFO indices corrupt")]
    Corrupt,
    /// [`FifoConsumer::consume`] was asked to drop more than is readable.
    #[error("cannot consume {requested} bytes, only {available} readable")]
    ConsumeTooLarge {
        /// Bytes asked for.
        requested: u32,
        /// Bytes readable.
        available: u32,
    },
    /// The header's magic is wrong (not a FIFO, or overwritten).
    #[error("bad FIFO magic {0:#x}")]
    BadMagic(u32),
    /// The header's size disagrees with the capacity the handle was given.
    #[error("FIFO header size {found} differs from expected capacity {expected}")]
    SizeMismatch {
        /// Capacity of the handle.
        expected: u32,
        /// `size` in the header.
        found: u32,
    },
}

/// Total bytes a FIFO of capacity `cap` occupies (header plus data).
pub fn fifo_footprint(cap: u32) -> usize {
    FIFO_HEADER_SIZE + cap as usize
}

/// Initialise a FIFO: zero the header, then write `size`, `session` and
/// `magic`. The data area is left as is.
///
/// # Safety
/// `base` must point to [`FIFO_HEADER_SIZE`] writable bytes, at least 4-byte
/// (ideally 64-byte) aligned, that no handle is using concurrently. `cap`
/// should be a power of two ≥ [`FIFO_MIN_CAP`].
pub unsafe fn fifo_init(base: *mut u8, cap: u32, session: u32) {
    // SAFETY: the caller guarantees the header is writable and aligned; the
    // header is all atomics, for which zero bytes are a valid value.
    unsafe {
        ptr::write_bytes(base, 0, FIFO_HEADER_SIZE);
        let h = &*base.cast::<FifoHeader>();
        h.size.store(cap, Ordering::Relaxed);
        h.session.store(session, Ordering::Relaxed);
        h.magic.store(FIFO_MAGIC, Ordering::Release);
    }
}

/// Largest power of two ≤ `cap` (0 stays 0). Keeps every masked offset below
/// the caller's `cap` even if the caller broke the power-of-two contract.
fn sane_cap(cap: u32) -> u32 {
    if cap == 0 {
        0
    } else {
        1 << (31 - cap.leading_zeros())
    }
}

/// Shared plumbing of both handles.
struct Ring {
    hdr: NonNull<FifoHeader>,
    cap: u32,
}

impl Ring {
    /// # Safety
    /// See [`FifoProducer::new`].
    unsafe fn new(base: *mut u8, cap: u32) -> Self {
        debug_assert!(
            cap.is_power_of_two(),
            "FIFO capacity {cap} not a power of two"
        );
        debug_assert_eq!(base as usize & 3, 0, "FIFO base misaligned");
        debug_assert!(!base.is_null());
        Ring {
            // SAFETY: the caller guarantees `base` points to a mapped FIFO,
            // so it is not null.
            hdr: unsafe { NonNull::new_unchecked(base.cast()) },
            cap: sane_cap(cap),
        }
    }

    #[inline]
    fn hdr(&self) -> &FifoHeader {
        // SAFETY: the constructor's contract keeps the header mapped and
        // aligned for the life of the handle; every field is atomic, so a
        // shared reference is sound even while the peer writes to it.
        unsafe { self.hdr.as_ref() }
    }

    /// Ask the CPU to start loading the header's two shared lines (the
    /// consumer's and the producer's). A hint: it never faults and changes
    /// nothing. Callers about to serve many FIFOs issue it for all of them
    /// first, so the cache misses overlap instead of stalling one by one.
    #[inline]
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.hdr.as_ptr().cast::<i8>();
            // SAFETY: prefetch is a hint that never dereferences or faults;
            // `p` and `p + 64` are inside the mapped header anyway.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.add(64));
            }
        }
    }

    #[inline]
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area directly follows the header inside the
        // `fifo_footprint(cap)` bytes the constructor's contract covers.
        unsafe { self.hdr.as_ptr().cast::<u8>().add(FIFO_HEADER_SIZE) }
    }

    /// Split `len` bytes starting at index `at` into (offset, first, second)
    /// segment lengths; `len <= cap` must hold.
    #[inline]
    fn split(&self, at: u32, len: usize) -> (usize, usize, usize) {
        debug_assert!(len <= self.cap as usize);
        if len == 0 {
            // Also keeps a (contract-violating) zero capacity harmless.
            return (0, 0, 0);
        }
        let off = (at & self.cap.wrapping_sub(1)) as usize;
        let first = len.min(self.cap as usize - off);
        (off, first, len - first)
    }

    fn check_header(&self) -> Result<(), FifoError> {
        let h = self.hdr();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != FIFO_MAGIC {
            return Err(FifoError::BadMagic(magic));
        }
        let found = h.size.load(Ordering::Relaxed);
        if found != self.cap {
            return Err(FifoError::SizeMismatch {
                expected: self.cap,
                found,
            });
        }
        Ok(())
    }
}

/// The writing end of a FIFO.
pub struct FifoProducer {
    ring: Ring,
    /// Private shadow of `tail`; never read back from shared memory.
    tail: u32,
    /// Private shadow of `base`.
    base: u32,
}

// SAFETY: the handle only touches shared memory through atomics and explicit
// copies, and the constructor's contract keeps the mapping alive for the
// handle's life, so it may move to another thread.
unsafe impl Send for FifoProducer {}

impl FifoProducer {
    /// A producer over an initialised FIFO. The shadow tail starts from the
    /// shared tail (our own index: trusting it can only hurt ourselves, and it
    /// lets a handle be re-created after a process re-attaches).
    ///
    /// `cap` comes from the trusted caller, never from the header. A `cap`
    /// that is not a power of two is rounded down to one (a debug assertion
    /// fires), so accesses stay in bounds even then.
    ///
    /// # Safety
    /// `base` must point to [`fifo_footprint`]`(cap)` bytes, at least 4-byte
    /// aligned, that stay mapped for the life of the handle, and there must be
    /// at most one producer handle per FIFO in use at a time.
    pub unsafe fn new(base: *mut u8, cap: u32) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { Ring::new(base, cap) };
        let tail = ring.hdr().tail.load(Ordering::Relaxed);
        let base = ring.hdr().base.load(Ordering::Relaxed);
        FifoProducer { ring, tail, base }
    }

    /// Like [`FifoProducer::new`] but starts from index 0 and writes it to the
    /// shared tail (for a freshly initialised FIFO).
    ///
    /// # Safety
    /// As [`FifoProducer::new`].
    pub unsafe fn new_zeroed(base: *mut u8, cap: u32) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { Ring::new(base, cap) };
        ring.hdr().base.store(0, Ordering::Relaxed);
        ring.hdr().tail.store(0, Ordering::Release);
        FifoProducer {
            ring,
            tail: 0,
            base: 0,
        }
    }

    /// Capacity in bytes.
    pub fn cap(&self) -> u32 {
        self.ring.cap
    }

    /// The header's `session` tag (untrusted if the peer may write it).
    pub fn session(&self) -> u32 {
        self.ring.hdr().session.load(Ordering::Relaxed)
    }

    /// Check the header's magic and that its `size` equals [`Self::cap`].
    pub fn check_header(&self) -> Result<(), FifoError> {
        self.ring.check_header()
    }

    /// Bytes queued and not yet consumed.
    pub fn len(&self) -> Result<u32, FifoError> {
        let head = self.ring.hdr().head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.cap {
            return Err(FifoError::Corrupt);
        }
        Ok(used)
    }

    /// True when nothing is queued (false on corruption).
    pub fn is_empty(&self) -> bool {
        self.len() == Ok(0)
    }

    /// Bytes that can be enqueued now.
    pub fn free_space(&self) -> Result<u32, FifoError> {
        Ok(self.ring.cap - self.len()?)
    }

    /// Enqueue as much of `data` as fits; returns the bytes written (0 when
    /// full). Wraps around the end of the ring with two copies.
    pub fn enqueue(&mut self, data: &[u8]) -> Result<usize, FifoError> {
        let used = self.len()?;
        let n = ((self.ring.cap - used) as usize).min(data.len());
        if n == 0 {
            return Ok(0);
        }
        if used == 0 && self.tail != self.base {
            // Empty: start over at offset 0 (see Rewind). Published by the
            // Release store of `tail` below.
            self.base = self.tail;
            self.ring.hdr().base.store(self.base, Ordering::Relaxed);
        }
        let (off, first, second) = self.ring.split(self.tail.wrapping_sub(self.base), n);
        let dst = self.ring.data();
        // SAFETY: `off + first <= cap` and `second <= off`, so both
        // destination ranges lie inside the `cap`-byte data area, which the
        // constructor's contract keeps mapped; `data` is our own slice and
        // cannot overlap shared memory we are writing. The consumer only reads
        // this free space after our Release store of `tail` below; a peer that
        // scribbles on it anyway can only garble the bytes it receives.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), dst.add(off), first);
            ptr::copy_nonoverlapping(data.as_ptr().add(first), dst, second);
        }
        self.tail = self.tail.wrapping_add(n as u32);
        self.ring.hdr().tail.store(self.tail, Ordering::Release);
        Ok(n)
    }

    /// Mark "data pending" after enqueuing. Returns true only if this flipped
    /// the flag 0→1, i.e. the caller must post an event to the consumer.
    ///
    /// Pairs with [`FifoConsumer::clear_event`]: the `SeqCst` fence between
    /// our `tail` store and the swap, and the consumer's fence between its
    /// clear and its `tail` load, guarantee that either we see the cleared
    /// flag (and post) or the consumer sees our data.
    pub fn set_event(&self) -> bool {
        fence(Ordering::SeqCst);
        self.ring.hdr().has_event.swap(1, Ordering::SeqCst) == 0
    }

    /// Ask the consumer to notify us when it frees space. The caller must
    /// re-check [`Self::free_space`] afterwards before waiting: the fence here
    /// pairs with the one in [`FifoConsumer::take_dequeue_notification`] so
    /// that either that re-check sees the freed space or the consumer sees
    /// the request.
    pub fn request_dequeue_notification(&self) {
        self.ring.hdr().want_deq_ntf.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

/// The reading end of a FIFO.
pub struct FifoConsumer {
    ring: Ring,
    /// Private shadow of `head`; never read back from shared memory.
    head: u32,
}

// SAFETY: as for `FifoProducer`.
unsafe impl Send for FifoConsumer {}

impl FifoConsumer {
    /// A consumer over an initialised FIFO; the shadow head starts from the
    /// shared head. `cap` is handled as in [`FifoProducer::new`].
    ///
    /// # Safety
    /// As [`FifoProducer::new`] (at most one consumer handle per FIFO).
    pub unsafe fn new(base: *mut u8, cap: u32) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { Ring::new(base, cap) };
        let head = ring.hdr().head.load(Ordering::Relaxed);
        FifoConsumer { ring, head }
    }

    /// Like [`FifoConsumer::new`] but starts from index 0 and writes it to the
    /// shared head (for a freshly initialised FIFO).
    ///
    /// # Safety
    /// As [`FifoProducer::new`].
    pub unsafe fn new_zeroed(base: *mut u8, cap: u32) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { Ring::new(base, cap) };
        ring.hdr().head.store(0, Ordering::Release);
        FifoConsumer { ring, head: 0 }
    }

    /// Capacity in bytes.
    pub fn cap(&self) -> u32 {
        self.ring.cap
    }

    /// The header's `session` tag (untrusted if the peer may write it).
    pub fn session(&self) -> u32 {
        self.ring.hdr().session.load(Ordering::Relaxed)
    }

    /// Check the header's magic and that its `size` equals [`Self::cap`].
    pub fn check_header(&self) -> Result<(), FifoError> {
        self.ring.check_header()
    }

    /// Bytes available to read.
    pub fn len(&self) -> Result<u32, FifoError> {
        let tail = self.ring.hdr().tail.load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > self.ring.cap {
            return Err(FifoError::Corrupt);
        }
        Ok(avail)
    }

    /// True when nothing is readable (false on corruption).
    pub fn is_empty(&self) -> bool {
        self.len() == Ok(0)
    }

    /// Copy up to `buf.len()` readable bytes into `buf` without consuming
    /// them; returns the count.
    pub fn peek(&self, buf: &mut [u8]) -> Result<usize, FifoError> {
        let n = (self.len()? as usize).min(buf.len());
        let (off, first, second) = self.ring.split(self.read_index(), n);
        let src = self.ring.data();
        // SAFETY: `off + first <= cap` and `second <= off`, so both source
        // ranges lie inside the mapped `cap`-byte data area, and `buf` is our
        // own memory of at least `n` bytes, disjoint from shared memory. If the
        // producer scribbles on these bytes concurrently we copy garbage
        // bytes, which is harmless: every bit pattern is a valid `u8` and no
        // pointer or length is derived from them.
        unsafe {
            ptr::copy_nonoverlapping(src.add(off), buf.as_mut_ptr(), first);
            ptr::copy_nonoverlapping(src, buf.as_mut_ptr().add(first), second);
        }
        Ok(n)
    }

    /// Zero-copy view of the readable bytes as at most two slices (the second
    /// is non-empty only when the data wraps). Follow with
    /// [`Self::consume`].
    ///
    /// The bytes live in shared memory: a misbehaving producer can change them
    /// while the slices are held, so treat them as untrusted input and copy
    /// anything you need to validate before using it.
    pub fn read_slices(&self) -> Result<(&[u8], &[u8]), FifoError> {
        let n = self.len()? as usize;
        let (off, first, second) = self.ring.split(self.read_index(), n);
        let src = self.ring.data();
        // SAFETY: both ranges lie inside the mapped data area (see `peek`)
        // and stay mapped while `self` is borrowed; the producer does not
        // write readable bytes until we move `head` past them, which needs
        // `&mut self` and so cannot happen while the slices live.
        unsafe {
            Ok((
                std::slice::from_raw_parts(src.add(off), first),
                std::slice::from_raw_parts(src, second),
            ))
        }
    }

    /// Drop `n` readable bytes (typically after [`Self::peek`] or
    /// [`Self::read_slices`]).
    pub fn consume(&mut self, n: u32) -> Result<(), FifoError> {
        let available = self.len()?;
        if n > available {
            return Err(FifoError::ConsumeTooLarge {
                requested: n,
                available,
            });
        }
        self.advance(n);
        Ok(())
    }

    /// Read up to `buf.len()` bytes; returns the count (0 when empty).
    pub fn dequeue(&mut self, buf: &mut [u8]) -> Result<usize, FifoError> {
        let n = self.peek(buf)?;
        self.advance(n as u32);
        Ok(n)
    }

    /// `head` relative to the producer's `base`, loaded after `tail` (by
    /// `len`); garbage from a misbehaving producer is masked into the ring.
    fn read_index(&self) -> u32 {
        let base = self.ring.hdr().base.load(Ordering::Relaxed);
        self.head.wrapping_sub(base)
    }

    fn advance(&mut self, n: u32) {
        if n > 0 {
            self.head = self.head.wrapping_add(n);
            self.ring.hdr().head.store(self.head, Ordering::Release);
        }
    }

    /// Clear "data pending" before draining, so that the producer's next
    /// [`FifoProducer::set_event`] posts a new event. Fenced so that the
    /// following [`Self::len`]/dequeue sees any data whose event was
    /// suppressed by the flag we just cleared.
    pub fn clear_event(&self) {
        self.ring.hdr().has_event.store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Call after a dequeue that freed space: returns true (and clears the
    /// flag) if the producer asked to be told, so the caller must notify it.
    pub fn take_dequeue_notification(&self) -> bool {
        // Pairs with the fence in `FifoProducer::request_dequeue_notification`
        // (our `head` store happens before this fence).
        fence(Ordering::SeqCst);
        let w = &self.ring.hdr().want_deq_ntf;
        // The plain load keeps the common "not requested" case free of a
        // read-modify-write on the shared line.
        w.load(Ordering::Relaxed) != 0 && w.swap(0, Ordering::SeqCst) != 0
    }
}

impl FifoProducer {
    /// Start loading this FIFO's header into the cache (see `Ring::prefetch`).
    #[inline]
    pub fn prefetch(&self) {
        self.ring.prefetch()
    }
}

impl FifoConsumer {
    /// Start loading this FIFO's header into the cache (see `Ring::prefetch`).
    #[inline]
    pub fn prefetch(&self) {
        self.ring.prefetch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Tiny xorshift64 PRNG.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// 64-byte aligned heap buffer holding one FIFO.
    struct Mem(Vec<[u64; 8]>);
    impl Mem {
        fn new(cap: u32) -> Self {
            Mem(vec![[0; 8]; fifo_footprint(cap).div_ceil(64)])
        }
        fn ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr().cast()
        }
        fn hdr(&self) -> &FifoHeader {
            // SAFETY: the buffer is aligned and at least a header long.
            unsafe { &*self.0.as_ptr().cast::<FifoHeader>() }
        }
    }

    fn fifo(cap: u32) -> (Mem, FifoProducer, FifoConsumer) {
        let mut m = Mem::new(cap);
        let p = m.ptr();
        // SAFETY: the buffer holds the whole FIFO, and the tests keep it
        // alive (returned alongside) for as long as the handles.
        unsafe {
            fifo_init(p, cap, 7);
            (m, FifoProducer::new(p, cap), FifoConsumer::new(p, cap))
        }
    }

    #[test]
    fn layout_and_init() {
        let (m, p, c) = fifo(128);
        assert_eq!(fifo_footprint(128), 320);
        assert_eq!(m.hdr().size.load(Ordering::Relaxed), 128);
        assert_eq!(p.session(), 7);
        assert_eq!(c.session(), 7);
        assert_eq!(p.check_header(), Ok(()));
        m.hdr().size.store(64, Ordering::Relaxed);
        assert_eq!(
            c.check_header(),
            Err(FifoError::SizeMismatch {
                expected: 128,
                found: 64
            })
        );
        m.hdr().magic.store(1, Ordering::Relaxed);
        assert_eq!(p.check_header(), Err(FifoError::BadMagic(1)));
        assert!(p.is_empty() && c.is_empty());
        assert_eq!(p.cap(), 128);
        assert_eq!(c.cap(), 128);
    }

    #[test]
    fn an_empty_fifo_rewinds_to_offset_zero() {
        // Request/response traffic keeps reusing the first bytes of the
        // ring instead of walking through all of it.
        let (m, mut p, mut c) = fifo(1024);
        let data = |m: &Mem, n: usize| -> Vec<u8> {
            // SAFETY: the data area follows the header inside the buffer.
            unsafe {
                std::slice::from_raw_parts(m.0.as_ptr().cast::<u8>().add(FIFO_HEADER_SIZE), n)
                    .to_vec()
            }
        };
        let mut buf = [0u8; 64];
        for round in 0..100u8 {
            assert_eq!(p.enqueue(&[round; 40]).unwrap(), 40);
            // Always at offset 0, whatever the indices.
            assert_eq!(data(&m, 40), vec![round; 40]);
            assert_eq!(c.dequeue(&mut buf).unwrap(), 40);
            assert_eq!(buf[..40], [round; 40]);
        }
        assert_eq!(m.hdr().tail.load(Ordering::Relaxed), 4000);
        // Not empty: no rewind, the bytes follow on and wrap as before.
        p.enqueue(&[1; 1000]).unwrap();
        assert_eq!(c.dequeue(&mut buf[..10]).unwrap(), 10);
        p.enqueue(&[2; 30]).unwrap();
        let mut all = vec![0u8; 2048];
        assert_eq!(c.dequeue(&mut all).unwrap(), 1020);
        assert!(all[..990].iter().all(|&b| b == 1) && all[990..1020].iter().all(|&b| b == 2));
        // A re-created consumer (and producer) picks the base up from the
        // header.
        p.enqueue(b"hello").unwrap();
        let _ = (p, c); // the old handles are done
                        // SAFETY: same FIFO, no other handle in use.
        let (mut p2, mut c2) = unsafe {
            let ptr = m.0.as_ptr() as *mut u8;
            (FifoProducer::new(ptr, 1024), FifoConsumer::new(ptr, 1024))
        };
        assert_eq!(c2.dequeue(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        p2.enqueue(b"again").unwrap();
        assert_eq!(c2.dequeue(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"again");
    }

    #[test]
    fn a_garbage_base_stays_in_bounds() {
        let (m, mut p, mut c) = fifo(64);
        p.enqueue(&[9; 50]).unwrap();
        for b in [u32::MAX, 12345, 63, 1 << 31] {
            m.hdr().base.store(b, Ordering::Relaxed);
            let mut buf = [0u8; 64];
            // Garbled bytes at worst, never an access outside the ring.
            assert_eq!(c.peek(&mut buf).unwrap(), 50);
            let (a, z) = c.read_slices().unwrap();
            assert_eq!(a.len() + z.len(), 50);
        }
        let mut buf = [0u8; 64];
        assert_eq!(c.dequeue(&mut buf).unwrap(), 50);
    }

    #[test]
    fn wraps_fills_and_drains() {
        let (_m, mut p, mut c) = fifo(64);
        let mut out = [0u8; 64];
        for round in 0..100u32 {
            let data: Vec<u8> = (0..40).map(|i| (i + round) as u8).collect();
            assert_eq!(p.enqueue(&data).unwrap(), 40);
            assert_eq!(
                p.enqueue(&data).unwrap(),
                24,
                "partial write when nearly full"
            );
            assert_eq!(p.free_space().unwrap(), 0);
            assert_eq!(p.enqueue(&data).unwrap(), 0, "full");
            assert_eq!(c.len().unwrap(), 64);
            assert_eq!(c.dequeue(&mut out).unwrap(), 64);
            assert_eq!(&out[..40], &data[..]);
            assert_eq!(&out[40..], &data[..24]);
            assert!(c.is_empty());
            assert_eq!(c.dequeue(&mut out).unwrap(), 0, "empty");
            // Shift the phase so the wrap point moves every round.
            assert_eq!(p.enqueue(&data[..3]).unwrap(), 3);
            assert_eq!(c.dequeue(&mut out[..3]).unwrap(), 3);
        }
    }

    #[test]
    fn indices_wrap_at_u32() {
        let mut m = Mem::new(64);
        let base = m.ptr();
        // SAFETY: buffer holds the FIFO and outlives the handles.
        let (mut p, mut c) = unsafe {
            fifo_init(base, 64, 0);
            m.hdr().head.store(u32::MAX - 10, Ordering::Relaxed);
            m.hdr().tail.store(u32::MAX - 10, Ordering::Relaxed);
            (FifoProducer::new(base, 64), FifoConsumer::new(base, 64))
        };
        let mut out = [0u8; 50];
        for i in 0..10u8 {
            let data = [i; 50];
            assert_eq!(p.enqueue(&data).unwrap(), 50);
            assert_eq!(c.len().unwrap(), 50);
            assert_eq!(c.dequeue(&mut out).unwrap(), 50);
            assert_eq!(out, data);
        }
    }

    #[test]
    fn random_ops_match_a_model() {
        let (_m, mut p, mut c) = fifo(256);
        let mut model = VecDeque::new();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut buf = [0u8; 600];
        let mut next = 0u8;
        for _ in 0..20_000 {
            match rng.below(4) {
                0 | 1 => {
                    let n = rng.below(600) as usize;
                    let data: Vec<u8> = (0..n)
                        .map(|_| {
                            next = next.wrapping_add(1);
                            next
                        })
                        .collect();
                    let k = p.enqueue(&data).unwrap();
                    assert_eq!(k, n.min(256 - model.len()));
                    model.extend(&data[..k]);
                    next = next.wrapping_sub((n - k) as u8);
                }
                2 => {
                    let n = rng.below(600) as usize;
                    let k = c.dequeue(&mut buf[..n]).unwrap();
                    assert_eq!(k, n.min(model.len()));
                    let want: Vec<u8> = model.drain(..k).collect();
                    assert_eq!(&buf[..k], &want[..]);
                }
                _ => {
                    let n = rng.below(300) as usize;
                    let k = c.peek(&mut buf[..n]).unwrap();
                    assert_eq!(k, n.min(model.len()));
                    assert!(model.iter().take(k).eq(buf[..k].iter()));
                    let (a, b) = c.read_slices().unwrap();
                    assert_eq!(a.len() + b.len(), model.len());
                    assert!(model.iter().eq(a.iter().chain(b)));
                    let drop = rng.below(k as u64 + 1) as u32;
                    c.consume(drop).unwrap();
                    model.drain(..drop as usize);
                }
            }
            assert_eq!(c.len().unwrap() as usize, model.len());
            assert_eq!(p.len().unwrap() as usize, model.len());
            assert_eq!(p.free_space().unwrap() as usize, 256 - model.len());
        }
    }

    #[test]
    fn peek_consume_and_read_slices() {
        let (_m, mut p, mut c) = fifo(64);
        p.enqueue(&[9u8; 60]).unwrap();
        let mut sink = [0u8; 59];
        c.dequeue(&mut sink).unwrap();
        // Not empty (one byte left), so no rewind: wraps at index 64.
        p.enqueue(b"hello world").unwrap();
        c.consume(1).unwrap();
        let (a, b) = c.read_slices().unwrap();
        assert_eq!((a, b), (&b"hell"[..], &b"o world"[..]));
        let mut b3 = [0u8; 3];
        assert_eq!(c.peek(&mut b3).unwrap(), 3);
        assert_eq!(&b3, b"hel");
        assert_eq!(c.len().unwrap(), 11, "peek does not consume");
        c.consume(6).unwrap();
        assert_eq!(
            c.consume(6),
            Err(FifoError::ConsumeTooLarge {
                requested: 6,
                available: 5
            })
        );
        let mut rest = [0u8; 16];
        assert_eq!(c.dequeue(&mut rest).unwrap(), 5);
        assert_eq!(&rest[..5], b"world");
        assert_eq!(c.read_slices().unwrap(), (&[][..], &[][..]));
        c.consume(0).unwrap();
    }

    #[test]
    fn event_flag_flips_once_per_clear() {
        let (_m, mut p, c) = fifo(64);
        p.enqueue(b"x").unwrap();
        assert!(p.set_event(), "first enqueue of a burst posts");
        assert!(!p.set_event(), "later ones do not");
        assert!(!p.set_event());
        c.clear_event();
        assert!(p.set_event());
        assert!(!p.set_event());
    }

    #[test]
    fn dequeue_notification() {
        let (_m, mut p, mut c) = fifo(64);
        p.enqueue(&[1; 64]).unwrap();
        assert!(!c.take_dequeue_notification(), "not requested");
        p.request_dequeue_notification();
        let mut b = [0u8; 8];
        c.dequeue(&mut b).unwrap();
        assert!(c.take_dequeue_notification());
        assert!(!c.take_dequeue_notification(), "taken once");
        assert_eq!(p.free_space().unwrap(), 8);
    }

    #[test]
    fn handles_resume_from_shared_indices() {
        let (mut m, mut p, mut c) = fifo(64);
        p.enqueue(b"abcdef").unwrap();
        let mut b = [0u8; 2];
        c.dequeue(&mut b).unwrap();
        let base = m.ptr();
        // SAFETY: buffer holds the FIFO and outlives the handles.
        let (mut p, mut c) = unsafe { (FifoProducer::new(base, 64), FifoConsumer::new(base, 64)) };
        assert_eq!(p.len().unwrap(), 4);
        p.enqueue(b"gh").unwrap();
        let mut out = [0u8; 8];
        assert_eq!(c.dequeue(&mut out).unwrap(), 6);
        assert_eq!(&out[..6], b"cdefgh");
        // SAFETY: as above.
        let mut p = unsafe { FifoProducer::new_zeroed(base, 64) };
        // SAFETY: as above.
        let c = unsafe { FifoConsumer::new_zeroed(base, 64) };
        assert_eq!(c.len().unwrap(), 0);
        assert_eq!(p.enqueue(&[0; 100]).unwrap(), 64);
    }

    #[test]
    fn non_power_of_two_cap_stays_in_bounds() {
        // Release builds round a bad cap down instead of misbehaving.
        assert_eq!(sane_cap(100), 64);
        assert_eq!(sane_cap(64), 64);
        assert_eq!(sane_cap(1), 1);
        assert_eq!(sane_cap(0), 0);
        assert_eq!(sane_cap(u32::MAX), 1 << 31);
        // A zero capacity (contract violation) degrades to an always-empty,
        // always-full FIFO instead of touching memory.
        let mut m = Mem::new(64);
        let base = m.ptr();
        // SAFETY: the buffer holds a FIFO and outlives the handles.
        unsafe { fifo_init(base, 64, 0) };
        m.hdr().head.store(5, Ordering::Relaxed);
        m.hdr().tail.store(5, Ordering::Relaxed);
        let ring = || Ring {
            hdr: NonNull::new(base.cast()).unwrap(),
            cap: 0,
        };
        let mut p = FifoProducer {
            ring: ring(),
            tail: 5,
            base: 0,
        };
        let mut c = FifoConsumer {
            ring: ring(),
            head: 5,
        };
        let mut buf = [0u8; 8];
        assert_eq!(p.enqueue(b"abc"), Ok(0));
        assert_eq!(c.dequeue(&mut buf), Ok(0));
        assert_eq!(c.read_slices(), Ok((&[][..], &[][..])));
        m.hdr().tail.store(6, Ordering::Relaxed);
        assert_eq!(c.dequeue(&mut buf), Err(FifoError::Corrupt));
    }

    #[test]
    fn garbage_indices_are_detected_never_out_of_bounds() {
        const CAP: u32 = 256;
        let (m, mut p, mut c) = fifo(CAP);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut buf = [0u8; 300];
        let mut corrupt = 0;
        for i in 0..100_000 {
            let h = m.hdr();
            // Sometimes near-valid values, sometimes pure garbage.
            let head = rng.next() as u32;
            let tail = if i % 2 == 0 {
                head.wrapping_add(rng.below(2 * CAP as u64) as u32)
            } else {
                rng.next() as u32
            };
            h.head.store(head, Ordering::Relaxed);
            h.tail.store(tail, Ordering::Relaxed);
            h.size.store(rng.next() as u32, Ordering::Relaxed);
            h.want_deq_ntf.store(rng.next() as u32, Ordering::Relaxed);
            h.has_event.store(rng.next() as u32, Ordering::Relaxed);
            let n = rng.below(300) as usize;
            match p.enqueue(&buf[..n]) {
                Ok(k) => assert!(k <= CAP as usize),
                Err(e) => {
                    assert_eq!(e, FifoError::Corrupt);
                    corrupt += 1;
                }
            }
            match c.len() {
                Ok(l) => assert!(l <= CAP),
                Err(e) => assert_eq!(e, FifoError::Corrupt),
            }
            if let Ok(k) = c.dequeue(&mut buf) {
                assert!(k <= CAP as usize);
            }
            if let Ok((a, b)) = c.read_slices() {
                assert!(a.len() + b.len() <= CAP as usize);
            }
            let _ = c.peek(&mut buf);
            let _ = c.consume(rng.below(300) as u32);
            if let Ok(f) = p.free_space() {
                assert!(f <= CAP);
            }
            let _ = p.set_event();
            let _ = c.take_dequeue_notification();
        }
        assert!(corrupt > 1000, "corruption must be detected ({corrupt})");
    }

    /// Stream byte `i` is `PATTERN[i % PATTERN.len()]`; the prime period
    /// makes any reordering or loss show up, and copies/compares stay cheap
    /// even in debug builds.
    fn pattern() -> Vec<u8> {
        let mut rng = Rng(99);
        (0..65_521).map(|_| rng.next() as u8).collect()
    }

    fn fill(pat: &[u8], mut pos: u64, mut out: &mut [u8]) {
        while !out.is_empty() {
            let at = (pos % pat.len() as u64) as usize;
            let k = out.len().min(pat.len() - at);
            out[..k].copy_from_slice(&pat[at..at + k]);
            out = &mut out[k..];
            pos += k as u64;
        }
    }

    fn matches(pat: &[u8], mut pos: u64, mut got: &[u8]) -> bool {
        while !got.is_empty() {
            let at = (pos % pat.len() as u64) as usize;
            let k = got.len().min(pat.len() - at);
            if got[..k] != pat[at..at + k] {
                return false;
            }
            got = &got[k..];
            pos += k as u64;
        }
        true
    }

    #[test]
    fn two_threads_stream_exact_bytes() {
        const CAP: u32 = 4096;
        const TOTAL: u64 = 64 << 20;
        let (m, mut p, mut c) = fifo(CAP);
        let pat = std::sync::Arc::new(pattern());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let pat2 = pat.clone();
        let prod = std::thread::spawn(move || {
            let mut rng = Rng(1);
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 6000];
            while sent < TOTAL && std::time::Instant::now() < deadline {
                let n = (rng.below(6000) as usize + 1).min((TOTAL - sent) as usize);
                fill(&pat2, sent, &mut chunk[..n]);
                let mut off = 0;
                while off < n && std::time::Instant::now() < deadline {
                    let k = p.enqueue(&chunk[off..n]).unwrap();
                    let l = p.len().unwrap();
                    assert!(l <= CAP);
                    off += k;
                    if k == 0 {
                        std::thread::yield_now();
                    }
                }
                sent += off as u64;
            }
            sent
        });
        let mut rng = Rng(7);
        let mut got = 0u64;
        let mut buf = vec![0u8; 6000];
        while got < TOTAL && std::time::Instant::now() < deadline {
            if prod.is_finished() && c.is_empty() {
                break; // the producer failed or timed out: reported below
            }
            let want = rng.below(6000) as usize + 1;
            let n = if rng.below(4) == 0 {
                // Exercise the zero-copy path too.
                let (a, b) = c.read_slices().unwrap();
                let k = (a.len() + b.len()).min(want);
                let ka = k.min(a.len());
                assert!(matches(&pat, got, &a[..ka]), "mismatch near byte {got}");
                assert!(
                    matches(&pat, got + ka as u64, &b[..k - ka]),
                    "mismatch near byte {got}"
                );
                c.consume(k as u32).unwrap();
                k
            } else {
                let n = c.dequeue(&mut buf[..want]).unwrap();
                assert!(matches(&pat, got, &buf[..n]), "mismatch near byte {got}");
                n
            };
            assert!(c.len().unwrap() <= CAP);
            if n == 0 {
                std::thread::yield_now();
            }
            got += n as u64;
        }
        assert_eq!(prod.join().unwrap(), TOTAL, "producer timed out");
        assert_eq!(got, TOTAL, "consumer timed out");
        assert!(c.is_empty());
        drop(m);
    }

    /// Both notification protocols across threads, with real blocking on
    /// eventfds: the consumer sleeps when empty and is woken only when
    /// `set_event` flips the flag; the producer sleeps when full and is woken
    /// only when `take_dequeue_notification` says so. A lost notification
    /// leaves one side asleep with work pending until its 1 s timeout.
    #[test]
    fn two_threads_notifications_are_never_lost() {
        use crate::shm::EventFd;
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        const CAP: u32 = 256;
        const TOTAL: u64 = 4 << 20;
        let (m, mut p, mut c) = fifo(CAP);
        let data_ev = Arc::new(EventFd::new().unwrap());
        let space_ev = Arc::new(EventFd::new().unwrap());
        let (data_ev2, space_ev2) = (data_ev.clone(), space_ev.clone());
        let pat = std::sync::Arc::new(pattern());
        let pat2 = pat.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        let pause = |rng: &mut Rng| match rng.below(512) {
            0 => std::thread::sleep(Duration::from_micros(rng.below(300))),
            1..=16 => std::thread::yield_now(),
            _ => {}
        };
        let prod = std::thread::spawn(move || {
            let mut rng = Rng(3);
            let (mut sent, mut sleeps) = (0u64, 0u32);
            let mut chunk = vec![0u8; 700];
            while sent < TOTAL {
                assert!(Instant::now() < deadline, "producer stuck at {sent}");
                let n = (rng.below(700) as usize + 1).min((TOTAL - sent) as usize);
                fill(&pat2, sent, &mut chunk[..n]);
                let k = p.enqueue(&chunk[..n]).unwrap();
                if k > 0 {
                    sent += k as u64;
                    if p.set_event() {
                        data_ev2.notify();
                    }
                } else {
                    p.request_dequeue_notification();
                    if p.free_space().unwrap() == 0 {
                        sleeps += 1;
                        let woke = space_ev2.wait(Some(Duration::from_secs(1))).unwrap();
                        assert!(
                            woke || p.free_space().unwrap() == 0,
                            "lost dequeue notification"
                        );
                    }
                }
                pause(&mut rng);
            }
            sleeps
        });
        let mut rng = Rng(5);
        let (mut got, mut sleeps) = (0u64, 0u32);
        let mut buf = vec![0u8; 700];
        while got < TOTAL {
            assert!(Instant::now() < deadline, "consumer stuck at {got}");
            if prod.is_finished() && c.is_empty() {
                break; // the producer failed: report its panic below
            }
            c.clear_event();
            let want = rng.below(700) as usize + 1;
            let n = c.dequeue(&mut buf[..want]).unwrap();
            if n > 0 {
                assert!(matches(&pat, got, &buf[..n]), "mismatch near byte {got}");
                got += n as u64;
                if c.take_dequeue_notification() {
                    space_ev.notify();
                }
            } else {
                sleeps += 1;
                let woke = data_ev.wait(Some(Duration::from_secs(1))).unwrap();
                assert!(woke || c.is_empty(), "lost data event at byte {got}");
            }
            pause(&mut rng);
        }
        let prod_sleeps = prod.join().expect("producer failed");
        assert_eq!(got, TOTAL);
        assert!(
            sleeps > 10 && prod_sleeps > 10,
            "protocols not exercised ({sleeps}, {prod_sleeps})"
        );
        drop(m);
    }
}
