//! Single-producer single-consumer queue of fixed 64-byte messages in shared
//! memory, with a sleep/wake protocol that makes no syscall while both sides
//! are busy.
//!
//! A queue is an [`MqHeader`] ([`MQ_HEADER_SIZE`] bytes, `#[repr(C)]`)
//! followed by `slots` messages of [`MSG_SIZE`] bytes:
//!
//! | offset | written by | field |
//! | --- | --- | --- |
//! | 0   | consumer | `head: u32`, free-running index of the next message to read |
//! | 4   | both | `consumer_sleeping: u32`: consumer stores 1/0, producer swaps to 0 |
//! | 8   | both | `channels_sleeping: u64`: bit `c` set while a thread sleeps on wake channel `c` |
//! | 64  | producer | `tail: u32`, free-running index of the next free slot |
//! | 128 | creator | `slots: u32` (power of two), `magic: u32` |
//! | 192 | data | message `i` at `192 + (i & (slots - 1)) * 64` |
//!
//! The same untrusted-peer rules as for [FIFOs](crate::fifo) apply: each
//! handle shadows the index it owns, validates the peer's (`tail - head <=
//! slots`, else [`MqError::Corrupt`]) and masks slot numbers with the slot
//! count given by the trusted caller, never the one in the header.
//!
//! # Wake-up protocol
//!
//! A consumer that finds the queue empty and wants to block calls
//! [`MqConsumer::prepare_sleep`]: it stores `consumer_sleeping = 1`, issues a
//! `SeqCst` fence and re-reads `tail`. A producer, after publishing `tail`,
//! calls [`MqProducer::wake_needed`]: a `SeqCst` fence, then it reads (and
//! swaps to 0) `consumer_sleeping`, and writes the consumer's eventfd only if
//! it was 1. The two fences are totally ordered: if the producer's comes
//! first, the consumer's re-read of `tail` sees the new message and it does
//! not sleep; if the consumer's comes first, the producer sees the flag and
//! writes the eventfd. Either way no wake-up is lost (Dekker's argument),
//! and while the consumer is awake the producer makes no syscall.
//!
//! # Wake channels
//!
//! A consumer shared by several threads, each sleeping in its own epoll set
//! (Envoy's main thread and workers), would be woken as a herd through one
//! eventfd. Instead a thread can sleep on a *wake channel* `c` (1..=63, each
//! with its own eventfd, see [`crate::proto::AppCtrl::AddChannel`]): it sets
//! bit `c` of `channels_sleeping` ([`MqConsumer::prepare_sleep_channel`])
//! with the same fence-and-recheck as above. The producer, after
//! [`MqProducer::wake_needed`]'s fence, takes the bits of the channels the
//! message concerns ([`MqProducer::take_sleeping_channels`]; the session's
//! channel is named by the app in its descriptor, or all channels for a
//! message without one) and writes only those channels' eventfds. The same
//! Dekker argument holds per bit.

use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Size of one message.
pub const MSG_SIZE: usize = 64;
/// Header bytes before the slots.
pub const MQ_HEADER_SIZE: usize = 192;
/// Value of [`MqHeader::magic`] ("MQH1" little-endian).
pub const MQ_MAGIC: u32 = u32::from_le_bytes(*b"MQH1");

/// Wake channels per worker: ids `1..MAX_CHANNELS` (0 means "none": the
/// message concerns every channel).
pub const MAX_CHANNELS: usize = 64;

/// One message slot: an opaque 64-byte record (typed messages are encoded
/// into it elsewhere).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawMsg(pub [u8; MSG_SIZE]);

impl Default for RawMsg {
    fn default() -> Self {
        RawMsg([0; MSG_SIZE])
    }
}

