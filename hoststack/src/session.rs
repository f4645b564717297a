//! The session layer: binds app sessions (FIFO pairs in shared memory) to
//! transport flows, serves app requests, and runs cut-through sessions.
//!
//! Flow control is end to end: data moves from a smoltcp receive buffer into
//! the app's rx FIFO only while the FIFO has room, so the advertised TCP
//! window is what the app has not yet consumed plus smoltcp's free space; a
//! slow reader closes the window and nothing is dropped or buffered without
//! bound. When the FIFO is full the daemon asks the app for a dequeue
//! notification and resumes when it arrives.
//!
//! Sans-IO apart from shared memory: frames go out through a
//! [`FrameTx`], time is passed in.

use crate::app::{
    alloc_block, chan_ref, consumer, producer, write_desc, App, AppId, ChanRef, PostError, Segment,
    SessionBlock,
};
use crate::stack::{
    FlowId, FlowKind, FrameTx, KeepAlive, ListenFamily, ListenerId, Stack, StackError,
};
use session_api::fasthash::{FastMap, FastSet};
use session_api::fifo::{FifoConsumer, FifoProducer};
use session_api::msg::{
    dgram_header, parse_dgram_header, Event, Proto, Request, SessOpt, SessionDesc, Shut,
    BIND_RESERVE, BIND_REUSEADDR, DGRAM_HDR, LISTEN_EXISTING, LISTEN_JOIN, LISTEN_PASSIVE,
    LISTEN_SHARED, LISTEN_V6ONLY,
};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Owner tokens with this bit name a listen group, not a session.
const LISTEN_BIT: u64 = 1 << 63;
/// Segments an app may have (its main one plus growth); bounds daemon
/// memory per app together with `max_sessions_per_app`.
const MAX_SEGMENTS_PER_APP: usize = 64;
/// How long a connect waits for its first hop to answer ARP/NDP before it
/// fails with EHOSTUNREACH (Linux: three probes a second apart).
pub const NEIGHBOR_TIMEOUT: Duration = Duration::from_secs(3);
/// ... after at least this many unanswered ARP/NDP probes for it.
pub const NEIGHBOR_PROBES: u32 = 3;

/// Listen groups with ids from here up exist only for cut-through
/// (loopback addresses); the stack has no listener for them.
const CT_ONLY_BASE: u32 = 1 << 31;

/// Session layer tunables.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Capacity of each FIFO (power of two).
    pub fifo_size: u32,
    /// Capacity of each cut-through FIFO (power of two): larger, since a
    /// full/drained cycle costs a notification round trip.
    pub ct_fifo_size: u32,
    /// Size of each app's private segment.
    pub segment_size: usize,
    /// Size of each cut-through segment (one per pair of apps).
    pub ct_segment_size: usize,
    /// Give up an active open after this long.
    pub connect_timeout: Duration,
    /// Maximum sessions per app (bounded memory).
    pub max_sessions_per_app: usize,
}

enum Kind {
    Net {
        flow: FlowId,
        rx: FifoProducer,
        tx: FifoConsumer,
    },
    Ct {
        peer: Option<u64>,
    },
}

struct Session {
    app: AppId,
    worker: u32,
    proto: Proto,
    blk: SessionBlock,
    /// The wake-channel byte of the app's descriptor.
    chan: Option<ChanRef>,
    kind: Kind,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    /// App sent Close: the handle is dead on the app side.
    app_closed: bool,
    /// App asked for FIN (shutdown write or close).
    shut_wr: bool,
    /// FIN handed to the transport.
    fin_done: bool,
    /// PeerClosed posted.
    peer_closed_sent: bool,
    /// Connection is gone (reset/closed); only the app's Close is awaited.
    dead: bool,
    pending_connect: Option<(u32, Instant)>,
    rx_bytes: u64,
    tx_bytes: u64,
    /// The listen group an accepted (network) session came from.
    group: Option<ListenerId>,
    /// How long the app takes to answer (network TCP sessions).
    ack: AckClock,
}

/// Times the app's answers on one connection to size its delayed ACK.
///
/// A delayed ACK exists so that the answer carries it; it only works when
/// the app answers within the delay. A server with 10 000 busy connections
/// answers ~100 ms after a request arrives, so with a fixed 10 ms every
/// request cost a pure ACK first: one frame more each way, ~0.8 per request
/// measured. Linux grows its delayed-ACK timeout with the connection's RTT
/// up to 200 ms for the same reason. Here the delay follows the app's own
/// answer time (`tcp.ack_delay_ms` up to `tcp.ack_delay_max_ms`). When
/// more data arrived before the answer, the peer may be holding back the
/// rest of its request until it sees an ACK (Nagle): back to the minimum,
/// so such a peer waits no longer than with a fixed delay.
#[derive(Default)]
struct AckClock {
    /// Data reached the app and it has not answered since.
    rx_at: Option<Instant>,
    /// More data arrived before the answer.
    again: bool,
    /// Smoothed answer time, microseconds.
    answer_us: u32,
}

impl AckClock {
    fn received(&mut self, now: Instant) {
        if self.rx_at.is_some() {
            self.again = true;
        } else {
            self.rx_at = Some(now);
        }
    }

    /// The app answered: the delay for the next ACKs, if it changes.
    fn answered(&mut self, now: Instant, (min, max): (Duration, Duration)) -> Option<Duration> {
        let t0 = self.rx_at.take()?;
        let old = self.answer_us;
        self.answer_us = if std::mem::take(&mut self.again) {
            0
        } else {
            let sample = (now - t0).total_micros().min(10_000_000) as u32;
            if old == 0 {
                sample
            } else {
                (3 * old / 4).saturating_add(sample / 4)
            }
        };
        let delay = |us: u32| {
            // A quarter more than the typical answer, within the bounds.
            Duration::from_micros(us as u64 + us as u64 / 4).clamp(min, max)
        };
        let d = delay(self.answer_us);
        (d != delay(old)).then_some(d)
    }
}

struct AppListener {
    app: AppId,
    worker: u32,
    group: ListenerId,
    /// Takes no connections ([`LISTEN_PASSIVE`]).
    passive: bool,
}

/// Error value for a cut-through connect parked until an active listener
/// exists (no reply yet).
const PARKED: i32 = -1;

struct Group {
    local: SocketAddr,
    members: Vec<u64>,
    rr: usize,
    /// Created with [`LISTEN_SHARED`]: others may join (SO_REUSEPORT).
    shared: bool,
    /// Established connections waiting for an active member.
    parked: Vec<FlowId>,
    /// Cut-through connects waiting for an active member: (app, worker, req_id, remote).
    parked_ct: Vec<(AppId, u32, u32, SocketAddr)>,
    /// No members, kept until then for a forked child to join.
    linger_until: Option<Instant>,
    /// An IPv6 listener that takes no IPv4 connections (IPV6_V6ONLY, or a
    /// specific IPv6 address).
    v6only: bool,
}

impl Group {
    /// Would this group take a connection to `ip` on its port?
    fn takes(&self, ip: IpAddr) -> bool {
        let g = self.local.ip();
        if g.is_ipv4() == ip.is_ipv4() {
            g.is_unspecified() || g == ip || (g.is_loopback() && ip.is_loopback())
        } else {
            // Only an IPv6 wildcard that is not v6-only takes IPv4.
            g.is_ipv6() && g.is_unspecified() && !self.v6only
        }
    }

    /// Would it take some of the connections a listener on `l` would?
    fn overlaps(&self, l: SocketAddr, v6only: bool) -> bool {
        overlap(self.local, self.v6only, l, v6only)
    }
}

/// Would sockets bound to `a` and `b` (each with its IPV6_V6ONLY) take some
/// of the same connections? Same port, and the same address, a wildcard of
/// the same family, or a dual-stack IPv6 wildcard against IPv4.
fn overlap(a: SocketAddr, a_v6only: bool, b: SocketAddr, b_v6only: bool) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (x, y) = (a.ip(), b.ip());
    if x.is_ipv4() == y.is_ipv4() {
        x == y || x.is_unspecified() || y.is_unspecified()
    } else if x.is_ipv6() {
        x.is_unspecified() && !a_v6only
    } else {
        y.is_unspecified() && !b_v6only
    }
}

/// An address held by a bound TCP socket that does not listen or connect
/// yet ([`Request::BindCheck`] with `BIND_RESERVE`), as a kernel bind()
/// holds it.
struct Reservation {
    app: AppId,
    local: SocketAddr,
    v6only: bool,
    /// SO_REUSEPORT.
    shared: bool,
    /// SO_REUSEADDR.
    reuseaddr: bool,
}

/// Reservations one app may hold at once (each bound, idle socket holds
/// one); beyond, bind() fails with ENOBUFS rather than grow without bound.
const MAX_RESERVATIONS_PER_APP: usize = 4096;

/// The IP versions a socket on `local` takes (see [`is_v6only`]).
fn family_of(local: SocketAddr, v6only: bool) -> ListenFamily {
    match local {
        SocketAddr::V4(_) => ListenFamily::V4,
        SocketAddr::V6(_) if v6only => ListenFamily::V6,
        SocketAddr::V6(_) => ListenFamily::Any,
    }
}

/// A listener on `local` takes no IPv4 connections: an IPv6 address, and
/// for the wildcard only with IPV6_V6ONLY.
fn is_v6only(local: SocketAddr, flags: u8) -> bool {
    local.is_ipv6() && (flags & LISTEN_V6ONLY != 0 || !local.ip().is_unspecified())
}

struct CtSegment {
    seg: Segment,
    apps: (AppId, AppId),
}

/// Counters.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SessionStats {
    /// Sessions created.
    pub sessions_opened: u64,
    /// Sessions freed.
    pub sessions_closed: u64,
    /// Cut-through sessions created (each side counted once).
    pub cut_through_opened: u64,
    /// Requests naming a handle the app does not own, or otherwise invalid.
    pub bad_requests: u64,
    /// Apps disconnected for corrupting shared memory or stalling.
    pub apps_killed: u64,
    /// Connections refused because no app was left to accept them.
    pub accept_aborts: u64,
}

/// A session row for `hoststackctl`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    /// Handle.
    pub handle: u64,
    /// App id.
    pub app: u32,
    /// Worker index.
    pub worker: u32,
    /// tcp/udp.
    pub proto: String,
    /// "net" or "cut-through".
    pub path: &'static str,
    /// Transport state.
    pub state: String,
    /// Local endpoint.
    pub local: String,
    /// Remote endpoint.
    pub remote: String,
    /// Bytes delivered to the app.
    pub rx_bytes: u64,
    /// Bytes taken from the app.
    pub tx_bytes: u64,
    /// Bytes waiting in the rx FIFO (net sessions).
    pub rx_fifo: u32,
    /// Bytes waiting in the tx FIFO (net sessions).
    pub tx_fifo: u32,
    /// FIFO capacity.
    pub fifo_cap: u32,
}

/// The session layer and the things it owns.
pub struct Engine {
    /// The transports.
    pub stack: Stack,
    /// Attached apps.
    pub apps: FastMap<AppId, App>,
    next_app: u32,
    next_segment: u32,
    /// Workers with a deferred wake-up (see `app::Worker::wake_pending`).
    wake_list: Vec<(AppId, u32)>,
    sessions: Vec<Option<Session>>,
    sgen: Vec<u32>,
    sfree: Vec<u32>,
    app_sessions: FastMap<AppId, FastSet<u64>>,
    listeners: FastMap<u64, AppListener>,
    next_listener: u64,
    groups: HashMap<ListenerId, Group>,
    next_ct_group: u32,
    ct_segments: HashMap<u32, CtSegment>,
    ct_by_pair: HashMap<(AppId, AppId), u32>,
    cfg: SessionConfig,
    broken: Vec<AppId>,
    /// Groups kept without members (see [`Request::UnlistenLinger`]).
    lingering: usize,
    /// Blocks of sessions adopted by a child, kept until the parent closes
    /// its copy (it may still touch them): (parent app, handle) -> block.
    retired: HashMap<(AppId, u64), SessionBlock>,
    /// Sessions closed by a parent that forked: (app, handle, deadline);
    /// a child may adopt them until the deadline, then they close.
    close_lingering: Vec<(AppId, u64, Instant)>,
    /// Bound addresses by reservation token (unguessable: an app may give
    /// back only a reservation it was told about).
    reservations: HashMap<u64, Reservation>,
    reservations_of: FastMap<AppId, usize>,
    token_keys: std::collections::hash_map::RandomState,
    next_token: u64,
    /// Counters.
    pub stats: SessionStats,
    scratch: Vec<u8>,
    touched: Vec<FlowId>,
}

