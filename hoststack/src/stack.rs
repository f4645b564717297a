//! The transport core: one smoltcp `Interface` and one small `SocketSet` per
//! flow, with our own flow table.
//!
//! smoltcp walks every socket of a set for each packet, so one set for all
//! connections makes per-packet cost grow with the number of connections. We
//! instead parse each frame's 4-tuple with `smoltcp::wire`, find the flow's own
//! set, and feed the single frame to `poll_ingress_single` with a one-packet
//! device. Frames that match no flow (ARP, NDP, ICMP echo, a segment for a
//! closed port) go through an empty set, so smoltcp answers like a normal host
//! (ARP/NDP replies, echo replies, RST, port unreachable).
//!
//! smoltcp has no listen backlog (one socket is one connection): a SYN for a
//! listening port that matches no flow gets a fresh listening socket in its own
//! set, bounded by the listener's backlog.
//!
//! This module is sans-IO: frames come in as byte slices and go out through a
//! [`FrameTx`], time is passed in. It is driven by the daemon's event loop and
//! by unit tests that wire two stacks together.

use crate::bufpool::{Lease, Pool};
use crate::frag;
use crate::recovery::{self, Recovery};
use crate::timers::Wheel;
use session_api::fasthash::FastSet;
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};
use std::collections::{HashMap, HashSet};

/// Where the stack writes outgoing Ethernet frames.
pub trait FrameTx {
    /// A buffer of exactly `len` bytes for one outgoing frame.
    fn tx_frame(&mut self, len: usize) -> &mut [u8];
    /// The same for a TCP super-frame the device must cut into `gso`-byte
    /// segments (only produced when the stack was built with `tso`).
    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        let _ = gso;
        self.tx_frame(len)
    }
}

impl<T: crate::uplink::Uplink + ?Sized> FrameTx for T {
    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        crate::uplink::Uplink::tx_frame(self, len)
    }
    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        crate::uplink::Uplink::tx_frame_gso(self, len, gso)
    }
}

/// Errors from stack operations requested by apps.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum StackError {
    /// Address/port already has a listener or bound socket.
    #[error("address in use")]
    AddrInUse,
    /// The local address is not one of the interface's.
    #[error("address not available")]
    AddrNotAvail,
    /// No ephemeral port left.
    #[error("no free local port")]
    NoPorts,
    /// No route / unsupported address.
    #[error("network unreachable")]
    Unreachable,
    /// Invalid argument (port 0 for connect, etc.).
    #[error("invalid argument")]
    Invalid,
    /// Flow limit reached.
    #[error("too many flows")]
    TooMany,
}

impl StackError {
    /// The errno a kernel socket reports in the same situation.
    pub fn errno(self) -> i32 {
        match self {
            StackError::AddrInUse => libc::EADDRINUSE,
            StackError::AddrNotAvail => libc::EADDRNOTAVAIL,
            StackError::NoPorts => libc::EAGAIN,
            StackError::Unreachable => libc::ENETUNREACH,
            StackError::Invalid => libc::EINVAL,
            StackError::TooMany => libc::ENOBUFS,
        }
    }
}

/// Identifies a flow: slot index plus generation, so a stale id never
/// reaches a recycled slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    idx: u32,
    gen: u32,
}

/// Identifies a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub u32);

/// Sizing and addressing of the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Our MAC address.
    pub mac: [u8; 6],
    /// IP MTU of the uplink.
    pub mtu: usize,
    /// Addresses (with prefix) the daemon owns.
    pub addrs: Vec<IpCidr>,
    /// IPv4 default gateway.
    pub gateway4: Option<smoltcp::wire::Ipv4Address>,
    /// IPv6 default gateway.
    pub gateway6: Option<smoltcp::wire::Ipv6Address>,
    /// smoltcp receive buffer per TCP connection (the advertised window).
    pub tcp_rx_buf: usize,
    /// smoltcp send buffer per TCP connection.
    pub tcp_tx_buf: usize,
    /// Receive buffer (and so window) a TCP connection gets instead of
    /// `tcp_rx_buf` while the larger buffers lent stay within
    /// `tcp_rx_large_budget` bytes (at or below `tcp_rx_buf`: off).
    pub tcp_rx_buf_max: usize,
    /// Bytes of `tcp_rx_buf_max` buffers lent at once, at most.
    pub tcp_rx_large_budget: usize,
    /// Delayed-ACK timer (`None`: ACK every segment at once).
    pub tcp_ack_delay: Option<Duration>,
    /// Longest delayed ACK when the session layer stretches it to the
    /// app's answer time (not above `tcp_ack_delay`: fixed).
    pub tcp_ack_delay_max: Duration,
    /// Answer a peer's timestamp option (RFC 7323), as Linux does.
    pub tcp_timestamps: bool,
    /// Loss recovery smoltcp lacks (tail-loss probes, NewReno partial ACKs;
    /// see [`crate::recovery`]).
    pub tcp_loss_recovery: bool,
    /// Abort a connection whose peer stays silent this long while data
    /// waits to be acknowledged (Linux gives up after `tcp_retries2`, about
    /// 15 minutes); a socket's own `TCP_USER_TIMEOUT` or keepalive replaces
    /// it. None: never.
    pub tcp_user_timeout: Option<Duration>,
    /// UDP buffers: packets and bytes.
    pub udp_packets: usize,
    /// UDP payload bytes buffered per socket and direction.
    pub udp_bytes: usize,
    /// Upper bound on flows (TCP connections + UDP sockets).
    pub max_flows: usize,
    /// Random seed (ISNs, ephemeral ports).
    pub seed: u64,
    /// The device segments TCP super-frames (IPv4 and IPv6) and fills TCP
    /// checksums.
    pub tso: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TcpKey {
    local: IpAddress,
    lport: u16,
    remote: IpAddress,
    rport: u16,
}

/// What a flow carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    /// TCP connection (passive if `listener` is set).
    Tcp,
    /// UDP socket bound to a port.
    Udp,
}

struct Flow {
    gen: u32,
    kind: FlowKind,
    set: SocketSet<'static>,
    handle: SocketHandle,
    key: Option<TcpKey>,
    udp_port: Option<u16>,
    /// Set once the UDP socket is connected: (remote, local port).
    udp_remote: Option<(IpEndpoint, u16)>,
    listener: Option<ListenerId>,
    /// Opaque owner token (the session id), set by the session layer.
    owner: u64,
    /// The earliest timer we queued for this flow.
    timer: Option<Instant>,
    /// Pool buffers lent to the socket in `set` (TCP).
    lease: Option<Lease>,
    /// TCP loss recovery state (see [`crate::recovery`]).
    rec: Recovery,
    /// An ICMP error about this connection's SYN, as an errno.
    error: Option<i32>,
    /// Keepalive settings (TCP).
    keepalive: Option<KeepAlive>,
    /// The socket's own user timeout (TCP_USER_TIMEOUT).
    user_timeout: Option<Duration>,
    /// When the peer last sent us anything (TCP, with keepalive on).
    last_rx: Instant,
    /// The socket closed in a timer pass, not on a segment from the peer:
    /// it gave up on a silent peer (ETIMEDOUT, not ECONNRESET).
    timed_out: bool,
}

/// TCP keepalive as Linux runs it (`SO_KEEPALIVE`, `TCP_KEEPIDLE`,
/// `TCP_KEEPINTVL`, `TCP_KEEPCNT`): after `idle` without hearing from the
/// peer, a probe every `interval`; after `probes` unanswered ones the
/// connection is dropped with ETIMEDOUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes before giving up.
    pub probes: u32,
}

/// Push a flow's keepalive and timeout settings into its smoltcp socket
/// (before each timer pass and after each arrival).
///
/// smoltcp has one keepalive interval, and aborts a connection after
/// `timeout` of silence from the peer whether or not anything waits for
/// it. With keepalive the interval is `idle` until the connection has been
/// silent that long, then `interval` (switched here, and back on each
/// arrival), and the timeout is `idle + interval * probes` (or the user
/// timeout): the probes and the verdict (smoltcp then sends a RST, as
/// Linux does) fall where Linux's would. Without keepalive, as in Linux,
/// only a connection with data waiting to be acknowledged times out: the
/// timeout is set only while the send queue holds some, so an idle
/// connection lives on however long both ends stay quiet.
fn apply_timeouts(f: &mut Flow, default_timeout: Option<Duration>, now: Instant) {
    if f.kind != FlowKind::Tcp {
        return;
    }
    let sock = f.set.get_mut::<tcp::Socket>(f.handle);
    let timeout = match f.keepalive {
        Some(k) => Some(f.user_timeout.unwrap_or(k.idle + k.interval * k.probes)),
        None if sock.send_queue() > 0 => f.user_timeout.or(default_timeout),
        None => None,
    };
    if sock.timeout() != timeout {
        sock.set_timeout(timeout);
    }
    if f.keepalive.is_none() && sock.keep_alive().is_none() {
        return;
    }
    let every = f.keepalive.map(|k| {
        if now >= f.last_rx + k.idle {
            k.interval
        } else {
            k.idle
        }
    });
    if sock.keep_alive() != every {
        sock.set_keep_alive(every);
    }
}

/// TCP timestamp clock (RFC 7323): milliseconds from an offset drawn at
/// the first stack's creation. Peers use timestamps for PAWS, and a Linux
/// client may reuse a port it holds in TIME-WAIT for a new connection to
/// us (`tcp_tw_reuse`) only if the old connection had them: without, a
/// client opening many short connections runs out of ports (10 000
/// connection benchmark runs back to back left wrk scanning the port range
/// inside connect() for seconds).
fn tsval() -> u32 {
    static START: std::sync::OnceLock<(std::time::Instant, u32)> = std::sync::OnceLock::new();
    let (t0, offset) = START.get_or_init(|| {
        // Random keys: the offset does not tell the daemon's uptime.
        let r = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0u8);
        (std::time::Instant::now(), r as u32)
    });
    offset.wrapping_add(t0.elapsed().as_millis() as u32)
}

/// Which IP versions a listener takes connections for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenFamily {
    /// IPv4 and IPv6 (an IPv6 wildcard without IPV6_V6ONLY).
    Any,
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
}

impl ListenFamily {
    fn takes(self, a: IpAddress) -> bool {
        matches!(
            (self, a),
            (ListenFamily::Any, _)
                | (ListenFamily::V4, IpAddress::Ipv4(_))
                | (ListenFamily::V6, IpAddress::Ipv6(_))
        )
    }

    fn overlaps(self, other: ListenFamily) -> bool {
        self == ListenFamily::Any || other == ListenFamily::Any || self == other
    }
}

/// A bound UDP socket: datagrams to its port on `addr` (any local address
/// of `family` when `None`) go to flow `id`.
#[derive(Debug, Clone, Copy)]
struct UdpBind {
    id: FlowId,
    addr: Option<IpAddress>,
    family: ListenFamily,
}

impl UdpBind {
    /// Would it take some of the datagrams a socket on (`addr`, `family`)
    /// would? Two addresses must be equal; a wildcard covers its family.
    fn overlaps(&self, addr: Option<IpAddress>, family: ListenFamily) -> bool {
        match (self.addr, addr) {
            (Some(a), Some(b)) => a == b,
            (Some(a), None) => family.takes(a),
            (None, Some(b)) => self.family.takes(b),
            (None, None) => self.family.overlaps(family),
        }
    }
}

/// The socket bound on a port that takes a datagram to `dst`: the one on
/// that exact address, else a wildcard of its family.
fn udp_pick(binds: &[UdpBind], dst: IpAddress) -> Option<FlowId> {
    binds
        .iter()
        .find(|b| b.addr == Some(dst))
        .or_else(|| {
            binds
                .iter()
                .find(|b| b.addr.is_none() && b.family.takes(dst))
        })
        .map(|b| b.id)
}

struct Listener {
    local: Option<IpAddress>,
    family: ListenFamily,
    port: u16,
    backlog: u32,
    pending: u32,
    owner: u64,
}

/// Counters shown by `hoststackctl`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StackStats {
    /// Frames fed to the stack.
    pub rx_frames: u64,
    /// Frames that matched a flow.
    pub rx_flow_hits: u64,
    /// Frames handled by the empty set (ARP, ICMP, RST for closed ports...).
    pub rx_other: u64,
    /// SYNs dropped because the listener's backlog was full.
    pub syn_backlog_drops: u64,
    /// Connections dropped because the peer fell silent (keepalive probes
    /// unanswered, or the user timeout with data unacknowledged).
    pub tcp_timeouts: u64,
    /// ICMP errors reported to connected UDP sockets.
    pub udp_icmp_errors: u64,
    /// Frames emitted.
    pub tx_frames: u64,
    /// Passive connections created.
    pub passive_opens: u64,
    /// Active connections created.
    pub active_opens: u64,
    /// Frames dropped for a bad IP/TCP/UDP checksum.
    pub rx_bad_checksum: u64,
    /// Segments retransmitted early on the stack's own loss decision (probe
    /// timeouts and partial ACKs, see [`crate::recovery`]).
    pub tcp_early_retransmits: u64,
    /// TCP connections given the larger receive buffer (`tcp_rx_buf_max`).
    pub tcp_rx_large: u64,
    /// Bytes of larger receive buffers lent now (at most the budget).
    pub tcp_rx_large_bytes: u64,
    /// IP fragments received and datagrams reassembled (see [`crate::frag`]).
    pub frag: frag::FragStats,
    /// UDP datagrams to our own addresses delivered locally.
    pub udp_local: u64,
    /// Connects failed by an ICMP error (host, network or port unreachable).
    pub icmp_connect_errors: u64,
    /// ... dropped for want of a socket bound there.
    pub udp_local_unreachable: u64,
}