/// Shared queue header; all fields atomic (see [`crate::fifo::FifoHeader`]).
#[repr(C)]
pub struct MqHeader {
    /// Free-running read index, written by the consumer only.
    pub head: AtomicU32,
    /// 1 while the consumer is (about to be) blocked on its eventfd.
    pub consumer_sleeping: AtomicU32,
    /// Bit `c` set while a thread sleeps on wake channel `c`.
    pub channels_sleeping: AtomicU64,
    _pad0: [AtomicU32; 12],
    /// Free-running write index, written by the producer only.
    pub tail: AtomicU32,
    _pad1: [AtomicU32; 15],
    /// Slot count as written by the creator (never trusted by handles).
    pub slots: AtomicU32,
    /// [`MQ_MAGIC`].
    pub magic: AtomicU32,
    _pad2: [AtomicU32; 14],
}

const _: () = {
    assert!(std::mem::size_of::<MqHeader>() == MQ_HEADER_SIZE);
    assert!(std::mem::offset_of!(MqHeader, head) == 0);
    assert!(std::mem::offset_of!(MqHeader, consumer_sleeping) == 4);
    assert!(std::mem::offset_of!(MqHeader, channels_sleeping) == 8);
    assert!(std::mem::offset_of!(MqHeader, tail) == 64);
    assert!(std::mem::offset_of!(MqHeader, slots) == 128);
    assert!(std::mem::offset_of!(MqHeader, magic) == 132);
    assert!(std::mem::size_of::<RawMsg>() == MSG_SIZE);
};

/// Queue errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum MqError {
    /// No free slot.
    #[error("message queue full")]
    Full,
    /// The peer's index is impossible (`tail - head > slots`).
    #[error("message queue corrupt")]
    Corrupt,
}

/// Bytes a queue of `slots` messages occupies (header plus slots).
pub fn mq_footprint(slots: u32) -> usize {
    MQ_HEADER_SIZE + slots as usize * MSG_SIZE
}

/// Initialise a queue header (indices 0, not sleeping, `slots`, magic).
///
/// # Safety
/// `base` must point to [`MQ_HEADER_SIZE`] writable bytes, at least 4-byte
/// (ideally 64-byte) aligned, that no handle is using concurrently. `slots`
/// should be a power of two.
pub unsafe fn mq_init(base: *mut u8, slots: u32) {
    // SAFETY: the caller guarantees the header is writable and aligned; zero
    // bytes are a valid value for the all-atomic header.
    unsafe {
        ptr::write_bytes(base, 0, MQ_HEADER_SIZE);
        let h = &*base.cast::<MqHeader>();
        h.slots.store(slots, Ordering::Relaxed);
        h.magic.store(MQ_MAGIC, Ordering::Release);
    }
}

/// Shared plumbing of both handles.
struct Queue {
    hdr: NonNull<MqHeader>,
    slots: u32,
}

impl Queue {
    /// # Safety
    /// See [`MqProducer::new`].
    unsafe fn new(base: *mut u8, slots: u32) -> Self {
        debug_assert!(
            slots.is_power_of_two(),
            "slot count {slots} not a power of two"
        );
        debug_assert!(
            !base.is_null() && (base as usize) & 7 == 0,
            "queue base misaligned"
        );
        Queue {
            // SAFETY: the caller guarantees `base` points to a mapped queue,
            // so it is not null.
            hdr: unsafe { NonNull::new_unchecked(base.cast()) },
            // Largest power of two <= slots, so masking stays in bounds even
            // if the caller broke the contract.
            slots: if slots == 0 {
                0
            } else {
                1 << (31 - slots.leading_zeros())
            },
        }
    }

    #[inline]
    fn hdr(&self) -> &MqHeader {
        // SAFETY: the constructor's contract keeps the header mapped and
        // aligned while the handle lives; all fields are atomics.
        unsafe { self.hdr.as_ref() }
    }

    /// Pointer to the slot for free-running index `i`.
    #[inline]
    fn slot(&self, i: u32) -> *mut u8 {
        let off = MQ_HEADER_SIZE + (i & self.slots.wrapping_sub(1)) as usize * MSG_SIZE;
        // SAFETY: `i & (slots - 1) < slots`, so the slot lies inside the
        // `mq_footprint(slots)` bytes covered by the constructor's contract.
        // (Only called when `slots > 0`, as a non-empty/non-full check
        // precedes every use.)
        unsafe { self.hdr.as_ptr().cast::<u8>().add(off) }
    }
}

