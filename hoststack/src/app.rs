//! The app registry: attached applications, their workers, segments and the
//! event queues the daemon writes.
//!
//! Everything read from an app's segment is untrusted: queue and FIFO handles
//! keep private copies of the indices the daemon owns and validate the ones
//! the app owns. An app that corrupts its queues is disconnected; it cannot
//! make the daemon read or write outside its own segment.

use session_api::fasthash::FastMap;
use session_api::fifo::{fifo_footprint, fifo_init, FifoConsumer, FifoProducer};
use session_api::mq::MAX_CHANNELS;
use session_api::mq::{mq_footprint, mq_init, MqConsumer, MqError, MqProducer, RawMsg};
use session_api::msg::{Event, SessionDesc, DESC_CHANNEL_OFF, SESSION_DESC_SIZE};
use session_api::segment::{SegmentAllocator, SegmentHeader, SEGMENT_HEADER_SIZE};
use session_api::shm::{EventFd, ShmRegion};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

/// Events that did not fit in a worker's queue wait here; past this many the
/// app is considered stuck and is disconnected (bounded memory).
pub const MAX_BACKLOG: usize = 65536;

/// App index + generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(pub u32);

/// A shared-memory segment with its daemon-private allocator.
pub struct Segment {
    /// Segment id (unique in the daemon).
    pub id: u32,
    /// The mapping.
    pub region: ShmRegion,
    /// Daemon-private allocation state.
    pub alloc: SegmentAllocator,
}

impl Segment {
    /// Create a fresh segment.
    pub fn create(id: u32, size: usize, name: &str) -> std::io::Result<Self> {
        let region = ShmRegion::create(name, size).map_err(std::io::Error::other)?;
        // SAFETY: the region is `size` bytes, freshly mapped and ≥ the header.
        unsafe { SegmentHeader::init(region.as_ptr(), id, size as u64) };
        Ok(Segment {
            id,
            region,
            alloc: SegmentAllocator::new(size),
        })
    }

    /// Pointer to `off` inside the segment, checked against `len`.
    pub fn ptr(&self, off: u32, len: usize) -> Option<*mut u8> {
        let end = (off as usize).checked_add(len)?;
        if (off as usize) < SEGMENT_HEADER_SIZE || end > self.region.len() {
            return None;
        }
        // SAFETY: bounds checked above.
        Some(unsafe { self.region.as_ptr().add(off as usize) })
    }
}

/// A block in a segment holding one session's descriptor(s) and FIFO pair.
#[derive(Debug, Clone, Copy)]
pub struct SessionBlock {
    /// Segment id.
    pub segment: u32,
    /// Block offset (descriptor A at +0, descriptor B at +SESSION_DESC_SIZE).
    pub off: u32,
    /// Offset of the FIFO flowing "A→B" (app tx for network sessions).
    pub fifo_ab: u32,
    /// Offset of the FIFO flowing "B→A" (app rx for network sessions).
    pub fifo_ba: u32,
    /// Capacity of each FIFO.
    pub cap: u32,
}

/// Allocate a session block (2 descriptors + 2 FIFOs) in `seg`.
pub fn alloc_block(seg: &mut Segment, cap: u32) -> Option<SessionBlock> {
    let desc = 2 * SESSION_DESC_SIZE;
    let fp = fifo_footprint(cap);
    let total = desc + 2 * fp;
    let off = seg.alloc.alloc(total)?;
    let base = seg.ptr(off, total)?;
    let fifo_ab = off + desc as u32;
    let fifo_ba = fifo_ab + fp as u32;
    // SAFETY: `base..base+total` lies in the segment (checked by `ptr`).
    unsafe {
        std::ptr::write_bytes(base, 0, desc);
        fifo_init(base.add(desc), cap, 0);
        fifo_init(base.add(desc + fp), cap, 0);
    }
    Some(SessionBlock {
        segment: seg.id,
        off,
        fifo_ab,
        fifo_ba,
        cap,
    })
}

/// Write descriptor `which` (0 = A, 1 = B) of a block.
pub fn write_desc(seg: &Segment, blk: &SessionBlock, which: u32, d: &SessionDesc) -> Option<u32> {
    let off = blk.off + which * SESSION_DESC_SIZE as u32;
    let p = seg.ptr(off, SESSION_DESC_SIZE)?;
    let b = d.to_bytes();
    // SAFETY: `p` points at SESSION_DESC_SIZE bytes inside the segment.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, SESSION_DESC_SIZE) };
    Some(off)
}

/// The wake-channel byte of a session's descriptor (app-written, so any
/// value): which of the worker's channels its events should wake.
#[derive(Debug, Clone, Copy)]
pub struct ChanRef(NonNull<AtomicU8>);

// SAFETY: a pointer into a shared segment, read with an atomic load only;
// like the FIFO handles it is used by the daemon's one thread.
unsafe impl Send for ChanRef {}

