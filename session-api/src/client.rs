//! The native client API.
//!
//! ```no_run
//! use session_api::client::{App, AttachConfig};
//! # fn main() -> Result<(), session_api::client::Error> {
//! let app = App::attach(&AttachConfig::from_env("echo"))?;
//! let mut w = app.worker()?;
//! let l = w.listen("0.0.0.0:7000".parse().unwrap())?;
//! let s = w.accept(l, None)?;
//! let mut buf = [0u8; 4096];
//! loop {
//!     let n = w.read(s, &mut buf, None)?;
//!     if n == 0 { break; }
//!     w.write_all(s, &buf[..n], None)?;
//! }
//! w.close(s)?;
//! # Ok(()) }
//! ```
//!
//! An [`App`] is one attachment (one process, usually); each thread that
//! does I/O takes its own [`Worker`] with its own queue pair. Every call has
//! a blocking form (with an optional timeout) and a non-blocking one
//! (`timeout = Some(Duration::ZERO)` or the `try_` variants), which returns
//! [`Error::WouldBlock`]. Blocking calls sleep in the kernel on the worker's
//! eventfd and the attach socket, so they return [`Error::DaemonGone`]
//! promptly if the daemon dies.
//!
//! To drive a worker from an external epoll loop, add [`Worker::wait_fds`]
//! to it and call [`Worker::prepare_external_wait`] before each blocking
//! `epoll_wait` (the daemon only writes the eventfd after the worker said it
//! is going to sleep).

use crate::fasthash::{FastMap, FastSet};
use crate::fifo::{FifoConsumer, FifoProducer};
use crate::mq::{MqConsumer, MqError, MqProducer};
use crate::msg::{
    dgram_header, parse_dgram_header, Event, Proto, Request, SessOpt, SessionDesc, Shut, DGRAM_HDR,
    SESSION_DESC_SIZE,
};
use crate::proto::{AppCtrl, DaemonCtrl, CTRL_MAX};
use crate::segment::{SegmentHeader, SEGMENT_HEADER_SIZE};
use crate::shm::{recv_with_fds, send_with_fds, EventFd, ShmRegion};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the client API. [`Error::errno`] maps each to the errno a
/// kernel socket would report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS call failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon refused the attach or a worker.
    #[error("refused by hoststackd: {message} (errno {errno})")]
    Refused {
        /// errno.
        errno: i32,
        /// The daemon's reason.
        message: String,
    },
    /// The daemon sent something we do not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The daemon is gone (crashed, killed, or shut down).
    #[error("hoststackd is gone")]
    DaemonGone,
    /// The call would block.
    #[error("operation would block")]
    WouldBlock,
    /// The timeout expired.
    #[error("timed out")]
    TimedOut,
    /// The daemon (or the connection) reported an errno.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The handle is not (or no longer) a session/listener of this worker.
    #[error("bad handle")]
    BadHandle,
    /// Shared memory from the daemon or a cut-through peer is inconsistent.
    #[error("shared memory corrupt")]
    Corrupt,
}

impl Error {
    /// The errno a kernel socket would report.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Refused { errno, .. } => *errno,
            Error::Protocol(_) => libc::EPROTO,
            Error::DaemonGone => libc::ENETDOWN,
            Error::WouldBlock => libc::EAGAIN,
            Error::TimedOut => libc::ETIMEDOUT,
            Error::Errno(e) => *e,
            Error::BadHandle => libc::EBADF,
            Error::Corrupt => libc::EIO,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// Daemon socket directory.
    pub socket_dir: PathBuf,
    /// App namespace.
    pub namespace: String,
    /// Namespace secret.
    pub secret: String,
    /// App name shown by hoststackctl.
    pub name: String,
}

impl AttachConfig {
    /// From `HOSTSTACK_SOCKET_DIR` (default /run/hoststack),
    /// `HOSTSTACK_NAMESPACE` (default "default") and `HOSTSTACK_SECRET`.
    pub fn from_env(name: &str) -> Self {
        AttachConfig {
            socket_dir: std::env::var_os("HOSTSTACK_SOCKET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/run/hoststack")),
            namespace: std::env::var("HOSTSTACK_NAMESPACE").unwrap_or_else(|_| "default".into()),
            secret: std::env::var("HOSTSTACK_SECRET").unwrap_or_default(),
            name: name.into(),
        }
    }
}

struct AppShared {
    ctrl: OwnedFd,
    ctrl_lock: Mutex<()>,
    segments: Mutex<HashMap<u32, Arc<ShmRegion>>>,
    /// Control replies not yet claimed (WorkerOk / Error) with their fds.
    replies: Mutex<VecDeque<(DaemonCtrl, Vec<OwnedFd>)>>,
    dead: AtomicBool,
    id: u32,
}

impl AppShared {
    /// Read one control datagram (blocking up to `timeout`), filing segment
    /// announcements; other messages go to `replies`.
    fn pump(&self, timeout: Duration) -> Result<()> {
        let _g = self.ctrl_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut pfd = libc::pollfd {
            fd: self.ctrl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(60_000) as i32) };
        if r <= 0 {
            return Ok(());
        }
        // Drain what is queued (bounded), not just one message.
        for _ in 0..256 {
            if !self.read_one()? {
                break;
            }
        }
        Ok(())
    }

    /// Read one control datagram if one waits; Ok(false) if none.
    fn read_one(&self) -> Result<bool> {
        let mut buf = vec![0u8; CTRL_MAX];
        let (n, fds) = match recv_with_fds(self.ctrl.as_fd(), &mut buf, 4) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(_) => {
                self.dead.store(true, Ordering::Release);
                return Err(Error::DaemonGone);
            }
        };
        if n == 0 {
            self.dead.store(true, Ordering::Release);
            return Err(Error::DaemonGone);
        }
        let m = DaemonCtrl::decode(&buf[..n]).map_err(|e| Error::Protocol(e.to_string()))?;
        match m {
            DaemonCtrl::Segment { segment, size } => {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Protocol("segment without fd".into()))?;
                let region = map_segment(fd, size, segment)?;
                self.segments
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(segment, Arc::new(region));
            }
            DaemonCtrl::SegmentGone { segment } => {
                // Sessions still holding it keep the mapping until closed.
                self.segments
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&segment);
            }
            other => self
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((other, fds)),
        }
        Ok(true)
    }

    fn segment(&self, id: u32) -> Result<Arc<ShmRegion>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = self
                .segments
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
            {
                return Ok(s.clone());
            }
            if self.dead.load(Ordering::Acquire) {
                return Err(Error::DaemonGone);
            }
            if Instant::now() > deadline {
                return Err(Error::Protocol(format!("segment {id} never announced")));
            }
            self.pump(Duration::from_millis(100))?;
        }
    }

    /// The first queued reply `mine` accepts (errors always match).
    fn take_reply(
        &self,
        timeout: Duration,
        mine: impl Fn(&DaemonCtrl) -> bool,
    ) -> Result<(DaemonCtrl, Vec<OwnedFd>)> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut q = self.replies.lock().unwrap_or_else(|e| e.into_inner());
                let pos = q
                    .iter()
                    .position(|(m, _)| matches!(m, DaemonCtrl::Error { .. }) || mine(m));
                if let Some(r) = pos.and_then(|i| q.remove(i)) {
                    return Ok(r);
                }
            }
            if self.dead.load(Ordering::Acquire) {
                return Err(Error::DaemonGone);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::TimedOut);
            }
            self.pump(left.min(Duration::from_millis(200)))?;
        }
    }
}