/// Sending end of a message queue.
pub struct MqProducer {
    q: Queue,
    /// Private shadow of `tail`.
    tail: u32,
}

// SAFETY: only atomics and explicit copies touch the shared memory, which the
// constructor's contract keeps mapped for the handle's life.
unsafe impl Send for MqProducer {}

impl MqProducer {
    /// A producer over an initialised queue; the shadow tail starts from the
    /// shared tail. `slots` comes from the trusted caller (a value that is not
    /// a power of two is rounded down, with a debug assertion).
    ///
    /// # Safety
    /// `base` must point to [`mq_footprint`]`(slots)` bytes, 8-byte aligned,
    /// mapped for the handle's life, with at most one producer handle in use
    /// at a time.
    pub unsafe fn new(base: *mut u8, slots: u32) -> Self {
        // SAFETY: forwarded contract.
        let q = unsafe { Queue::new(base, slots) };
        let tail = q.hdr().tail.load(Ordering::Relaxed);
        MqProducer { q, tail }
    }

    /// Slot count.
    pub fn slots(&self) -> u32 {
        self.q.slots
    }

    /// Messages queued and not yet received.
    pub fn len(&self) -> Result<u32, MqError> {
        let head = self.q.hdr().head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.q.slots {
            return Err(MqError::Corrupt);
        }
        Ok(used)
    }

    /// True when nothing is queued (false if corrupt).
    pub fn is_empty(&self) -> bool {
        self.len() == Ok(0)
    }

    /// True when no slot is free (or the queue is corrupt).
    pub fn is_full(&self) -> bool {
        self.len().map_or(true, |u| u == self.q.slots)
    }

    /// Enqueue one message, or fail with [`MqError::Full`] /
    /// [`MqError::Corrupt`]. Follow a successful send (or a batch of them)
    /// with [`Self::wake_needed`].
    pub fn try_send(&mut self, msg: &RawMsg) -> Result<(), MqError> {
        if self.len()? >= self.q.slots {
            return Err(MqError::Full);
        }
        // SAFETY: the slot lies inside the mapped queue (see `Queue::slot`)
        // and `msg` is our own memory. The consumer does not read this slot
        // before our Release store of `tail`; a peer writing it anyway only
        // garbles its own message.
        unsafe { ptr::copy_nonoverlapping(msg.0.as_ptr(), self.q.slot(self.tail), MSG_SIZE) };
        self.tail = self.tail.wrapping_add(1);
        self.q.hdr().tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// After sending: true if the consumer announced that it is going to
    /// sleep, in which case the caller must write the consumer's eventfd
    /// (the flag is consumed, so one write per sleep). See the module docs
    /// for why no wake-up is lost.
    pub fn wake_needed(&self) -> bool {
        fence(Ordering::SeqCst);
        let s = &self.q.hdr().consumer_sleeping;
        // Plain load first: under load the consumer is awake and we avoid a
        // read-modify-write on its cache line.
        s.load(Ordering::Relaxed) != 0 && s.swap(0, Ordering::SeqCst) != 0
    }

    /// Does any thread sleep on a wake channel? (a cheap pre-check for
    /// [`Self::take_sleeping_channels`], after [`Self::wake_needed`].)
    pub fn channels_sleeping(&self) -> bool {
        self.q.hdr().channels_sleeping.load(Ordering::Relaxed) != 0
    }

    /// After [`Self::wake_needed`] (whose fence orders this read after the
    /// message's publication): clear and return the bits of `want` whose
    /// channels have a sleeping thread. The caller writes those channels'
    /// eventfds.
    pub fn take_sleeping_channels(&self, want: u64) -> u64 {
        let s = &self.q.hdr().channels_sleeping;
        if s.load(Ordering::Relaxed) & want == 0 {
            return 0;
        }
        s.fetch_and(!want, Ordering::SeqCst) & want
    }
}

/// Receiving end of a message queue.
pub struct MqConsumer {
    q: Queue,
    /// Private shadow of `head`.
    head: u32,
}

// SAFETY: as for `MqProducer`.
unsafe impl Send for MqConsumer {}

impl MqConsumer {
    /// A consumer over an initialised queue; the shadow head starts from the
    /// shared head. `slots` is handled as in [`MqProducer::new`].
    ///
    /// # Safety
    /// As [`MqProducer::new`] (at most one consumer handle at a time).
    pub unsafe fn new(base: *mut u8, slots: u32) -> Self {
        // SAFETY: forwarded contract.
        let q = unsafe { Queue::new(base, slots) };
        let head = q.hdr().head.load(Ordering::Relaxed);
        MqConsumer { q, head }
    }