/// The stack.
pub struct Stack {
    iface: Interface,
    empty: SocketSet<'static>,
    flows: Vec<Option<Flow>>,
    free: Vec<u32>,
    gens: Vec<u32>,
    nflows: usize,
    tcp: HashMap<TcpKey, FlowId>,
    /// Bound (unconnected) UDP sockets by port: one per address, or per
    /// family for wildcards (an IPv4 and a v6-only IPv6 socket may share a
    /// port, as in Linux).
    udp: HashMap<u16, Vec<UdpBind>>,
    /// Connected UDP sockets by (remote, local port): they take their
    /// peer's datagrams before the port's unconnected socket does.
    udp_conn: HashMap<(IpEndpoint, u16), FlowId>,
    /// Local ports of `udp_conn` entries, with their counts.
    udp_conn_ports: HashMap<u16, usize>,
    listeners: Vec<Option<Listener>>,
    listen_ports: HashMap<u16, Vec<ListenerId>>,
    used_ports: HashSet<u16>,
    /// Ports bound by sockets that neither listen nor connect yet (the
    /// session layer's reservations), with how many hold each: ephemeral
    /// ports avoid them.
    reserved_ports: HashMap<u16, usize>,
    next_port: u16,
    /// Flow deadlines; stale entries (superseded `Flow::timer`) are skipped.
    timers: Wheel<FlowId>,
    /// Scratch for `poll_timers`.
    expired: Vec<(Instant, FlowId)>,
    /// TCP socket buffers, recycled across connections.
    pool: Pool,
    touched: Vec<FlowId>,
    touched_set: FastSet<FlowId>,
    cfg: StackConfig,
    caps: DeviceCapabilities,
    link: Link,
    /// IP fragments being put back together.
    frags: frag::Reassembler,
    /// Set when an ARP/NDP frame arrived: flows blocked on neighbour
    /// resolution need an egress pass.
    neighbor_changed: bool,
    stats: StackStats,
    /// Scratch for [`Recovery::split`]: the intermediate ACK being shown.
    ack_step: Vec<u8>,
}

/// One-frame device: ingress gives exactly the frame we hold; egress writes
/// through to the uplink's batch.
struct OneShot<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut dyn FrameTx,
    caps: DeviceCapabilities,
    /// The link's IP MTU and whether TCP checksums are left to the device
    /// (see [`Link`]).
    link: Link,
    sent: &'a mut u64,
    /// The flow's recovery state, told about every TCP segment sent.
    log: Option<(&'a mut Recovery, Instant)>,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a, 'b> {
    tx: &'b mut dyn FrameTx,
    sent: &'b mut u64,
    gso: Option<u16>,
    link: Link,
    log: Option<(&'b mut Recovery, Instant)>,
    _p: std::marker::PhantomData<&'a ()>,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

/// What the transmit path needs to know about the real link: smoltcp's
/// interface is given a far larger MTU (see [`crate::frag`]).
#[derive(Debug, Clone, Copy)]
struct Link {
    /// IP MTU.
    mtu: usize,
    /// smoltcp fills TCP checksums (no offload): a clamped SYN needs a new one.
    tcp_csum: bool,
    /// The device segments TCP super-frames.
    tso: bool,
    /// We answer TCP timestamps (`tcp_timestamps`).
    timestamps: bool,
}

impl Link {
    /// The largest TCP segment that fits the link over IPv4 (`v4`) or IPv6.
    fn mss(&self, v4: bool) -> u16 {
        (self.mtu - if v4 { 40 } else { 60 }).min(65535) as u16
    }
}

/// Longest frame that can be a TCP SYN (Ethernet, IPv6, TCP with options).
const SYN_MAX: usize = 14 + 40 + 60;

/// IP fragment identifiers (IPv4 uses the low 16 bits); any start will do,
/// they need only differ between datagrams in flight to one peer.
static FRAG_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x5eed);

impl phy::TxToken for Tx<'_, '_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        if len > self.link.mtu + 14 && self.gso.is_none() && self.link.tso {
            // smoltcp 0.14 builds IPv6 TCP super-frames but passes their
            // segment size on only for IPv4. It is what smoltcp computes:
            // the smaller of our MSS and the peer's (536 if it sent none),
            // less 12 bytes when timestamps are in use.
            if let Some((rec, _)) = &self.log {
                let mss = rec
                    .peer_mss
                    .unwrap_or(536)
                    .max(48)
                    .min(self.link.mss(false));
                let opts = if self.link.timestamps && rec.peer_ts {
                    12
                } else {
                    0
                };
                self.gso = Some(mss - opts);
            }
        }
        if len > self.link.mtu + 14 && self.gso.is_none() {
            // A datagram larger than the link: cut it into fragments.
            let mut big = vec![0u8; len];
            let r = f(&mut big);
            let id = FRAG_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tx = self.tx;
            let sent = self.sent;
            frag::fragment(&big, self.link.mtu, id, &mut |piece| {
                *sent += 1;
                tx.tx_frame(piece.len()).copy_from_slice(piece);
            });
            return r;
        }
        *self.sent += 1;
        let buf = self.tx.tx_frame_gso(len, self.gso);
        let r = f(buf);
        if len <= SYN_MAX && frag::maybe_syn(buf) {
            // smoltcp offers an MSS from the large MTU it was given.
            let v4 = buf.get(12..14) == Some(&[0x08, 0x00]);
            frag::clamp_mss(buf, self.link.mss(v4), self.link.tcp_csum);
        }
        if let Some((rec, now)) = self.log {
            if let Some(seg) = recovery::parse(buf) {
                rec.on_sent(&seg, now);
            } else if is_neighbor_probe(buf) {
                // smoltcp asks for the next hop while sending for this flow.
                rec.neighbor_probes = rec.neighbor_probes.saturating_add(1);
            }
        }
        r
    }

    fn set_meta(&mut self, meta: smoltcp::phy::PacketMeta) {
        self.gso = meta.segmentation_offload_size.map(|n| n.get());
    }
}

impl Device for OneShot<'_> {
    type RxToken<'a>
        = Rx<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a, 'a>
    where
        Self: 'a;

    fn receive(&mut self, _t: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.take()?;
        Some((
            Rx(frame),
            Tx {
                tx: &mut *self.tx,
                sent: &mut *self.sent,
                gso: None,
                link: self.link,
                log: self.log.as_mut().map(|(r, t)| (&mut **r, *t)),
                _p: std::marker::PhantomData,
            },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            tx: &mut *self.tx,
            sent: &mut *self.sent,
            gso: None,
            link: self.link,
            log: self.log.as_mut().map(|(r, t)| (&mut **r, *t)),
            _p: std::marker::PhantomData,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// Feed the peer's last ACK (without payload) to the flow's socket as
/// duplicate ACKs: smoltcp retransmits its first unacknowledged segment
/// (see [`crate::recovery`] and [`Recovery::replay_frames`]).
fn replay_dup_acks(
    iface: &mut Interface,
    f: &mut Flow,
    (caps, link): (&DeviceCapabilities, Link),
    tx: &mut dyn FrameTx,
    sent: &mut u64,
    now: Instant,
    stats: &mut StackStats,
) {
    stats.tcp_early_retransmits += 1;
    for ack in f.rec.replay_frames() {
        let mut dev = OneShot {
            rx: Some(&ack),
            tx: &mut *tx,
            caps: caps.clone(),
            link,
            sent: &mut *sent,
            log: Some((&mut f.rec, now)),
        };
        iface.poll_ingress_single(now, &mut dev, &mut f.set);
    }
}

/// The parsed demultiplexing key of one frame.
enum Demux {
    Tcp {
        key: TcpKey,
        syn_only: bool,
    },
    Udp {
        port: u16,
        src: IpEndpoint,
        dst: IpAddress,
    },
    Neighbor,
    Other,
}

fn demux(frame: &[u8]) -> Demux {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Demux::Other;
    };
    let (src, dst, proto, payload): (IpAddress, IpAddress, IpProtocol, &[u8]) =
        match eth.ethertype() {
            EthernetProtocol::Arp => return Demux::Neighbor,
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return Demux::Other;
                };
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return Demux::Other;
                }
                (
                    ip.src_addr().into(),
                    ip.dst_addr().into(),
                    ip.next_header(),
                    ip.payload(),
                )
            }
            EthernetProtocol::Ipv6 => {
                let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                    return Demux::Other;
                };
                if ip.next_header() == IpProtocol::Icmpv6 {
                    // NDP (or echo): resolution may unblock queued flows.
                    return Demux::Neighbor;
                }
                (
                    ip.src_addr().into(),
                    ip.dst_addr().into(),
                    ip.next_header(),
                    ip.payload(),
                )
            }
            _ => return Demux::Other,
        };
    match proto {
        IpProtocol::Tcp => match TcpPacket::new_checked(payload) {
            Ok(t) => Demux::Tcp {
                key: TcpKey {
                    local: dst,
                    lport: t.dst_port(),
                    remote: src,
                    rport: t.src_port(),
                },
                syn_only: t.syn() && !t.ack() && !t.rst(),
            },
            Err(_) => Demux::Other,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(payload) {
            Ok(u) => Demux::Udp {
                port: u.dst_port(),
                src: IpEndpoint::new(src, u.src_port()),
                dst,
            },
            Err(_) => Demux::Other,
        },
        _ => Demux::Other,
    }
}

/// An ARP request or an IPv6 neighbour solicitation.
fn is_neighbor_probe(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        // ARP, opcode 1 (request).
        Some([0x08, 0x06]) => frame.get(20..22) == Some(&[0, 1]),
        // ICMPv6 type 135.
        Some([0x86, 0xdd]) => frame.get(20) == Some(&58) && frame.get(54) == Some(&135),
        _ => false,
    }
}

/// errno for an ICMPv4 destination-unreachable code, as Linux maps it
/// (`icmp_err_convert`); `None` for "fragmentation needed" (path MTU).
fn icmp4_errno(code: u8) -> Option<i32> {
    Some(match code {
        0 | 6 | 9 | 11 => libc::ENETUNREACH,
        1 | 10 | 12 | 13 | 14 | 15 => libc::EHOSTUNREACH,
        2 => libc::ENOPROTOOPT,
        3 => libc::ECONNREFUSED,
        5 => libc::EOPNOTSUPP,
        7 => libc::EHOSTDOWN,
        8 => libc::ENONET,
        _ => return None,
    })
}

/// errno for an ICMPv6 destination-unreachable code (`icmpv6_err_convert`).
fn icmp6_errno(code: u8) -> Option<i32> {
    Some(match code {
        0 => libc::ENETUNREACH,
        1 | 5 | 6 => libc::EACCES,
        2 | 3 => libc::EHOSTUNREACH,
        4 => libc::ECONNREFUSED,
        _ => return None,
    })
}

/// A destination-unreachable ICMP error about one of our TCP segments or
/// UDP datagrams.
struct IcmpError {
    /// The quoted packet's protocol: 6 (TCP) or 17 (UDP).
    proto: u8,
    /// Its addresses and ports, ours first.
    key: TcpKey,
    /// The quoted TCP sequence number (UDP: meaningless).
    seq: u32,
    /// The errno Linux would report.
    errno: i32,
    /// A "hard" error (port or protocol unreachable, administratively
    /// prohibited...): the kind Linux reports on a connected UDP socket.
    fatal: bool,
}