fn map_segment(fd: OwnedFd, size: u64, id: u32) -> Result<ShmRegion> {
    let size = usize::try_from(size).map_err(|_| Error::Protocol("segment too large".into()))?;
    if size < SEGMENT_HEADER_SIZE {
        return Err(Error::Protocol("segment too small".into()));
    }
    let region = ShmRegion::map_fd(fd, size)
        .map_err(|e| Error::Protocol(format!("mapping segment: {e}")))?;
    // SAFETY: the region is `size` ≥ header bytes.
    unsafe { SegmentHeader::check(region.as_ptr(), size, id) }
        .map_err(|e| Error::Protocol(e.to_string()))?;
    Ok(region)
}

/// An attachment to hoststackd. Cheap to clone; the attachment ends when
/// the last clone (and every worker) is dropped, or the process exits.
#[derive(Clone)]
pub struct App {
    inner: Arc<AppShared>,
}

impl App {
    /// Connect to the namespace socket and authenticate.
    pub fn attach(cfg: &AttachConfig) -> Result<App> {
        let path = cfg.socket_dir.join(format!("{}.sock", cfg.namespace));
        let ctrl = crate::sys::seqpacket_connect(&path)?;
        let msg = AppCtrl::Attach {
            namespace: cfg.namespace.clone(),
            secret: cfg.secret.clone(),
            name: cfg.name.clone(),
            pid: std::process::id(),
        }
        .encode();
        send_with_fds(ctrl.as_fd(), &msg, &[])?;
        let mut buf = vec![0u8; CTRL_MAX];
        let mut pfd = libc::pollfd {
            fd: ctrl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 5000) } <= 0 {
            return Err(Error::TimedOut);
        }
        let (n, fds) = recv_with_fds(ctrl.as_fd(), &mut buf, 4)?;
        if n == 0 {
            return Err(Error::DaemonGone);
        }
        match DaemonCtrl::decode(&buf[..n]).map_err(|e| Error::Protocol(e.to_string()))? {
            DaemonCtrl::AttachOk {
                app_id,
                segment,
                size,
            } => {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Protocol("attach reply without segment".into()))?;
                let region = map_segment(fd, size, segment)?;
                let mut segs = HashMap::new();
                segs.insert(segment, Arc::new(region));
                Ok(App {
                    inner: Arc::new(AppShared {
                        ctrl,
                        ctrl_lock: Mutex::new(()),
                        segments: Mutex::new(segs),
                        replies: Mutex::new(VecDeque::new()),
                        dead: AtomicBool::new(false),
                        id: app_id,
                    }),
                })
            }
            DaemonCtrl::Error { errno, message } => Err(Error::Refused { errno, message }),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// The daemon's id for this app.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// Handle control messages the daemon sent (segment announcements and
    /// retirements) without blocking. Blocking calls do this on their own.
    pub fn process_control(&self) -> Result<()> {
        self.inner.pump(Duration::ZERO)
    }

    /// Shared segments this app has mapped (its own and cut-through ones).
    pub fn segment_count(&self) -> usize {
        self.inner
            .segments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Register a new worker (one per thread doing I/O).
    pub fn worker(&self) -> Result<Worker> {
        {
            let _g = self
                .inner
                .ctrl_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            send_with_fds(self.inner.ctrl.as_fd(), &AppCtrl::AddWorker.encode(), &[])
                .map_err(|_| Error::DaemonGone)?;
        }
        let (m, fds) = self.inner.take_reply(Duration::from_secs(5), |m| {
            matches!(m, DaemonCtrl::WorkerOk { .. })
        })?;
        match m {
            DaemonCtrl::WorkerOk {
                worker,
                segment,
                req_off,
                req_slots,
                evt_off,
                evt_slots,
            } => {
                let mut fds = fds.into_iter();
                let (Some(dw), Some(aw)) = (fds.next(), fds.next()) else {
                    return Err(Error::Protocol("worker reply without eventfds".into()));
                };
                let seg = self.inner.segment(segment)?;
                let rq = crate::mq::mq_footprint(req_slots);
                let eq = crate::mq::mq_footprint(evt_slots);
                let len = seg.len();
                let ok = |off: u32, l: usize| {
                    (off as usize) >= SEGMENT_HEADER_SIZE
                        && (off as usize).checked_add(l).is_some_and(|e| e <= len)
                };
                if !ok(req_off, rq) || !ok(evt_off, eq) {
                    return Err(Error::Protocol("queue outside segment".into()));
                }
                // SAFETY: both queues were checked to lie inside the segment,
                // which the worker keeps mapped (it holds an Arc).
                let (req, evt) = unsafe {
                    (
                        MqProducer::new(seg.as_ptr().add(req_off as usize), req_slots),
                        MqConsumer::new(seg.as_ptr().add(evt_off as usize), evt_slots),
                    )
                };
                Ok(Worker {
                    app: self.clone(),
                    index: worker,
                    req,
                    evt,
                    daemon_wake: EventFd::from_fd(dw),
                    app_wake: EventFd::from_fd(aw),
                    _seg: seg,
                    next_req: 1,
                    replies: FastMap::default(),
                    sessions: FastMap::default(),
                    listeners: FastMap::default(),
                    closed_listeners: FastSet::default(),
                    early_accepts: Vec::new(),
                    early_state: FastMap::default(),
                    unopened: FastSet::default(),
                    late: FastMap::default(),
                    reply_timeout: REPLY_TIMEOUT,
                    notes: VecDeque::new(),
                    dead: false,
                    scratch: Vec::new(),
                    busy: false,
                    defer_wake: false,
                    wake_pending: false,
                    spins: 0,
                    stats: WorkerStats::default(),
                })
            }
            DaemonCtrl::Error { errno, message } => Err(Error::Refused { errno, message }),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }
}

/// A session (TCP connection or UDP socket) handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// A listener handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

/// A pending non-blocking connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectToken(u32);

struct Sess {
    proto: Proto,
    rx: FifoConsumer,
    tx: FifoProducer,
    _seg: Arc<ShmRegion>,
    /// Offset of the descriptor in `_seg` (checked when opened).
    desc_off: u32,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    peer_closed: bool,
    reset: Option<i32>,
    /// An error to report once on the next call (connected UDP: ICMP).
    soft_error: Option<i32>,
    shut_wr: bool,
    cut_through: bool,
}

struct Listen {
    queue: VecDeque<(u64, u32, u32)>,
    local: SocketAddr,
}

/// What happened to a handle (edge notifications from the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// A listener has a connection to accept.
    Accept(ListenerId),
    /// A session has data (or EOF/error) to read.
    Readable(SessionId),
    /// A session has room to write again.
    Writable(SessionId),
    /// A pending connect finished (success or failure).
    Connected(ConnectToken),
}

/// Level readiness of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// A read would not block (data, EOF or error).
    pub readable: bool,
    /// A write would not block.
    pub writable: bool,
    /// The peer closed its side (EOF after the data).
    pub hup: bool,
    /// The connection failed (reset/timeout).
    pub error: Option<i32>,
}