impl ChanRef {
    /// The app's current choice.
    pub fn get(&self) -> u8 {
        // SAFETY: `chan_ref` checked that the byte lies in the segment, and
        // sessions (which hold their ChanRef) are dropped before their
        // segment, as for the FIFO handles.
        unsafe { self.0.as_ref() }.load(Ordering::Relaxed)
    }
}

/// The wake-channel byte of the descriptor at `desc_off` in `seg`.
pub fn chan_ref(seg: &Segment, desc_off: u32) -> Option<ChanRef> {
    let p = seg.ptr(desc_off.checked_add(DESC_CHANNEL_OFF as u32)?, 1)?;
    NonNull::new(p.cast()).map(ChanRef)
}

/// Daemon-side producer handle on a FIFO of a block.
pub fn producer(seg: &Segment, off: u32, cap: u32) -> Option<FifoProducer> {
    let p = seg.ptr(off, fifo_footprint(cap))?;
    // SAFETY: the FIFO lies inside the segment, which outlives the handle
    // (sessions are dropped before their segment).
    Some(unsafe { FifoProducer::new(p, cap) })
}

/// Daemon-side consumer handle on a FIFO of a block.
pub fn consumer(seg: &Segment, off: u32, cap: u32) -> Option<FifoConsumer> {
    let p = seg.ptr(off, fifo_footprint(cap))?;
    // SAFETY: as in `producer`.
    Some(unsafe { FifoConsumer::new(p, cap) })
}

/// One app worker: a queue pair and two eventfds.
pub struct Worker {
    /// Worker index within the app.
    pub index: u32,
    /// Requests from the app.
    pub req: MqConsumer,
    /// Events to the app.
    pub evt: MqProducer,
    /// The app writes this to wake the daemon (in the daemon's epoll set).
    pub daemon_wake: EventFd,
    /// The daemon writes this to wake the worker.
    pub app_wake: EventFd,
    /// Events waiting for room in `evt`.
    pub backlog: VecDeque<RawMsg>,
    /// Offsets of the queues (for freeing).
    pub q_off: u32,
    /// Events posted (stats).
    pub events: u64,
    /// Requests handled (stats).
    pub requests: u64,
    /// eventfd writes made to wake the app (stats).
    pub wakeups: u64,
    /// The app sleeps and has been sent events: wake it once the daemon
    /// has finished its current pass ([`Worker::flush_wake`]). Waking it at
    /// the first event would, on a shared CPU, let it preempt the daemon
    /// and handle one event per wake-up instead of the whole batch.
    pub wake_pending: bool,
    /// Wake channels (index = channel id; 0 is never used): eventfds of
    /// the app's threads that sleep apart (see `session_api::mq`).
    pub channels: Vec<Option<EventFd>>,
    /// Channels that were sent events while their thread slept.
    pub chan_pending: u64,
}

/// Result of posting an event.
#[derive(Debug, PartialEq, Eq)]
pub enum PostError {
    /// The queue is corrupt or the backlog overflowed: disconnect the app.
    Broken,
}

impl Worker {
    /// Post an event, keeping order with anything already backlogged.
    /// `chan` is the wake-channel byte of the session the event concerns.
    pub fn post(&mut self, ev: &Event, chan: Option<ChanRef>) -> Result<(), PostError> {
        let m = ev.encode();
        self.events += 1;
        if self.backlog.is_empty() {
            match self.evt.try_send(&m) {
                Ok(()) => {
                    if self.evt.wake_needed() {
                        self.wake_pending = true;
                    }
                    self.wake_channels(chan);
                    return Ok(());
                }
                Err(MqError::Full) => {}
                Err(_) => return Err(PostError::Broken),
            }
        }
        if self.backlog.len() >= MAX_BACKLOG {
            return Err(PostError::Broken);
        }
        self.backlog.push_back(m);
        Ok(())
    }

    /// Move backlogged events into the queue as room appears.
    pub fn flush_backlog(&mut self) -> Result<(), PostError> {
        let mut sent = false;
        while let Some(m) = self.backlog.front() {
            match self.evt.try_send(m) {
                Ok(()) => {
                    self.backlog.pop_front();
                    sent = true;
                }
                Err(MqError::Full) => break,
                Err(_) => return Err(PostError::Broken),
            }
        }
        if sent {
            if self.evt.wake_needed() {
                self.wake_pending = true;
            }
            self.wake_channels(None);
        }
        Ok(())
    }

    /// After an event was published (and `wake_needed`'s fence): note the
    /// sleeping channels it concerns, that of its session (read now, after
    /// the fence, so a thread that named it and then slept is seen) or, for
    /// none or an unknown one, every channel.
    fn wake_channels(&mut self, chan: Option<ChanRef>) {
        // The sleeping-channels word shares a line with the flag
        // `wake_needed` just read: look at it before touching the
        // descriptor's line.
        if self.channels.is_empty() || !self.evt.channels_sleeping() {
            return;
        }
        let c = chan.map_or(0, |c| c.get()) as usize;
        let want = if c > 0 && self.channels.get(c).is_some_and(|e| e.is_some()) {
            1u64 << c
        } else {
            u64::MAX
        };
        self.chan_pending |= self.evt.take_sleeping_channels(want);
    }