fn ep_to_sa(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

fn sa_to_ep(s: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(s.ip().into(), s.port())
}

fn listen_ep(s: SocketAddr) -> IpListenEndpoint {
    IpListenEndpoint {
        addr: if s.ip().is_unspecified() {
            None
        } else {
            Some(s.ip().into())
        },
        port: s.port(),
    }
}

impl Engine {
    /// New engine over a stack.
    pub fn new(stack: Stack, cfg: SessionConfig) -> Self {
        Engine {
            stack,
            apps: FastMap::default(),
            next_app: 1,
            next_segment: 1,
            sessions: Vec::new(),
            sgen: Vec::new(),
            sfree: Vec::new(),
            app_sessions: FastMap::default(),
            listeners: FastMap::default(),
            next_listener: 1,
            groups: HashMap::new(),
            next_ct_group: 0,
            ct_segments: HashMap::new(),
            ct_by_pair: HashMap::new(),
            cfg,
            broken: Vec::new(),
            wake_list: Vec::new(),
            lingering: 0,
            retired: HashMap::new(),
            close_lingering: Vec::new(),
            reservations: HashMap::new(),
            reservations_of: FastMap::default(),
            token_keys: Default::default(),
            next_token: 0,
            stats: SessionStats::default(),
            scratch: vec![0; 65536 + DGRAM_HDR],
            touched: Vec::new(),
        }
    }

    /// Session layer configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Register an app: creates its private segment. Returns the id.
    pub fn add_app(
        &mut self,
        name: String,
        namespace: String,
        pid: u32,
        ctrl: std::os::fd::OwnedFd,
    ) -> std::io::Result<AppId> {
        let id = AppId(self.next_app);
        self.next_app += 1;
        let segid = self.alloc_segment_id();
        let seg = Segment::create(
            segid,
            self.cfg.segment_size,
            &format!("hoststack-app{}", id.0),
        )?;
        let mut segments = FastMap::default();
        segments.insert(segid, seg);
        self.apps.insert(
            id,
            App {
                id,
                name,
                namespace,
                pid,
                ctrl,
                segments,
                main_segment: segid,
                workers: Vec::new(),
                ct_segments: Vec::new(),
            },
        );
        self.app_sessions.insert(id, FastSet::default());
        Ok(id)
    }

    fn alloc_segment_id(&mut self) -> u32 {
        let s = self.next_segment;
        self.next_segment = self.next_segment.wrapping_add(1).max(1);
        s
    }

    /// Apps found broken (corrupt queues, stalled) since the last call.
    pub fn take_broken(&mut self) -> Vec<AppId> {
        std::mem::take(&mut self.broken)
    }

    /// Wake the apps that were sent events during this pass (one eventfd
    /// write per sleeping worker). The daemon calls this before it sleeps
    /// or polls again.
    /// Returns whether any app was woken.
    pub fn flush_wakes(&mut self) -> bool {
        let mut woke = false;
        for (app, w) in std::mem::take(&mut self.wake_list) {
            if let Some(w) = self.apps.get_mut(&app).and_then(|a| a.worker(w)) {
                woke |= w.flush_wake();
            }
        }
        woke
    }

    fn mark_broken(&mut self, app: AppId) {
        if !self.broken.contains(&app) {
            tracing::warn!(
                app = app.0,
                "app misbehaved (corrupt queue or stalled); disconnecting"
            );
            self.broken.push(app);
        }
    }

    fn post(&mut self, app: AppId, worker: u32, ev: Event) {
        // Events about a session wake the channel its owner named.
        let chan = match ev {
            Event::Rx { handle }
            | Event::TxSpace { handle }
            | Event::PeerClosed { handle }
            | Event::Reset { handle, .. }
            | Event::SoftError { handle, .. } => self
                .sess(handle)
                .filter(|s| s.app == app && s.worker == worker)
                .and_then(|s| s.chan),
            _ => None,
        };
        let r = match self.apps.get_mut(&app).and_then(|a| a.worker(worker)) {
            Some(w) => track_wake(&mut self.wake_list, app, w, |w| w.post(&ev, chan)),
            None => return,
        };
        if r == Err(PostError::Broken) {
            self.mark_broken(app);
        }
    }

    fn new_handle(&mut self, s: Session) -> u64 {
        let idx = match self.sfree.pop() {
            Some(i) => i,
            None => {
                self.sessions.push(None);
                self.sgen.push(1);
                (self.sessions.len() - 1) as u32
            }
        };
        let app = s.app;
        self.sessions[idx as usize] = Some(s);
        let h = (idx as u64) | ((self.sgen[idx as usize] as u64) << 32);
        if let Some(set) = self.app_sessions.get_mut(&app) {
            set.insert(h);
        }
        self.stats.sessions_opened += 1;
        h
    }

    fn sess(&mut self, h: u64) -> Option<&mut Session> {
        let idx = (h & 0xffff_ffff) as usize;
        let gen = (h >> 32) as u32;
        if h & LISTEN_BIT != 0 || self.sgen.get(idx) != Some(&gen) {
            return None;
        }
        self.sessions.get_mut(idx)?.as_mut()
    }

    /// A session owned by `app`, or None (and a bad-request count).
    fn owned(&mut self, app: AppId, h: u64) -> bool {
        match self.sess(h) {
            Some(s) if s.app == app && !s.app_closed => true,
            _ => {
                self.stats.bad_requests += 1;
                false
            }
        }
    }

    /// Free the session slot and its FIFO block (the flow, if any, is the
    /// caller's business).
    fn free_session(&mut self, h: u64) {
        let idx = (h & 0xffff_ffff) as usize;
        let Some(s) = self
            .sess(h)
            .map(|_| ())
            .and_then(|_| self.sessions[idx].take())
        else {
            return;
        };
        self.sgen[idx] = self.sgen[idx].wrapping_add(1).max(1);
        self.sfree.push(idx as u32);
        if let Some(set) = self.app_sessions.get_mut(&s.app) {
            set.remove(&h);
        }
        self.stats.sessions_closed += 1;
        match s.kind {
            Kind::Net { .. } => {
                if let Some(seg) = self
                    .apps
                    .get_mut(&s.app)
                    .and_then(|a| a.segments.get_mut(&s.blk.segment))
                {
                    let _ = seg.alloc.free(s.blk.off);
                }
            }
            Kind::Ct { peer } => {
                // The block is shared: free it when the second side goes.
                let peer_alive = peer.and_then(|p| self.sess(p).map(|_| p));
                match peer_alive {
                    Some(p) => {
                        if let Some(ps) = self.sess(p) {
                            if let Kind::Ct { peer } = &mut ps.kind {
                                *peer = None;
                            }
                        }
                    }
                    None => {
                        if let Some(ct) = self.ct_segments.get_mut(&s.blk.segment) {
                            let _ = ct.seg.alloc.free(s.blk.off);
                        }
                    }
                }
            }
        }
    }

    fn alloc_net_block(&mut self, app: AppId) -> Result<SessionBlock, i32> {
        if self.app_sessions.get(&app).map_or(0, |s| s.len()) >= self.cfg.max_sessions_per_app {
            return Err(libc::ENOBUFS);
        }
        let cap = self.cfg.fifo_size;
        let a = self.apps.get_mut(&app).ok_or(libc::EINVAL)?;
        // Main segment first, then the growth segments.
        let mut ids: Vec<u32> = a.segments.keys().copied().collect();
        ids.sort_unstable_by_key(|id| (*id != a.main_segment, *id));
        for id in ids {
            if let Some(b) = a
                .segments
                .get_mut(&id)
                .and_then(|seg| alloc_block(seg, cap))
            {
                return Ok(b);
            }
        }
        if a.segments.len() >= MAX_SEGMENTS_PER_APP {
            return Err(libc::ENOBUFS);
        }
        // Grow: a new segment, announced (fd attached) before any event
        // names it.
        let id = self.alloc_segment_id();
        let size = self.cfg.segment_size;
        let mut seg = Segment::create(id, size, &format!("hoststack-app{}-{id}", app.0))
            .map_err(|_| libc::ENOMEM)?;
        let a = self.apps.get_mut(&app).ok_or(libc::EINVAL)?;
        let msg = session_api::proto::DaemonCtrl::Segment {
            segment: id,
            size: size as u64,
        }
        .encode();
        {
            use std::os::fd::AsFd;
            session_api::shm::send_with_fds(a.ctrl.as_fd(), &msg, &[seg.region.fd()])
                .map_err(|_| libc::ENOMEM)?;
        }
        let b = alloc_block(&mut seg, cap).ok_or(libc::ENOBUFS)?;
        a.segments.insert(id, seg);
        tracing::debug!(app = app.0, segment = id, "app segment added");
        Ok(b)
    }

    /// A fresh block in `app`'s segment with its descriptor written: the
    /// daemon's ends of the rx and tx FIFOs.
    fn net_fifos(
        &mut self,
        app: AppId,
        proto: Proto,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
    ) -> Result<(SessionBlock, u32, FifoProducer, FifoConsumer), i32> {
        let blk = self.alloc_net_block(app)?;
        let a = self.apps.get_mut(&app).ok_or(libc::EINVAL)?;
        let seg = a.segments.get(&blk.segment).ok_or(libc::EINVAL)?;
        let desc = SessionDesc {
            proto,
            rx_off: blk.fifo_ba,
            rx_cap: blk.cap,
            tx_off: blk.fifo_ab,
            tx_cap: blk.cap,
            local,
            remote,
            cut_through: false,
        };
        let doff = write_desc(seg, &blk, 0, &desc).ok_or(libc::EFAULT)?;
        let rx = producer(seg, blk.fifo_ba, blk.cap).ok_or(libc::EFAULT)?;
        let tx = consumer(seg, blk.fifo_ab, blk.cap).ok_or(libc::EFAULT)?;
        Ok((blk, doff, rx, tx))
    }

    /// Make a network session on a fresh block; writes its descriptor.
    fn make_net_session(
        &mut self,
        app: AppId,
        worker: u32,
        proto: Proto,
        flow: FlowId,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
    ) -> Result<(u64, SessionBlock, u32), i32> {
        let (blk, doff, rx, tx) = self.net_fifos(app, proto, local, remote)?;
        let chan = self.chan_of(app, blk.segment, doff);
        let h = self.new_handle(Session {
            app,
            worker,
            proto,
            blk,
            chan,
            kind: Kind::Net { flow, rx, tx },
            local,
            remote,
            app_closed: false,
            shut_wr: false,
            fin_done: false,
            peer_closed_sent: false,
            dead: false,
            pending_connect: None,
            rx_bytes: 0,
            tx_bytes: 0,
            group: None,
            ack: AckClock::default(),
        });
        self.stack.set_owner(flow, h);
        Ok((h, blk, doff))
    }

    /// Handle every pending request of every worker, bounded per worker.
    pub fn drain_requests(&mut self, now: Instant, tx: &mut dyn FrameTx) -> usize {
        let ids: Vec<AppId> = self.apps.keys().copied().collect();
        let mut total = 0;
        for app in ids {
            total += self.drain_app(app, 256, now, tx);
        }
        total
    }

    /// Handle up to `limit` pending requests of each worker of `app`.
    fn drain_app(&mut self, app: AppId, limit: usize, now: Instant, tx: &mut dyn FrameTx) -> usize {
        let mut batch = Vec::new();
        let mut total = 0;
        let mut corrupt = false;
        if let Some(a) = self.apps.get_mut(&app) {
            for w in a.workers.iter_mut().flatten() {
                for _ in 0..limit {
                    match w.req.try_recv() {
                        Ok(Some(m)) => {
                            w.requests += 1;
                            batch.push((w.index, m))
                        }
                        Ok(None) => break,
                        Err(_) => {
                            corrupt = true;
                            break;
                        }
                    }
                }
            }
        }
        if corrupt {
            self.mark_broken(app);
            return 0;
        }
        total += batch.len();
        for (w, m) in batch.drain(..) {
            match Request::decode(&m) {
                Ok(r) => self.handle_request(app, w, r, now, tx),
                Err(e) => {
                    tracing::warn!(app = app.0, error = %e, "malformed request");
                    self.mark_broken(app);
                    break;
                }
            }
        }
        if let Some(a) = self.apps.get_mut(&app) {
            for w in a.workers.iter_mut().flatten() {
                if track_wake(&mut self.wake_list, app, w, |w| w.flush_backlog()).is_err() {
                    corrupt = true;
                }
            }
        }
        if corrupt {
            self.mark_broken(app);
        }
        // The flows the requests touched: one pass over each, so the data
        // and FIN of a response closed right away share a segment (new
        // connections: 4 -> 3 frames sent per connection).
        self.service_touched(now, tx);
        total
    }

    /// Serve one request from `app`'s worker `worker`.
    fn handle_request(
        &mut self,
        app: AppId,
        worker: u32,
        req: Request,
        now: Instant,
        tx: &mut dyn FrameTx,
    ) {
        match req {
            Request::Listen {
                req_id,
                proto,
                local,
                backlog,
                flags,
            } => {
                let r = match proto {
                    Proto::Tcp => self.listen(app, worker, local, backlog, flags),
                    Proto::Udp => self.udp_open(app, worker, local, None, flags),
                };
                let joined = match (proto, &r) {
                    (Proto::Tcp, Ok((h, ..))) if flags & LISTEN_PASSIVE == 0 => {
                        self.listeners.get(h).map(|l| l.group)
                    }
                    _ => None,
                };
                let ev = match r {
                    Ok((handle, segment, desc, local)) => Event::Reply {
                        req_id,
                        errno: 0,
                        handle,
                        segment,
                        desc,
                        local: Some(local),
                    },
                    Err(errno) => Event::error_reply(req_id, errno),
                };
                self.post(app, worker, ev);
                // After the reply: the app must know the listener before
                // connections arrive on it.
                if let Some(g) = joined {
                    self.dispatch_parked(g, now, tx);
                }
            }
            Request::Unlisten { handle } => self.unlisten(app, handle, false, now, tx),
            Request::UnlistenLinger { handle } => self.unlisten(app, handle, true, now, tx),
            Request::Connect {
                req_id,
                proto,
                remote,
                local,
            } => {
                let r = match proto {
                    Proto::Udp => self.udp_open(
                        app,
                        worker,
                        local.unwrap_or_else(|| unspecified_like(remote)),
                        Some(remote),
                        0,
                    ),
                    Proto::Tcp => self.connect(app, worker, req_id, remote, local, now, tx),
                };
                match r {
                    Ok((handle, segment, desc, local)) if proto == Proto::Udp => self.post(
                        app,
                        worker,
                        Event::Reply {
                            req_id,
                            errno: 0,
                            handle,
                            segment,
                            desc,
                            local: Some(local),
                        },
                    ),
                    Ok(_) => {} // TCP replies when established (or cut-through replied).
                    Err(PARKED) => {} // replies when a listener takes it
                    Err(errno) => self.post(app, worker, Event::error_reply(req_id, errno)),
                }
            }
            Request::Tx { handle } | Request::RxDrained { handle } => {
                if !self.owned(app, handle) {
                    return;
                }
                let is_tx = matches!(req, Request::Tx { .. });
                self.kick(handle, is_tx);
            }
            Request::Shutdown { handle, how } => {
                if !self.owned(app, handle) {
                    return;
                }
                if matches!(how, Shut::Write | Shut::Both) {
                    self.shut_write(handle);
                }
            }
            Request::Close { handle } => {
                if self.release_retired(app, handle) || !self.owned(app, handle) {
                    return;
                }
                self.close(handle);
            }
            Request::Abort { handle } => {
                if self.release_retired(app, handle) || !self.owned(app, handle) {
                    return;
                }
                self.abort(handle, now, tx);
            }
            Request::BindCheck {
                req_id,
                local,
                flags,
            } => {
                let (errno, local, token) = match self.bind_check(app, local, flags) {
                    Ok((l, t)) => (0, l, t),
                    Err(e) => (e, local, 0),
                };
                self.post(
                    app,
                    worker,
                    Event::Reply {
                        req_id,
                        errno,
                        handle: token,
                        segment: 0,
                        desc: 0,
                        local: Some(local),
                    },
                );
            }
            Request::Unbind { handle } => self.unbind(handle),
            Request::CloseLinger { handle } => {
                if !self.owned(app, handle) {
                    return;
                }
                let until = now + Duration::from_millis(session_api::msg::LINGER_MS);
                self.close_lingering.push((app, handle, until));
            }
            Request::Adopt { req_id, handle } => {
                let ev = match self.adopt(app, worker, handle) {
                    Ok((segment, desc, local)) => Event::Reply {
                        req_id,
                        errno: 0,
                        handle,
                        segment,
                        desc,
                        local,
                    },
                    Err(e) => Event::error_reply(req_id, e),
                };
                let ok = matches!(ev, Event::Reply { errno: 0, .. });
                self.post(app, worker, ev);
                if ok {
                    // Unsent bytes moved along: send them.
                    self.kick(handle, true);
                }
            }
            Request::UdpConnect { handle, remote } => {
                if !self.owned(app, handle) {
                    return;
                }
                if let Some(Kind::Net { flow, .. }) = self.sess(handle).map(|s| &s.kind) {
                    let flow = *flow;
                    if self.stack.udp_connect(flow, sa_to_ep(remote)).is_ok() {
                        if let Some(s) = self.sess(handle) {
                            s.remote = Some(remote);
                        }
                    }
                }
            }
            Request::Requeue { handle } => {
                if !self.owned(app, handle) {
                    return;
                }
                if self.requeue(handle).is_err() {
                    self.stats.accept_aborts += 1;
                    self.abort(handle, now, tx);
                }
            }
            Request::SetOpt { handle, opt } => {
                if !self.owned(app, handle) {
                    return;
                }
                if let Some(Kind::Net { flow, .. }) = self.sess(handle).map(|s| &s.kind) {
                    let flow = *flow;
                    if self.stack.tcp(flow).is_none() {
                        return;
                    }
                    let ms = |v: u32| Duration::from_millis(v as u64);
                    match opt {
                        SessOpt::NoDelay(b) => {
                            if let Some(sock) = self.stack.tcp(flow) {
                                sock.set_nagle_enabled(!b)
                            }
                        }
                        SessOpt::KeepAlive {
                            idle_ms,
                            interval_ms,
                            probes,
                        } => {
                            let ka = (idle_ms > 0).then(|| KeepAlive {
                                idle: ms(idle_ms),
                                interval: ms(interval_ms.max(1)),
                                probes: probes.clamp(1, 1000),
                            });
                            self.stack.set_keepalive(flow, ka, now, tx);
                        }
                        SessOpt::TimeoutMs(t) => {
                            self.stack
                                .set_user_timeout(flow, (t > 0).then(|| ms(t)), now)
                        }
                    }
                    self.stack.egress(flow, now, tx);
                }
            }
        }
    }

    fn listen(
        &mut self,
        app: AppId,
        worker: u32,
        mut local: SocketAddr,
        backlog: u32,
        flags: u8,
    ) -> Result<(u64, u32, u32, SocketAddr), i32> {
        let shared = flags & (LISTEN_SHARED | LISTEN_JOIN) != 0;
        let v6only = is_v6only(local, flags);
        if local.port() == 0 {
            // Like the kernel: an ephemeral port nobody listens on.
            local.set_port(self.free_listen_port()?);
        }
        // Join an existing group on the same address (SO_REUSEPORT-like);
        // a listener on the same port with an overlapping address that is
        // not this exact address is a conflict, as in the kernel.
        let ep = listen_ep(local);
        let mut existing = None;
        if let Some((id, g)) = self.groups.iter().find(|(_, g)| g.local == local) {
            let may_join = flags & LISTEN_JOIN != 0 || (shared && g.shared);
            if !may_join {
                return Err(libc::EADDRINUSE);
            }
            existing = Some(*id);
        } else if flags & LISTEN_EXISTING != 0 {
            return Err(libc::ENOENT);
        } else if self.groups.values().any(|g| g.overlaps(local, v6only))
            || self.reserved_elsewhere(local, v6only, shared)
        {
            return Err(libc::EADDRINUSE);
        }
        let gid = match existing {
            Some(g) => g,
            None if local.ip().is_loopback() => {
                // Loopback is reachable only through cut-through: no
                // transport listener, a group id outside the stack's range.
                let gid = ListenerId(CT_ONLY_BASE + self.next_ct_group);
                self.next_ct_group = (self.next_ct_group + 1) % CT_ONLY_BASE;
                self.new_group(gid, local, shared, v6only)
            }
            None => {
                let family = family_of(local, v6only);
                let gid = self
                    .stack
                    .listen_family(ep, family, backlog, LISTEN_BIT)
                    .map_err(StackError::errno)?;
                self.new_group(gid, local, shared, v6only)
            }
        };
        let h = LISTEN_BIT | self.next_listener;
        self.next_listener += 1;
        self.listeners.insert(
            h,
            AppListener {
                app,
                worker,
                group: gid,
                passive: flags & LISTEN_PASSIVE != 0,
            },
        );
        if let Some(g) = self.groups.get_mut(&gid) {
            g.members.push(h);
            if g.linger_until.take().is_some() {
                self.lingering = self.lingering.saturating_sub(1);
            }
        }
        Ok((h, 0, 0, local))
    }

    fn new_group(
        &mut self,
        gid: ListenerId,
        local: SocketAddr,
        shared: bool,
        v6only: bool,
    ) -> ListenerId {
        self.groups.insert(
            gid,
            Group {
                local,
                members: Vec::new(),
                rr: 0,
                shared,
                parked: Vec::new(),
                parked_ct: Vec::new(),
                linger_until: None,
                v6only,
            },
        );
        gid
    }

    /// The kernel's bind() checks for a TCP address; port 0 gets a free
    /// port, as the kernel picks one at bind() time (programs read it with
    /// getsockname() before listen(): Python's socketserver). With
    /// `BIND_RESERVE` the address is reserved for `app` until it is given
    /// back ([`Request::Unbind`]) or the app leaves; returns the token
    /// (0 when nothing was reserved).
    fn bind_check(
        &mut self,
        app: AppId,
        mut local: SocketAddr,
        flags: u8,
    ) -> Result<(SocketAddr, u64), i32> {
        let ip = local.ip();
        if !(ip.is_unspecified() || ip.is_loopback() || self.stack.is_local(ip.into())) {
            return Err(libc::EADDRNOTAVAIL);
        }
        let shared = flags & LISTEN_SHARED != 0;
        let reuseaddr = flags & BIND_REUSEADDR != 0;
        let v6only = is_v6only(local, flags);
        let reserve = flags & BIND_RESERVE != 0;
        if reserve
            && self.reservations_of.get(&app).copied().unwrap_or(0) >= MAX_RESERVATIONS_PER_APP
        {
            return Err(libc::ENOBUFS);
        }
        if local.port() == 0 {
            local.set_port(self.free_listen_port()?);
        } else {
            for g in self.groups.values() {
                if g.overlaps(local, v6only) && !(shared && g.shared && g.local == local) {
                    return Err(libc::EADDRINUSE);
                }
            }
            // Like the kernel, two bound sockets that neither listens may
            // share an address if both have SO_REUSEADDR (the first to
            // listen takes it) or both SO_REUSEPORT.
            if self.reservations.values().any(|r| {
                overlap(r.local, r.v6only, local, v6only)
                    && !(reuseaddr && r.reuseaddr)
                    && !(shared && r.shared)
            }) {
                return Err(libc::EADDRINUSE);
            }
        }
        if !reserve {
            return Ok((local, 0));
        }
        let token = loop {
            use std::hash::BuildHasher;
            self.next_token += 1;
            let t = self.token_keys.hash_one(self.next_token);
            if t != 0 && !self.reservations.contains_key(&t) {
                break t;
            }
        };
        self.reservations.insert(
            token,
            Reservation {
                app,
                local,
                v6only,
                shared,
                reuseaddr,
            },
        );
        *self.reservations_of.entry(app).or_default() += 1;
        self.stack.reserve_port(local.port());
        Ok((local, token))
    }

    /// Give back a reservation (by whoever knows its token: a forked child
    /// that listens on its parent's bound socket gives back the parent's).
    fn unbind(&mut self, token: u64) {
        let Some(r) = self.reservations.remove(&token) else {
            return;
        };
        if let Some(n) = self.reservations_of.get_mut(&r.app) {
            *n -= 1;
            if *n == 0 {
                self.reservations_of.remove(&r.app);
            }
        }
        self.stack.release_port(r.local.port());
    }

    /// Would a new listener on `local` take an address another socket has
    /// bound? Bound sockets with SO_REUSEADDR yield to the first listener,
    /// as in the kernel; SO_REUSEPORT ones share with a shared listener.
    fn reserved_elsewhere(&self, local: SocketAddr, v6only: bool, shared: bool) -> bool {
        self.reservations.values().any(|r| {
            overlap(r.local, r.v6only, local, v6only) && !r.reuseaddr && !(shared && r.shared)
        })
    }

    /// A port for `listen` on port 0: free in the stack (no connection,
    /// listener or UDP socket) and in the cut-through-only groups.
    fn free_listen_port(&mut self) -> Result<u16, i32> {
        for _ in 0..16384 {
            let p = self.stack.alloc_port().map_err(StackError::errno)?;
            if !self.groups.values().any(|g| g.local.port() == p) {
                return Ok(p);
            }
        }
        Err(libc::EADDRINUSE)
    }

    fn unlisten(&mut self, app: AppId, h: u64, linger: bool, now: Instant, tx: &mut dyn FrameTx) {
        match self.listeners.get(&h) {
            Some(l) if l.app == app => {}
            _ => {
                self.stats.bad_requests += 1;
                return;
            }
        }
        if linger {
            let Some(gid) = self.listeners.get(&h).map(|l| l.group) else {
                return;
            };
            if let Some(g) = self.groups.get_mut(&gid) {
                g.members.retain(|m| *m != h);
                if g.members.is_empty() {
                    g.linger_until = Some(now + Duration::from_millis(session_api::msg::LINGER_MS));
                    self.lingering += 1;
                }
            }
            self.listeners.remove(&h);
            return;
        }
        self.remove_listener(h, now, tx);
    }

    fn remove_listener(&mut self, h: u64, now: Instant, tx: &mut dyn FrameTx) {
        let Some(l) = self.listeners.remove(&h) else {
            return;
        };
        let empty = match self.groups.get_mut(&l.group) {
            Some(g) => {
                g.members.retain(|m| *m != h);
                g.members.is_empty()
            }
            None => false,
        };
        if empty {
            self.destroy_group(l.group, now, tx);
        }
    }

    /// Remove a listen group: what waited in it is refused, the transport
    /// listener closed.
    fn destroy_group(&mut self, gid: ListenerId, now: Instant, tx: &mut dyn FrameTx) {
        if let Some(g) = self.groups.remove(&gid) {
            for f in g.parked {
                self.stats.accept_aborts += 1;
                if let Some(s) = self.stack.tcp(f) {
                    s.abort();
                }
                self.stack.remove_flow(f, now, tx);
            }
            for (app, worker, req_id, _) in g.parked_ct {
                self.post(app, worker, Event::error_reply(req_id, libc::ECONNREFUSED));
            }
        }
        if gid.0 < CT_ONLY_BASE {
            self.stack.unlisten(gid);
        }
    }

    /// Close the lingering groups nobody joined in time.
    fn expire_lingering(&mut self, now: Instant, tx: &mut dyn FrameTx) {
        let due: Vec<ListenerId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.members.is_empty() && g.linger_until.is_some_and(|t| now >= t))
            .map(|(id, _)| *id)
            .collect();
        for gid in due {
            self.lingering = self.lingering.saturating_sub(1);
            self.destroy_group(gid, now, tx);
        }
    }

    /// An active member joined `gid`: hand it what waited.
    fn dispatch_parked(&mut self, gid: ListenerId, now: Instant, tx: &mut dyn FrameTx) {
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let flows = std::mem::take(&mut g.parked);
        let cts = std::mem::take(&mut g.parked_ct);
        for f in flows {
            self.service_unaccepted(f, now, tx);
        }
        for (app, worker, req_id, remote) in cts {
            if !self.apps.contains_key(&app) {
                continue;
            }
            match self.connect_cut_through(app, worker, req_id, remote) {
                Ok(_) | Err(PARKED) => {}
                Err(e) => self.post(app, worker, Event::error_reply(req_id, e)),
            }
        }
    }

    fn udp_open(
        &mut self,
        app: AppId,
        worker: u32,
        local: SocketAddr,
        remote: Option<SocketAddr>,
        flags: u8,
    ) -> Result<(u64, u32, u32, SocketAddr), i32> {
        let family = family_of(local, is_v6only(local, flags));
        let flow = self
            .stack
            .udp_bind(listen_ep(local), family, 0)
            .map_err(StackError::errno)?;
        let port = self
            .stack
            .udp(flow)
            .map(|s| s.endpoint().port)
            .unwrap_or(local.port());
        let bound = SocketAddr::new(local.ip(), port);
        if let Some(r) = remote {
            // Connected in the stack too, as in Linux: only the peer's
            // datagrams reach it, and ICMP errors about it find it.
            if let Err(e) = self.stack.udp_connect(flow, sa_to_ep(r)) {
                self.stack.remove_flow(
                    flow,
                    Instant::from_micros(0),
                    &mut crate::stack::NullTx(Vec::new()),
                );
                return Err(e.errno());
            }
        }
        match self.make_net_session(app, worker, Proto::Udp, flow, Some(bound), remote) {
            Ok((h, blk, doff)) => Ok((h, blk.segment, doff, bound)),
            Err(e) => {
                self.stack.remove_flow(
                    flow,
                    Instant::from_micros(0),
                    &mut crate::stack::NullTx(Vec::new()),
                );
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        app: AppId,
        worker: u32,
        req_id: u32,
        remote: SocketAddr,
        local: Option<SocketAddr>,
        now: Instant,
        tx: &mut dyn FrameTx,
    ) -> Result<(u64, u32, u32, SocketAddr), i32> {
        let rip: IpAddress = remote.ip().into();
        if remote.ip().is_loopback() || self.stack.is_local(rip) {
            return self.connect_cut_through(app, worker, req_id, remote);
        }
        let flow = self
            .stack
            .connect(sa_to_ep(remote), local.map(sa_to_ep), 0, now)
            .map_err(StackError::errno)?;
        let lep = self
            .stack
            .tcp(flow)
            .and_then(|s| s.local_endpoint())
            .map(ep_to_sa);
        if let Some(sock) = self.stack.tcp(flow) {
            sock.set_timeout(Some(self.cfg.connect_timeout));
        }
        match self.make_net_session(app, worker, Proto::Tcp, flow, lep, Some(remote)) {
            Ok((h, blk, doff)) => {
                if let Some(s) = self.sess(h) {
                    s.pending_connect = Some((req_id, now));
                }
                self.stack.egress(flow, now, tx);
                Ok((h, blk.segment, doff, lep.unwrap_or(remote)))
            }
            Err(e) => {
                if let Some(s) = self.stack.tcp(flow) {
                    s.abort();
                }
                self.stack.remove_flow(flow, now, tx);
                Err(e)
            }
        }
    }

    /// Connect to a listener of this daemon: a FIFO pair in a segment shared
    /// by both apps; the daemon only relays notifications.
    fn connect_cut_through(
        &mut self,
        app: AppId,
        worker: u32,
        req_id: u32,
        remote: SocketAddr,
    ) -> Result<(u64, u32, u32, SocketAddr), i32> {
        let rip = remote.ip();
        let gid = self
            .groups
            .iter()
            .find(|(_, g)| {
                g.local.port() == remote.port()
                    && g.takes(rip)
                    && (!g.members.is_empty() || g.linger_until.is_some())
            })
            .map(|(id, _)| *id)
            .ok_or(libc::ECONNREFUSED)?;
        let Some(lh) = self.pick_member(gid) else {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.parked_ct.push((app, worker, req_id, remote));
                return Err(PARKED);
            }
            return Err(libc::ECONNREFUSED);
        };
        let (papp, pworker) = {
            let l = self.listeners.get(&lh).ok_or(libc::ECONNREFUSED)?;
            (l.app, l.worker)
        };
        for a in [app, papp] {
            if self.app_sessions.get(&a).map_or(0, |s| s.len()) >= self.cfg.max_sessions_per_app {
                return Err(libc::ENOBUFS);
            }
        }
        let segid = self.ct_segment(app, papp)?;
        let cap = self.cfg.ct_fifo_size;
        let ct = self.ct_segments.get_mut(&segid).ok_or(libc::ENOMEM)?;
        let blk = alloc_block(&mut ct.seg, cap).ok_or(libc::ENOBUFS)?;
        // Client endpoint: a made-up ephemeral port on the loopback/local ip.
        let cport = 49152 + (self.stats.cut_through_opened % 16384) as u16;
        let client = SocketAddr::new(rip, cport);
        let server = SocketAddr::new(rip, remote.port());
        let da = SessionDesc {
            proto: Proto::Tcp,
            rx_off: blk.fifo_ba,
            rx_cap: cap,
            tx_off: blk.fifo_ab,
            tx_cap: cap,
            local: Some(client),
            remote: Some(server),
            cut_through: true,
        };
        let db = SessionDesc {
            proto: Proto::Tcp,
            rx_off: blk.fifo_ab,
            rx_cap: cap,
            tx_off: blk.fifo_ba,
            tx_cap: cap,
            local: Some(server),
            remote: Some(client),
            cut_through: true,
        };
        let ct = self.ct_segments.get(&segid).ok_or(libc::ENOMEM)?;
        let off_a = write_desc(&ct.seg, &blk, 0, &da).ok_or(libc::EFAULT)?;
        let off_b = write_desc(&ct.seg, &blk, 1, &db).ok_or(libc::EFAULT)?;
        let (chan_a, chan_b) = (chan_ref(&ct.seg, off_a), chan_ref(&ct.seg, off_b));
        let mk = |app, worker, local, remote, chan| Session {
            app,
            worker,
            proto: Proto::Tcp,
            blk,
            chan,
            kind: Kind::Ct { peer: None },
            local: Some(local),
            remote: Some(remote),
            app_closed: false,
            shut_wr: false,
            fin_done: false,
            peer_closed_sent: false,
            dead: false,
            pending_connect: None,
            rx_bytes: 0,
            tx_bytes: 0,
            group: None,
            ack: AckClock::default(),
        };
        let ha = self.new_handle(mk(app, worker, client, server, chan_a));
        let hb = self.new_handle(mk(papp, pworker, server, client, chan_b));
        if let Some(s) = self.sess(ha) {
            s.kind = Kind::Ct { peer: Some(hb) };
        }
        if let Some(s) = self.sess(hb) {
            s.kind = Kind::Ct { peer: Some(ha) };
        }
        self.stats.cut_through_opened += 1;
        self.post(
            papp,
            pworker,
            Event::Accepted {
                listener: lh,
                handle: hb,
                segment: segid,
                desc: off_b,
            },
        );
        self.post(
            app,
            worker,
            Event::Reply {
                req_id,
                errno: 0,
                handle: ha,
                segment: segid,
                desc: off_a,
                local: Some(client),
            },
        );
        Ok((ha, segid, off_a, client))
    }

    /// The segment shared by two apps, created (and announced to both) on
    /// first use.
    fn ct_segment(&mut self, a: AppId, b: AppId) -> Result<u32, i32> {
        let key = if a <= b { (a, b) } else { (b, a) };
        if let Some(id) = self.ct_by_pair.get(&key) {
            return Ok(*id);
        }
        let id = self.alloc_segment_id();
        let seg = Segment::create(id, self.cfg.ct_segment_size, "hoststack-ct")
            .map_err(|_| libc::ENOMEM)?;
        let msg = session_api::proto::DaemonCtrl::Segment {
            segment: id,
            size: self.cfg.ct_segment_size as u64,
        }
        .encode();
        for app in [key.0, key.1] {
            if let Some(ap) = self.apps.get_mut(&app) {
                use std::os::fd::AsFd;
                if session_api::shm::send_with_fds(ap.ctrl.as_fd(), &msg, &[seg.region.fd()])
                    .is_err()
                {
                    return Err(libc::ENOMEM);
                }
                ap.ct_segments.push(id);
            }
            if key.0 == key.1 {
                break;
            }
        }
        self.ct_segments.insert(id, CtSegment { seg, apps: key });
        self.ct_by_pair.insert(key, id);
        Ok(id)
    }

    /// Point session `h` at its new owner and FIFO block.
    fn rehome(
        &mut self,
        h: u64,
        old_app: AppId,
        app: AppId,
        worker: u32,
        blk: SessionBlock,
        kind: Kind,
    ) -> Result<(), i32> {
        if let Some(set) = self.app_sessions.get_mut(&old_app) {
            set.remove(&h);
        }
        self.app_sessions.entry(app).or_default().insert(h);
        // A network session's descriptor is at the start of its block.
        let chan = self.chan_of(app, blk.segment, blk.off);
        let s = self.sess(h).ok_or(libc::EBADF)?;
        s.app = app;
        s.worker = worker;
        s.blk = blk;
        s.chan = chan;
        s.kind = kind;
        Ok(())
    }

    /// The wake-channel byte of the descriptor at `off` in `app`'s segment.
    fn chan_of(&self, app: AppId, segment: u32, off: u32) -> Option<ChanRef> {
        chan_ref(self.apps.get(&app)?.segments.get(&segment)?, off)
    }

    /// Move an accepted, never-taken network session to another member of
    /// its listen group: new FIFOs in that app's segment, received bytes
    /// copied over, the old block freed, `Accepted` posted.
    fn requeue(&mut self, h: u64) -> Result<(), i32> {
        let s = self.sess(h).ok_or(libc::EBADF)?;
        let (Kind::Net { flow, .. }, Some(gid)) = (&s.kind, s.group) else {
            return Err(libc::EINVAL);
        };
        let (flow, old_app, old_blk, proto, local, remote) =
            (*flow, s.app, s.blk, s.proto, s.local, s.remote);
        let lh = self.pick_member(gid).ok_or(libc::ECONNREFUSED)?;
        let (app, worker) = self
            .listeners
            .get(&lh)
            .map(|l| (l.app, l.worker))
            .ok_or(libc::ECONNREFUSED)?;
        // What the peer already sent (the old owner never read it).
        let pending = {
            let seg = self
                .apps
                .get(&old_app)
                .and_then(|a| a.segments.get(&old_blk.segment))
                .ok_or(libc::EFAULT)?;
            let mut c = consumer(seg, old_blk.fifo_ba, old_blk.cap).ok_or(libc::EFAULT)?;
            let n = c.len().map_err(|_| libc::EFAULT)? as usize;
            let mut v = vec![0u8; n];
            c.dequeue(&mut v).map_err(|_| libc::EFAULT)?;
            v
        };
        let (blk, doff, mut rx, txc) = self.net_fifos(app, proto, local, remote)?;
        rx.enqueue(&pending).map_err(|_| libc::EFAULT)?;
        if let Some(seg) = self
            .apps
            .get_mut(&old_app)
            .and_then(|a| a.segments.get_mut(&old_blk.segment))
        {
            let _ = seg.alloc.free(old_blk.off);
        }
        self.rehome(
            h,
            old_app,
            app,
            worker,
            blk,
            Kind::Net { flow, rx, tx: txc },
        )?;
        self.post(
            app,
            worker,
            Event::Accepted {
                listener: lh,
                handle: h,
                segment: blk.segment,
                desc: doff,
            },
        );
        Ok(())
    }

    /// The parent of a fork closes its copy of a session its child adopted:
    /// free the old FIFO block now.
    fn release_retired(&mut self, app: AppId, h: u64) -> bool {
        let Some(blk) = self.retired.remove(&(app, h)) else {
            return false;
        };
        if let Some(seg) = self
            .apps
            .get_mut(&app)
            .and_then(|a| a.segments.get_mut(&blk.segment))
        {
            let _ = seg.alloc.free(blk.off);
        }
        true
    }

    /// Move network session `h` from the requesting app's parent process to
    /// the requesting app (a socket inherited over fork).
    fn adopt(
        &mut self,
        app: AppId,
        worker: u32,
        h: u64,
    ) -> Result<(u32, u32, Option<SocketAddr>), i32> {
        let s = self.sess(h).ok_or(libc::EBADF)?;
        let (Kind::Net { flow, .. }, false) = (&s.kind, s.app_closed) else {
            // Cut-through sessions live in a segment of the app pair.
            return Err(libc::EOPNOTSUPP);
        };
        let (flow, old_app, old_worker, old_blk, proto, local, remote) =
            (*flow, s.app, s.worker, s.blk, s.proto, s.local, s.remote);
        if old_app == app {
            return Err(libc::EINVAL);
        }
        // Only the parent process's sessions (the kernel's fd inheritance).
        let child_pid = self.apps.get(&app).map(|a| a.pid).ok_or(libc::EINVAL)?;
        let parent_pid = self.apps.get(&old_app).map(|a| a.pid).ok_or(libc::EBADF)?;
        if parent_of(child_pid) != Some(parent_pid) {
            return Err(libc::EPERM);
        }
        // Bytes in flight in both FIFOs move along.
        let (rx_data, tx_data) = {
            let seg = self
                .apps
                .get(&old_app)
                .and_then(|a| a.segments.get(&old_blk.segment))
                .ok_or(libc::EFAULT)?;
            let take = |off: u32| -> Result<Vec<u8>, i32> {
                let c = consumer(seg, off, old_blk.cap).ok_or(libc::EFAULT)?;
                let n = c.len().map_err(|_| libc::EFAULT)? as usize;
                let mut v = vec![0u8; n];
                c.peek(&mut v).map_err(|_| libc::EFAULT)?;
                Ok(v)
            };
            (take(old_blk.fifo_ba)?, take(old_blk.fifo_ab)?)
        };
        let (blk, doff, mut rx, txc) = self.net_fifos(app, proto, local, remote)?;
        {
            let seg = self
                .apps
                .get(&app)
                .and_then(|a| a.segments.get(&blk.segment))
                .ok_or(libc::EFAULT)?;
            rx.enqueue(&rx_data).map_err(|_| libc::EFAULT)?;
            let mut txp = producer(seg, blk.fifo_ab, blk.cap).ok_or(libc::EFAULT)?;
            txp.enqueue(&tx_data).map_err(|_| libc::EFAULT)?;
        }
        // A lingering close of the parent is cancelled; the parent's handle
        // is gone already then, so the old block can go too.
        let lingering = self
            .close_lingering
            .iter()
            .position(|&(a, x, _)| a == old_app && x == h);
        match lingering {
            Some(i) => {
                self.close_lingering.swap_remove(i);
                if let Some(seg) = self
                    .apps
                    .get_mut(&old_app)
                    .and_then(|a| a.segments.get_mut(&old_blk.segment))
                {
                    let _ = seg.alloc.free(old_blk.off);
                }
            }
            None => {
                self.retired.insert((old_app, h), old_blk);
            }
        }
        self.rehome(
            h,
            old_app,
            app,
            worker,
            blk,
            Kind::Net { flow, rx, tx: txc },
        )?;
        // The parent's copy (if it still has one) is dead from now on.
        if lingering.is_none() {
            self.post(
                old_app,
                old_worker,
                Event::Reset {
                    handle: h,
                    errno: libc::ECONNABORTED,
                },
            );
        }
        Ok((blk.segment, doff, local))
    }

    /// An accepted network session its app never read from nor wrote to.
    fn untouched(&mut self, h: u64) -> bool {
        let Some(s) = self.sess(h) else { return false };
        let (rx_bytes, tx_bytes, closed) = (s.rx_bytes, s.tx_bytes, s.app_closed);
        match &s.kind {
            Kind::Net { rx, tx, .. } if s.group.is_some() && !closed && tx_bytes == 0 => {
                rx.len().ok() == Some(rx_bytes as u32) && tx.len().ok() == Some(0)
            }
            _ => false,
        }
    }

    /// Round-robin over the group's active members.
    fn pick_member(&mut self, gid: ListenerId) -> Option<u64> {
        let g = self.groups.get_mut(&gid)?;
        let n = g.members.len();
        for _ in 0..n {
            g.rr = (g.rr + 1) % n;
            let m = g.members[g.rr];
            if self.listeners.get(&m).is_some_and(|l| !l.passive) {
                return Some(m);
            }
        }
        None
    }

    /// Data or space appeared on the app side of `h`.
    fn kick(&mut self, h: u64, is_tx: bool) {
        let Some(s) = self.sess(h) else { return };
        match &s.kind {
            Kind::Net { flow, .. } => {
                // Serviced (and sent) at the end of the request batch, so
                // a write and the close after it leave as one segment.
                let flow = *flow;
                self.stack.touch(flow);
            }
            Kind::Ct { peer } => {
                // The peer closed (its session is freed and unlinked, or
                // about to be): writing to it gets the kernel's answer, a
                // RST.
                let open = (*peer)
                    .and_then(|p| Some((p, self.sess(p)?)))
                    .filter(|(_, ps)| !ps.app_closed);
                let Some((p, ps)) = open else {
                    if is_tx {
                        if let Some(me) = self.sess(h).filter(|m| !m.dead) {
                            me.dead = true;
                            let (a, w) = (me.app, me.worker);
                            self.post(
                                a,
                                w,
                                Event::Reset {
                                    handle: h,
                                    errno: libc::ECONNRESET,
                                },
                            );
                        }
                    }
                    return;
                };
                let (pa, pw) = (ps.app, ps.worker);
                let ev = if is_tx {
                    Event::Rx { handle: p }
                } else {
                    Event::TxSpace { handle: p }
                };
                self.post(pa, pw, ev);
            }
        }
    }

    fn shut_write(&mut self, h: u64) {
        let Some(s) = self.sess(h) else { return };
        if s.shut_wr {
            return;
        }
        s.shut_wr = true;
        match &s.kind {
            Kind::Net { flow, .. } => {
                let flow = *flow;
                self.stack.touch(flow);
            }
            Kind::Ct { peer } => {
                let Some(p) = *peer else { return };
                if let Some(ps) = self.sess(p) {
                    if !ps.peer_closed_sent && !ps.app_closed {
                        ps.peer_closed_sent = true;
                        let (pa, pw) = (ps.app, ps.worker);
                        self.post(pa, pw, Event::PeerClosed { handle: p });
                    }
                }
            }
        }
    }

    fn close(&mut self, h: u64) {
        self.shut_write(h);
        let Some(s) = self.sess(h) else { return };
        s.app_closed = true;
        match &s.kind {
            Kind::Net { flow, .. } => {
                let flow = *flow;
                if s.dead {
                    self.free_session(h);
                    return;
                }
                self.stack.touch(flow);
            }
            Kind::Ct { .. } => self.free_session(h),
        }
    }

    fn abort(&mut self, h: u64, now: Instant, tx: &mut dyn FrameTx) {
        let Some(s) = self.sess(h) else { return };
        match &s.kind {
            Kind::Net { flow, .. } => {
                let flow = *flow;
                if let Some(sock) = self.stack.tcp(flow) {
                    sock.abort();
                }
                self.stack.remove_flow(flow, now, tx);
            }
            Kind::Ct { peer } => {
                if let Some(p) = *peer {
                    if let Some(ps) = self.sess(p) {
                        if !ps.app_closed && !ps.dead {
                            ps.dead = true;
                            let (pa, pw) = (ps.app, ps.worker);
                            self.post(
                                pa,
                                pw,
                                Event::Reset {
                                    handle: p,
                                    errno: libc::ECONNRESET,
                                },
                            );
                        }
                    }
                }
            }
        }
        self.free_session(h);
    }

    /// Feed a received frame and serve the flows it touched.
    pub fn ingress(&mut self, now: Instant, frame: &[u8], csum_ok: bool, tx: &mut dyn FrameTx) {
        self.stack.ingress(now, frame, csum_ok, tx);
    }

    /// Serve every flow touched by ingress or timers, then send what they
    /// have. Call after a batch of frames.
    pub fn service_touched(&mut self, now: Instant, tx: &mut dyn FrameTx) {
        let mut touched = std::mem::take(&mut self.touched);
        // Serving a flow can touch others (a UDP datagram to one of our own
        // addresses lands in its socket at once): a few more rounds.
        for _ in 0..4 {
            self.stack.take_touched(&mut touched);
            if touched.is_empty() {
                break;
            }
            if touched.len() > 1 {
                self.prefetch(&touched);
            }
            for id in touched.drain(..) {
                self.service_flow(id, now, tx);
                self.stack.egress(id, now, tx);
            }
        }
        self.touched = touched;
    }

    /// Before serving a batch of flows: start the cache misses of each
    /// one's session FIFO headers together (with thousands of connections
    /// every one of them is cold, and serving them one by one stalls on
    /// each in turn).
    fn prefetch(&self, flows: &[FlowId]) {
        for &id in flows {
            let Some(owner) = self.stack.prefetch(id) else {
                continue;
            };
            let idx = (owner & 0xffff_ffff) as usize;
            if let Some(Some(Session {
                kind: Kind::Net { rx, tx, .. },
                ..
            })) = self.sessions.get(idx)
            {
                tx.prefetch();
                rx.prefetch();
            }
        }
    }

    /// Run timers.
    pub fn poll_timers(&mut self, now: Instant, tx: &mut dyn FrameTx) {
        if self.lingering > 0 {
            self.expire_lingering(now, tx);
        }
        if !self.close_lingering.is_empty() {
            let mut due = Vec::new();
            self.close_lingering.retain(|&(a, h, t)| {
                if now >= t {
                    due.push((a, h));
                    false
                } else {
                    true
                }
            });
            for (a, h) in due {
                // Still the parent's (no child adopted it): close it now.
                if self.sess(h).is_some_and(|s| s.app == a && !s.app_closed) {
                    self.close(h);
                }
            }
            self.service_touched(now, tx);
        }
        self.stack.poll_timers(now, tx);
        self.service_touched(now, tx);
    }

    fn service_flow(&mut self, flow: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        let Some(owner) = self.stack.owner(flow) else {
            return;
        };
        if self.stack.flow_listener(flow).is_some() {
            // Not yet handed to an app: owner is still the listen token.
            self.service_unaccepted(flow, now, tx);
            if self
                .stack
                .owner(flow)
                .is_none_or(|o| o & LISTEN_BIT != 0 || o == 0)
            {
                return;
            }
        } else if owner == 0 || owner & LISTEN_BIT != 0 {
            self.service_orphan(flow, now, tx);
            return;
        }
        let Some(h) = self.stack.owner(flow) else {
            return;
        };
        match self.stack.kind(flow) {
            Some(FlowKind::Tcp) => self.service_tcp(h, flow, now, tx),
            Some(FlowKind::Udp) => self.service_udp(h, flow, now),
            None => {}
        }
    }

    fn service_unaccepted(&mut self, flow: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        let Some(lid) = self.stack.flow_listener(flow) else {
            return;
        };
        let state = match self.stack.tcp(flow) {
            Some(s) => s.state(),
            None => return,
        };
        match state {
            tcp::State::Established | tcp::State::CloseWait => {}
            tcp::State::Closed | tcp::State::TimeWait => {
                self.stack.remove_flow(flow, now, tx);
                return;
            }
            _ => return,
        }
        let Some(lh) = self.pick_member(lid) else {
            if let Some(g) = self
                .groups
                .get_mut(&lid)
                .filter(|g| !g.members.is_empty() || g.linger_until.is_some())
            {
                // Only passive members: wait in the backlog for an active one.
                if !g.parked.contains(&flow) {
                    g.parked.push(flow);
                }
                return;
            }
            self.stats.accept_aborts += 1;
            if let Some(s) = self.stack.tcp(flow) {
                s.abort();
            }
            self.stack.remove_flow(flow, now, tx);
            return;
        };
        let Some((app, worker)) = self.listeners.get(&lh).map(|l| (l.app, l.worker)) else {
            return;
        };
        let (local, remote) = match self.stack.tcp(flow) {
            Some(s) => (
                s.local_endpoint().map(ep_to_sa),
                s.remote_endpoint().map(ep_to_sa),
            ),
            None => return,
        };
        match self.make_net_session(app, worker, Proto::Tcp, flow, local, remote) {
            Ok((h, blk, doff)) => {
                if let Some(s) = self.sess(h) {
                    s.group = Some(lid);
                }
                self.stack.accepted(flow);
                self.post(
                    app,
                    worker,
                    Event::Accepted {
                        listener: lh,
                        handle: h,
                        segment: blk.segment,
                        desc: doff,
                    },
                );
            }
            Err(_) => {
                // Out of session memory: refuse like a full backlog would.
                self.stats.accept_aborts += 1;
                if let Some(s) = self.stack.tcp(flow) {
                    s.abort();
                }
                self.stack.remove_flow(flow, now, tx);
            }
        }
    }

    /// A flow whose app is gone: discard input, reap when closed.
    fn service_orphan(&mut self, flow: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        match self.stack.kind(flow) {
            Some(FlowKind::Tcp) => {
                let closed = match self.stack.tcp(flow) {
                    Some(s) => {
                        while s.can_recv() {
                            if s.recv(|b| (b.len(), b.len())).unwrap_or(0) == 0 {
                                break;
                            }
                        }
                        s.state() == tcp::State::Closed
                    }
                    None => true,
                };
                if closed {
                    self.stack.remove_flow(flow, now, tx);
                }
            }
            _ => self.stack.remove_flow(flow, now, tx),
        }
    }

    fn service_tcp(&mut self, h: u64, flow: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        let idx = (h & 0xffff_ffff) as usize;
        if self.sess(h).is_none() {
            return;
        }
        let connect_timeout = self.cfg.connect_timeout;
        let ack_bounds = self.stack.ack_delay_bounds();
        // Only a connect in progress asks how its SYN fares (not per request).
        let connecting = self.sessions[idx]
            .as_ref()
            .is_some_and(|s| s.pending_connect.is_some());
        let (icmp_error, (syn_sent, probes)) = if connecting {
            (self.stack.take_error(flow), self.stack.syn_progress(flow))
        } else {
            (None, (true, 0))
        };
        let timed_out = self.stack.timed_out(flow);
        let Some(sock) = self.stack.tcp(flow) else {
            return;
        };
        let Some(s) = self.sessions[idx].as_mut() else {
            return;
        };
        let state = sock.state();
        let mut events: Vec<Event> = Vec::new();
        let mut reset: Option<i32> = None;
        let mut corrupt = false;
        if let Some((req_id, started)) = s.pending_connect {
            match state {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    // An ICMP error about our SYN fails the connect at once;
                    // a SYN that never left because three ARP/NDP probes
                    // for the next hop went unanswered fails it after
                    // NEIGHBOR_TIMEOUT, as Linux's neighbour code gives up:
                    // EHOSTUNREACH rather than ETIMEDOUT much later. (Not
                    // on time alone: smoltcp rate-limits probes for the
                    // whole interface, so dead neighbours can delay a live
                    // one's probes.)
                    let waited = now - started;
                    let errno = icmp_error.or((state == tcp::State::SynSent
                        && !syn_sent
                        && probes >= NEIGHBOR_PROBES
                        && waited >= NEIGHBOR_TIMEOUT)
                        .then_some(libc::EHOSTUNREACH));
                    if let Some(errno) = errno {
                        sock.abort();
                        let (app, worker) = (s.app, s.worker);
                        self.post(app, worker, Event::error_reply(req_id, errno));
                        self.stack.remove_flow(flow, now, tx);
                        self.free_session(h);
                    }
                    return;
                }
                tcp::State::Closed | tcp::State::TimeWait => {
                    let errno = if now - started >= connect_timeout {
                        libc::ETIMEDOUT
                    } else {
                        libc::ECONNREFUSED
                    };
                    let (app, worker) = (s.app, s.worker);
                    self.post(app, worker, Event::error_reply(req_id, errno));
                    self.stack.remove_flow(flow, now, tx);
                    self.free_session(h);
                    return;
                }
                _ => {
                    sock.set_timeout(None);
                    s.pending_connect = None;
                    s.local = sock.local_endpoint().map(ep_to_sa);
                    events.push(Event::Reply {
                        req_id,
                        errno: 0,
                        handle: h,
                        segment: s.blk.segment,
                        desc: s.blk.off,
                        local: s.local,
                    });
                }
            }
        }
        let Kind::Net { rx, tx: txf, .. } = &mut s.kind else {
            return;
        };
        // Receive path: smoltcp buffer → app rx FIFO, while there is room.
        let mut moved = 0usize;
        if s.app_closed {
            while sock.can_recv() {
                if sock.recv(|b| (b.len(), b.len())).unwrap_or(0) == 0 {
                    break;
                }
            }
        } else {
            for _ in 0..64 {
                if !sock.can_recv() {
                    break;
                }
                let free = match rx.free_space() {
                    Ok(f) => f as usize,
                    Err(_) => {
                        corrupt = true;
                        break;
                    }
                };
                if free == 0 {
                    rx.request_dequeue_notification();
                    // The app may have drained between our check and the flag.
                    if rx.free_space().unwrap_or(0) == 0 {
                        break;
                    }
                    continue;
                }
                let n = sock
                    .recv(|b| {
                        let n = b.len().min(free);
                        match rx.enqueue(&b[..n]) {
                            Ok(k) => (k, k),
                            Err(_) => (0, 0),
                        }
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                moved += n;
            }
        }
        if moved > 0 {
            s.rx_bytes += moved as u64;
            if ack_bounds.is_some() {
                s.ack.received(now);
            }
            if rx.set_event() {
                events.push(Event::Rx { handle: h });
            }
        }
        // Send path: app tx FIFO → smoltcp buffer.
        if !s.dead && !s.fin_done {
            txf.clear_event();
            let mut taken = 0usize;
            for _ in 0..64 {
                if !sock.can_send() {
                    break;
                }
                let n = sock
                    .send(|b| match txf.dequeue(b) {
                        Ok(k) => (k, k),
                        Err(_) => (0, 0),
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                taken += n;
            }
            if txf.len().is_err() {
                corrupt = true;
            }
            if taken > 0 {
                s.tx_bytes += taken as u64;
                if let Some(d) = ack_bounds.and_then(|b| s.ack.answered(now, b)) {
                    sock.set_ack_delay(Some(d));
                }
                if txf.take_dequeue_notification() && !s.app_closed {
                    events.push(Event::TxSpace { handle: h });
                }
            }
            if s.shut_wr && txf.len().unwrap_or(0) == 0 {
                sock.close();
                s.fin_done = true;
            }
        }
        // Peer's FIN, after everything before it reached the app.
        let state = sock.state();
        if !s.peer_closed_sent
            && !s.app_closed
            && matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            )
            && sock.recv_queue() == 0
        {
            s.peer_closed_sent = true;
            events.push(Event::PeerClosed { handle: h });
        }
        let mut remove_flow = false;
        if state == tcp::State::Closed && !s.dead {
            s.dead = true;
            remove_flow = true;
            let graceful = s.peer_closed_sent && s.fin_done;
            if !graceful && !s.app_closed {
                // Given up on a silent peer (keepalive, user timeout), as
                // Linux reports it; else the peer reset it.
                reset = Some(if timed_out {
                    libc::ETIMEDOUT
                } else {
                    libc::ECONNRESET
                });
            }
        }
        if corrupt {
            sock.abort();
            s.dead = true;
            remove_flow = true;
            reset = Some(libc::EIO);
            self.stats.bad_requests += 1;
        }
        let (app, worker, app_closed, fin_done) = (s.app, s.worker, s.app_closed, s.fin_done);
        if let Some(errno) = reset {
            if !app_closed {
                events.push(Event::Reset { handle: h, errno });
            }
        }
        for ev in events {
            self.post(app, worker, ev);
        }
        if remove_flow {
            self.stack.remove_flow(flow, now, tx);
            if app_closed {
                self.free_session(h);
            }
        } else if app_closed && fin_done {
            // Everything is in the transport's hands: free the FIFOs now and
            // let the flow finish (FIN handshake, TIME-WAIT) as an orphan.
            self.stack.set_owner(flow, 0);
            self.free_session(h);
        }
    }

    fn service_udp(&mut self, h: u64, flow: FlowId, now: Instant) {
        let idx = (h & 0xffff_ffff) as usize;
        if self.sess(h).is_none() {
            return;
        }
        let local = self.stack.local_addrs();
        // Datagrams to our own addresses, delivered once the socket is free.
        let mut looped: Vec<(IpEndpoint, Vec<u8>)> = Vec::new();
        let Some(sock) = self.stack.udp(flow) else {
            return;
        };
        let Some(s) = self.sessions[idx].as_mut() else {
            return;
        };
        let Kind::Net { rx, tx: txf, .. } = &mut s.kind else {
            return;
        };
        let mut delivered = false;
        let mut corrupt = false;
        let mut drained = false;
        // Datagrams in: header + payload, only whole datagrams.
        for _ in 0..256 {
            let need = match sock.peek() {
                Ok((d, _)) => DGRAM_HDR + d.len(),
                Err(_) => break,
            };
            let free = match rx.free_space() {
                Ok(f) => f as usize,
                Err(_) => {
                    corrupt = true;
                    break;
                }
            };
            if free < need {
                if need > rx.cap() as usize {
                    let _ = sock.recv(); // can never fit: drop it
                    continue;
                }
                rx.request_dequeue_notification();
                if rx.free_space().unwrap_or(0) as usize >= need {
                    continue;
                }
                break;
            }
            let Ok((d, meta)) = sock.recv() else { break };
            let hdr = dgram_header(d.len(), Some(ep_to_sa(meta.endpoint)));
            let _ = rx.enqueue(&hdr);
            let _ = rx.enqueue(d);
            s.rx_bytes += d.len() as u64;
            delivered = true;
        }
        // Datagrams out.
        txf.clear_event();
        for _ in 0..256 {
            let have = match txf.len() {
                Ok(n) => n as usize,
                Err(_) => {
                    corrupt = true;
                    break;
                }
            };
            if have < DGRAM_HDR {
                break;
            }
            let mut hb = [0u8; DGRAM_HDR];
            if txf.peek(&mut hb).unwrap_or(0) != DGRAM_HDR {
                break;
            }
            let Ok((len, addr)) = parse_dgram_header(&hb) else {
                corrupt = true;
                break;
            };
            if len > 65507 || DGRAM_HDR + len > have {
                // A datagram is published whole; a shorter one means garbage.
                corrupt = len > 65507 || DGRAM_HDR + len > txf.cap() as usize;
                break;
            }
            let dest = addr.or(s.remote);
            if sock.send_queue() + len > sock.payload_send_capacity() && sock.send_queue() > 0 {
                break; // socket full: resume when it drains (timer/egress touch)
            }
            let total = DGRAM_HDR + len;
            let buf = &mut self.scratch[..total];
            if txf.peek(buf).unwrap_or(0) != total {
                break;
            }
            let _ = txf.consume(total as u32);
            drained = true;
            if let Some(d) = dest {
                let ep = sa_to_ep(d);
                if local.contains(&Some(ep.addr)) {
                    looped.push((ep, buf[DGRAM_HDR..].to_vec()));
                    s.tx_bytes += len as u64;
                } else if sock.send_slice(&buf[DGRAM_HDR..], ep).is_ok() {
                    s.tx_bytes += len as u64;
                }
            }
        }
        let (app, worker, remote) = (s.app, s.worker, s.remote);
        let mut evs = Vec::new();
        if delivered && rx.set_event() {
            evs.push(Event::Rx { handle: h });
        }
        if let Some(errno) = self.stack.take_error(flow) {
            evs.push(Event::SoftError { handle: h, errno });
        }
        if drained && txf.take_dequeue_notification() {
            evs.push(Event::TxSpace { handle: h });
        }
        if corrupt {
            s.dead = true;
            evs.push(Event::Reset {
                handle: h,
                errno: libc::EIO,
            });
        }
        for e in evs {
            self.post(app, worker, e);
        }
        for (dst, data) in looped {
            // Nobody there: a connected sender hears of it as from the
            // kernel's loopback (ICMP port unreachable: ECONNREFUSED).
            if !self.stack.udp_local(flow, dst, &data, now) && remote.map(sa_to_ep) == Some(dst) {
                self.post(
                    app,
                    worker,
                    Event::SoftError {
                        handle: h,
                        errno: libc::ECONNREFUSED,
                    },
                );
            }
        }
    }

    /// Disconnect an app: reset its connections towards their peers, reset
    /// cut-through peers, drop listeners, unmap its segments.
    pub fn remove_app(&mut self, app: AppId, now: Instant, tx: &mut dyn FrameTx) {
        self.remove_app_with(app, false, now, tx)
    }

    /// [`Engine::remove_app`]; with `drain`, the requests the app queued
    /// before it went (typically the close() of its connections on a
    /// graceful exit) are served first, so a closed session whose data is
    /// all in the transport finishes with FIN, not RST. Never for an app
    /// whose queues are corrupt.
    pub fn remove_app_with(&mut self, app: AppId, drain: bool, now: Instant, tx: &mut dyn FrameTx) {
        if drain {
            self.drain_app(app, 4096, now, tx);
            self.broken.retain(|a| *a != app);
        }
        let tokens: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.app == app)
            .map(|(t, _)| *t)
            .collect();
        for t in tokens {
            self.unbind(t);
        }
        // Leave the listen groups first so nothing new is handed to us.
        let ls: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.app == app)
            .map(|(h, _)| *h)
            .collect();
        for h in ls {
            self.remove_listener(h, now, tx);
        }
        let handles: Vec<u64> = self
            .app_sessions
            .get(&app)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut reset = 0;
        for h in handles {
            // Connections handed to the app that it never touched (still in
            // its accept queue when it exited) go to a sibling listener.
            if drain && self.untouched(h) && self.requeue(h).is_ok() {
                continue;
            }
            reset += 1;
            let net = match self.sess(h).map(|s| &s.kind) {
                Some(Kind::Net { flow, .. }) => Some(*flow),
                Some(Kind::Ct { .. }) => None,
                None => continue,
            };
            match net {
                Some(flow) => {
                    if self.stack.kind(flow) == Some(FlowKind::Tcp) {
                        if let Some(s) = self.stack.tcp(flow) {
                            s.abort();
                        }
                    }
                    self.stack.remove_flow(flow, now, tx);
                    self.free_session(h);
                }
                None => self.abort(h, now, tx),
            }
        }
        if reset > 0 {
            tracing::debug!(
                app = app.0,
                sessions = reset,
                "reset the sessions of a departed app"
            );
        }
        let cts: Vec<u32> = self
            .ct_segments
            .iter()
            .filter(|(_, c)| c.apps.0 == app || c.apps.1 == app)
            .map(|(id, _)| *id)
            .collect();
        for id in cts {
            if let Some(c) = self.ct_segments.remove(&id) {
                self.ct_by_pair.remove(&c.apps);
                // Tell the surviving app it can unmap the pair's segment.
                let other = if c.apps.0 == app { c.apps.1 } else { c.apps.0 };
                if let Some(o) = self.apps.get_mut(&other).filter(|_| other != app) {
                    o.ct_segments.retain(|s| *s != id);
                    let m = session_api::proto::DaemonCtrl::SegmentGone { segment: id }.encode();
                    use std::os::fd::AsFd;
                    let _ = session_api::shm::send_with_fds(o.ctrl.as_fd(), &m, &[]);
                }
            }
        }
        self.app_sessions.remove(&app);
        if self.apps.remove(&app).is_some() {
            tracing::info!(app = app.0, "app detached");
        }
    }

    /// Remove one worker of an app, closing its sessions and listeners.
    pub fn remove_worker(&mut self, app: AppId, worker: u32, now: Instant, tx: &mut dyn FrameTx) {
        let hs: Vec<u64> = self
            .app_sessions
            .get(&app)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for h in hs {
            if self.sess(h).is_some_and(|s| s.worker == worker) {
                self.abort(h, now, tx);
            }
        }
        let ls: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.app == app && l.worker == worker)
            .map(|(h, _)| *h)
            .collect();
        for h in ls {
            self.remove_listener(h, now, tx);
        }
        if let Some(a) = self.apps.get_mut(&app) {
            a.del_worker(worker);
        }
    }

    /// Session rows for `hoststackctl`.
    pub fn session_info(&mut self) -> Vec<SessionInfo> {
        let mut out = Vec::new();
        for (i, slot) in self.sessions.iter().enumerate() {
            let Some(s) = slot else { continue };
            let h = i as u64 | (self.sgen[i] as u64) << 32;
            let (path, state, rxf, txf) = match &s.kind {
                Kind::Net { flow, rx, tx } => (
                    "net",
                    self.stack
                        .flow_info(*flow)
                        .map(|f| f.state)
                        .unwrap_or_else(|| "closed".into()),
                    rx.len().unwrap_or(0),
                    tx.len().unwrap_or(0),
                ),
                Kind::Ct { peer } => (
                    "cut-through",
                    if peer.is_some() {
                        "connected".into()
                    } else {
                        "peer-closed".into()
                    },
                    0,
                    0,
                ),
            };
            out.push(SessionInfo {
                handle: h,
                app: s.app.0,
                worker: s.worker,
                proto: format!("{:?}", s.proto).to_lowercase(),
                path,
                state,
                local: s.local.map(|a| a.to_string()).unwrap_or_default(),
                remote: s.remote.map(|a| a.to_string()).unwrap_or_default(),
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                rx_fifo: rxf,
                tx_fifo: txf,
                fifo_cap: s.blk.cap,
            });
        }
        out
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.iter().filter(|s| s.is_some()).count()
    }

    /// Listeners: (handle, app, worker, address).
    pub fn listener_info(&self) -> Vec<(u64, u32, u32, String)> {
        self.listeners
            .iter()
            .map(|(h, l)| {
                let addr = self
                    .groups
                    .get(&l.group)
                    .map(|g| g.local.to_string())
                    .unwrap_or_default();
                (*h, l.app.0, l.worker, addr)
            })
            .collect()
    }
}