/// A worker: one queue pair, used by one thread at a time.
pub struct Worker {
    app: App,
    index: u32,
    req: MqProducer,
    evt: MqConsumer,
    daemon_wake: EventFd,
    app_wake: EventFd,
    _seg: Arc<ShmRegion>,
    next_req: u32,
    replies: FastMap<u32, Event>,
    sessions: FastMap<u64, Sess>,
    listeners: FastMap<u64, Listen>,
    /// Listeners this worker closed (late connections go back).
    closed_listeners: FastSet<u64>,
    /// Connections that arrived before the listen reply was seen.
    early_accepts: Vec<(u64, u64, u32, u32)>,
    /// FIN/reset seen for sessions not yet opened: (peer closed, reset).
    early_state: FastMap<u64, (bool, Option<i32>)>,
    /// Sessions the daemon handed to this worker that are not open yet (in
    /// an accept queue, or a reply not yet collected). Only their events
    /// go to `early_state`; an event for any other unknown handle is stale
    /// (the session was closed while it was in flight) and is dropped, so
    /// `early_state` cannot grow over a long uptime.
    unopened: FastSet<u64>,
    /// Requests whose reply we stopped waiting for (the daemon was too
    /// slow): what the reply would hold, to give it back when it comes.
    late: FastMap<u32, Late>,
    /// How long a call waits for the daemon's reply.
    reply_timeout: Duration,
    notes: VecDeque<Notify>,
    dead: bool,
    scratch: Vec<u8>,
    busy: bool,
    /// Defer daemon wake-ups to [`Worker::flush_wake`] (event loops).
    defer_wake: bool,
    wake_pending: bool,
    spins: u32,
    stats: WorkerStats,
}

/// How long a call waits for the daemon's reply by default
/// ([`Worker::set_reply_timeout`]).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a reply the worker gave up on would carry, so that it can be given
/// back when it arrives after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Late {
    /// A new session (connect, UDP bind, adopt): aborted.
    Session,
    /// A listener: closed, its connections handed back.
    Listener,
    /// A bind reservation: given back.
    Reservation,
    /// Nothing to give back.
    Nothing,
}

/// Per-worker counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    /// System calls made by the worker on the data path (eventfd writes
    /// and reads, polls).
    pub syscalls: u64,
    /// Events received from the daemon.
    pub events: u64,
    /// Requests sent to the daemon.
    pub requests: u64,
    /// Sessions handed to this worker and not opened yet (accept queues,
    /// uncollected replies): a gauge, not a counter.
    pub unopened: usize,
    /// Of those, how many have a FIN or reset remembered for them.
    pub early_state: usize,
    /// Replies given up on after [`REPLY_TIMEOUT`] that have not arrived
    /// yet (a gauge); when one does, what it created is given back.
    pub late_replies: usize,
}

fn deadline_of(timeout: Option<Duration>) -> Option<Instant> {
    // A zero timeout never waits, so it needs no clock read (the shim makes
    // every call with one).
    timeout.filter(|t| !t.is_zero()).map(|t| Instant::now() + t)
}

impl Worker {
    /// Worker index in the daemon.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Busy-poll mode: blocking calls spin instead of sleeping in the
    /// kernel, and reads leave the rx FIFOs' event flags set so producers
    /// (the daemon or a cut-through peer) stop sending per-burst
    /// notifications. For latency benchmarks on dedicated cores.
    pub fn set_busy_poll(&mut self, on: bool) {
        self.busy = on;
    }