/// Parse a destination-unreachable ICMP error about one of our TCP
/// segments or UDP datagrams.
fn icmp_error(frame: &[u8]) -> Option<IcmpError> {
    use smoltcp::wire::{Icmpv4Packet, Icmpv6Packet};
    // Every frame comes here: ICMP or not is a byte or two away.
    let icmp = match frame.get(12..14)? {
        [0x08, 0x00] => frame.get(23) == Some(&1),
        [0x86, 0xdd] => frame.get(20) == Some(&58),
        _ => false,
    };
    if !icmp {
        return None;
    }
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (quoted, (errno, fatal)) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
            if u8::from(icmp.msg_type()) != 3 || !icmp.verify_checksum() {
                return None;
            }
            let code = icmp.msg_code();
            let fatal = matches!(code, 2 | 3 | 6..=10 | 13..=15);
            (ip.payload().get(8..)?, (icmp4_errno(code)?, fatal))
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmpv6 {
                return None;
            }
            let icmp = Icmpv6Packet::new_checked(ip.payload()).ok()?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            if u8::from(icmp.msg_type()) != 1 || !icmp.verify_checksum(&src, &dst) {
                return None;
            }
            let code = icmp.msg_code();
            let fatal = matches!(code, 1 | 4..=6);
            (ip.payload().get(8..)?, (icmp6_errno(code)?, fatal))
        }
        _ => return None,
    };
    // The quoted packet: our IP header, then at least 8 bytes of TCP or
    // UDP.
    let transport = |p: u8| p == 6 || p == 17;
    let (proto, local, remote, tcp): (u8, IpAddress, IpAddress, &[u8]) = match quoted.first()? >> 4
    {
        4 => {
            let hl = usize::from(quoted[0] & 0xf) * 4;
            if quoted.len() < hl + 8 || hl < 20 || !transport(quoted[9]) {
                return None;
            }
            let a = |o: usize| {
                smoltcp::wire::Ipv4Address::new(
                    quoted[o],
                    quoted[o + 1],
                    quoted[o + 2],
                    quoted[o + 3],
                )
            };
            (quoted[9], a(12).into(), a(16).into(), &quoted[hl..])
        }
        6 => {
            if quoted.len() < 48 || !transport(quoted[6]) {
                return None;
            }
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&quoted[o..o + 16]);
                IpAddress::Ipv6(smoltcp::wire::Ipv6Address::from(b))
            };
            (quoted[6], a(8), a(24), &quoted[40..])
        }
        _ => return None,
    };
    let port = |o: usize| u16::from_be_bytes([tcp[o], tcp[o + 1]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let key = TcpKey {
        local,
        lport: port(0),
        remote,
        rport: port(2),
    };
    Some(IcmpError {
        proto,
        key,
        seq,
        errno,
        fatal,
    })
}

/// An Ethernet frame carrying a UDP datagram from `src` to `dst` (same IP
/// version), addressed to `mac` on both ends.
fn local_udp_frame(
    mac: [u8; 6],
    src: IpEndpoint,
    dst: IpEndpoint,
    payload: &[u8],
) -> Option<Vec<u8>> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpRepr, UdpRepr};
    let udp_len = 8 + payload.len();
    let ip = IpRepr::new(src.addr, dst.addr, IpProtocol::Udp, udp_len, 64);
    if src.addr.version() != dst.addr.version() || ip.buffer_len() > 65535 {
        return None;
    }
    let (eth_type, ip_len) = match dst.addr {
        IpAddress::Ipv4(_) => (EthernetProtocol::Ipv4, ip.header_len()),
        IpAddress::Ipv6(_) => (EthernetProtocol::Ipv6, ip.header_len()),
    };
    let mut f = vec![0u8; 14 + ip_len + udp_len];
    let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
    eth.set_dst_addr(EthernetAddress(mac));
    eth.set_src_addr(EthernetAddress(mac));
    eth.set_ethertype(eth_type);
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut f[14..14 + ip_len], &caps);
    let repr = UdpRepr {
        src_port: src.port,
        dst_port: dst.port,
    };
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut f[14 + ip_len..]),
        &src.addr,
        &dst.addr,
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(f)
}

/// Verify the IPv4 header and TCP/UDP checksums of a frame (what smoltcp
/// would check, done here so it can be skipped per frame).
fn checksums_valid(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return true; // malformed: smoltcp drops it
    };
    let (src, dst, proto, payload): (IpAddress, IpAddress, IpProtocol, &[u8]) =
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return true;
                };
                if !ip.verify_checksum() {
                    return false;
                }
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return true;
                }
                (
                    ip.src_addr().into(),
                    ip.dst_addr().into(),
                    ip.next_header(),
                    ip.payload(),
                )
            }
            EthernetProtocol::Ipv6 => {
                let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                    return true;
                };
                (
                    ip.src_addr().into(),
                    ip.dst_addr().into(),
                    ip.next_header(),
                    ip.payload(),
                )
            }
            _ => return true,
        };
    match proto {
        IpProtocol::Tcp => {
            TcpPacket::new_checked(payload).is_ok_and(|t| t.verify_checksum(&src, &dst))
        }
        IpProtocol::Udp => UdpPacket::new_checked(payload).is_ok_and(|u| {
            // A zero UDP checksum over IPv4 means "none".
            (u.checksum() == 0 && matches!(src, IpAddress::Ipv4(_)))
                || u.verify_checksum(&src, &dst)
        }),
        _ => true,
    }
}

/// A snapshot of one flow for `hoststackctl`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowInfo {
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// TCP state name.
    pub state: String,
    /// Local endpoint.
    pub local: String,
    /// Remote endpoint.
    pub remote: String,
    /// Bytes waiting in smoltcp's receive buffer.
    pub rx_queue: usize,
    /// Bytes waiting in smoltcp's send buffer.
    pub tx_queue: usize,
}