fn unspecified_like(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// The parent pid of `pid` (from /proc).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Run `f` on worker `w` of `app` and, if that left a wake-up pending
/// that was not before, list the worker for [`Engine::flush_wakes`].
fn track_wake<R>(
    wake_list: &mut Vec<(AppId, u32)>,
    app: AppId,
    w: &mut crate::app::Worker,
    f: impl FnOnce(&mut crate::app::Worker) -> R,
) -> R {
    let was = w.wake_due();
    let r = f(w);
    if !was && w.wake_due() {
        wake_list.push((app, w.index));
    }
    r
}

#[cfg(test)]
mod tests {
    //! The session layer driven without root, sockets or threads: an
    //! engine and a bare peer stack exchange frames in memory; the "app" is
    //! the test itself, speaking through the queues and FIFOs in its segment.
    use super::*;
    use crate::stack::{StackConfig, VecTx};
    use session_api::mq::{MqConsumer, MqProducer};
    use smoltcp::wire::{EthernetFrame, IpCidr, Ipv4Packet, TcpPacket};

    fn stack_cfg(last: u8, buf: usize) -> StackConfig {
        StackConfig {
            mac: [2, 0, 0, 0, 0, last],
            mtu: 1500,
            addrs: vec![IpCidr::new(IpAddress::v4(198, 18, 0, last), 24)],
            gateway4: None,
            gateway6: None,
            tcp_rx_buf: buf,
            tcp_tx_buf: buf,
            tcp_rx_buf_max: 0,
            tcp_rx_large_budget: 0,
            tcp_ack_delay: Some(Duration::from_millis(10)),
            tcp_ack_delay_max: Duration::from_millis(100),
            tcp_timestamps: true,
            tcp_loss_recovery: true,
            tcp_user_timeout: None,
            udp_packets: 16,
            udp_bytes: 65536,
            max_flows: 1000,
            seed: last as u64,
            tso: false,
        }
    }

    struct Bench {
        e: Engine,
        peer: Stack,
        now: Instant,
        app: AppId,
        req: MqProducer,
        evt: MqConsumer,
        _ctrl: std::os::unix::net::UnixStream,
        /// TCP segments the engine sent to the peer: (SYN or FIN, payload).
        out_log: Vec<(bool, usize)>,
    }

    impl Bench {
        /// A second app in the same namespace (and its end of the control
        /// socket, to keep while it lives).
        fn other_app(&mut self) -> (AppId, std::os::unix::net::UnixStream) {
            let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
            let id = self
                .e
                .add_app("u".into(), "default".into(), 2, x.into())
                .unwrap();
            (id, y)
        }

        fn new(fifo: u32, rxbuf: usize) -> Self {
            let now = Instant::from_millis(1);
            let stack = Stack::new(stack_cfg(1, rxbuf), now);
            let mut e = Engine::new(
                stack,
                SessionConfig {
                    fifo_size: fifo,
                    ct_fifo_size: fifo,
                    segment_size: 8 << 20,
                    ct_segment_size: 8 << 20,
                    connect_timeout: Duration::from_secs(5),
                    max_sessions_per_app: 100,
                },
            );
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let app = e
                .add_app("t".into(), "default".into(), 1, a.into())
                .unwrap();
            let a = e.apps.get_mut(&app).unwrap();
            let w = a.add_worker().unwrap();
            let off = a.workers[w as usize].as_ref().unwrap().q_off as usize;
            let base = a.segments[&a.main_segment].region.as_ptr();
            let rq = session_api::mq::mq_footprint(crate::app::REQ_SLOTS);
            // SAFETY: the queues lie in the app's segment, which the engine
            // keeps mapped for the whole test.
            let (req, evt) = unsafe {
                (
                    MqProducer::new(base.add(off), crate::app::REQ_SLOTS),
                    MqConsumer::new(base.add(off + rq), crate::app::EVT_SLOTS),
                )
            };
            Bench {
                e,
                peer: Stack::new(stack_cfg(2, 65536), now),
                now,
                app,
                req,
                evt,
                _ctrl: b,
                out_log: Vec::new(),
            }
        }

        fn request(&mut self, r: Request) {
            self.req.try_send(&r.encode()).unwrap();
            let mut tx = VecTx::default();
            self.e.drain_requests(self.now, &mut tx);
            self.deliver(tx.0, Vec::new());
        }

        fn events(&mut self) -> Vec<Event> {
            let mut v = Vec::new();
            while let Some(m) = self.evt.try_recv().unwrap() {
                v.push(Event::decode(&m).unwrap());
            }
            v
        }

        /// Exchange frames until both sides are quiet.
        fn deliver(&mut self, mut to_peer: Vec<Vec<u8>>, mut to_e: Vec<Vec<u8>>) {
            for _ in 0..1000 {
                if to_peer.is_empty() && to_e.is_empty() {
                    return;
                }
                let mut te = VecTx::default();
                let mut tp = VecTx::default();
                for f in to_e.drain(..) {
                    self.e.ingress(self.now, &f, false, &mut te);
                }
                self.e.service_touched(self.now, &mut te);
                for f in to_peer.iter() {
                    let seg = EthernetFrame::new_checked(&f[..])
                        .ok()
                        .and_then(|e| {
                            Some(
                                Ipv4Packet::new_checked(e.payload())
                                    .ok()?
                                    .payload()
                                    .to_vec(),
                            )
                        })
                        .and_then(|ip| {
                            let t = TcpPacket::new_checked(&ip[..]).ok()?;
                            Some((t.syn() || t.fin(), t.payload().len()))
                        });
                    self.out_log.extend(seg);
                }
                for f in to_peer.drain(..) {
                    self.peer.ingress(self.now, &f, false, &mut tp);
                }
                let mut t = Vec::new();
                self.peer.take_touched(&mut t);
                for id in t {
                    self.peer.egress(id, self.now, &mut tp);
                }
                self.now += Duration::from_micros(50);
                to_peer = te.0;
                to_e = tp.0;
            }
        }

        /// Listen on port 80, let the peer connect, and return the peer's
        /// flow, the accepted session's handle, its segment's base and
        /// descriptor offset, and the descriptor.
        fn accept(&mut self) -> (FlowId, u64, *mut u8, u32, SessionDesc) {
            self.request(Request::Listen {
                req_id: 1,
                proto: Proto::Tcp,
                local: "0.0.0.0:80".parse().unwrap(),
                backlog: 8,
                flags: LISTEN_SHARED,
            });
            assert!(matches!(self.events()[..], [Event::Reply { errno: 0, .. }]));
            let f = self
                .peer
                .connect(
                    IpEndpoint::new(IpAddress::v4(198, 18, 0, 1), 80),
                    None,
                    1,
                    self.now,
                )
                .unwrap();
            let mut tp = VecTx::default();
            self.peer.egress(f, self.now, &mut tp);
            self.deliver(Vec::new(), tp.0);
            self.tick(5);
            let (handle, seg, desc) = match self.events()[..] {
                [Event::Accepted {
                    handle,
                    segment,
                    desc,
                    ..
                }] => (handle, segment, desc),
                ref other => panic!("expected Accepted, got {other:?}"),
            };
            let region = self.e.apps[&self.app].segments[&seg].region.as_ptr();
            let mut db = [0u8; SESSION_DESC_SIZE_T];
            // SAFETY: the descriptor lies in the segment the engine wrote it
            // to, which stays mapped for the test.
            unsafe {
                std::ptr::copy_nonoverlapping(region.add(desc as usize), db.as_mut_ptr(), db.len())
            };
            (
                f,
                handle,
                region,
                desc,
                SessionDesc::from_bytes(&db).unwrap(),
            )
        }

        fn tick(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
            let mut te = VecTx::default();
            let mut tp = VecTx::default();
            self.e.poll_timers(self.now, &mut te);
            self.peer.poll_timers(self.now, &mut tp);
            self.deliver(te.0, tp.0);
        }
    }

    #[test]
    fn listen_existing_joins_a_group_and_never_creates_one() {
        let mut b = Bench::new(4096, 8192);
        let me = b.app;
        let (other, _ctrl) = b.other_app();
        let a: SocketAddr = "198.18.0.1:5100".parse().unwrap();
        let join = LISTEN_JOIN | LISTEN_SHARED | LISTEN_EXISTING;
        // Nobody listens there: no group appears.
        assert_eq!(
            b.e.listen(other, 0, a, 8, join).map(|_| ()),
            Err(libc::ENOENT)
        );
        assert_eq!(
            b.e.listen(other, 0, a, 8, join).map(|_| ()),
            Err(libc::ENOENT)
        );
        // Someone does (not shared): the flag joins it anyway, as
        // LISTEN_JOIN does, and the address stays one group.
        let (h1, ..) = b.e.listen(me, 0, a, 8, 0).unwrap();
        let (h2, ..) = b.e.listen(other, 0, a, 8, join).unwrap();
        assert_eq!(b.e.listeners[&h1].group, b.e.listeners[&h2].group);
    }

    #[test]
    fn a_bound_address_is_held_until_given_back_and_ephemeral_ports_avoid_it() {
        let mut b = Bench::new(4096, 8192);
        let me = b.app;
        let (other, _ctrl) = b.other_app();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let a = sa("198.18.0.1:5000");
        let (got, t) = b.e.bind_check(me, a, BIND_RESERVE).unwrap();
        assert_eq!(got, a);
        assert_ne!(t, 0);
        // Held against other binds of the address, its wildcard, and a
        // dual-stack IPv6 wildcard; not against another port or a v6-only
        // wildcard.
        for (addr, flags) in [
            ("198.18.0.1:5000", 0),
            ("0.0.0.0:5000", 0),
            ("[::]:5000", 0),
        ] {
            assert_eq!(
                b.e.bind_check(other, sa(addr), flags),
                Err(libc::EADDRINUSE),
                "{addr}"
            );
        }
        assert!(b.e.bind_check(other, sa("198.18.0.1:5001"), 0).is_ok());
        assert!(b
            .e
            .bind_check(other, sa("[::]:5000"), LISTEN_V6ONLY)
            .is_ok());
        // Without a reservation of its own, a listen on it fails too.
        assert_eq!(
            b.e.listen(other, 0, a, 8, 0).map(|_| ()),
            Err(libc::EADDRINUSE)
        );
        // A token nobody was given changes nothing; the real one frees it.
        b.e.unbind(t ^ 1);
        assert_eq!(b.e.bind_check(other, a, 0), Err(libc::EADDRINUSE));
        b.e.unbind(t);
        assert!(b.e.bind_check(other, a, 0).is_ok());

        // Both SO_REUSEADDR: both may hold it; the first listen takes it
        // and then binds conflict again.
        let (_, t1) =
            b.e.bind_check(me, a, BIND_RESERVE | BIND_REUSEADDR)
                .unwrap();
        let (_, t2) =
            b.e.bind_check(other, a, BIND_RESERVE | BIND_REUSEADDR)
                .unwrap();
        assert_eq!(
            b.e.bind_check(other, a, BIND_RESERVE),
            Err(libc::EADDRINUSE)
        );
        b.e.unbind(t2);
        assert!(b.e.listen(other, 0, a, 8, 0).is_ok());
        assert_eq!(
            b.e.bind_check(me, a, BIND_REUSEADDR),
            Err(libc::EADDRINUSE),
            "a listener beats SO_REUSEADDR"
        );
        b.e.unbind(t1);

        // Ephemeral ports step over a reserved one.
        let p = b.e.stack.alloc_port().unwrap();
        let next = if p == 65535 { 49152 } else { p + 1 };
        let after = if next == 65535 { 49152 } else { next + 1 };
        let (_, t3) =
            b.e.bind_check(me, SocketAddr::new(a.ip(), next), BIND_RESERVE)
                .unwrap();
        assert_eq!(b.e.stack.alloc_port().unwrap(), after);
        // Port 0 is a fresh port each time while the earlier ones are held.
        let any = sa("0.0.0.0:0");
        let ports: std::collections::HashSet<u16> = (0..100)
            .map(|_| b.e.bind_check(me, any, BIND_RESERVE).unwrap().0.port())
            .collect();
        assert_eq!(ports.len(), 100);
        assert!(!ports.contains(&next));

        // An app that leaves gives back everything it held.
        let mut tx = VecTx::default();
        b.e.remove_app(me, b.now, &mut tx);
        assert!(b
            .e
            .bind_check(other, SocketAddr::new(a.ip(), next), 0)
            .is_ok());
        let _ = t3;
        for p in &ports {
            assert!(b
                .e
                .bind_check(other, SocketAddr::new(a.ip(), *p), 0)
                .is_ok());
        }

        // Bounded per app.
        for i in 0..MAX_RESERVATIONS_PER_APP {
            assert!(b.e.bind_check(other, any, BIND_RESERVE).is_ok(), "{i}");
        }
        assert_eq!(b.e.bind_check(other, any, BIND_RESERVE), Err(libc::ENOBUFS));
    }

    #[test]
    fn slow_reader_closes_the_window_and_loses_nothing() {
        const FIFO: u32 = 4096;
        const RXBUF: usize = 8192;
        let mut b = Bench::new(FIFO, RXBUF);
        let (f, handle, region, _, d) = b.accept();
        // SAFETY: the rx FIFO lies in the segment, mapped for the test.
        let mut rx = unsafe { FifoConsumer::new(region.add(d.rx_off as usize), d.rx_cap) };

        // The peer has 64 KiB to send; the app does not read yet.
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut sent = 0;
        for _ in 0..50 {
            let s = b.peer.tcp(f).unwrap();
            sent += s.send_slice(&data[sent..]).unwrap();
            let mut tp = VecTx::default();
            b.peer.egress(f, b.now, &mut tp);
            b.deliver(Vec::new(), tp.0);
            b.tick(2);
        }
        // Only FIFO + smoltcp buffer worth of data left the peer's buffer:
        // the advertised window closed instead of data being dropped or
        // buffered without bound.
        let buffered = rx.len().unwrap() as usize;
        assert_eq!(buffered, FIFO as usize, "the app's FIFO is full");
        let delivered = sent - b.peer.tcp(f).unwrap().send_queue();
        assert!(
            delivered <= FIFO as usize + RXBUF,
            "{delivered} bytes accepted with a full FIFO"
        );
        assert!(
            b.peer.tcp(f).unwrap().send_queue() > 0,
            "sender must be stalled"
        );

        // Now read slowly; every read that drains tells the daemon.
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        for _ in 0..10_000 {
            if got.len() == data.len() {
                break;
            }
            rx.clear_event();
            let n = rx.dequeue(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            if rx.take_dequeue_notification() {
                b.request(Request::RxDrained { handle });
            }
            let s = b.peer.tcp(f).unwrap();
            if sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            let mut tp = VecTx::default();
            b.peer.egress(f, b.now, &mut tp);
            b.deliver(Vec::new(), tp.0);
            b.tick(1);
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes must arrive intact and in order");
    }

    #[test]
    fn a_sleeping_app_is_woken_once_per_pass_after_the_batch() {
        let mut b = Bench::new(4096, 8192);
        assert!(b.evt.prepare_sleep(), "nothing queued yet");
        for (i, port) in [81u16, 82, 83].into_iter().enumerate() {
            b.req
                .try_send(
                    &Request::Listen {
                        req_id: i as u32 + 1,
                        proto: Proto::Tcp,
                        local: format!("0.0.0.0:{port}").parse().unwrap(),
                        backlog: 8,
                        flags: LISTEN_SHARED,
                    }
                    .encode(),
                )
                .unwrap();
        }
        let mut tx = VecTx::default();
        b.e.drain_requests(b.now, &mut tx);
        let w = |b: &mut Bench| {
            b.e.apps
                .get_mut(&b.app)
                .unwrap()
                .worker(0)
                .unwrap()
                .app_wake
                .drain()
        };
        // Three replies queued, no wake-up yet: the app would otherwise run
        // (on a shared CPU, preempting the daemon) after the first one.
        assert_eq!(w(&mut b), 0, "woken before the pass ended");
        b.e.flush_wakes();
        assert_eq!(w(&mut b), 1, "one wake-up for the whole batch");
        b.e.flush_wakes();
        assert_eq!(w(&mut b), 0, "and only one");
        assert_eq!(b.events().len(), 3);
    }

    #[test]
    fn events_wake_only_the_channel_their_session_names() {
        let mut b = Bench::new(4096, 8192);
        let (f, _, region, desc, d) = b.accept();
        let (c1, c2) = {
            let w = b.e.apps.get_mut(&b.app).unwrap().worker(0).unwrap();
            let c1 = w.add_channel().unwrap().unwrap().0 as u8;
            let c2 = w.add_channel().unwrap().unwrap().0 as u8;
            (c1, c2)
        };
        assert_ne!(c1, c2);
        // SAFETY: the descriptor lies in the segment, mapped for the test.
        let chan_byte = unsafe {
            &*region
                .add(desc as usize + session_api::msg::DESC_CHANNEL_OFF)
                .cast::<std::sync::atomic::AtomicU8>()
        };
        // SAFETY: the rx FIFO lies in the same segment.
        let mut rx = unsafe { FifoConsumer::new(region.add(d.rx_off as usize), d.rx_cap) };
        // Eventfd counts: (global, c1, c2).
        let wakes = |b: &mut Bench| {
            b.e.flush_wakes();
            let w = b.e.apps.get_mut(&b.app).unwrap().worker(0).unwrap();
            let ch = |c: u8| w.channels[c as usize].as_ref().unwrap().drain();
            (w.app_wake.drain(), ch(c1), ch(c2))
        };
        let mut round = |b: &mut Bench, chan: u8, global: bool| {
            chan_byte.store(chan, std::sync::atomic::Ordering::Relaxed);
            assert!(b.evt.prepare_sleep_channel(c1));
            assert!(b.evt.prepare_sleep_channel(c2));
            if global {
                assert!(b.evt.prepare_sleep());
            }
            b.peer.tcp(f).unwrap().send_slice(b"ping").unwrap();
            let mut tp = VecTx::default();
            b.peer.egress(f, b.now, &mut tp);
            b.deliver(Vec::new(), tp.0);
            // Past the delayed ACK, so the peer's next send is not held
            // back by Nagle.
            b.tick(20);
            let woke = wakes(b);
            let evs = b.events();
            assert!(matches!(evs[..], [Event::Rx { .. }]), "{evs:?} {woke:?}");
            b.evt.cancel_sleep();
            b.evt.cancel_sleep_channel(c1);
            b.evt.cancel_sleep_channel(c2);
            rx.clear_event();
            let mut buf = [0u8; 16];
            assert_eq!(rx.dequeue(&mut buf).unwrap(), 4);
            woke
        };
        // The session names c2: only c2's thread wakes.
        assert_eq!(round(&mut b, c2, false), (0, 0, 1));
        assert_eq!(round(&mut b, c1, false), (0, 1, 0));
        // No channel, or one that does not exist: every sleeper.
        assert_eq!(round(&mut b, 0, false), (0, 1, 1));
        assert_eq!(round(&mut b, 200, true), (1, 1, 1));
        // A channel given back is no longer written (its sleepers count as
        // unknown: everyone wakes).
        b.e.apps
            .get_mut(&b.app)
            .unwrap()
            .worker(0)
            .unwrap()
            .del_channel(c2 as u32);
        chan_byte.store(c2, std::sync::atomic::Ordering::Relaxed);
        assert!(b.evt.prepare_sleep_channel(c1));
        b.peer.tcp(f).unwrap().send_slice(b"ping").unwrap();
        let mut tp = VecTx::default();
        b.peer.egress(f, b.now, &mut tp);
        b.deliver(Vec::new(), tp.0);
        b.tick(20);
        b.e.flush_wakes();
        let w = b.e.apps.get_mut(&b.app).unwrap().worker(0).unwrap();
        assert_eq!(w.channels[c1 as usize].as_ref().unwrap().drain(), 1);
    }

    #[test]
    fn a_reply_closed_at_once_leaves_with_its_fin_in_one_segment() {
        // Connection: close: the app writes the response and closes in the
        // same batch; the data and the FIN share a segment (one frame less
        // per connection for the peer and for the daemon).
        let mut b = Bench::new(4096, 8192);
        let (f, handle, region, _, d) = b.accept();
        // SAFETY: the tx FIFO lies in the segment, mapped for the test.
        let mut tx = unsafe { FifoProducer::new(region.add(d.tx_off as usize), d.tx_cap) };
        assert_eq!(tx.enqueue(b"HTTP/1.1 200 OK\r\n\r\n").unwrap(), 19);
        for r in [Request::Tx { handle }, Request::Close { handle }] {
            b.req.try_send(&r.encode()).unwrap();
        }
        let mut out = VecTx::default();
        b.e.drain_requests(b.now, &mut out);
        let segs: Vec<(bool, usize)> = out
            .0
            .iter()
            .filter_map(|fr| {
                let eth = EthernetFrame::new_checked(&fr[..]).ok()?;
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                Some((tcp.fin(), tcp.payload().len()))
            })
            .collect();
        assert_eq!(segs, vec![(true, 19)], "one segment with the data and FIN");
        b.deliver(out.0, Vec::new());
        let mut buf = [0u8; 64];
        let n = b.peer.tcp(f).unwrap().recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(!b.peer.tcp(f).unwrap().may_recv(), "FIN seen");
    }

    #[test]
    fn the_delayed_ack_stretches_to_a_slow_app_and_shrinks_for_a_split_request() {
        let mut b = Bench::new(4096, 8192);
        let (f, handle, region, _, d) = b.accept();
        // SAFETY: both FIFOs lie in the segment, mapped for the test.
        let (mut rx, mut tx) = unsafe {
            (
                FifoConsumer::new(region.add(d.rx_off as usize), d.rx_cap),
                FifoProducer::new(region.add(d.tx_off as usize), d.tx_cap),
            )
        };
        let send = |b: &mut Bench, data: &[u8]| {
            b.peer.tcp(f).unwrap().send_slice(data).unwrap();
            let mut tp = VecTx::default();
            b.peer.egress(f, b.now, &mut tp);
            b.deliver(Vec::new(), tp.0);
        };
        let pure_acks = |b: &Bench| b.out_log.iter().filter(|s| **s == (false, 0)).count();
        // Milliseconds until the engine sends a pure ACK (at most `limit`).
        let ack_after = |b: &mut Bench, limit: u64| {
            (1..=limit).find(|_| {
                b.tick(1);
                pure_acks(b) > 0
            })
        };
        let mut answer = |b: &mut Bench| {
            let mut buf = [0u8; 64];
            while rx.dequeue(&mut buf).unwrap() > 0 {}
            tx.enqueue(b"answer").unwrap();
            b.request(Request::Tx { handle });
            let mut got = [0u8; 64];
            assert_eq!(b.peer.tcp(f).unwrap().recv_slice(&mut got).unwrap(), 6);
            b.tick(20); // the peer's ACK of the answer; nothing from us
        };

        // The app answers 40 ms after each request. The first request gets
        // a pure ACK at 10 ms; once the daemon has seen the app's pace, the
        // answers carry the ACK.
        let mut acks = Vec::new();
        for _ in 0..3 {
            b.out_log.clear();
            send(&mut b, b"request");
            b.tick(40);
            acks.push(pure_acks(&b));
            answer(&mut b);
        }
        assert_eq!(acks, [1, 0, 0], "pure ACKs before each answer");

        // A peer that holds the rest of its request until it sees an ACK
        // (Nagle): it waits out the stretched delay once; the answer after
        // a second piece sets the delay back to 10 ms for the next one.
        b.out_log.clear();
        send(&mut b, b"first half");
        let waited = ack_after(&mut b, 100).expect("no ACK of a split request");
        assert!((40..=60).contains(&waited), "ACK after {waited} ms");
        send(&mut b, b"second half");
        answer(&mut b);
        b.out_log.clear();
        send(&mut b, b"first half");
        let waited = ack_after(&mut b, 100).expect("no ACK of a split request");
        assert!(waited <= 11, "ACK after {waited} ms");
        send(&mut b, b"second half");
        answer(&mut b);
    }

    #[test]
    fn requests_for_handles_of_other_apps_are_refused() {
        let mut b = Bench::new(4096, 8192);
        // A made-up handle and a listener handle the app does not own.
        b.request(Request::Close { handle: 12345 });
        b.request(Request::Abort {
            handle: LISTEN_BIT | 7,
        });
        b.request(Request::Unlisten {
            handle: LISTEN_BIT | 7,
        });
        assert_eq!(b.e.stats.bad_requests, 3);
        assert!(b.e.take_broken().is_empty(), "bad handles are not fatal");
        // Garbage in the queue is fatal for that app only.
        b.req
            .try_send(&session_api::mq::RawMsg([0xee; 64]))
            .unwrap();
        let mut tx = VecTx::default();
        b.e.drain_requests(b.now, &mut tx);
        assert_eq!(b.e.take_broken(), vec![b.app]);
    }

    const SESSION_DESC_SIZE_T: usize = session_api::msg::SESSION_DESC_SIZE;
}