    /// Does [`Worker::flush_wake`] have eventfds to write?
    pub fn wake_due(&self) -> bool {
        self.wake_pending || self.chan_pending != 0
    }

    /// Write the eventfds of the app's threads that were sent events while
    /// they slept.
    pub fn flush_wake(&mut self) -> bool {
        let before = self.wakeups;
        if std::mem::take(&mut self.wake_pending) {
            self.wakeups += 1;
            self.app_wake.notify();
        }
        let mut p = std::mem::take(&mut self.chan_pending);
        while p != 0 {
            let c = p.trailing_zeros() as usize;
            p &= p - 1;
            // Bits of channels that do not exist (an app may set any) are
            // dropped here.
            if let Some(Some(e)) = self.channels.get(c) {
                self.wakeups += 1;
                e.notify();
            }
        }
        self.wakeups != before
    }

    /// A new wake channel: its id and eventfd (None when all are taken).
    pub fn add_channel(&mut self) -> std::io::Result<Option<(u32, &EventFd)>> {
        if self.channels.is_empty() {
            self.channels.push(None); // id 0 is "no channel"
        }
        let free = self.channels.iter().skip(1).position(|c| c.is_none());
        let c = match free {
            Some(i) => i + 1,
            None if self.channels.len() < MAX_CHANNELS => {
                self.channels.push(None);
                self.channels.len() - 1
            }
            None => return Ok(None),
        };
        self.channels[c] = Some(EventFd::new()?);
        Ok(self.channels[c].as_ref().map(|e| (c as u32, e)))
    }

    /// Free channel `c` (ignored if it is not one).
    pub fn del_channel(&mut self, c: u32) {
        if c > 0 {
            if let Some(e) = self.channels.get_mut(c as usize) {
                *e = None;
            }
        }
    }
}

/// An attached application.
pub struct App {
    /// Id.
    pub id: AppId,
    /// Name it gave.
    pub name: String,
    /// Namespace it attached in.
    pub namespace: String,
    /// Pid it claimed.
    pub pid: u32,
    /// The attach socket (closing it = detach).
    pub ctrl: OwnedFd,
    /// Its private segments.
    pub segments: FastMap<u32, Segment>,
    /// Id of the segment new sessions and queues go to.
    pub main_segment: u32,
    /// Workers (None = removed).
    pub workers: Vec<Option<Worker>>,
    /// Cut-through segments this app has been sent (id → peer app).
    pub ct_segments: Vec<u32>,
}

/// Queue sizes.
pub const REQ_SLOTS: u32 = 1024;
/// Event queue slots.
pub const EVT_SLOTS: u32 = 4096;

impl App {
    /// Allocate a worker's queues in the main segment.
    pub fn add_worker(&mut self) -> std::io::Result<u32> {
        let seg = self
            .segments
            .get_mut(&self.main_segment)
            .ok_or_else(|| std::io::Error::other("no main segment"))?;
        let rq = mq_footprint(REQ_SLOTS);
        let eq = mq_footprint(EVT_SLOTS);
        let off = seg
            .alloc
            .alloc(rq + eq)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let base = seg
            .ptr(off, rq + eq)
            .ok_or_else(|| std::io::Error::other("queue outside segment"))?;
        // SAFETY: both queues lie inside the segment (checked by `ptr`), which
        // lives as long as the app and therefore the worker.
        let (req, evt) = unsafe {
            mq_init(base, REQ_SLOTS);
            mq_init(base.add(rq), EVT_SLOTS);
            (
                MqConsumer::new(base, REQ_SLOTS),
                MqProducer::new(base.add(rq), EVT_SLOTS),
            )
        };
        let index = match self.workers.iter().position(|w| w.is_none()) {
            Some(i) => i,
            None => {
                self.workers.push(None);
                self.workers.len() - 1
            }
        } as u32;
        let w = Worker {
            index,
            req,
            evt,
            daemon_wake: EventFd::new()?,
            app_wake: EventFd::new()?,
            backlog: VecDeque::new(),
            q_off: off,
            events: 0,
            requests: 0,
            wakeups: 0,
            wake_pending: false,
            channels: Vec::new(),
            chan_pending: 0,
        };
        self.workers[index as usize] = Some(w);
        Ok(index)
    }

    /// Remove a worker and free its queues.
    pub fn del_worker(&mut self, index: u32) -> bool {
        let Some(w) = self.workers.get_mut(index as usize).and_then(|w| w.take()) else {
            return false;
        };
        if let Some(seg) = self.segments.get_mut(&self.main_segment) {
            let _ = seg.alloc.free(w.q_off);
        }
        true
    }

    /// A worker by index.
    pub fn worker(&mut self, index: u32) -> Option<&mut Worker> {
        self.workers.get_mut(index as usize)?.as_mut()
    }

    /// Bytes of shared memory mapped for this app.
    pub fn shm_bytes(&self) -> usize {
        self.segments.values().map(|s| s.region.len()).sum()
    }
}