    /// Slot count.
    pub fn slots(&self) -> u32 {
        self.q.slots
    }

    /// Messages waiting.
    pub fn len(&self) -> Result<u32, MqError> {
        let tail = self.q.hdr().tail.load(Ordering::Acquire);
        let n = tail.wrapping_sub(self.head);
        if n > self.q.slots {
            return Err(MqError::Corrupt);
        }
        Ok(n)
    }

    /// True when nothing waits (false if corrupt).
    pub fn is_empty(&self) -> bool {
        self.len() == Ok(0)
    }

    /// Dequeue one message if any. The content is whatever the peer wrote:
    /// decode it defensively.
    pub fn try_recv(&mut self) -> Result<Option<RawMsg>, MqError> {
        if self.len()? == 0 {
            return Ok(None);
        }
        let mut m = RawMsg::default();
        // SAFETY: the slot lies inside the mapped queue (see `Queue::slot`),
        // `m` is a local; a concurrently scribbled slot only yields a garbage
        // message (any bytes are a valid `RawMsg`).
        unsafe { ptr::copy_nonoverlapping(self.q.slot(self.head), m.0.as_mut_ptr(), MSG_SIZE) };
        self.head = self.head.wrapping_add(1);
        self.q.hdr().head.store(self.head, Ordering::Release);
        Ok(Some(m))
    }

    /// Announce sleep. Returns true if the queue is still empty: the caller
    /// may now block on its eventfd (and should [`Self::cancel_sleep`] when
    /// it wakes). Returns false if messages (or corruption) showed up: the
    /// caller must [`Self::cancel_sleep`] and keep draining.
    pub fn prepare_sleep(&self) -> bool {
        self.q.hdr().consumer_sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.len() == Ok(0)
    }

    /// Withdraw the sleep announcement.
    pub fn cancel_sleep(&self) {
        self.q.hdr().consumer_sleeping.store(0, Ordering::SeqCst);
    }