impl Stack {
    /// Build the stack. `now` seeds smoltcp's clock.
    pub fn new(cfg: StackConfig, now: Instant) -> Self {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // Whole datagrams up to 64 KiB: the transmit path cuts larger-than-
        // link ones into fragments itself (see `frag`).
        caps.max_transmission_unit = frag::MAX_FRAME;
        let link = Link {
            mtu: cfg.mtu,
            tcp_csum: !cfg.tso,
            tso: cfg.tso,
            timestamps: cfg.tcp_timestamps,
        };
        // smoltcp computes checksums on transmit but does not verify on
        // receive: `ingress` verifies them itself unless the device vouches
        // for them (or they are partial, from a local veth peer).
        {
            use smoltcp::phy::Checksum;
            caps.checksum.ipv4 = Checksum::Tx;
            caps.checksum.tcp = Checksum::Tx;
            caps.checksum.udp = Checksum::Tx;
            caps.checksum.icmpv4 = Checksum::Tx;
            caps.checksum.icmpv6 = Checksum::Tx;
            if cfg.tso {
                caps.checksum.tcp = Checksum::None;
                caps.segmentation.tcpv4 = std::num::NonZeroUsize::new(65000);
                // IPv6 too: smoltcp drops an IPv6 packet above the MTU it
                // was given, which for super-frames is now 64 KiB (`frag`).
                caps.segmentation.tcpv6 = std::num::NonZeroUsize::new(65000);
            }
        }
        let mut icfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
        icfg.random_seed = cfg.seed;
        let mut sent = 0u64;
        let mut sink = NullTx(Vec::new());
        let mut dev = OneShot {
            rx: None,
            tx: &mut sink,
            caps: caps.clone(),
            link,
            sent: &mut sent,
            log: None,
        };
        let mut iface = Interface::new(icfg, &mut dev, now);
        iface.update_ip_addrs(|a| {
            for c in &cfg.addrs {
                if a.push(*c).is_err() {
                    tracing::warn!(addr = %c, "too many interface addresses, ignoring");
                }
            }
        });
        if let Some(gw) = cfg.gateway4 {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        if let Some(gw) = cfg.gateway6 {
            let _ = iface.routes_mut().add_default_ipv6_route(gw);
        }
        let seed = cfg.seed;
        Stack {
            iface,
            empty: SocketSet::new(Vec::new()),
            flows: Vec::new(),
            free: Vec::new(),
            gens: Vec::new(),
            nflows: 0,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            udp_conn: HashMap::new(),
            udp_conn_ports: HashMap::new(),
            listeners: Vec::new(),
            listen_ports: HashMap::new(),
            used_ports: HashSet::new(),
            reserved_ports: HashMap::new(),
            next_port: 49152 + (seed % 16000) as u16,
            timers: Wheel::new(now),
            expired: Vec::new(),
            pool: Pool::default(),
            touched: Vec::new(),
            touched_set: FastSet::default(),
            cfg,
            caps,
            link,
            frags: frag::Reassembler::default(),
            neighbor_changed: false,
            ack_step: Vec::new(),
            stats: StackStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &StackStats {
        &self.stats
    }

    /// Number of live flows.
    pub fn flow_count(&self) -> usize {
        self.nflows
    }

    /// Is `ip` one of our addresses?
    pub fn is_local(&self, ip: IpAddress) -> bool {
        self.iface.has_ip_addr(ip)
    }

    /// An ICMP error that ended `id`'s connect, once (errno).
    pub fn take_error(&mut self, id: FlowId) -> Option<i32> {
        self.flow_mut(id)?.error.take()
    }

    /// Whether `id`'s SYN has gone out (a connect still waiting for its
    /// neighbour has sent none), and how many ARP requests or neighbour
    /// solicitations smoltcp sent while trying to send for it.
    pub fn syn_progress(&self, id: FlowId) -> (bool, u32) {
        self.flow(id).map_or((false, 0), |f| {
            (f.rec.syn_seq.is_some(), f.rec.neighbor_probes)
        })
    }

    /// Deliver a datagram from UDP flow `from` to `dst`, one of our own
    /// addresses, as the kernel's loopback would: straight to the UDP
    /// socket bound there (smoltcp would instead ask the wire who has our
    /// own address and never send it). The source address is the
    /// sender's, or `dst`'s if it is bound to a wildcard. False if nothing
    /// is bound there (the datagram is dropped, as a kernel does after
    /// its ICMP port unreachable).
    pub fn udp_local(
        &mut self,
        from: FlowId,
        dst: IpEndpoint,
        payload: &[u8],
        now: Instant,
    ) -> bool {
        let Some(ep) = self.udp(from).map(|s| s.endpoint()) else {
            return false;
        };
        let src = IpEndpoint::new(ep.addr.unwrap_or(dst.addr), ep.port);
        if self
            .udp
            .get(&dst.port)
            .and_then(|b| udp_pick(b, dst.addr))
            .is_none()
            && !self.udp_conn.contains_key(&(src, dst.port))
        {
            self.stats.udp_local_unreachable += 1;
            return false;
        }
        let Some(frame) = local_udp_frame(self.cfg.mac, src, dst, payload) else {
            return false;
        };
        self.stats.udp_local += 1;
        self.ingress(now, &frame, true, &mut NullTx(Vec::new()));
        true
    }

    /// Our addresses (the interface holds at most four).
    pub fn local_addrs(&self) -> [Option<IpAddress>; 4] {
        let mut a = [None; 4];
        for (slot, c) in a.iter_mut().zip(&self.cfg.addrs) {
            *slot = Some(c.address());
        }
        a
    }

    fn local_addr_for(&self, remote: IpAddress) -> Option<IpAddress> {
        self.cfg
            .addrs
            .iter()
            .map(|c| c.address())
            .find(|a| match (a, remote) {
                (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => true,
                (IpAddress::Ipv6(a6), IpAddress::Ipv6(r6)) => {
                    // Prefer a link-local source for link-local peers.
                    a6.is_unicast_link_local() == r6.is_unicast_link_local()
                }
                _ => false,
            })
    }

    fn alloc_flow(
        &mut self,
        kind: FlowKind,
        set: SocketSet<'static>,
        handle: SocketHandle,
    ) -> FlowId {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.flows.push(None);
                self.gens.push(0);
                (self.flows.len() - 1) as u32
            }
        };
        let gen = self.gens[idx as usize];
        self.flows[idx as usize] = Some(Flow {
            gen,
            kind,
            set,
            handle,
            key: None,
            udp_port: None,
            udp_remote: None,
            listener: None,
            owner: 0,
            timer: None,
            rec: Recovery::default(),
            error: None,
            lease: None,
            keepalive: None,
            user_timeout: None,
            last_rx: Instant::from_micros(0),
            timed_out: false,
        });
        self.nflows += 1;
        FlowId { idx, gen }
    }

    /// Start loading flow `id`'s socket into the cache (a hint, see
    /// `Engine::prefetch`); its owner token.
    pub fn prefetch(&self, id: FlowId) -> Option<u64> {
        let f = self.flow(id)?;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            if let Some(s) = f.set.iter().next() {
                let p = (s.1 as *const smoltcp::socket::Socket).cast::<i8>();
                // SAFETY: prefetch never dereferences or faults.
                unsafe {
                    for k in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * k));
                    }
                }
            }
        }
        Some(f.owner)
    }

    fn flow(&self, id: FlowId) -> Option<&Flow> {
        self.flows
            .get(id.idx as usize)?
            .as_ref()
            .filter(|f| f.gen == id.gen)
    }

    fn flow_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.flows
            .get_mut(id.idx as usize)?
            .as_mut()
            .filter(|f| f.gen == id.gen)
    }

    /// (shortest, longest) delayed ACK, when it may adapt to the app.
    pub fn ack_delay_bounds(&self) -> Option<(Duration, Duration)> {
        let min = self.cfg.tcp_ack_delay?;
        (self.cfg.tcp_ack_delay_max > min).then_some((min, self.cfg.tcp_ack_delay_max))
    }

    /// The receive buffer size for a new TCP socket: the larger one while
    /// the budget lasts. smoltcp fixes a socket's buffers (and the window
    /// scale it offers) at creation, so the window cannot grow later as
    /// Linux's autotuning does; the budget bounds the memory this costs
    /// (pool buffers are lazily backed: only what the ring has walked over
    /// is resident).
    fn rx_size(&mut self) -> usize {
        let (base, max) = (self.cfg.tcp_rx_buf, self.cfg.tcp_rx_buf_max);
        if max > base
            && self.stats.tcp_rx_large_bytes as usize + max <= self.cfg.tcp_rx_large_budget
        {
            self.stats.tcp_rx_large += 1;
            self.stats.tcp_rx_large_bytes += max as u64;
            max
        } else {
            base
        }
    }

    /// Account for a TCP socket's buffers going back.
    fn rx_release(&mut self, sock: &tcp::Socket) {
        let cap = sock.recv_capacity();
        if cap > self.cfg.tcp_rx_buf {
            self.stats.tcp_rx_large_bytes =
                self.stats.tcp_rx_large_bytes.saturating_sub(cap as u64);
        }
    }

    fn new_tcp_socket(&mut self) -> (tcp::Socket<'static>, Option<Lease>) {
        let rx_size = self.rx_size();
        let (rx, tx, lease) = self.pool.tcp_buffers(rx_size, self.cfg.tcp_tx_buf);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s.set_ack_delay(self.cfg.tcp_ack_delay);
        // Used only when the peer's SYN offers timestamps (smoltcp drops it
        // otherwise), as Linux does by default.
        if self.cfg.tcp_timestamps {
            s.set_tsval_generator(Some(tsval));
        }
        (s, lease)
    }

    /// Start listening on `local` (unspecified address = all of ours).
    pub fn listen(
        &mut self,
        local: IpListenEndpoint,
        backlog: u32,
        owner: u64,
    ) -> Result<ListenerId, StackError> {
        let family = match local.addr {
            None => ListenFamily::Any,
            Some(IpAddress::Ipv4(_)) => ListenFamily::V4,
            Some(IpAddress::Ipv6(_)) => ListenFamily::V6,
        };
        self.listen_family(local, family, backlog, owner)
    }

    /// [`Stack::listen`] for the connections of `family` only: a wildcard
    /// IPv4 listener and a v6-only wildcard one share a port.
    pub fn listen_family(
        &mut self,
        local: IpListenEndpoint,
        family: ListenFamily,
        backlog: u32,
        owner: u64,
    ) -> Result<ListenerId, StackError> {
        if local.port == 0 {
            return Err(StackError::Invalid);
        }
        if let Some(a) = local.addr {
            if !self.is_local(a) {
                return Err(StackError::AddrNotAvail);
            }
        }
        if let Some(ids) = self.listen_ports.get(&local.port) {
            for id in ids {
                if let Some(Some(l)) = self.listeners.get(id.0 as usize) {
                    let addr = l.local.is_none() || local.addr.is_none() || l.local == local.addr;
                    if addr && l.family.overlaps(family) {
                        return Err(StackError::AddrInUse);
                    }
                }
            }
        }
        let l = Listener {
            local: local.addr,
            family,
            port: local.port,
            backlog: backlog.clamp(1, 65535),
            pending: 0,
            owner,
        };
        let idx = match self.listeners.iter().position(|l| l.is_none()) {
            Some(i) => {
                self.listeners[i] = Some(l);
                i
            }
            None => {
                self.listeners.push(Some(l));
                self.listeners.len() - 1
            }
        };
        let id = ListenerId(idx as u32);
        self.listen_ports.entry(local.port).or_default().push(id);
        Ok(id)
    }

    /// Stop listening. Connections already created keep going.
    pub fn unlisten(&mut self, id: ListenerId) {
        if let Some(slot) = self.listeners.get_mut(id.0 as usize) {
            if let Some(l) = slot.take() {
                if let Some(v) = self.listen_ports.get_mut(&l.port) {
                    v.retain(|x| *x != id);
                    if v.is_empty() {
                        self.listen_ports.remove(&l.port);
                    }
                }
            }
        }
    }

    /// Owner token of a listener.
    pub fn listener_owner(&self, id: ListenerId) -> Option<u64> {
        self.listeners.get(id.0 as usize)?.as_ref().map(|l| l.owner)
    }

    /// Which listener (if any) would take a connection to `ep`.
    pub fn find_listener(&self, addr: IpAddress, port: u16) -> Option<ListenerId> {
        self.listen_ports.get(&port)?.iter().copied().find(|id| {
            matches!(self.listeners.get(id.0 as usize),
                Some(Some(l)) if l.family.takes(addr) && (l.local.is_none() || l.local == Some(addr)))
        })
    }

    /// The session layer took an established passive connection off the
    /// backlog.
    pub fn accepted(&mut self, flow: FlowId) {
        let lid = match self.flow_mut(flow) {
            Some(f) => f.listener.take(),
            None => None,
        };
        if let Some(lid) = lid {
            if let Some(Some(l)) = self.listeners.get_mut(lid.0 as usize) {
                l.pending = l.pending.saturating_sub(1);
            }
        }
    }

    /// An ephemeral port not in use by any flow, listener or UDP socket.
    pub fn alloc_port(&mut self) -> Result<u16, StackError> {
        for _ in 0..16384 {
            let p = self.next_port;
            self.next_port = if self.next_port == 65535 {
                49152
            } else {
                self.next_port + 1
            };
            if !self.used_ports.contains(&p)
                && !self.listen_ports.contains_key(&p)
                && !self.udp.contains_key(&p)
                && !self.udp_conn_ports.contains_key(&p)
                && !self.reserved_ports.contains_key(&p)
            {
                return Ok(p);
            }
        }
        Err(StackError::NoPorts)
    }

    /// Keep [`Self::alloc_port`] off `port` (a bound socket holds it).
    pub fn reserve_port(&mut self, port: u16) {
        *self.reserved_ports.entry(port).or_default() += 1;
    }

    /// Undo one [`Self::reserve_port`].
    pub fn release_port(&mut self, port: u16) {
        release_port(&mut self.reserved_ports, port);
    }

    /// Open an active TCP connection.
    pub fn connect(
        &mut self,
        remote: IpEndpoint,
        local: Option<IpEndpoint>,
        owner: u64,
        now: Instant,
    ) -> Result<FlowId, StackError> {
        if remote.port == 0 || remote.addr.is_unspecified() {
            return Err(StackError::Invalid);
        }
        if self.nflows >= self.cfg.max_flows {
            return Err(StackError::TooMany);
        }
        let laddr = match local.map(|l| l.addr) {
            Some(a) if !a.is_unspecified() => {
                if !self.is_local(a) {
                    return Err(StackError::AddrNotAvail);
                }
                a
            }
            _ => self
                .local_addr_for(remote.addr)
                .ok_or(StackError::Unreachable)?,
        };
        let lport = match local.map(|l| l.port) {
            Some(p) if p != 0 => p,
            _ => self.alloc_port()?,
        };
        let key = TcpKey {
            local: laddr,
            lport,
            remote: remote.addr,
            rport: remote.port,
        };
        if self.tcp.contains_key(&key) {
            return Err(StackError::AddrInUse);
        }
        let (mut sock, lease) = self.new_tcp_socket();
        if sock
            .connect(self.iface.context(), remote, IpEndpoint::new(laddr, lport))
            .is_err()
        {
            self.give_back(sock, lease);
            return Err(StackError::Unreachable);
        }
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let h = set.add(sock);
        let id = self.alloc_flow(FlowKind::Tcp, set, h);
        if let Some(f) = self.flow_mut(id) {
            f.lease = lease;
            f.key = Some(key);
            f.owner = owner;
        }
        self.tcp.insert(key, id);
        self.used_ports.insert(lport);
        self.stats.active_opens += 1;
        self.schedule(id, now);
        Ok(id)
    }

    /// Bind a UDP socket on `local` (port 0 = ephemeral) for the IP
    /// versions `family` names; it matters for a wildcard only (an IPv4
    /// wildcard is `V4`, an IPv6 one `V6` with IPV6_V6ONLY, `Any` without).
    pub fn udp_bind(
        &mut self,
        local: IpListenEndpoint,
        family: ListenFamily,
        owner: u64,
    ) -> Result<FlowId, StackError> {
        if let Some(a) = local.addr {
            if !self.is_local(a) {
                return Err(StackError::AddrNotAvail);
            }
        }
        if self.nflows >= self.cfg.max_flows {
            return Err(StackError::TooMany);
        }
        let port = if local.port == 0 {
            self.alloc_port()?
        } else {
            local.port
        };
        if self
            .udp
            .get(&port)
            .is_some_and(|v| v.iter().any(|b| b.overlaps(local.addr, family)))
        {
            return Err(StackError::AddrInUse);
        }
        let meta = || vec![udp::PacketMetadata::EMPTY; self.cfg.udp_packets];
        let rx = udp::PacketBuffer::new(meta(), vec![0; self.cfg.udp_bytes]);
        let tx = udp::PacketBuffer::new(meta(), vec![0; self.cfg.udp_bytes]);
        let mut sock = udp::Socket::new(rx, tx);
        sock.bind(IpListenEndpoint {
            addr: local.addr,
            port,
        })
        .map_err(|_| StackError::Invalid)?;
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let h = set.add(sock);
        let id = self.alloc_flow(FlowKind::Udp, set, h);
        if let Some(f) = self.flow_mut(id) {
            f.udp_port = Some(port);
            f.owner = owner;
        }
        self.udp.entry(port).or_default().push(UdpBind {
            id,
            addr: local.addr,
            family,
        });
        Ok(id)
    }

    /// Take flow `id` off the bound sockets of `port`.
    fn udp_unbind(&mut self, port: u16, id: FlowId) {
        if let Some(v) = self.udp.get_mut(&port) {
            v.retain(|b| b.id != id);
            if v.is_empty() {
                self.udp.remove(&port);
            }
        }
    }

    /// Set the owner token of a flow.
    pub fn set_owner(&mut self, id: FlowId, owner: u64) {
        if let Some(f) = self.flow_mut(id) {
            f.owner = owner;
        }
    }

    /// Owner token of a flow.
    pub fn owner(&self, id: FlowId) -> Option<u64> {
        self.flow(id).map(|f| f.owner)
    }

    /// The listener a passive flow came from, while it is not yet accepted.
    pub fn flow_listener(&self, id: FlowId) -> Option<ListenerId> {
        self.flow(id).and_then(|f| f.listener)
    }

    /// Kind of a flow.
    pub fn kind(&self, id: FlowId) -> Option<FlowKind> {
        self.flow(id).map(|f| f.kind)
    }

    /// Turn keepalive on (Linux semantics, see [`KeepAlive`]) or off.
    pub fn set_keepalive(
        &mut self,
        id: FlowId,
        ka: Option<KeepAlive>,
        now: Instant,
        tx: &mut dyn FrameTx,
    ) {
        let default = self.cfg.tcp_user_timeout;
        let idx = id.idx as usize;
        let Some(f) = self
            .flows
            .get_mut(idx)
            .and_then(|f| f.as_mut())
            .filter(|f| f.gen == id.gen && f.kind == FlowKind::Tcp)
        else {
            return;
        };
        if f.keepalive.is_none() {
            f.last_rx = now;
        }
        f.keepalive = ka;
        apply_timeouts(f, default, now);
        // smoltcp re-arms its keepalive timer only when a segment arrives
        // (or a probe leaves): one armed for a longer idle (an app that
        // sets SO_KEEPALIVE, then TCP_KEEPIDLE) would keep the old time.
        // The peer's last ACK shown again re-arms it with the new one (on
        // an idle connection it is no duplicate; the peer's silence is
        // counted from now, as after any change of the settings).
        if ka.is_some() && !f.rec.replay_frame().is_empty() {
            let ack = f.rec.replay_frame().to_vec();
            let mut sent = 0;
            let mut dev = OneShot {
                rx: Some(&ack),
                tx,
                caps: self.caps.clone(),
                link: self.link,
                sent: &mut sent,
                log: None,
            };
            self.iface.poll_ingress_single(now, &mut dev, &mut f.set);
            self.stats.tx_frames += sent;
        }
    }

    /// `TCP_USER_TIMEOUT`: how long the peer may stay silent while data
    /// waits to be acknowledged (or, with keepalive, at all) before the
    /// connection is dropped; None restores the default.
    pub fn set_user_timeout(&mut self, id: FlowId, t: Option<Duration>, now: Instant) {
        let default = self.cfg.tcp_user_timeout;
        if let Some(f) = self.flow_mut(id) {
            f.user_timeout = t;
            apply_timeouts(f, default, now);
        }
    }

    /// The connection was dropped because its peer fell silent (keepalive
    /// or user timeout), not reset by it.
    pub fn timed_out(&self, id: FlowId) -> bool {
        self.flow(id).is_some_and(|f| f.timed_out)
    }

    /// Access the TCP socket of a flow.
    pub fn tcp(&mut self, id: FlowId) -> Option<&mut tcp::Socket<'static>> {
        let f = self.flow_mut(id)?;
        if f.kind != FlowKind::Tcp {
            return None;
        }
        let h = f.handle;
        Some(f.set.get_mut::<tcp::Socket>(h))
    }

    /// Access the UDP socket of a flow.
    /// Connect a bound UDP flow to `remote`: its peer's datagrams go to it,
    /// and the port is free for another (unconnected) socket, as in Linux
    /// (iperf3's UDP server does this).
    pub fn udp_connect(&mut self, id: FlowId, remote: IpEndpoint) -> Result<(), StackError> {
        let f = self
            .flows
            .get_mut(id.idx as usize)
            .and_then(|f| f.as_mut())
            .filter(|f| f.gen == id.gen && f.kind == FlowKind::Udp)
            .ok_or(StackError::Invalid)?;
        let port = f
            .udp_port
            .or(f.udp_remote.map(|r| r.1))
            .ok_or(StackError::Invalid)?;
        if self.udp_conn.contains_key(&(remote, port)) {
            return Err(StackError::AddrInUse);
        }
        if let Some(old) = f.udp_remote.take() {
            if self.udp_conn.remove(&old).is_some() {
                release_port(&mut self.udp_conn_ports, old.1);
            }
        }
        let was_bound = f.udp_port.take().is_some();
        f.udp_remote = Some((remote, port));
        if was_bound {
            self.udp_unbind(port, id);
        }
        self.udp_conn.insert((remote, port), id);
        *self.udp_conn_ports.entry(port).or_default() += 1;
        Ok(())
    }

    pub fn udp(&mut self, id: FlowId) -> Option<&mut udp::Socket<'static>> {
        let f = self.flow_mut(id)?;
        if f.kind != FlowKind::Udp {
            return None;
        }
        let h = f.handle;
        Some(f.set.get_mut::<udp::Socket>(h))
    }

    /// Remove a flow (after close/reset, or when its owner is gone; the TCP
    /// socket should already be closed or aborted — an aborted socket still
    /// gets a final egress pass here so its RST leaves).
    pub fn remove_flow(&mut self, id: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        self.egress(id, now, tx);
        let Some(slot) = self.flows.get_mut(id.idx as usize) else {
            return;
        };
        if !matches!(slot, Some(f) if f.gen == id.gen) {
            return;
        }
        let f = slot.take().expect("checked above");
        self.gens[id.idx as usize] = f.gen.wrapping_add(1);
        self.free.push(id.idx);
        self.nflows -= 1;
        if let Some(k) = f.key {
            if self.tcp.get(&k) == Some(&id) {
                self.tcp.remove(&k);
            }
            self.used_ports.remove(&k.lport);
        }
        if let Some(p) = f.udp_port {
            self.udp_unbind(p, id);
        }
        if let Some(k) = f.udp_remote {
            if self.udp_conn.get(&k) == Some(&id) {
                self.udp_conn.remove(&k);
                release_port(&mut self.udp_conn_ports, k.1);
            }
        }
        if let Some(lid) = f.listener {
            if let Some(Some(l)) = self.listeners.get_mut(lid.0 as usize) {
                l.pending = l.pending.saturating_sub(1);
            }
        }
        self.touched_set.remove(&id);
        if f.kind == FlowKind::Tcp {
            self.rx_release(f.set.get::<tcp::Socket>(f.handle));
        }
        if let Some(l) = f.lease {
            self.pool.recycle(f.set, l);
        }
    }

    /// Return the buffers of a socket that never became a flow.
    fn give_back(&mut self, sock: tcp::Socket<'static>, lease: Option<Lease>) {
        self.rx_release(&sock);
        if let Some(l) = lease {
            let mut set = SocketSet::new(Vec::with_capacity(1));
            set.add(sock);
            self.pool.recycle(set, l);
        }
    }

    /// List `id` for the next [`Stack::take_touched`] (its state changed).
    pub fn touch(&mut self, id: FlowId) {
        if self.touched_set.insert(id) {
            self.touched.push(id);
        }
    }

    /// Flows whose state may have changed since the last call.
    pub fn take_touched(&mut self, out: &mut Vec<FlowId>) {
        out.append(&mut self.touched);
        self.touched_set.clear();
    }

    /// Feed one received Ethernet frame.
    /// `csum_ok`: the device vouches for the checksums (or they are partial,
    /// from a local sender), so smoltcp must not verify them.
    pub fn ingress(&mut self, now: Instant, frame: &[u8], csum_ok: bool, tx: &mut dyn FrameTx) {
        self.stats.rx_frames += 1;
        if frag::is_fragment(frame) {
            // Only ours are kept; the whole datagram then comes through
            // here as one frame (its transport checksum is checked then).
            let ours = frag::destination(frame).is_some_and(|a| self.is_local(a));
            if ours && (csum_ok || checksums_valid(frame)) {
                let whole = self.frags.push(frame, now);
                self.stats.frag = self.frags.stats.clone();
                if let Some(whole) = whole {
                    self.ingress(now, &whole, false, tx);
                }
            }
            return;
        }
        if frame.len() <= SYN_MAX && frag::maybe_syn(frame) {
            // smoltcp's interface has a large MTU (see `frag`): keep a
            // peer's offered MSS within the link, so segments we send
            // fit it, as smoltcp's own limit did.
            let mut f = [0u8; SYN_MAX];
            f[..frame.len()].copy_from_slice(frame);
            let f = &mut f[..frame.len()];
            let v4 = f.get(12..14) == Some(&[0x08, 0x00]);
            if frag::clamp_mss(f, self.link.mss(v4), false) {
                // Checked as it arrived; the new MSS is ours.
                if !csum_ok && !checksums_valid(frame) {
                    self.stats.rx_bad_checksum += 1;
                    return;
                }
                return self.ingress_one(now, f, true, tx);
            }
        }
        self.ingress_one(now, frame, csum_ok, tx)
    }

    fn ingress_one(&mut self, now: Instant, frame: &[u8], csum_ok: bool, tx: &mut dyn FrameTx) {
        match icmp_error(frame) {
            Some(IcmpError {
                proto: 6,
                key,
                seq,
                errno,
                ..
            }) => {
                // About one of our connects (it quotes our SYN): it fails
                // with the error, as in Linux. Later errors are soft:
                // ignored.
                if let Some(&id) = self.tcp.get(&key) {
                    if let Some(f) = self.flow_mut(id) {
                        let h = f.handle;
                        let connecting = f.set.get::<tcp::Socket>(h).state() == tcp::State::SynSent;
                        if connecting && f.rec.syn_seq == Some(seq) {
                            f.error = Some(errno);
                            self.stats.icmp_connect_errors += 1;
                            self.touch(id);
                        }
                    }
                }
            }
            Some(IcmpError {
                key, errno, fatal, ..
            }) if fatal => {
                // A connected UDP socket reports a hard error once on its
                // next call, as in Linux (an unconnected one ignores it).
                let remote = IpEndpoint::new(key.remote, key.rport);
                if let Some(&id) = self.udp_conn.get(&(remote, key.lport)) {
                    if let Some(f) = self.flow_mut(id) {
                        f.error = Some(errno);
                        self.stats.udp_icmp_errors += 1;
                        self.touch(id);
                    }
                }
            }
            _ => {}
        }
        let target = match demux(frame) {
            Demux::Tcp { key, syn_only } => match self.tcp.get(&key).copied() {
                // A new SYN on a 4-tuple whose old connection lingers in
                // TIME-WAIT (client port reuse): like Linux, end the old one
                // and accept the new connection.
                Some(id) if syn_only && self.in_time_wait(id) => {
                    self.remove_flow(id, now, &mut NullTx(Vec::new()));
                    self.passive_open(key, now)
                }
                Some(id) => Some(id),
                None if syn_only => self.passive_open(key, now),
                None => None,
            },
            Demux::Udp { port, src, dst } => self
                .udp_conn
                .get(&(src, port))
                .copied()
                .or_else(|| udp_pick(self.udp.get(&port)?, dst)),
            Demux::Neighbor => {
                self.neighbor_changed = true;
                None
            }
            Demux::Other => None,
        };
        if !csum_ok && !checksums_valid(frame) {
            self.stats.rx_bad_checksum += 1;
            return;
        }
        let mut sent = 0u64;
        let recover = self.cfg.tcp_loss_recovery;
        match target.and_then(|id| {
            let idx = id.idx as usize;
            self.flows[idx]
                .as_mut()
                .filter(|f| f.gen == id.gen)
                .map(|f| (id, f))
        }) {
            Some((id, f)) => {
                self.stats.rx_flow_hits += 1;
                let tcp = recover && f.kind == FlowKind::Tcp;
                let syn = f.kind == FlowKind::Tcp && frag::maybe_syn(frame);
                let seg = if tcp || syn {
                    recovery::parse(frame)
                } else {
                    None
                };
                // A large cumulative ACK: its intermediate points first.
                if let Some(steps) = seg.and_then(|s| f.rec.split(&s, frame, &mut self.ack_step)) {
                    for k in 1..=steps.count {
                        steps.set(&mut self.ack_step, k);
                        let mut dev = OneShot {
                            rx: Some(&self.ack_step),
                            tx: &mut *tx,
                            caps: self.caps.clone(),
                            link: self.link,
                            sent: &mut sent,
                            log: Some((&mut f.rec, now)),
                        };
                        self.iface.poll_ingress_single(now, &mut dev, &mut f.set);
                    }
                }
                if f.keepalive.is_some() {
                    // Heard from the peer: back to the idle interval, which
                    // smoltcp re-arms from now as it takes the segment.
                    f.last_rx = now;
                    apply_timeouts(f, self.cfg.tcp_user_timeout, now);
                }
                let mut dev = OneShot {
                    rx: Some(frame),
                    tx: &mut *tx,
                    caps: self.caps.clone(),
                    link: self.link,
                    sent: &mut sent,
                    // Every TCP segment we send is seen (a SYN-ACK too).
                    log: (f.kind == FlowKind::Tcp).then_some((&mut f.rec, now)),
                };
                let r = self.iface.poll_ingress_single(now, &mut dev, &mut f.set);
                let _ = r == PollIngressSingleResult::None;
                if f.kind == FlowKind::Tcp {
                    // An ACK may have emptied the send queue: an idle
                    // connection has no timeout (see `apply_timeouts`).
                    apply_timeouts(f, self.cfg.tcp_user_timeout, now);
                }
                if let Some(seg) = seg.as_ref().filter(|_| tcp) {
                    if f.rec.on_received(seg, frame, now) {
                        // A partial ACK while recovering: the next hole
                        // goes out now, not after smoltcp's timer.
                        let (caps, link) = (&self.caps, self.link);
                        let st = &mut self.stats;
                        replay_dup_acks(&mut self.iface, f, (caps, link), tx, &mut sent, now, st);
                    }
                }
                if let Some(seg) = seg.as_ref().filter(|s| s.syn) {
                    f.rec.peer_syn(seg);
                }
                self.stats.tx_frames += sent;
                // A listening socket that did not move to SYN-RECEIVED was
                // not for us after all (e.g. wrong address): drop it.
                let h = f.handle;
                if f.kind == FlowKind::Tcp
                    && f.listener.is_some()
                    && f.set.get::<tcp::Socket>(h).state() == tcp::State::Listen
                {
                    self.remove_flow(id, now, &mut NullTx(Vec::new()));
                    return;
                }
                if self.in_time_wait(id) {
                    // An orphan reached TIME-WAIT: send the last ACK and free
                    // it now. Holding 512 KiB of socket buffers per closed
                    // connection for 10 s would cap short-connection rates
                    // (Linux likewise keeps only a small time-wait bucket).
                    self.remove_flow(id, now, tx);
                    return;
                }
                self.touch(id);
            }
            None => {
                self.stats.rx_other += 1;
                let mut dev = OneShot {
                    rx: Some(frame),
                    tx,
                    caps: self.caps.clone(),
                    link: self.link,
                    sent: &mut sent,
                    log: None,
                };
                self.iface
                    .poll_ingress_single(now, &mut dev, &mut self.empty);
                self.stats.tx_frames += sent;
            }
        }
    }

    /// An orphaned TCP flow in TIME-WAIT (or already closed).
    fn in_time_wait(&mut self, id: FlowId) -> bool {
        let Some(f) = self
            .flows
            .get_mut(id.idx as usize)
            .and_then(|f| f.as_mut())
            .filter(|f| f.gen == id.gen && f.owner == 0 && f.kind == FlowKind::Tcp)
        else {
            return false;
        };
        let h = f.handle;
        matches!(
            f.set.get::<tcp::Socket>(h).state(),
            tcp::State::TimeWait | tcp::State::Closed
        )
    }

    fn passive_open(&mut self, key: TcpKey, _now: Instant) -> Option<FlowId> {
        let lid = self.find_listener(key.local, key.lport)?;
        let l = self.listeners[lid.0 as usize].as_mut()?;
        if l.pending >= l.backlog || self.nflows >= self.cfg.max_flows {
            self.stats.syn_backlog_drops += 1;
            return None;
        }
        l.pending += 1;
        let owner = l.owner;
        let (mut sock, lease) = self.new_tcp_socket();
        if sock
            .listen(IpListenEndpoint {
                addr: Some(key.local),
                port: key.lport,
            })
            .is_err()
        {
            self.give_back(sock, lease);
            return None;
        }
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let h = set.add(sock);
        let id = self.alloc_flow(FlowKind::Tcp, set, h);
        if let Some(f) = self.flow_mut(id) {
            f.lease = lease;
        }
        if let Some(f) = self.flow_mut(id) {
            f.key = Some(key);
            f.listener = Some(lid);
            f.owner = owner;
        }
        self.tcp.insert(key, id);
        self.stats.passive_opens += 1;
        Some(id)
    }

    /// Transmit whatever `id` has to send and re-arm its timer.
    pub fn egress(&mut self, id: FlowId, now: Instant, tx: &mut dyn FrameTx) {
        let idx = id.idx as usize;
        let Some(f) = self
            .flows
            .get_mut(idx)
            .and_then(|f| f.as_mut())
            .filter(|f| f.gen == id.gen)
        else {
            return;
        };
        let mut sent = 0u64;
        let is_tcp = f.kind == FlowKind::Tcp;
        let tcp = self.cfg.tcp_loss_recovery && is_tcp;
        apply_timeouts(f, self.cfg.tcp_user_timeout, now);
        // Only smoltcp's timeout closes a connection in a timer pass (its
        // TIME-WAIT ending is a clean close): remember it for the errno.
        let open_before = is_tcp
            && !matches!(
                f.set.get::<tcp::Socket>(f.handle).state(),
                tcp::State::Closed | tcp::State::TimeWait
            );
        if tcp && f.rec.probe(now) {
            // Nothing acknowledged for a probe timeout: retransmit the first
            // unacknowledged segment now.
            let (caps, link) = (&self.caps, self.link);
            let st = &mut self.stats;
            replay_dup_acks(&mut self.iface, f, (caps, link), tx, &mut sent, now, st);
        }
        {
            let mut dev = OneShot {
                rx: None,
                tx,
                caps: self.caps.clone(),
                link: self.link,
                sent: &mut sent,
                log: is_tcp.then_some((&mut f.rec, now)),
            };
            // Bounded: each call sends what the window allows; stop when idle.
            for _ in 0..1024 {
                if self.iface.poll_egress(now, &mut dev, &mut f.set)
                    == smoltcp::iface::PollResult::None
                {
                    break;
                }
            }
        }
        self.stats.tx_frames += sent;
        if open_before && f.set.get::<tcp::Socket>(f.handle).state() == tcp::State::Closed {
            f.timed_out = true;
            self.stats.tcp_timeouts += 1;
        }
        let probe_at = if tcp { f.rec.deadline() } else { None };
        let next = match (self.iface.poll_at(now, &f.set), probe_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(t) = next {
            if f.timer.is_none_or(|old| t < old || old <= now) {
                f.timer = Some(t);
                self.timers.push(t, id);
            }
        }
    }

    fn schedule(&mut self, id: FlowId, at: Instant) {
        if let Some(f) = self.flow_mut(id) {
            f.timer = Some(at);
            self.timers.push(at, id);
        }
    }

    /// Run expired timers (retransmits, delayed ACKs, keepalives, TIME-WAIT)
    /// and the neighbour-resolution retry pass. Flows get touched.
    pub fn poll_timers(&mut self, now: Instant, tx: &mut dyn FrameTx) {
        if self.frags.pending() > 0 {
            self.frags.expire(now);
            self.stats.frag = self.frags.stats.clone();
        }
        if std::mem::take(&mut self.neighbor_changed) {
            // Rare (ARP/NDP): give every flow an egress chance.
            let ids: Vec<FlowId> = self
                .flows
                .iter()
                .enumerate()
                .filter_map(|(i, f)| {
                    f.as_ref().map(|f| FlowId {
                        idx: i as u32,
                        gen: f.gen,
                    })
                })
                .collect();
            for id in ids {
                self.egress(id, now, tx);
                self.touch(id);
            }
        }
        let mut due = std::mem::take(&mut self.expired);
        // Bounded per call; the rest runs on the next pass.
        self.timers.expire(now, 100_000, &mut due);
        for (t, id) in due.drain(..) {
            let Some(f) = self.flow_mut(id) else { continue };
            if f.timer != Some(t) {
                continue; // superseded
            }
            f.timer = None;
            self.egress(id, now, tx);
            self.touch(id);
        }
        self.expired = due;
    }

    /// When `poll_timers` next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.neighbor_changed {
            return Some(Instant::from_micros(0));
        }
        self.timers.next()
    }

    /// Snapshot of the flows for the control socket.
    pub fn flow_info(&self, id: FlowId) -> Option<FlowInfo> {
        let f = self.flow(id)?;
        Some(match f.kind {
            FlowKind::Tcp => {
                let s = f.set.get::<tcp::Socket>(f.handle);
                FlowInfo {
                    proto: "tcp",
                    state: format!("{}", s.state()),
                    local: s
                        .local_endpoint()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    remote: s
                        .remote_endpoint()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    rx_queue: s.recv_queue(),
                    tx_queue: s.send_queue(),
                }
            }
            FlowKind::Udp => {
                let s = f.set.get::<udp::Socket>(f.handle);
                FlowInfo {
                    proto: "udp",
                    state: "bound".into(),
                    local: s.endpoint().to_string(),
                    remote: String::new(),
                    rx_queue: s.recv_queue(),
                    tx_queue: s.send_queue(),
                }
            }
        })
    }
}