    /// Counters.
    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            unopened: self.unopened.len(),
            early_state: self.early_state.len(),
            late_replies: self.late.len(),
            ..self.stats
        }
    }

    /// The app this worker belongs to.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Descriptors to watch from an external epoll: the wake eventfd and
    /// the attach socket (readable on segment announcements or daemon death).
    pub fn wait_fds(&self) -> [RawFd; 2] {
        [self.app_wake.as_raw_fd(), self.app.inner.ctrl.as_raw_fd()]
    }

    /// Before blocking in an external epoll: returns false if events are
    /// already pending (process them with [`Worker::poll_events`] with a zero
    /// timeout instead of sleeping).
    pub fn prepare_external_wait(&mut self) -> bool {
        self.flush_wake();
        if self.evt.prepare_sleep() {
            true
        } else {
            self.evt.cancel_sleep();
            false
        }
    }

    /// For callers that run their own wait loop (the LD_PRELOAD shim):
    /// announce that a thread is about to block on [`Worker::wait_fds`].
    /// Returns false if events are already pending (drain them instead of
    /// sleeping). Unlike [`Worker::prepare_external_wait`] the announcement
    /// stays until [`Worker::cancel_sleep`], so several sleeping threads can
    /// share it.
    pub fn prepare_sleep(&mut self) -> bool {
        self.flush_wake();
        self.evt.prepare_sleep()
    }

    /// Event-loop mode: requests do not wake a sleeping daemon one by one;
    /// [`Worker::flush_wake`] (also done by [`Worker::prepare_sleep`] and
    /// before any blocking call) wakes it once for the whole batch. Saves a
    /// wake-up (and often a context switch) per request when the app and the
    /// daemon share a CPU.
    pub fn set_defer_wake(&mut self, on: bool) {
        self.defer_wake = on;
        if !on {
            self.flush_wake();
        }
    }

    /// Wake the daemon if requests were queued since the last flush.
    pub fn flush_wake(&mut self) {
        if self.wake_pending {
            self.wake_pending = false;
            if self.req.wake_needed() {
                self.stats.syscalls += 1;
                self.daemon_wake.notify();
            }
        }
    }

    /// Withdraw [`Worker::prepare_sleep`] (when no thread sleeps any more).
    pub fn cancel_sleep(&mut self) {
        self.evt.cancel_sleep();
    }

    /// A wake channel of this worker: its id and the eventfd the daemon
    /// writes when an event concerns the channel while a thread sleeps on
    /// it ([`Worker::prepare_sleep_channel`]). Events of a session go to the
    /// channel named with [`Worker::set_wake_channel`]; events without one
    /// (and of sessions with channel 0) wake every sleeping channel and
    /// [`Worker::prepare_sleep`] sleepers. For apps whose threads each wait
    /// in their own epoll set: a thread is woken only for its own sessions.
    pub fn add_channel(&mut self) -> Result<(u8, OwnedFd)> {
        if self.dead {
            return Err(Error::DaemonGone);
        }
        {
            let inner = &self.app.inner;
            let _g = inner.ctrl_lock.lock().unwrap_or_else(|e| e.into_inner());
            let m = AppCtrl::AddChannel { worker: self.index }.encode();
            send_with_fds(inner.ctrl.as_fd(), &m, &[]).map_err(|_| Error::DaemonGone)?;
        }
        let me = self.index;
        let (m, fds) = self.app.inner.take_reply(
            Duration::from_secs(5),
            |m| matches!(m, DaemonCtrl::ChannelOk { worker, .. } if *worker == me),
        )?;
        match m {
            DaemonCtrl::ChannelOk { channel, .. }
                if (1..crate::mq::MAX_CHANNELS as u32).contains(&channel) =>
            {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Protocol("channel without eventfd".into()))?;
                Ok((channel as u8, fd))
            }
            DaemonCtrl::Error { errno, message } => Err(Error::Refused { errno, message }),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Give a channel from [`Worker::add_channel`] back.
    pub fn del_channel(&mut self, ch: u8) {
        let inner = &self.app.inner;
        let _g = inner.ctrl_lock.lock().unwrap_or_else(|e| e.into_inner());
        let m = AppCtrl::DelChannel {
            worker: self.index,
            channel: ch as u32,
        }
        .encode();
        let _ = send_with_fds(inner.ctrl.as_fd(), &m, &[]);
    }

    /// Route the events of session `s` to wake channel `ch` (0 = any
    /// sleeper). Takes effect for the next event: a thread that then
    /// sleeps on `ch` is woken by it.
    pub fn set_wake_channel(&mut self, s: SessionId, ch: u8) -> Result<()> {
        let sess = self.sess(s)?;
        let off = sess.desc_off as usize + crate::msg::DESC_CHANNEL_OFF;
        // SAFETY: the descriptor (SESSION_DESC_SIZE bytes at `desc_off`) was
        // checked to lie inside the segment when the session was opened,
        // and `_seg` keeps it mapped; a byte is always aligned for AtomicU8.
        let b = unsafe {
            &*sess
                ._seg
                .as_ptr()
                .add(off)
                .cast::<std::sync::atomic::AtomicU8>()
        };
        // Relaxed: the fence in `prepare_sleep_channel` orders it before
        // the thread's sleep (see the mq module docs).
        b.store(ch, Ordering::Relaxed);
        Ok(())
    }

    /// Like [`Worker::prepare_sleep`] for a thread sleeping on wake channel
    /// `ch` (on that channel's eventfd): only events for the channel wake
    /// it. Returns false if events are pending (or `ch` is not a channel).
    pub fn prepare_sleep_channel(&mut self, ch: u8) -> bool {
        self.flush_wake();
        self.evt.prepare_sleep_channel(ch)
    }

    /// Withdraw [`Worker::prepare_sleep_channel`].
    pub fn cancel_sleep_channel(&mut self, ch: u8) {
        self.evt.cancel_sleep_channel(ch);
    }

    /// After an external wait: reset the wake eventfd if it fired and
    /// handle the attach socket if it became readable (segment
    /// announcements, daemon death).
    pub fn after_wake(&mut self, woken: bool, ctrl: bool) -> Result<()> {
        if woken {
            self.stats.syscalls += 1;
            self.app_wake.drain();
        }
        if ctrl {
            self.check_ctrl()?;
        }
        Ok(())
    }

    /// Forget this worker in a forked child: the child's copies of the
    /// descriptors are closed and the mappings dropped, but nothing is sent
    /// to the daemon (the queues and attach socket still belong to the
    /// parent).
    pub fn detach_after_fork(mut self) {
        self.dead = true;
        drop(self);
    }

    /// The daemon is known to be gone (a call or a read of the attach
    /// socket found it closed).
    pub fn is_gone(&self) -> bool {
        self.dead || self.app.inner.dead.load(Ordering::Acquire)
    }

    fn send_req(&mut self, r: Request) -> Result<()> {
        if self.dead || self.app.inner.dead.load(Ordering::Acquire) {
            self.dead = true;
            return Err(Error::DaemonGone);
        }
        let m = r.encode();
        // Read the clock only once the queue turns out to be full.
        let mut start = None;
        loop {
            match self.req.try_send(&m) {
                Ok(()) => break,
                Err(MqError::Full) => {
                    // The daemon drains continuously; a full queue for long
                    // means it is gone or wedged.
                    self.daemon_wake.notify();
                    if start.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(5) {
                        return Err(Error::TimedOut);
                    }
                    self.process_events()?;
                    self.check_ctrl()?;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => return Err(Error::Corrupt),
            }
        }
        self.stats.requests += 1;
        if self.defer_wake {
            self.wake_pending = true;
        } else if self.req.wake_needed() {
            self.stats.syscalls += 1;
            self.daemon_wake.notify();
        }
        Ok(())
    }

    fn check_ctrl(&mut self) -> Result<()> {
        self.stats.syscalls += 1;
        let mut pfd = libc::pollfd {
            fd: self.app.inner.ctrl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
            if let Err(e) = self.app.inner.pump(Duration::ZERO) {
                self.dead = true;
                return Err(e);
            }
        }
        if self.app.inner.dead.load(Ordering::Acquire) {
            self.dead = true;
            return Err(Error::DaemonGone);
        }
        Ok(())
    }

    /// Drain the event queue into local state. Returns how many events.
    fn process_events(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            let m = match self.evt.try_recv() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => return Err(Error::Corrupt),
            };
            n += 1;
            self.stats.events += 1;
            let ev = Event::decode(&m).map_err(|e| Error::Protocol(e.to_string()))?;
            match ev {
                Event::Reply {
                    req_id,
                    errno,
                    handle,
                    segment,
                    ..
                } => {
                    if let Some(late) = self.late.remove(&req_id) {
                        self.give_back(ev, late);
                        continue;
                    }
                    if errno == 0 && segment != 0 {
                        // A new session (listeners have no segment).
                        self.unopened.insert(handle);
                    }
                    self.replies.insert(req_id, ev);
                    self.notes
                        .push_back(Notify::Connected(ConnectToken(req_id)));
                }
                Event::Accepted {
                    listener,
                    handle,
                    segment,
                    desc,
                } => match self.listeners.get_mut(&listener) {
                    Some(l) => {
                        self.unopened.insert(handle);
                        l.queue.push_back((handle, segment, desc));
                        self.notes.push_back(Notify::Accept(ListenerId(listener)));
                    }
                    None if self.closed_listeners.contains(&listener) => {
                        // Listener closed meanwhile: another listener of
                        // the address (a sibling process) may take it.
                        let _ = self.send_req(Request::Requeue { handle });
                    }
                    None => {
                        // Ahead of the listen reply (drained in one batch).
                        self.unopened.insert(handle);
                        self.early_accepts.push((listener, handle, segment, desc));
                    }
                },
                Event::Rx { handle } => self.notes.push_back(Notify::Readable(SessionId(handle))),
                Event::TxSpace { handle } => {
                    self.notes.push_back(Notify::Writable(SessionId(handle)))
                }
                Event::PeerClosed { handle } => {
                    if let Some(s) = self.sessions.get_mut(&handle) {
                        s.peer_closed = true;
                    } else if self.unopened.contains(&handle) {
                        // Not accepted yet: remember for accept().
                        self.early_state.entry(handle).or_default().0 = true;
                    }
                    self.notes.push_back(Notify::Readable(SessionId(handle)));
                }
                Event::Reset { handle, errno } => {
                    if let Some(s) = self.sessions.get_mut(&handle) {
                        // Like Linux: a reset after the peer's FIN (our side
                        // in CLOSE-WAIT) reads as EPIPE.
                        let e = if s.peer_closed && errno == libc::ECONNRESET {
                            libc::EPIPE
                        } else {
                            errno
                        };
                        s.reset = Some(e);
                    } else if self.unopened.contains(&handle) {
                        self.early_state.entry(handle).or_default().1 = Some(errno);
                    }
                    self.notes.push_back(Notify::Readable(SessionId(handle)));
                    self.notes.push_back(Notify::Writable(SessionId(handle)));
                }
                Event::SoftError { handle, errno } => {
                    if let Some(s) = self.sessions.get_mut(&handle) {
                        s.soft_error = Some(errno);
                        self.notes.push_back(Notify::Readable(SessionId(handle)));
                    }
                }
                Event::Shutdown => {
                    self.dead = true;
                }
            }
        }
        Ok(n)
    }

    /// Sleep until an event arrives or `deadline`; Err(TimedOut) on timeout.
    fn wait_until(&mut self, deadline: Option<Instant>) -> Result<()> {
        self.flush_wake();
        if self.process_events()? > 0 {
            return Ok(());
        }
        if self.dead {
            return Err(Error::DaemonGone);
        }
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::TimedOut);
                }
                Some(left)
            }
            None => None,
        };
        if self.busy {
            // Spin; look at the attach socket now and then so a dead
            // daemon is still noticed.
            self.spins = self.spins.wrapping_add(1);
            if self.spins & 0xffff == 0 {
                self.check_ctrl()?;
            }
            std::hint::spin_loop();
            return Ok(());
        }
        if !self.evt.prepare_sleep() {
            self.evt.cancel_sleep();
            self.process_events()?;
            return Ok(());
        }
        self.stats.syscalls += 1;
        let r = crate::sys::wait2(self.app_wake.fd(), self.app.inner.ctrl.as_fd(), timeout);
        self.evt.cancel_sleep();
        let r = r?;
        if r.woken {
            self.stats.syscalls += 1;
            self.app_wake.drain();
        }
        if r.ctrl {
            self.check_ctrl()?;
        }
        self.process_events()?;
        Ok(())
    }

    /// Wait for the reply to `req_id` for up to the reply timeout. If it
    /// does not come, remember that it is `late` so that whatever it
    /// creates is given back when it arrives (else a session, listener or
    /// reservation would stay with this worker for its whole life).
    fn await_reply(&mut self, req_id: u32, late: Late) -> Result<Event> {
        let deadline = deadline_of(Some(self.reply_timeout));
        loop {
            if let Some(ev) = self.replies.remove(&req_id) {
                return Ok(ev);
            }
            if let Err(e) = self.wait_until(deadline) {
                if let Some(ev) = self.replies.remove(&req_id) {
                    // It came with the last batch: hand it back now.
                    self.give_back(ev, late);
                } else {
                    self.late.insert(req_id, late);
                }
                return Err(e);
            }
        }
    }

    /// Undo what a reply nobody waits for any more created.
    fn give_back(&mut self, ev: Event, late: Late) {
        let Event::Reply {
            errno: 0, handle, ..
        } = ev
        else {
            return;
        };
        let _ = match late {
            Late::Session => {
                self.forget_unopened(handle);
                self.send_req(Request::Abort { handle })
            }
            Late::Listener => {
                self.closed_listeners.insert(handle);
                self.send_req(Request::Unlisten { handle })
            }
            Late::Reservation if handle != 0 => self.send_req(Request::Unbind { handle }),
            Late::Reservation | Late::Nothing => Ok(()),
        };
    }

    /// How long calls wait for the daemon's reply (default
    /// [`REPLY_TIMEOUT`]). A call that gives up fails with
    /// [`Error::TimedOut`]; what a late reply creates is given back.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// A session handed back unopened (requeued to other listeners).
    fn forget_unopened(&mut self, handle: u64) {
        self.unopened.remove(&handle);
        self.early_state.remove(&handle);
    }

    fn req_id(&mut self) -> u32 {
        let r = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        r
    }

    fn open_session(&mut self, handle: u64, segment: u32, desc_off: u32) -> Result<()> {
        self.unopened.remove(&handle);
        let early = self.early_state.remove(&handle);
        let seg = self.app.inner.segment(segment)?;
        let len = seg.len();
        if (desc_off as usize) < SEGMENT_HEADER_SIZE || desc_off as usize + SESSION_DESC_SIZE > len
        {
            return Err(Error::Corrupt);
        }
        let mut b = [0u8; SESSION_DESC_SIZE];
        // SAFETY: the descriptor lies inside the mapped segment (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                seg.as_ptr().add(desc_off as usize),
                b.as_mut_ptr(),
                SESSION_DESC_SIZE,
            )
        };
        let d = SessionDesc::from_bytes(&b).map_err(|_| Error::Corrupt)?;
        let fits = |off: u32, cap: u32| {
            cap.is_power_of_two()
                && (off as usize) >= SEGMENT_HEADER_SIZE
                && (off as usize)
                    .checked_add(crate::fifo::fifo_footprint(cap))
                    .is_some_and(|e| e <= len)
        };
        if !fits(d.rx_off, d.rx_cap) || !fits(d.tx_off, d.tx_cap) {
            return Err(Error::Corrupt);
        }
        // SAFETY: both FIFOs lie inside the segment; `_seg` keeps it mapped
        // for the life of the session.
        let (rx, tx) = unsafe {
            (
                FifoConsumer::new(seg.as_ptr().add(d.rx_off as usize), d.rx_cap),
                FifoProducer::new(seg.as_ptr().add(d.tx_off as usize), d.tx_cap),
            )
        };
        self.sessions.insert(
            handle,
            Sess {
                proto: d.proto,
                rx,
                tx,
                _seg: seg,
                desc_off,
                local: d.local,
                remote: d.remote,
                peer_closed: false,
                reset: None,
                soft_error: None,
                shut_wr: false,
                cut_through: d.cut_through,
            },
        );
        if let Some((fin, reset)) = early {
            if let Some(s) = self.sessions.get_mut(&handle) {
                s.peer_closed = fin;
                s.reset = reset;
            }
        }
        Ok(())
    }

    /// Listen for TCP connections on `addr` (an unspecified IP = all of the
    /// daemon's addresses). Several workers/apps may listen on the same
    /// address: connections are spread across them.
    pub fn listen(&mut self, addr: SocketAddr) -> Result<ListenerId> {
        self.listen_backlog(addr, 1024)
    }

    /// [`Worker::listen`] with an explicit backlog.
    pub fn listen_backlog(&mut self, addr: SocketAddr, backlog: u32) -> Result<ListenerId> {
        self.listen_with(addr, backlog, crate::msg::LISTEN_SHARED)
            .map(|(l, _)| l)
    }

    /// Listen with explicit [`crate::msg::LISTEN_SHARED`] /
    /// [`crate::msg::LISTEN_JOIN`] flags (0: exclusive, EADDRINUSE if
    /// someone listens on `addr` already). Port 0 picks a free port; the
    /// address actually bound is returned.
    pub fn listen_with(
        &mut self,
        addr: SocketAddr,
        backlog: u32,
        flags: u8,
    ) -> Result<(ListenerId, SocketAddr)> {
        let req_id = self.req_id();
        self.send_req(Request::Listen {
            req_id,
            proto: Proto::Tcp,
            local: addr,
            backlog,
            flags,
        })?;
        match self.await_reply(req_id, Late::Listener)? {
            Event::Reply {
                errno: 0,
                handle,
                local,
                ..
            } => {
                let local = local.unwrap_or(addr);
                let mut queue = VecDeque::new();
                self.early_accepts.retain(|&(l, h, seg, d)| {
                    if l == handle {
                        queue.push_back((h, seg, d));
                        false
                    } else {
                        true
                    }
                });
                if !queue.is_empty() {
                    self.notes.push_back(Notify::Accept(ListenerId(handle)));
                }
                self.listeners.insert(handle, Listen { queue, local });
                Ok((ListenerId(handle), local))
            }
            Event::Reply { errno, .. } => Err(Error::Errno(errno)),
            _ => Err(Error::Protocol("bad reply".into())),
        }
    }

    /// Stop listening.
    pub fn unlisten(&mut self, l: ListenerId) -> Result<()> {
        let lst = self.listeners.remove(&l.0).ok_or(Error::BadHandle)?;
        self.closed_listeners.insert(l.0);
        // Leave the group first, then hand the connections nobody accepted
        // to the remaining listeners (nginx reload: old workers close their
        // listeners while new ones take over).
        self.send_req(Request::Unlisten { handle: l.0 })?;
        for (h, _, _) in lst.queue {
            self.forget_unopened(h);
            let _ = self.send_req(Request::Requeue { handle: h });
        }
        Ok(())
    }

    /// Stop listening; if nobody else listens on the address, it stays
    /// reserved for a short while (connections wait) so a forked child that
    /// inherited the listener can take over.
    pub fn unlisten_linger(&mut self, l: ListenerId) -> Result<()> {
        let lst = self.listeners.remove(&l.0).ok_or(Error::BadHandle)?;
        self.closed_listeners.insert(l.0);
        self.send_req(Request::UnlistenLinger { handle: l.0 })?;
        for (h, _, _) in lst.queue {
            self.forget_unopened(h);
            let _ = self.send_req(Request::Requeue { handle: h });
        }
        Ok(())
    }

    /// The address a listener was bound to.
    pub fn listener_addr(&self, l: ListenerId) -> Result<SocketAddr> {
        self.listeners
            .get(&l.0)
            .map(|l| l.local)
            .ok_or(Error::BadHandle)
    }

    /// Accept a connection; `timeout` None blocks, `Some(ZERO)` never blocks.
    pub fn accept(&mut self, l: ListenerId, timeout: Option<Duration>) -> Result<SessionId> {
        let deadline = deadline_of(timeout);
        loop {
            self.process_events()?;
            let lst = self.listeners.get_mut(&l.0).ok_or(Error::BadHandle)?;
            if let Some((h, seg, desc)) = lst.queue.pop_front() {
                self.open_session(h, seg, desc)?;
                return Ok(SessionId(h));
            }
            if timeout == Some(Duration::ZERO) {
                return Err(Error::WouldBlock);
            }
            match self.wait_until(deadline) {
                Err(Error::TimedOut) => return Err(Error::TimedOut),
                r => r?,
            }
        }
    }

    /// Start a TCP connection without waiting; finish with
    /// [`Worker::connect_finish`] after a [`Notify::Connected`].
    pub fn connect_start(
        &mut self,
        remote: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<ConnectToken> {
        let req_id = self.req_id();
        self.send_req(Request::Connect {
            req_id,
            proto: Proto::Tcp,
            remote,
            local,
        })?;
        Ok(ConnectToken(req_id))
    }

    /// Ok(Some) when connected, Ok(None) while pending, Err when it failed.
    pub fn connect_finish(&mut self, t: ConnectToken) -> Result<Option<SessionId>> {
        self.process_events()?;
        match self.replies.remove(&t.0) {
            None => Ok(None),
            Some(Event::Reply {
                errno: 0,
                handle,
                segment,
                desc,
                ..
            }) => {
                self.open_session(handle, segment, desc)?;
                Ok(Some(SessionId(handle)))
            }
            Some(Event::Reply { errno, .. }) => Err(Error::Errno(errno)),
            Some(_) => Err(Error::Protocol("bad reply".into())),
        }
    }

    /// Connect (blocking up to `timeout`).
    pub fn connect(&mut self, remote: SocketAddr, timeout: Option<Duration>) -> Result<SessionId> {
        let t = self.connect_start(remote, None)?;
        let deadline = deadline_of(timeout);
        loop {
            if let Some(s) = self.connect_finish(t)? {
                return Ok(s);
            }
            if timeout == Some(Duration::ZERO) {
                return Err(Error::TimedOut);
            }
            self.wait_until(deadline)?;
        }
    }

    fn sess(&mut self, s: SessionId) -> Result<&mut Sess> {
        self.sessions.get_mut(&s.0).ok_or(Error::BadHandle)
    }

    /// Read up to `buf.len()` bytes. Ok(0) is end of stream. `timeout` None
    /// blocks until data, EOF or error; `Some(ZERO)` is non-blocking.
    pub fn read(
        &mut self,
        s: SessionId,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let deadline = deadline_of(timeout);
        let busy = self.busy;
        loop {
            self.process_events()?;
            let sess = self.sess(s)?;
            if sess.proto != Proto::Tcp {
                return Err(Error::Errno(libc::EOPNOTSUPP));
            }
            if !busy {
                sess.rx.clear_event();
            }
            let n = sess.rx.dequeue(buf).map_err(|_| Error::Corrupt)?;
            if n > 0 || buf.is_empty() {
                if sess.rx.take_dequeue_notification() {
                    self.send_req(Request::RxDrained { handle: s.0 })?;
                }
                return Ok(n);
            }
            if let Some(e) = sess.reset {
                return Err(Error::Errno(e));
            }
            if sess.peer_closed {
                return Ok(0);
            }
            if self.dead {
                return Err(Error::DaemonGone);
            }
            if timeout == Some(Duration::ZERO) {
                return Err(Error::WouldBlock);
            }
            self.wait_until(deadline)?;
        }
    }

    /// Write what fits now (at least one byte, or block per `timeout`).
    pub fn write(&mut self, s: SessionId, buf: &[u8], timeout: Option<Duration>) -> Result<usize> {
        let deadline = deadline_of(timeout);
        loop {
            self.process_events()?;
            let dead = self.dead;
            let sess = self.sess(s)?;
            if let Some(e) = sess.reset {
                return Err(Error::Errno(if e == libc::ECONNRESET {
                    libc::ECONNRESET
                } else {
                    e
                }));
            }
            if sess.shut_wr {
                return Err(Error::Errno(libc::EPIPE));
            }
            if dead {
                return Err(Error::DaemonGone);
            }
            if buf.is_empty() {
                return Ok(0);
            }
            let n = sess.tx.enqueue(buf).map_err(|_| Error::Corrupt)?;
            if n > 0 {
                if sess.tx.set_event() {
                    self.send_req(Request::Tx { handle: s.0 })?;
                }
                return Ok(n);
            }
            sess.tx.request_dequeue_notification();
            if sess.tx.free_space().map_err(|_| Error::Corrupt)? > 0 {
                continue;
            }
            if timeout == Some(Duration::ZERO) {
                return Err(Error::WouldBlock);
            }
            self.wait_until(deadline)?;
        }
    }

    /// Write all of `buf` (blocking up to `timeout` overall).
    pub fn write_all(
        &mut self,
        s: SessionId,
        mut buf: &[u8],
        timeout: Option<Duration>,
    ) -> Result<()> {
        let deadline = deadline_of(timeout);
        while !buf.is_empty() {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(Error::TimedOut);
            }
            let n = self.write(s, buf, left)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Shut down the write side (FIN after queued data) or both.
    pub fn shutdown(&mut self, s: SessionId, how: Shut) -> Result<()> {
        let sess = self.sess(s)?;
        if matches!(how, Shut::Write | Shut::Both) {
            if sess.shut_wr {
                return Ok(());
            }
            sess.shut_wr = true;
        }
        self.send_req(Request::Shutdown { handle: s.0, how })
    }

    /// Close: queued data is still delivered, then FIN. The handle is dead.
    pub fn close(&mut self, s: SessionId) -> Result<()> {
        self.sessions.remove(&s.0).ok_or(Error::BadHandle)?;
        self.send_req(Request::Close { handle: s.0 })
    }

    /// Close a session a forked child may take over ([`Worker::adopt`]):
    /// the daemon keeps it for a moment, then closes it like
    /// [`Worker::close`] if no child did.
    pub fn close_linger(&mut self, s: SessionId) -> Result<()> {
        self.sessions.remove(&s.0).ok_or(Error::BadHandle)?;
        self.send_req(Request::CloseLinger { handle: s.0 })
    }

    /// Abort with RST; queued data is discarded. The handle is dead.
    pub fn abort(&mut self, s: SessionId) -> Result<()> {
        self.sessions.remove(&s.0).ok_or(Error::BadHandle)?;
        self.send_req(Request::Abort { handle: s.0 })
    }

    /// Disable/enable Nagle.
    pub fn set_nodelay(&mut self, s: SessionId, on: bool) -> Result<()> {
        self.sess(s)?;
        self.send_req(Request::SetOpt {
            handle: s.0,
            opt: SessOpt::NoDelay(on),
        })
    }

    /// TCP keepalive (None turns it off): after `idle` without hearing
    /// from the peer a probe every `interval`; after `probes` unanswered
    /// ones the session fails with ETIMEDOUT (Linux's `SO_KEEPALIVE` with
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL` and `TCP_KEEPCNT`).
    pub fn set_keepalive(
        &mut self,
        s: SessionId,
        ka: Option<(Duration, Duration, u32)>,
    ) -> Result<()> {
        self.sess(s)?;
        let ms = |d: Duration| d.as_millis().clamp(1, u32::MAX as u128) as u32;
        let opt = match ka {
            Some((idle, interval, probes)) => SessOpt::KeepAlive {
                idle_ms: ms(idle),
                interval_ms: ms(interval),
                probes: probes.max(1),
            },
            None => SessOpt::KeepAlive {
                idle_ms: 0,
                interval_ms: 0,
                probes: 0,
            },
        };
        self.send_req(Request::SetOpt { handle: s.0, opt })
    }

    /// `TCP_USER_TIMEOUT`: how long the peer may stay silent while data
    /// waits to be acknowledged (with keepalive: at all) before the session
    /// fails with ETIMEDOUT. None restores the daemon's default.
    pub fn set_user_timeout(&mut self, s: SessionId, t: Option<Duration>) -> Result<()> {
        self.sess(s)?;
        let ms = t.map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32);
        self.send_req(Request::SetOpt {
            handle: s.0,
            opt: SessOpt::TimeoutMs(ms),
        })
    }

    /// Local address of a session.
    pub fn local_addr(&mut self, s: SessionId) -> Result<Option<SocketAddr>> {
        Ok(self.sess(s)?.local)
    }

    /// Peer address of a session.
    pub fn peer_addr(&mut self, s: SessionId) -> Result<Option<SocketAddr>> {
        Ok(self.sess(s)?.remote)
    }

    /// True for a same-node (cut-through) session.
    pub fn is_cut_through(&mut self, s: SessionId) -> Result<bool> {
        Ok(self.sess(s)?.cut_through)
    }

    /// Bytes readable right now.
    pub fn nread(&mut self, s: SessionId) -> Result<usize> {
        Ok(self.sess(s)?.rx.len().map_err(|_| Error::Corrupt)? as usize)
    }

    /// Copy up to `buf.len()` readable bytes without consuming them
    /// (TCP; MSG_PEEK).
    pub fn peek(&mut self, s: SessionId, buf: &mut [u8]) -> Result<usize> {
        self.process_events()?;
        let sess = self.sess(s)?;
        let n = (sess.rx.len().map_err(|_| Error::Corrupt)? as usize).min(buf.len());
        sess.rx.peek(&mut buf[..n]).map_err(|_| Error::Corrupt)?;
        Ok(n)
    }

    /// Ask for a new [`Notify::Readable`] on the next arrival even if
    /// unread data remains (edge-triggered epoll reports every arrival).
    pub fn rearm_rx(&mut self, s: SessionId) -> Result<()> {
        self.sess(s)?.rx.clear_event();
        Ok(())
    }

    /// Bytes written but not yet taken by the daemon or peer (TIOCOUTQ).
    pub fn unsent(&mut self, s: SessionId) -> Result<usize> {
        let sess = self.sess(s)?;
        let free = sess.tx.free_space().map_err(|_| Error::Corrupt)?;
        Ok((sess.tx.cap() - free) as usize)
    }

    /// Room in the tx FIFO right now.
    pub fn tx_free(&mut self, s: SessionId) -> Result<usize> {
        Ok(self.sess(s)?.tx.free_space().map_err(|_| Error::Corrupt)? as usize)
    }

    /// Is the session writable? If not, ask for a [`Notify::Writable`]
    /// when room appears (so a waiter is woken), then look again.
    pub fn want_writable(&mut self, s: SessionId) -> Result<bool> {
        if self.ready(s)?.writable {
            return Ok(true);
        }
        self.sess(s)?.tx.request_dequeue_notification();
        Ok(self.ready(s)?.writable)
    }

    /// Level readiness of a session.
    pub fn ready(&mut self, s: SessionId) -> Result<Ready> {
        let sess = self.sess(s)?;
        let rx = sess.rx.len().map_err(|_| Error::Corrupt)?;
        let tx = sess.tx.free_space().map_err(|_| Error::Corrupt)?;
        let min_tx = if sess.proto == Proto::Udp {
            DGRAM_HDR as u32 + 1
        } else {
            1
        };
        Ok(Ready {
            readable: rx > 0 || sess.peer_closed || sess.reset.is_some(),
            writable: tx >= min_tx || sess.reset.is_some(),
            hup: sess.peer_closed,
            error: sess.reset.or(sess.soft_error),
        })
    }

    /// Take the error a session reports once (a connected UDP socket's
    /// ICMP error), as `getsockopt(SO_ERROR)` does.
    pub fn take_soft_error(&mut self, s: SessionId) -> Result<Option<i32>> {
        self.process_events()?;
        Ok(self.sess(s)?.soft_error.take())
    }

    /// Does listener `l` have connections waiting?
    pub fn accept_ready(&mut self, l: ListenerId) -> Result<bool> {
        Ok(!self
            .listeners
            .get(&l.0)
            .ok_or(Error::BadHandle)?
            .queue
            .is_empty())
    }

    /// Wait for notifications (edge-style) up to `timeout`; returns how many
    /// were appended to `out`. Zero timeout never blocks.
    pub fn poll_events(
        &mut self,
        out: &mut Vec<Notify>,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let deadline = deadline_of(timeout);
        loop {
            self.process_events()?;
            if !self.notes.is_empty() {
                let n = self.notes.len();
                out.extend(self.notes.drain(..));
                return Ok(n);
            }
            if timeout == Some(Duration::ZERO) {
                return Ok(0);
            }
            match self.wait_until(deadline) {
                Err(Error::TimedOut) => return Ok(0),
                r => r?,
            }
        }
    }

    /// Open a UDP socket bound to `local` (port 0 = ephemeral).
    pub fn udp_bind(&mut self, local: SocketAddr) -> Result<SessionId> {
        self.udp_bind_with(local, 0)
    }

    /// [`Self::udp_bind`] with [`crate::msg::LISTEN_V6ONLY`]: an IPv6
    /// wildcard socket that takes no IPv4 datagrams and leaves the port
    /// free for an IPv4 socket.
    pub fn udp_bind_with(&mut self, local: SocketAddr, flags: u8) -> Result<SessionId> {
        let req_id = self.req_id();
        self.send_req(Request::Listen {
            req_id,
            proto: Proto::Udp,
            local,
            backlog: 0,
            flags,
        })?;
        self.finish_open(req_id)
    }

    /// Open a UDP socket whose default destination is `remote`.
    pub fn udp_connect(&mut self, remote: SocketAddr) -> Result<SessionId> {
        let req_id = self.req_id();
        self.send_req(Request::Connect {
            req_id,
            proto: Proto::Udp,
            remote,
            local: None,
        })?;
        self.finish_open(req_id)
    }

    fn finish_open(&mut self, req_id: u32) -> Result<SessionId> {
        match self.await_reply(req_id, Late::Session)? {
            Event::Reply {
                errno: 0,
                handle,
                segment,
                desc,
                ..
            } => {
                self.open_session(handle, segment, desc)?;
                Ok(SessionId(handle))
            }
            Event::Reply { errno, .. } => Err(Error::Errno(errno)),
            _ => Err(Error::Protocol("bad reply".into())),
        }
    }

    /// Would binding a TCP socket to `local` succeed? (kernel bind() errors;
    /// see [`Request::BindCheck`]). Returns the address to bind: port 0
    /// replaced by a free port.
    pub fn bind_check(&mut self, local: SocketAddr, flags: u8) -> Result<SocketAddr> {
        self.bind_request(local, flags).map(|(a, _)| a)
    }

    /// Bind a TCP socket's address as the kernel does: [`Self::bind_check`]
    /// and reserve the address (other binds conflict with it, ephemeral
    /// ports avoid it) until [`Self::unbind`] or the app detaches. Returns
    /// the address (port 0 replaced) and the reservation token. `flags`:
    /// [`crate::msg::LISTEN_SHARED`] (SO_REUSEPORT), [`crate::msg::BIND_REUSEADDR`],
    /// [`crate::msg::LISTEN_V6ONLY`].
    pub fn bind_reserve(&mut self, local: SocketAddr, flags: u8) -> Result<(SocketAddr, u64)> {
        self.bind_request(local, flags | crate::msg::BIND_RESERVE)
    }

    /// [`Request::BindCheck`]: the address and the reservation token (0
    /// without `BIND_RESERVE`).
    fn bind_request(&mut self, local: SocketAddr, flags: u8) -> Result<(SocketAddr, u64)> {
        let req_id = self.req_id();
        self.send_req(Request::BindCheck {
            req_id,
            local,
            flags,
        })?;
        let late = if flags & crate::msg::BIND_RESERVE != 0 {
            Late::Reservation
        } else {
            Late::Nothing
        };
        match self.await_reply(req_id, late)? {
            Event::Reply {
                errno: 0,
                local: l,
                handle,
                ..
            } => Ok((l.unwrap_or(local), handle)),
            Event::Reply { errno, .. } => Err(Error::Errno(errno)),
            _ => Err(Error::Protocol("bad reply".into())),
        }
    }

    /// Give back a reservation of [`Self::bind_reserve`].
    pub fn unbind(&mut self, token: u64) -> Result<()> {
        self.send_req(Request::Unbind { handle: token })
    }

    /// Take over session `handle` of the parent process (a socket inherited
    /// over fork). See [`Request::Adopt`].
    pub fn adopt(&mut self, handle: u64) -> Result<SessionId> {
        let req_id = self.req_id();
        self.send_req(Request::Adopt { req_id, handle })?;
        self.finish_open(req_id)
    }

    /// Connect a UDP session to `remote` (datagrams from that peer come to
    /// it first; the port can be bound again by another socket).
    pub fn udp_set_peer(&mut self, s: SessionId, remote: SocketAddr) -> Result<()> {
        let sess = self.sess(s)?;
        if sess.proto != Proto::Udp {
            return Err(Error::Errno(libc::EOPNOTSUPP));
        }
        sess.remote = Some(remote);
        self.send_req(Request::UdpConnect {
            handle: s.0,
            remote,
        })
    }

    /// Send one datagram (to `to`, or the connected peer).
    pub fn send_to(
        &mut self,
        s: SessionId,
        data: &[u8],
        to: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let deadline = deadline_of(timeout);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(&dgram_header(data.len(), to));
        scratch.extend_from_slice(data);
        let r = loop {
            if let Err(e) = self.process_events() {
                break Err(e);
            }
            let sess = match self.sess(s) {
                Ok(x) => x,
                Err(e) => break Err(e),
            };
            if sess.proto != Proto::Udp {
                break Err(Error::Errno(libc::EOPNOTSUPP));
            }
            if let Some(e) = sess.soft_error.take() {
                break Err(Error::Errno(e));
            }
            if to.is_none() && sess.remote.is_none() {
                break Err(Error::Errno(libc::EDESTADDRREQ));
            }
            if data.len() > 65507 || scratch.len() > sess.tx.cap() as usize {
                break Err(Error::Errno(libc::EMSGSIZE));
            }
            let free = match sess.tx.free_space() {
                Ok(f) => f as usize,
                Err(_) => break Err(Error::Corrupt),
            };
            if free >= scratch.len() {
                if sess.tx.enqueue(&scratch).is_err() {
                    break Err(Error::Corrupt);
                }
                let flip = sess.tx.set_event();
                if flip {
                    if let Err(e) = self.send_req(Request::Tx { handle: s.0 }) {
                        break Err(e);
                    }
                }
                break Ok(data.len());
            }
            sess.tx.request_dequeue_notification();
            if sess.tx.free_space().unwrap_or(0) as usize >= scratch.len() {
                continue;
            }
            if timeout == Some(Duration::ZERO) {
                break Err(Error::WouldBlock);
            }
            if let Err(e) = self.wait_until(deadline) {
                break Err(e);
            }
        };
        self.scratch = scratch;
        r
    }

    /// Receive one datagram: (bytes copied, source). A datagram longer than
    /// `buf` is truncated (the rest is discarded), like a kernel socket.
    pub fn recv_from(
        &mut self,
        s: SessionId,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<(usize, Option<SocketAddr>)> {
        let deadline = deadline_of(timeout);
        loop {
            self.process_events()?;
            let sess = self.sess(s)?;
            if sess.proto != Proto::Udp {
                return Err(Error::Errno(libc::EOPNOTSUPP));
            }
            // Like Linux: a pending error comes before queued datagrams.
            if let Some(e) = sess.soft_error.take() {
                return Err(Error::Errno(e));
            }
            sess.rx.clear_event();
            let have = sess.rx.len().map_err(|_| Error::Corrupt)? as usize;
            if have >= DGRAM_HDR {
                let mut h = [0u8; DGRAM_HDR];
                sess.rx.peek(&mut h).map_err(|_| Error::Corrupt)?;
                let (len, from) = parse_dgram_header(&h).map_err(|_| Error::Corrupt)?;
                if DGRAM_HDR + len > sess.rx.cap() as usize {
                    return Err(Error::Corrupt);
                }
                if have >= DGRAM_HDR + len {
                    let mut tmp = vec![0u8; DGRAM_HDR + len];
                    sess.rx.peek(&mut tmp).map_err(|_| Error::Corrupt)?;
                    sess.rx
                        .consume((DGRAM_HDR + len) as u32)
                        .map_err(|_| Error::Corrupt)?;
                    let n = len.min(buf.len());
                    buf[..n].copy_from_slice(&tmp[DGRAM_HDR..DGRAM_HDR + n]);
                    if sess.rx.take_dequeue_notification() {
                        self.send_req(Request::RxDrained { handle: s.0 })?;
                    }
                    return Ok((n, from));
                }
            }
            if let Some(e) = sess.reset {
                return Err(Error::Errno(e));
            }
            if timeout == Some(Duration::ZERO) {
                return Err(Error::WouldBlock);
            }
            self.wait_until(deadline)?;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.dead {
            return;
        }
        let _g = self
            .app
            .inner
            .ctrl_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = send_with_fds(
            self.app.inner.ctrl.as_fd(),
            &AppCtrl::DelWorker { worker: self.index }.encode(),
            &[],
        );
    }
}