    /// Announce that a thread sleeps on wake channel `ch` (1..63; others
    /// are ignored and return false). Same contract as
    /// [`Self::prepare_sleep`]: true if the queue is still empty.
    pub fn prepare_sleep_channel(&self, ch: u8) -> bool {
        if !(1..MAX_CHANNELS).contains(&(ch as usize)) {
            return false;
        }
        let s = &self.q.hdr().channels_sleeping;
        s.fetch_or(1 << ch, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.len() == Ok(0)
    }

    /// Withdraw [`Self::prepare_sleep_channel`].
    pub fn cancel_sleep_channel(&self, ch: u8) {
        if (1..MAX_CHANNELS).contains(&(ch as usize)) {
            let s = &self.q.hdr().channels_sleeping;
            s.fetch_and(!(1 << ch), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::EventFd;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    struct Mem(Vec<[u64; 8]>);
    impl Mem {
        fn hdr(&self) -> &MqHeader {
            // SAFETY: aligned buffer at least a header long.
            unsafe { &*self.0.as_ptr().cast::<MqHeader>() }
        }
    }

    fn queue(slots: u32) -> (Mem, MqProducer, MqConsumer) {
        let mut mem = Mem(vec![[0u64; 8]; mq_footprint(slots) / 64]);
        let p = mem.0.as_mut_ptr().cast::<u8>();
        // SAFETY: `mem` holds the whole queue and is returned alongside the
        // handles, outliving their use in each test.
        unsafe {
            mq_init(p, slots);
            (mem, MqProducer::new(p, slots), MqConsumer::new(p, slots))
        }
    }

    fn msg(i: u32) -> RawMsg {
        let mut m = RawMsg::default();
        m.0[..4].copy_from_slice(&i.to_le_bytes());
        m.0[60..].copy_from_slice(&(!i).to_le_bytes());
        m
    }

    #[test]
    fn init_layout() {
        let (m, p, c) = queue(8);
        assert_eq!(mq_footprint(8), 192 + 512);
        assert_eq!(m.hdr().slots.load(Ordering::Relaxed), 8);
        assert_eq!(m.hdr().magic.load(Ordering::Relaxed), MQ_MAGIC);
        assert_eq!((p.slots(), c.slots()), (8, 8));
        assert!(p.is_empty() && c.is_empty() && !p.is_full());
    }

    #[test]
    fn fifo_order_full_and_empty() {
        let (_m, mut p, mut c) = queue(8);
        for round in 0..10 {
            for i in 0..8 {
                assert_eq!(p.len().unwrap(), i);
                p.try_send(&msg(round * 8 + i)).unwrap();
            }
            assert_eq!(p.try_send(&msg(0)), Err(MqError::Full));
            assert!(p.is_full());
            assert_eq!(c.len().unwrap(), 8);
            for i in 0..5 {
                assert_eq!(c.try_recv().unwrap(), Some(msg(round * 8 + i)));
            }
            assert!(!p.is_full());
            for i in 5..8 {
                assert_eq!(c.try_recv().unwrap(), Some(msg(round * 8 + i)));
            }
            assert_eq!(c.try_recv().unwrap(), None);
        }
    }

    #[test]
    fn sleep_flag_protocol_single_thread() {
        let (m, mut p, mut c) = queue(4);
        assert!(!p.wake_needed(), "awake consumer: no syscall");
        assert!(c.prepare_sleep(), "empty: may sleep");
        assert_eq!(m.hdr().consumer_sleeping.load(Ordering::Relaxed), 1);
        p.try_send(&msg(1)).unwrap();
        assert!(p.wake_needed());
        assert!(!p.wake_needed(), "one wake per sleep");
        c.cancel_sleep();
        assert!(!c.prepare_sleep(), "message pending: do not sleep");
        c.cancel_sleep();
        assert_eq!(c.try_recv().unwrap(), Some(msg(1)));
        p.try_send(&msg(2)).unwrap();
        assert!(!p.wake_needed());
    }

    #[test]
    fn wake_channels_wake_only_their_sleepers() {
        let (_m, mut p, mut c) = queue(4);
        assert!(c.prepare_sleep_channel(3));
        assert!(c.prepare_sleep_channel(5));
        assert!(!c.prepare_sleep_channel(0), "0 is not a channel");
        assert!(!c.prepare_sleep_channel(64), "out of range");
        p.try_send(&msg(1)).unwrap();
        assert!(!p.wake_needed(), "no thread sleeps on the queue itself");
        assert_eq!(p.take_sleeping_channels(1 << 4), 0, "channel 4 is awake");
        assert_eq!(p.take_sleeping_channels(1 << 3), 1 << 3);
        assert_eq!(p.take_sleeping_channels(1 << 3), 0, "one wake per sleep");
        // A message for no particular channel wakes whoever sleeps.
        assert_eq!(p.take_sleeping_channels(u64::MAX), 1 << 5);
        assert_eq!(p.take_sleeping_channels(u64::MAX), 0);
        assert!(!c.prepare_sleep_channel(3), "message pending: do not sleep");
        c.cancel_sleep_channel(3);
        assert_eq!(c.try_recv().unwrap(), Some(msg(1)));
        assert!(c.prepare_sleep_channel(3));
        c.cancel_sleep_channel(3);
        p.try_send(&msg(2)).unwrap();
        assert!(!p.wake_needed());
        assert_eq!(p.take_sleeping_channels(u64::MAX), 0, "cancelled");
    }

    #[test]
    fn corruption_is_detected() {
        let (m, mut p, mut c) = queue(8);
        let mut rng = Rng(88_172_645_463_325_252);
        let mut corrupt = 0;
        for i in 0..100_000 {
            let h = m.hdr();
            let head = rng.next() as u32;
            let tail = if i % 2 == 0 {
                head.wrapping_add((rng.next() % 16) as u32)
            } else {
                rng.next() as u32
            };
            h.head.store(head, Ordering::Relaxed);
            h.tail.store(tail, Ordering::Relaxed);
            h.slots.store(rng.next() as u32, Ordering::Relaxed);
            h.consumer_sleeping
                .store(rng.next() as u32, Ordering::Relaxed);
            match p.try_send(&msg(1)) {
                Ok(()) | Err(MqError::Full) => {}
                Err(MqError::Corrupt) => corrupt += 1,
            }
            match c.try_recv() {
                Ok(_) => {}
                Err(e) => assert_eq!(e, MqError::Corrupt),
            }
            if let Ok(n) = c.len() {
                assert!(n <= 8);
            }
            if let Ok(n) = p.len() {
                assert!(n <= 8);
            }
            let _ = p.wake_needed();
            let _ = c.prepare_sleep();
            let _ = p.is_full();
        }
        assert!(corrupt > 1000, "corruption must be detected ({corrupt})");
    }

    /// The consumer really blocks on an eventfd whenever `prepare_sleep`
    /// allows it; the producer writes the eventfd only when `wake_needed`
    /// says so. The producer sends random-sized bursts with random pauses and
    /// then goes quiet until the consumer has received everything, so a lost
    /// wake-up cannot be healed by a later send: it shows up as a wait that
    /// times out while a message is pending.
    #[test]
    fn no_lost_wakeups_across_threads() {
        const N: u32 = 20_000;
        let (m, mut p, mut c) = queue(16);
        let ev = Arc::new(EventFd::new().unwrap());
        let received = Arc::new(AtomicU32::new(0));
        let (ev2, received2) = (ev.clone(), received.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        let prod = std::thread::spawn(move || {
            let mut wakes = 0u32;
            let mut rng = Rng(12_345);
            let mut i = 0;
            while i < N {
                let burst = (rng.next() % 50 + 1).min(u64::from(N - i));
                for _ in 0..burst {
                    while p.try_send(&msg(i)).is_err() {
                        assert!(Instant::now() < deadline, "producer stuck at {i}");
                        std::thread::yield_now();
                    }
                    i += 1;
                    if p.wake_needed() {
                        ev2.notify();
                        wakes += 1;
                    }
                    match rng.next() % 64 {
                        0 => std::thread::sleep(Duration::from_micros(rng.next() % 200)),
                        1..=8 => std::thread::yield_now(),
                        _ => {}
                    }
                }
                // Quiet until everything sent so far has been received.
                while received2.load(Ordering::Acquire) < i {
                    assert!(Instant::now() < deadline, "consumer never drained {i}");
                    std::thread::yield_now();
                }
            }
            wakes
        });
        let mut next = 0;
        let (mut announced, mut sleeps) = (0u32, 0u32);
        while next < N {
            assert!(Instant::now() < deadline, "consumer stuck at {next}");
            match c.try_recv().unwrap() {
                Some(got) => {
                    assert_eq!(got, msg(next), "out of order");
                    next += 1;
                    received.store(next, Ordering::Release);
                }
                None => {
                    announced += 1;
                    if c.prepare_sleep() {
                        sleeps += 1;
                        let woke = ev.wait(Some(Duration::from_secs(1))).unwrap();
                        assert!(woke || c.is_empty(), "lost wake-up: message {next} pending");
                    }
                    c.cancel_sleep();
                }
            }
        }
        let wakes = prod.join().unwrap();
        assert!(
            sleeps > 100,
            "the consumer rarely slept ({sleeps}): protocol not exercised"
        );
        assert!(
            wakes <= announced,
            "one wake-up per announced sleep at most ({wakes} > {announced})"
        );
        assert!(wakes < N, "wake-ups must be rarer than messages ({wakes})");
        drop(m);
    }
}