/// A sink that drops frames (used while building the interface and for
/// flows being discarded).
pub struct NullTx(pub Vec<u8>);

impl FrameTx for NullTx {
    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        self.0.resize(len, 0);
        &mut self.0[..len]
    }
}

/// A sink that keeps frames (tests, and wiring two stacks together).
#[derive(Default)]
pub struct VecTx(pub Vec<Vec<u8>>);

impl FrameTx for VecTx {
    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        self.0.push(vec![0; len]);
        self.0.last_mut().expect("just pushed")
    }
}

/// One user of `port` fewer in a port -> count map.
fn release_port(ports: &mut HashMap<u16, usize>, port: u16) {
    if let Some(n) = ports.get_mut(&port) {
        *n -= 1;
        if *n == 0 {
            ports.remove(&port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, Ipv4Address};

    fn cfg(last: u8) -> StackConfig {
        StackConfig {
            mac: [2, 0, 0, 0, 0, last],
            mtu: 1500,
            addrs: vec![IpCidr::new(IpAddress::v4(198, 18, 0, last), 24)],
            gateway4: None,
            gateway6: None,
            tcp_rx_buf: 65536,
            tcp_tx_buf: 65536,
            tcp_rx_buf_max: 0,
            tcp_rx_large_budget: 0,
            tcp_ack_delay: Some(Duration::from_millis(10)),
            tcp_ack_delay_max: Duration::from_millis(10),
            tcp_timestamps: true,
            tcp_loss_recovery: true,
            tcp_user_timeout: None,
            udp_packets: 16,
            udp_bytes: 65536,
            max_flows: 100_000,
            seed: last as u64,
            tso: false,
        }
    }

    /// Two stacks on one wire; frames are exchanged until quiet.
    struct Wire {
        a: Stack,
        b: Stack,
        now: Instant,
    }

    impl Wire {
        fn new() -> Self {
            Self::with(cfg(1), cfg(2))
        }

        /// A and B with these configurations.
        fn with(a: StackConfig, b: StackConfig) -> Self {
            let now = Instant::from_millis(1);
            Wire {
                a: Stack::new(a, now),
                b: Stack::new(b, now),
                now,
            }
        }

        /// B listens on port 80 (all addresses) with this backlog.
        fn listen_80(&mut self, backlog: u32) {
            let any = IpListenEndpoint {
                addr: None,
                port: 80,
            };
            self.b.listen(any, backlog, 7).unwrap();
        }

        fn pump(&mut self, mut to_b: Vec<Vec<u8>>, mut to_a: Vec<Vec<u8>>) {
            for _ in 0..10_000 {
                if to_a.is_empty() && to_b.is_empty() {
                    break;
                }
                let mut ta = VecTx::default();
                let mut tb = VecTx::default();
                for f in to_b.drain(..) {
                    self.b.ingress(self.now, &f, false, &mut tb);
                }
                for f in to_a.drain(..) {
                    self.a.ingress(self.now, &f, false, &mut ta);
                }
                let mut t = Vec::new();
                self.a.take_touched(&mut t);
                for id in t.drain(..) {
                    self.a.egress(id, self.now, &mut ta);
                }
                self.b.take_touched(&mut t);
                for id in t.drain(..) {
                    self.b.egress(id, self.now, &mut tb);
                }
                self.now += Duration::from_micros(10);
                self.a.poll_timers(self.now, &mut ta);
                self.b.poll_timers(self.now, &mut tb);
                to_b = ta.0;
                to_a = tb.0;
            }
        }

        /// B listens on `port`, A connects to it; the handshake is done.
        fn connected(port: u16) -> (Wire, FlowId) {
            Self::connected_with(cfg(1), port)
        }

        /// [`Wire::connected`] with A configured as `a`.
        fn connected_with(a: StackConfig, port: u16) -> (Wire, FlowId) {
            let mut w = Wire::with(a, cfg(2));
            w.b.listen(IpListenEndpoint { addr: None, port }, 16, 7)
                .unwrap();
            let mut out = VecTx::default();
            let f = w.a.connect(ep(2, port), None, 1, w.now).unwrap();
            w.a.egress(f, w.now, &mut out);
            w.pump(out.0, Vec::new());
            (w, f)
        }

        fn settle(&mut self) {
            // Let timers (delayed ACK, retransmits) run.
            for _ in 0..50 {
                self.now += Duration::from_millis(2);
                let mut ta = VecTx::default();
                let mut tb = VecTx::default();
                self.a.poll_timers(self.now, &mut ta);
                self.b.poll_timers(self.now, &mut tb);
                self.pump(ta.0, tb.0);
            }
        }
    }

    fn ep(last: u8, port: u16) -> IpEndpoint {
        IpEndpoint::new(IpAddress::v4(198, 18, 0, last), port)
    }

    /// Send 20 segments from A to B, dropping the transmissions `(segment,
    /// transmission)` in `lost` (both 1-based: `(3, 1)` is the first send
    /// of the third data segment); returns how long B took to receive
    /// everything.
    fn deliver_losing(recovery: bool, lost: &[(usize, usize)]) -> Duration {
        let mut a_cfg = cfg(1);
        a_cfg.tcp_loss_recovery = recovery;
        let mut w = Wire::with(a_cfg, cfg(2));
        w.listen_80(16);
        let mut out = VecTx::default();
        let f = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
        w.a.egress(f, w.now, &mut out);
        w.pump(out.0, Vec::new());
        let bf = *w.b.tcp.values().next().unwrap();
        let data = vec![7u8; 20 * 1400];
        assert_eq!(w.a.tcp(f).unwrap().send_slice(&data).unwrap(), data.len());
        let (t0, mut got, mut n) = (w.now, 0, 0);
        // Per sequence number: (segment number, transmissions so far).
        let mut seen: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        while got < data.len() {
            assert!(w.now - t0 < Duration::from_secs(30), "stalled at {got}");
            // A: what B sent, timers, then its output through the lossy
            // wire (the chosen transmissions of the chosen segments die).
            let mut ta = VecTx::default();
            for fr in to_a.drain(..) {
                w.a.ingress(w.now, &fr, false, &mut ta);
            }
            w.a.poll_timers(w.now, &mut ta);
            w.a.egress(f, w.now, &mut ta);
            let mut tb = VecTx::default();
            for fr in ta.0 {
                let s = recovery::parse(&fr).unwrap();
                if s.len > 0 && !s.syn_or_rst {
                    let e = seen.entry(s.seq).or_insert_with(|| {
                        n += 1;
                        (n, 0)
                    });
                    e.1 += 1;
                    if lost.contains(&*e) {
                        continue;
                    }
                }
                w.b.ingress(w.now, &fr, false, &mut tb);
            }
            // B: its app reads everything; ACKs go back next round.
            w.b.poll_timers(w.now, &mut tb);
            got += w.b.tcp(bf).unwrap().recv_slice(&mut buf).unwrap();
            w.b.egress(bf, w.now, &mut tb);
            to_a = tb.0;
            w.now += Duration::from_micros(100);
        }
        w.now - t0
    }

    /// Bytes B holds unread after A tried to send `n` bytes to it, for
    /// each of three connections opened at once, and B's stats.
    fn unread_at_receiver(b_cfg: StackConfig, n: usize) -> (Vec<usize>, StackStats) {
        let mut w = Wire::with(cfg(1), b_cfg);
        w.listen_80(16);
        let mut out = VecTx::default();
        let conns: Vec<FlowId> = (0..3)
            .map(|_| {
                let f = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
                w.a.egress(f, w.now, &mut out);
                f
            })
            .collect();
        w.pump(std::mem::take(&mut out.0), Vec::new());
        let data = vec![7u8; n];
        let mut sent = [0usize; 3];
        for _ in 0..200 {
            for (i, &f) in conns.iter().enumerate() {
                let s = w.a.tcp(f).unwrap();
                sent[i] += s.send_slice(&data[sent[i]..]).unwrap();
                w.a.egress(f, w.now, &mut out);
            }
            w.pump(std::mem::take(&mut out.0), Vec::new());
            w.settle();
        }
        let mut unread: Vec<usize> = (0..w.b.flows.len())
            .filter_map(|i| {
                let f = w.b.flows[i].as_ref()?;
                Some(f.set.get::<tcp::Socket>(f.handle).recv_queue())
            })
            .collect();
        unread.sort_unstable();
        (unread, w.b.stats().clone())
    }

    #[test]
    fn connections_get_the_larger_window_while_the_budget_lasts() {
        // 64 KiB base, 512 KiB larger buffers, budget for two of them.
        let mut c = cfg(2);
        c.tcp_rx_buf_max = 512 << 10;
        c.tcp_rx_large_budget = 1 << 20;
        let (unread, st) = unread_at_receiver(c.clone(), 400_000);
        // Two connections took all 400 000 bytes without the app reading;
        // the third stopped at its 64 KiB window.
        assert_eq!(unread, vec![65536, 400_000, 400_000]);
        assert_eq!((st.tcp_rx_large, st.tcp_rx_large_bytes), (2, 1 << 20));
        // Without the larger size every connection stops at 64 KiB.
        c.tcp_rx_buf_max = 0;
        let (unread, st) = unread_at_receiver(c, 400_000);
        assert_eq!(unread, vec![65536; 3]);
        assert_eq!(st.tcp_rx_large, 0);
    }

    #[test]
    fn a_closed_connection_gives_its_larger_buffer_back_to_the_budget() {
        let mut c = cfg(1);
        c.tcp_rx_buf_max = 512 << 10;
        c.tcp_rx_large_budget = 512 << 10;
        let mut s = Stack::new(c, Instant::from_millis(1));
        let mut tx = VecTx::default();
        let now = Instant::from_millis(1);
        let a = s.connect(ep(2, 80), None, 1, now).unwrap();
        let b = s.connect(ep(2, 80), None, 1, now).unwrap();
        assert_eq!(s.tcp(a).unwrap().recv_capacity(), 512 << 10);
        assert_eq!(s.tcp(b).unwrap().recv_capacity(), 65536);
        s.tcp(a).unwrap().abort();
        s.remove_flow(a, now, &mut tx);
        assert_eq!(s.stats().tcp_rx_large_bytes, 0);
        let c2 = s.connect(ep(2, 80), None, 1, now).unwrap();
        assert_eq!(s.tcp(c2).unwrap().recv_capacity(), 512 << 10);
        assert_eq!(s.stats().tcp_rx_large, 2);
    }

    #[test]
    fn lost_segments_go_again_long_before_smoltcps_one_second_timer() {
        // A tail loss (no duplicate ACKs can follow it; a lone segment
        // waits out the peer's possible delayed ACK, 200 ms, first), and
        // two holes in one window (the second is found by a partial ACK).
        // A retransmission lost as well: the next probe must send it again
        // (smoltcp counts duplicate ACKs on, and retransmits only at the
        // third, so each probe first resets its count).
        for (lost, within) in [
            (&[(20, 1)][..], 300),
            (&[(8, 1), (10, 1)][..], 60),
            (&[(5, 1), (5, 2)][..], 60),
            (&[(5, 1), (5, 2), (5, 3)][..], 200),
            // A lost TSO super-frame: eight segments at once.
            (&(8..=15).map(|n| (n, 1)).collect::<Vec<_>>()[..], 100),
        ] {
            let with = deliver_losing(true, lost);
            let without = deliver_losing(false, lost);
            assert!(with < Duration::from_millis(within), "{lost:?}: {with}");
            assert!(without >= Duration::from_millis(900), "{lost:?}: {without}");
        }
    }

    /// Step A and B 10 ms at a time for `ms`; frames from A reach B only
    /// while `alive`. When (ms since `t0`) A sent something, and whether it
    /// was a RST.
    fn run_keepalive(w: &mut Wire, t0: Instant, ms: u64, alive: bool) -> Vec<(i64, bool)> {
        let mut sent = Vec::new();
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        for _ in 0..ms / 10 {
            w.now += Duration::from_millis(10);
            let mut ta = VecTx::default();
            for fr in to_a.drain(..) {
                w.a.ingress(w.now, &fr, false, &mut ta);
            }
            w.a.poll_timers(w.now, &mut ta);
            let mut tb = VecTx::default();
            for fr in ta.0 {
                let rst = recovery::parse(&fr).is_some_and(|s| s.syn_or_rst);
                sent.push(((w.now - t0).total_millis() as i64, rst));
                if alive {
                    w.b.ingress(w.now, &fr, false, &mut tb);
                }
            }
            w.b.poll_timers(w.now, &mut tb);
            let mut t = Vec::new();
            w.b.take_touched(&mut t);
            for id in t {
                w.b.egress(id, w.now, &mut tb);
            }
            to_a = tb.0;
        }
        sent
    }

    #[test]
    fn keepalive_probes_after_idle_then_every_interval_and_drops_a_silent_peer() {
        let (mut w, f) = Wire::connected(80);
        w.settle();
        let ka = KeepAlive {
            idle: Duration::from_millis(1000),
            interval: Duration::from_millis(200),
            probes: 3,
        };
        // Linux's defaults first, then the app's own timing (the
        // immediate probe smoltcp sends on the first is answered at once,
        // which arms its timer for 7200 s): the new timing must hold.
        let linux = KeepAlive {
            idle: Duration::from_secs(7200),
            interval: Duration::from_secs(75),
            probes: 9,
        };
        let mut out = VecTx::default();
        w.a.set_keepalive(f, Some(linux), w.now, &mut out);
        w.a.egress(f, w.now, &mut out);
        assert_eq!(out.0.len(), 1, "smoltcp's probe at once");
        w.pump(out.0, Vec::new());
        let mut out = VecTx::default();
        w.a.set_keepalive(f, Some(ka), w.now, &mut out);
        w.pump(out.0, Vec::new());
        // The peer answers: one probe per second of silence, not one per
        // interval, and the connection lives on.
        let t0 = w.now;
        let sent = run_keepalive(&mut w, t0, 4000, true);
        assert!(sent.iter().all(|s| !s.1), "{sent:?}");
        let later: Vec<i64> = sent.iter().map(|s| s.0).filter(|&t| t > 100).collect();
        assert!(
            (3..=4).contains(&later.len()),
            "one probe per idle second: {sent:?}"
        );
        for p in later.windows(2) {
            assert!((990..=1030).contains(&(p[1] - p[0])), "{sent:?}");
        }
        assert_eq!(w.a.tcp(f).unwrap().state(), tcp::State::Established);
        assert!(!w.a.timed_out(f));
        // The peer vanishes right after answering a probe: three probes
        // 200 ms apart from 1 s after its answer, then the connection is
        // dropped at 1.6 s with a RST (Linux's timing), as a timeout.
        let t1 = w.now;
        let answered = *later.last().unwrap() - (t1 - t0).total_millis() as i64;
        let sent = run_keepalive(&mut w, t1, 3000, false);
        let expect: Vec<(i64, bool)> = [(1000, false), (1200, false), (1400, false), (1600, true)]
            .iter()
            .map(|&(t, rst)| (t + answered, rst))
            .collect();
        assert_eq!(sent.len(), 4, "{sent:?} (expected near {expect:?})");
        for (got, want) in sent.iter().zip(&expect) {
            assert!(
                (got.0 - want.0).abs() <= 30 && got.1 == want.1,
                "{sent:?} vs {expect:?}"
            );
        }
        assert_eq!(w.a.tcp(f).unwrap().state(), tcp::State::Closed);
        assert!(w.a.timed_out(f));
        assert_eq!(w.a.stats().tcp_timeouts, 1);
    }

    #[test]
    fn a_peer_silent_while_data_waits_is_dropped_after_the_user_timeout() {
        // (stack default, the socket's own, data waiting): how long until
        // A gives up. As in Linux, a quiet connection with nothing to send
        // never times out, whatever the timeouts.
        for (default, own, data, within) in [
            (None, Some(500), true, Some(500..1400)),
            (Some(2000), None, true, Some(2000..2900)),
            (Some(2000), Some(700), true, Some(700..1600)),
            (None, None, true, None),
            (Some(500), Some(500), false, None),
        ] {
            let mut a_cfg = cfg(1);
            a_cfg.tcp_user_timeout = default.map(Duration::from_millis);
            let (mut w, f) = Wire::connected_with(a_cfg, 80);
            w.settle();
            w.a.set_user_timeout(f, own.map(Duration::from_millis), w.now);
            if data {
                w.a.tcp(f).unwrap().send_slice(b"hello").unwrap();
            }
            let t0 = w.now;
            let mut closed_at = None;
            for _ in 0..600 {
                run_keepalive(&mut w, t0, 10, false);
                let mut out = VecTx::default();
                w.a.egress(f, w.now, &mut out);
                if w.a.tcp(f).unwrap().state() == tcp::State::Closed {
                    closed_at = Some((w.now - t0).total_millis());
                    break;
                }
            }
            match within {
                Some(r) => {
                    let at = closed_at.expect("dropped");
                    assert!(r.contains(&at), "{default:?}/{own:?}: at {at} ms");
                    assert!(w.a.timed_out(f));
                }
                None => assert_eq!(closed_at, None, "no timeout: never dropped"),
            }
        }
    }

    #[test]
    fn many_concurrent_syns_get_accepted() {
        let mut w = Wire::new();
        w.listen_80(4096);
        let mut flows = Vec::new();
        let mut out = VecTx::default();
        for _ in 0..300 {
            flows.push(w.a.connect(ep(2, 80), None, 1, w.now).unwrap());
        }
        for f in &flows {
            w.a.egress(*f, w.now, &mut out);
        }
        w.pump(out.0, Vec::new());
        w.settle();
        let established = flows
            .iter()
            .filter(|f| w.a.tcp(**f).unwrap().state() == tcp::State::Established)
            .count();
        assert_eq!(established, 300, "every SYN must get its own socket");
        assert_eq!(w.b.stats().passive_opens, 300);
    }

    #[test]
    fn backlog_bounds_half_open_connections() {
        let mut w = Wire::new();
        w.listen_80(4);
        let mut out = VecTx::default();
        for _ in 0..10 {
            let f = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
            w.a.egress(f, w.now, &mut out);
        }
        w.pump(out.0, Vec::new());
        // Nobody accepted: only `backlog` connections were created.
        assert_eq!(w.b.stats().passive_opens, 4);
        assert!(w.b.stats().syn_backlog_drops >= 6);
    }

    #[test]
    fn closed_port_gets_rst_and_connect_fails() {
        let mut w = Wire::new();
        let mut out = VecTx::default();
        let f = w.a.connect(ep(2, 81), None, 1, w.now).unwrap();
        w.a.egress(f, w.now, &mut out);
        w.pump(out.0, Vec::new());
        assert_eq!(w.a.tcp(f).unwrap().state(), tcp::State::Closed);
    }

    /// An ICMPv4 destination-unreachable `code` from 198.18.0.254 to A,
    /// quoting `quoted` (A's frame, from its IP header on).
    fn icmp_unreachable(code: u8, quoted: &[u8]) -> Vec<u8> {
        use smoltcp::wire::Icmpv4Packet;
        let q = &quoted[14..14 + 28];
        let mut f = vec![0u8; 14 + 20 + 8 + q.len()];
        f[..6].copy_from_slice(&cfg(1).mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + 8 + q.len()) as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Icmp);
        ip.set_src_addr(Ipv4Address::new(198, 18, 0, 254));
        ip.set_dst_addr(Ipv4Address::new(198, 18, 0, 1));
        ip.fill_checksum();
        let t = 14 + 20;
        f[t] = 3;
        f[t + 1] = code;
        f[t + 8..].copy_from_slice(q);
        Icmpv4Packet::new_unchecked(&mut f[t..]).fill_checksum();
        f
    }

    #[test]
    fn an_icmp_error_quoting_our_syn_fails_the_connect_and_no_other_does() {
        let mut w = Wire::new();
        let mut out = VecTx::default();
        // A's first connect resolves B's MAC; the second's SYN goes out.
        let first = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
        w.a.egress(first, w.now, &mut out);
        w.pump(std::mem::take(&mut out.0), Vec::new());
        let f = w.a.connect(ep(2, 81), None, 1, w.now).unwrap();
        assert!(!w.a.syn_progress(f).0);
        w.a.egress(f, w.now, &mut out);
        let syn = out.0.pop().expect("a SYN");
        assert_eq!(w.a.syn_progress(f), (true, 0));
        let mut sink = NullTx(Vec::new());
        // A forged error with another sequence number: ignored.
        let mut forged = syn.clone();
        forged[14 + 20 + 4] ^= 0x55;
        w.a.ingress(w.now, &icmp_unreachable(1, &forged), false, &mut sink);
        assert_eq!(w.a.take_error(f), None);
        // Fragmentation needed is path MTU news, not an error.
        w.a.ingress(w.now, &icmp_unreachable(4, &syn), false, &mut sink);
        assert_eq!(w.a.take_error(f), None);
        // Host unreachable quoting the SYN: the connect's error.
        w.a.ingress(w.now, &icmp_unreachable(1, &syn), false, &mut sink);
        assert_eq!(w.a.take_error(f), Some(libc::EHOSTUNREACH));
        assert_eq!(w.a.stats().icmp_connect_errors, 1);
        // Port unreachable maps to ECONNREFUSED.
        w.a.ingress(w.now, &icmp_unreachable(3, &syn), false, &mut sink);
        assert_eq!(w.a.take_error(f), Some(libc::ECONNREFUSED));
        // A connect to an address nobody answers ARP for: no SYN, probes
        // (smoltcp sends at most one per second for the interface).
        w.now += Duration::from_secs(2);
        let lost = w.a.connect(ep(77, 80), None, 1, w.now).unwrap();
        w.a.egress(lost, w.now, &mut out);
        assert_eq!(w.a.syn_progress(lost), (false, 1));
    }

    #[test]
    fn a_hard_icmp_error_reaches_a_connected_udp_flow_only() {
        let mut w = Wire::new();
        let mut out = VecTx::default();
        // A datagram from each of two A sockets to B's closed port 53:
        // one connected there, one not.
        let mut sent = Vec::new();
        let mut flows = Vec::new();
        for connect in [true, false] {
            let any = IpListenEndpoint {
                addr: None,
                port: 0,
            };
            let f = w.a.udp_bind(any, ListenFamily::V4, 1).unwrap();
            if connect {
                w.a.udp_connect(f, ep(2, 53)).unwrap();
            }
            // The first try resolves B's MAC (smoltcp may drop that
            // datagram); a later one goes out.
            for _ in 0..20 {
                w.a.udp(f).unwrap().send_slice(b"query", ep(2, 53)).unwrap();
                w.a.egress(f, w.now, &mut out);
                let d = out.0.iter().find(|fr| fr.get(23) == Some(&17)).cloned();
                w.pump(std::mem::take(&mut out.0), Vec::new());
                if let Some(d) = d {
                    sent.push(d);
                    break;
                }
                w.now += Duration::from_millis(200);
            }
            flows.push(f);
        }
        assert_eq!(sent.len(), 2, "both datagrams went out");
        // B's own port unreachable (smoltcp answers a closed port) already
        // reached the connected socket, and only that one.
        assert_eq!(w.a.take_error(flows[0]), Some(libc::ECONNREFUSED));
        assert_eq!(w.a.take_error(flows[1]), None);
        let before = w.a.stats().udp_icmp_errors;
        let mut sink = NullTx(Vec::new());
        // Host unreachable is a soft error: Linux leaves the socket alone.
        w.a.ingress(w.now, &icmp_unreachable(1, &sent[0]), false, &mut sink);
        assert_eq!(w.a.take_error(flows[0]), None);
        // Port unreachable: the connected socket's next call fails, once.
        w.a.ingress(w.now, &icmp_unreachable(3, &sent[0]), false, &mut sink);
        assert_eq!(w.a.take_error(flows[0]), Some(libc::ECONNREFUSED));
        assert_eq!(w.a.take_error(flows[0]), None);
        // The unconnected one hears nothing.
        w.a.ingress(w.now, &icmp_unreachable(3, &sent[1]), false, &mut sink);
        assert_eq!(w.a.take_error(flows[1]), None);
        assert_eq!(w.a.stats().udp_icmp_errors, before + 1);
    }

    /// Frames and the segment size asked of the device, as sent.
    #[derive(Default)]
    struct GsoTx(Vec<(Vec<u8>, Option<u16>)>);

    impl FrameTx for GsoTx {
        fn tx_frame(&mut self, len: usize) -> &mut [u8] {
            self.tx_frame_gso(len, None)
        }
        fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
            self.0.push((vec![0; len], gso));
            &mut self.0.last_mut().expect("just pushed").0
        }
    }

    #[test]
    fn ipv6_bulk_goes_out_in_super_frames_cut_at_the_peers_mss() {
        // smoltcp builds IPv6 super-frames but passes their segment size
        // on only for IPv4: without it they were cut into IP fragments
        // (before the large MTU they were dropped), and IPv6 bulk ran at a
        // tenth of IPv4's.
        let v6 = |last: u8| {
            let mut c = cfg(last);
            c.tso = true;
            c.addrs = vec![
                IpCidr::new(IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, last.into()), 64),
                IpCidr::new(IpAddress::v6(0xfe80, 0, 0, 0, 0, 0, 0, last.into()), 64),
            ];
            c
        };
        let mut w = Wire::with(v6(1), v6(2));
        w.listen_80(16);
        let dst = IpEndpoint::new(IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, 2), 80);
        let f = w.a.connect(dst, None, 1, w.now).unwrap();
        // TCP checksums are left to the device here: frames are trusted.
        let mut to_b = VecTx::default();
        w.a.egress(f, w.now, &mut to_b);
        for _ in 0..4 {
            let mut to_a = VecTx::default();
            for fr in to_b.0.drain(..) {
                w.b.ingress(w.now, &fr, true, &mut to_a);
            }
            let mut t = Vec::new();
            w.b.take_touched(&mut t);
            for id in t {
                w.b.egress(id, w.now, &mut to_a);
            }
            for fr in to_a.0.drain(..) {
                w.a.ingress(w.now, &fr, true, &mut to_b);
            }
            w.a.egress(f, w.now, &mut to_b);
        }
        assert_eq!(w.a.tcp(f).unwrap().state(), tcp::State::Established);
        w.a.tcp(f).unwrap().send_slice(&[5u8; 100_000]).unwrap();
        let mut tx = GsoTx::default();
        w.a.egress(f, w.now, &mut tx);
        let big: Vec<_> = tx.0.iter().filter(|(fr, _)| fr.len() > 1514).collect();
        assert!(
            !big.is_empty(),
            "no super-frame in {:?}",
            tx.0.iter().map(|f| f.0.len()).collect::<Vec<_>>()
        );
        assert!(tx.0.iter().all(|(fr, _)| !frag::is_fragment(fr)));
        // 1440 (the link's IPv6 MSS, which B offered) less 12 for timestamps.
        assert!(big.iter().all(|(_, gso)| *gso == Some(1428)));
    }

    #[test]
    fn mangled_frames_from_the_wire_never_panic_the_stack() {
        // Frames from the wire are untrusted input. Real ones (handshake,
        // data, UDP, IPv4 and IPv6 fragments, ARP) with random bytes
        // changed, cut short or extended go to a stack with a listener
        // and UDP sockets, checksums trusted half the time so the deepest
        // parsing runs; afterwards it still serves a real connection.
        let with_v6 = |last: u8| {
            let mut c = cfg(last);
            c.addrs.push(IpCidr::new(
                IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, last as u16),
                64,
            ));
            c
        };
        let mut w = Wire::with(with_v6(1), with_v6(2));
        w.listen_80(64);
        for addr in [None, Some(IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, 2))] {
            let fam = if addr.is_some() {
                ListenFamily::V6
            } else {
                ListenFamily::V4
            };
            w.b.udp_bind(IpListenEndpoint { addr, port: 53 }, fam, 9)
                .unwrap();
        }
        // Seeds: what A sends B in a handshake, a request, and UDP
        // datagrams small and large (fragments) over both IP versions.
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut out = VecTx::default();
        let f = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
        w.a.egress(f, w.now, &mut out);
        seeds.extend(out.0.iter().cloned());
        w.pump(std::mem::take(&mut out.0), Vec::new());
        w.a.tcp(f).unwrap().send_slice(&[b'x'; 3000]).unwrap();
        w.a.egress(f, w.now, &mut out);
        seeds.extend(out.0.iter().cloned());
        w.pump(std::mem::take(&mut out.0), Vec::new());
        // UDP from A's addresses to B's port 53, small and (cut as A's
        // transmit path cuts it) in fragments.
        for (src, dst) in [
            (IpAddress::v4(198, 18, 0, 1), IpAddress::v4(198, 18, 0, 2)),
            (
                IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, 1),
                IpAddress::v6(0x2001, 2, 0, 0, 0, 0, 0, 2),
            ),
        ] {
            let (src, dst) = (IpEndpoint::new(src, 5353), IpEndpoint::new(dst, 53));
            seeds.push(local_udp_frame(cfg(2).mac, src, dst, &[7; 40]).unwrap());
            let big = local_udp_frame(cfg(2).mac, src, dst, &[7; 5000]).unwrap();
            frag::fragment(&big, 1500, 1, &mut |p| seeds.push(p.to_vec()));
        }
        let fragments = seeds.iter().filter(|s| frag::is_fragment(s));
        assert_eq!(
            fragments.count(),
            8,
            "IPv4 and IPv6 fragments among the seeds"
        );
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sink = NullTx(Vec::new());
        for i in 0..40_000u64 {
            let mut fr = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 4 {
                match next() % 6 {
                    // Mostly the headers (the first 120 bytes).
                    0..=2 => {
                        let at = (next() % fr.len().min(120) as u64) as usize;
                        fr[at] = next() as u8;
                    }
                    3 => {
                        let at = (next() % fr.len() as u64) as usize;
                        fr[at] ^= 0xff;
                    }
                    4 => fr.truncate((next() % fr.len() as u64) as usize),
                    _ => fr.extend((0..next() % 64).map(|_| next() as u8)),
                }
                if fr.is_empty() {
                    break;
                }
            }
            w.b.ingress(w.now, &fr, next() % 2 == 0, &mut sink);
            let mut t = Vec::new();
            w.b.take_touched(&mut t);
            for id in t {
                w.b.egress(id, w.now, &mut sink);
            }
            if i % 1000 == 0 {
                w.now += Duration::from_millis(50);
                w.b.poll_timers(w.now, &mut sink);
            }
        }
        // Still a working host: a new connection carries data.
        let f = w.a.connect(ep(2, 80), None, 1, w.now).unwrap();
        w.a.egress(f, w.now, &mut out);
        w.pump(std::mem::take(&mut out.0), Vec::new());
        w.a.tcp(f).unwrap().send_slice(b"still here").unwrap();
        w.a.egress(f, w.now, &mut out);
        w.pump(std::mem::take(&mut out.0), Vec::new());
        w.settle();
        let got = w.b.tcp.iter().filter_map(|(k, id)| {
            (k.rport
                == w.a
                    .tcp(f)
                    .map(|s| s.local_endpoint().unwrap().port)
                    .unwrap_or(0))
            .then_some(*id)
        });
        let ids: Vec<FlowId> = got.collect();
        let mut buf = [0u8; 32];
        let n = w.b.tcp(ids[0]).unwrap().recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
    }

    #[test]
    fn data_flows_both_ways_and_per_flow_sets_stay_small() {
        let (mut w, f) = Wire::connected(80);
        let mut data = vec![0u8; 50_000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let n = w.a.tcp(f).unwrap().send_slice(&data).unwrap();
        let mut out = VecTx::default();
        w.a.egress(f, w.now, &mut out);
        w.pump(out.0, Vec::new());
        w.settle();
        // Find B's flow: the only TCP flow on B.
        let bf = *w.b.tcp.values().next().unwrap();
        let mut got = vec![0u8; n];
        let k = w.b.tcp(bf).unwrap().recv_slice(&mut got).unwrap();
        assert_eq!(k, n);
        assert_eq!(&got[..], &data[..n]);
        assert_eq!(w.b.flow(bf).unwrap().set.iter().count(), 1);
    }

    #[test]
    fn reply_within_the_ack_delay_carries_the_ack() {
        // Request/response: the server's ACK of a request must ride on the
        // reply when the app answers within the delayed-ACK time (a pure ACK
        // first is one more frame through the uplink and the peer's stack).
        let (mut w, f) = Wire::connected(80);
        w.settle();
        let bf = *w.b.tcp.values().next().unwrap();
        w.a.tcp(f).unwrap().send_slice(&[b'r'; 47]).unwrap();
        let mut req = VecTx::default();
        w.a.egress(f, w.now, &mut req);
        assert_eq!(req.0.len(), 1);
        let mut from_b = VecTx::default();
        w.b.ingress(w.now, &req.0[0], false, &mut from_b);
        let mut t = Vec::new();
        w.b.take_touched(&mut t);
        for id in t {
            w.b.egress(id, w.now, &mut from_b);
        }
        // The app takes 3 ms to answer (a proxy hop on a busy CPU).
        for _ in 0..3 {
            w.now += Duration::from_millis(1);
            w.b.poll_timers(w.now, &mut from_b);
        }
        assert!(from_b.0.is_empty(), "pure ACK sent before the reply");
        let mut got = [0u8; 64];
        assert_eq!(w.b.tcp(bf).unwrap().recv_slice(&mut got).unwrap(), 47);
        w.b.tcp(bf).unwrap().send_slice(&[b'R'; 300]).unwrap();
        w.b.egress(bf, w.now, &mut from_b);
        assert_eq!(from_b.0.len(), 1, "one frame: the reply with the ACK");
        w.pump(Vec::new(), from_b.0);
        let mut got = [0u8; 400];
        assert_eq!(w.a.tcp(f).unwrap().recv_slice(&mut got).unwrap(), 300);
        // Nothing left to retransmit: the request was acknowledged.
        w.settle();
        assert_eq!(w.a.tcp(f).unwrap().send_queue(), 0);
    }

    #[test]
    fn a_v6_only_wildcard_listener_leaves_ipv4_to_another() {
        let mut s = Stack::new(cfg(1), Instant::from_millis(1));
        let any = |port| IpListenEndpoint { addr: None, port };
        let (v4, v6) = (
            IpAddress::v4(198, 18, 0, 1),
            IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1),
        );
        let l6 = s.listen_family(any(80), ListenFamily::V6, 16, 1).unwrap();
        assert_eq!(s.find_listener(v4, 80), None, "IPv4 SYN: reset");
        assert_eq!(s.find_listener(v6, 80), Some(l6));
        let l4 = s.listen_family(any(80), ListenFamily::V4, 16, 2).unwrap();
        assert_eq!(s.find_listener(v4, 80), Some(l4));
        assert_eq!(s.find_listener(v6, 80), Some(l6));
        // A dual-stack wildcard overlaps both.
        assert!(matches!(
            s.listen(any(80), 16, 3),
            Err(StackError::AddrInUse)
        ));
        let dual = s.listen(any(81), 16, 4).unwrap();
        assert_eq!(s.find_listener(v4, 81), Some(dual));
        assert_eq!(s.find_listener(v6, 81), Some(dual));
        assert!(s.listen_family(any(81), ListenFamily::V4, 16, 5).is_err());
    }

    #[test]
    fn answers_arp_and_ping() {
        // An ARP request from a peer (198.18.0.9) for our address.
        let mut s = Stack::new(cfg(1), Instant::from_millis(1));
        let mut f = vec![0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        f[28..32].copy_from_slice(&[198, 18, 0, 9]);
        f[38..42].copy_from_slice(&[198, 18, 0, 1]);
        let mut out = VecTx::default();
        s.ingress(Instant::from_millis(2), &f, false, &mut out);
        assert_eq!(out.0.len(), 1, "ARP reply expected");
        assert_eq!(&out.0[0][12..14], &[0x08, 0x06]);
        assert_eq!(&out.0[0][20..22], &[0, 2]);
        let _ = Ipv4Address::new(0, 0, 0, 0);
    }
}
