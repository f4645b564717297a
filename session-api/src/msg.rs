//! Typed messages carried in the 64-byte slots of the message queues.
//!
//! Every worker has two queues: app→daemon ([`Request`]) and daemon→app
//! ([`Event`]). A message is a fixed 64-byte record:
//!
//! ```text
//! 0      2      4        8                16                          64
//! | kind | rsvd | req_id | handle (u64)   | payload (48 bytes)         |
//! ```
//!
//! Decoding never trusts the bytes: an unknown kind or an out-of-range field
//! yields [`MsgError`], which the daemon treats as a misbehaving app.

use crate::mq::{RawMsg, MSG_SIZE};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Errors decoding a message from a queue slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsgError {
    /// The kind field names no known message.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A field holds a value outside its domain.
    #[error("invalid field {0} in message")]
    BadField(&'static str),
}

/// Transport protocol of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Proto {
    /// TCP byte stream.
    Tcp = 1,
    /// UDP datagrams (each FIFO record is a datagram header
    /// ([`dgram_header`], [`DGRAM_HDR`] bytes) + payload).
    Udp = 2,
}

impl Proto {
    fn from_u8(v: u8) -> Result<Self, MsgError> {
        match v {
            1 => Ok(Proto::Tcp),
            2 => Ok(Proto::Udp),
            _ => Err(MsgError::BadField("proto")),
        }
    }
}

/// How a half of a TCP connection is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Shut {
    /// No more reads (local only: received data is discarded).
    Read = 0,
    /// No more writes: FIN after the tx FIFO drains.
    Write = 1,
    /// Both.
    Both = 2,
}

/// Session options the app can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessOpt {
    /// Disable Nagle (value 0/1).
    NoDelay(bool),
    /// TCP keepalive as Linux runs it: the first probe after `idle_ms`
    /// without hearing from the peer, then one every `interval_ms`; after
    /// `probes` unanswered ones the connection is dropped (ETIMEDOUT).
    /// `idle_ms` 0 turns keepalive off.
    KeepAlive {
        /// `TCP_KEEPIDLE`, in milliseconds.
        idle_ms: u32,
        /// `TCP_KEEPINTVL`, in milliseconds.
        interval_ms: u32,
        /// `TCP_KEEPCNT`.
        probes: u32,
    },
    /// `TCP_USER_TIMEOUT` (ms): how long the peer may stay silent while
    /// data waits to be acknowledged before the connection is dropped
    /// (ETIMEDOUT); 0 restores the daemon's default.
    TimeoutMs(u32),
}

/// Requests an app worker sends to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Listen (TCP) or bind (UDP) on `local`. Answered by [`Event::Reply`].
    Listen {
        /// Correlates the reply.
        req_id: u32,
        /// Protocol.
        proto: Proto,
        /// Local address; an unspecified IP means "any of the daemon's".
        local: SocketAddr,
        /// Maximum number of accepted-but-not-yet-taken connections.
        backlog: u32,
        /// [`LISTEN_SHARED`] / [`LISTEN_JOIN`] bits (TCP only).
        flags: u8,
    },
    /// Stop listening; the listener handle becomes invalid.
    Unlisten {
        /// The listener's handle.
        handle: u64,
    },
    /// Open a TCP connection or a connected UDP session. Answered by
    /// [`Event::Reply`] when established (or failed).
    Connect {
        /// Correlates the reply.
        req_id: u32,
        /// Protocol.
        proto: Proto,
        /// Where to connect.
        remote: SocketAddr,
        /// Optional local address (port 0 = ephemeral).
        local: Option<SocketAddr>,
    },
    /// The tx FIFO of `handle` has new data (sent when its event flag flips).
    Tx {
        /// Session handle.
        handle: u64,
    },
    /// The app freed room in the rx FIFO of `handle` after the daemon asked.
    RxDrained {
        /// Session handle.
        handle: u64,
    },
    /// Shut down one or both directions.
    Shutdown {
        /// Session handle.
        handle: u64,
        /// Which direction.
        how: Shut,
    },
    /// Close: the daemon sends what is queued, then FIN; the handle is dead for the app.
    Close {
        /// Session handle.
        handle: u64,
    },
    /// Abort with RST; queued data is discarded.
    Abort {
        /// Session handle.
        handle: u64,
    },
    /// Stop listening, but if this was the last member keep the address
    /// for [`LINGER_MS`] (connections wait): a forked child that inherited
    /// the listener is about to join (the parent closed its copy first).
    UnlistenLinger {
        /// The listener's handle.
        handle: u64,
    },
    /// Connect a bound UDP socket to `remote`: it receives that peer's
    /// datagrams, and its port may be bound again by another socket.
    UdpConnect {
        /// Session handle.
        handle: u64,
        /// The peer.
        remote: SocketAddr,
    },
    /// Take over a network session of the parent process (after fork, the
    /// child uses an inherited connected socket). Allowed only when the
    /// session's app is this app's parent process; its FIFOs (and unread or
    /// unsent bytes) move into this app's segment, the parent gets `Reset`.
    Adopt {
        /// Correlates the reply.
        req_id: u32,
        /// The parent's session handle.
        handle: u64,
    },
    /// Close a session a forked child may still adopt: it stays open for
    /// [`LINGER_MS`] (a child's [`Request::Adopt`] takes it over), then
    /// closes like [`Request::Close`].
    CloseLinger {
        /// Session handle.
        handle: u64,
    },
    /// Check that a TCP socket may bind `local` (kernel bind() errors):
    /// EADDRNOTAVAIL for an address that is not the daemon's, EADDRINUSE
    /// for a port someone listens on or has reserved (unless both share
    /// it). For port 0 the reply's `local` names a free port (the kernel
    /// picks it at bind() time; programs read it back before listen()).
    ///
    /// With [`BIND_RESERVE`] the address is then reserved, as a kernel
    /// bind() does: other binds conflict with it, ephemeral ports avoid it,
    /// until [`Request::Unbind`] or the app detaches. The reply's `handle`
    /// is the reservation (an unguessable token).
    BindCheck {
        /// Correlates the reply.
        req_id: u32,
        /// The address.
        local: SocketAddr,
        /// [`LISTEN_SHARED`] if the socket has SO_REUSEPORT,
        /// [`LISTEN_V6ONLY`], [`BIND_REUSEADDR`], [`BIND_RESERVE`].
        flags: u8,
    },
    /// Give back a reservation made by [`Request::BindCheck`] (the socket
    /// closed, or is about to listen or connect on the address). Unknown
    /// tokens are ignored.
    Unbind {
        /// The reservation token.
        handle: u64,
    },
    /// Give back an accepted connection the app never took (its listener
    /// closed first): the daemon hands it to another listener of the same
    /// address (bytes already received included), or resets it.
    Requeue {
        /// Session handle.
        handle: u64,
    },
    /// Set an option.
    SetOpt {
        /// Session handle.
        handle: u64,
        /// The option.
        opt: SessOpt,
    },
}

/// Events the daemon posts to an app worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Answer to a request with a `req_id`. `errno` 0 means success; then
    /// `handle` names the new session/listener and (`segment`, `desc`) locate
    /// its [`SessionDesc`] in a segment.
    Reply {
        /// The request this answers.
        req_id: u32,
        /// 0 or a positive errno value.
        errno: i32,
        /// The new handle (0 on error).
        handle: u64,
        /// Segment holding the descriptor (listeners: 0).
        segment: u32,
        /// Offset of the descriptor in the segment (listeners: 0).
        desc: u32,
        /// Local address actually bound.
        local: Option<SocketAddr>,
    },
    /// A new connection on listener `listener`.
    Accepted {
        /// Listener handle.
        listener: u64,
        /// The new session.
        handle: u64,
        /// Segment holding the descriptor.
        segment: u32,
        /// Offset of the descriptor.
        desc: u32,
    },
    /// The rx FIFO of `handle` has data (event flag flipped).
    Rx {
        /// Session handle.
        handle: u64,
    },
    /// The tx FIFO of `handle` has room again (the app asked).
    TxSpace {
        /// Session handle.
        handle: u64,
    },
    /// The peer closed its sending side (FIN): after the rx FIFO drains, EOF.
    PeerClosed {
        /// Session handle.
        handle: u64,
    },
    /// The connection is gone with an error (reset, timeout, unreachable).
    Reset {
        /// Session handle.
        handle: u64,
        /// errno to report (ECONNRESET, ETIMEDOUT, EPIPE...).
        errno: i32,
    },
    /// An error the session survives (a connected UDP socket's ICMP port
    /// unreachable): reported once, by the next call, as in Linux.
    SoftError {
        /// Session handle.
        handle: u64,
        /// errno to report once (ECONNREFUSED, EHOSTUNREACH...).
        errno: i32,
    },
    /// The daemon is shutting down; every handle is dead.
    Shutdown,
}

/// Listen flag: other listeners with [`LISTEN_SHARED`] may join this
/// address and share its connections (SO_REUSEPORT).
pub const LISTEN_SHARED: u8 = 1;
/// Listen flag: join an existing listener on the address whatever its
/// sharing mode (a forked child taking over its parent's listener).
pub const LISTEN_JOIN: u8 = 2;
/// Listen flag: a passive member takes no connections; while a group has
/// only passive members, new connections wait (in the backlog) for an
/// active one. A forked server's parent that never accepts (nginx's
/// master) keeps its listener this way.
pub const LISTEN_PASSIVE: u8 = 4;
/// Listen / bind-check flag: an IPv6 wildcard socket with IPV6_V6ONLY,
/// which takes no IPv4 connections and leaves the port free for IPv4.
pub const LISTEN_V6ONLY: u8 = 8;
/// Bind-check flag: reserve the address (see [`Request::BindCheck`]).
pub const BIND_RESERVE: u8 = 16;
/// Bind-check flag: the socket has SO_REUSEADDR. Two such sockets may both
/// hold a reservation of one address while neither listens (the first to
/// listen wins, as in the kernel).
pub const BIND_REUSEADDR: u8 = 32;
/// Listen flag (with [`LISTEN_JOIN`]): only join a listener that exists
/// on the address; ENOENT if none does (a process adopting a listening
/// socket it received over a UNIX socket, e.g. Envoy's hot restart).
pub const LISTEN_EXISTING: u8 = 64;

const K_LISTEN: u16 = 1;
const K_UNLISTEN: u16 = 2;
const K_CONNECT: u16 = 3;
const K_TX: u16 = 4;
const K_RX_DRAINED: u16 = 5;
const K_SHUTDOWN: u16 = 6;
const K_CLOSE: u16 = 7;
const K_ABORT: u16 = 8;
const K_SETOPT: u16 = 9;
const K_REQUEUE: u16 = 10;
const K_UNLISTEN_LINGER: u16 = 11;
const K_UDP_CONNECT: u16 = 12;
const K_ADOPT: u16 = 13;
const K_CLOSE_LINGER: u16 = 14;
const K_BIND_CHECK: u16 = 15;
const K_UNBIND: u16 = 16;

/// How long an address closed with [`Request::UnlistenLinger`] waits for a
/// new member.
pub const LINGER_MS: u64 = 2000;

const E_REPLY: u16 = 101;
const E_ACCEPTED: u16 = 102;
const E_RX: u16 = 103;
const E_TXSPACE: u16 = 104;
const E_PEER_CLOSED: u16 = 105;
const E_RESET: u16 = 106;
const E_SHUTDOWN: u16 = 107;
const E_SOFT_ERROR: u16 = 108;

/// Encoded socket address size in a message payload.
pub const ADDR_SIZE: usize = 20;

/// Encode a socket address as `family u8 (0 none, 4, 6) | rsvd u8 | port u16 le | ip [16]`.
pub fn put_addr(buf: &mut [u8], addr: Option<SocketAddr>) {
    buf[..ADDR_SIZE].fill(0);
    match addr {
        None => {}
        Some(SocketAddr::V4(a)) => {
            buf[0] = 4;
            buf[2..4].copy_from_slice(&a.port().to_le_bytes());
            buf[4..8].copy_from_slice(&a.ip().octets());
        }
        Some(SocketAddr::V6(a)) => {
            buf[0] = 6;
            buf[2..4].copy_from_slice(&a.port().to_le_bytes());
            buf[4..20].copy_from_slice(&a.ip().octets());
        }
    }
}

/// Decode an address written by [`put_addr`].
pub fn get_addr(buf: &[u8]) -> Result<Option<SocketAddr>, MsgError> {
    let port = u16::from_le_bytes([buf[2], buf[3]]);
    match buf[0] {
        0 => Ok(None),
        4 => {
            let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[4..20]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)))
        }
        _ => Err(MsgError::BadField("address family")),
    }
}

struct W([u8; MSG_SIZE]);

impl W {
    fn new(kind: u16, req_id: u32, handle: u64) -> Self {
        let mut b = [0u8; MSG_SIZE];
        b[0..2].copy_from_slice(&kind.to_le_bytes());
        b[4..8].copy_from_slice(&req_id.to_le_bytes());
        b[8..16].copy_from_slice(&handle.to_le_bytes());
        W(b)
    }
    fn u8(mut self, off: usize, v: u8) -> Self {
        self.0[16 + off] = v;
        self
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[16 + off..20 + off].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[16 + off..24 + off].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn addr(mut self, off: usize, a: Option<SocketAddr>) -> Self {
        put_addr(&mut self.0[16 + off..16 + off + ADDR_SIZE], a);
        self
    }
    fn done(self) -> RawMsg {
        RawMsg(self.0)
    }
}

struct R<'a>(&'a [u8; MSG_SIZE]);

impl R<'_> {
    fn kind(&self) -> u16 {
        u16::from_le_bytes([self.0[0], self.0[1]])
    }
    fn req_id(&self) -> u32 {
        u32::from_le_bytes(self.0[4..8].try_into().unwrap_or_default())
    }
    fn handle(&self) -> u64 {
        u64::from_le_bytes(self.0[8..16].try_into().unwrap_or_default())
    }
    fn u8(&self, off: usize) -> u8 {
        self.0[16 + off]
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.0[16 + off..20 + off].try_into().unwrap_or_default())
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.0[16 + off..24 + off].try_into().unwrap_or_default())
    }
    fn addr(&self, off: usize) -> Result<Option<SocketAddr>, MsgError> {
        get_addr(&self.0[16 + off..16 + off + ADDR_SIZE])
    }
}

impl Request {
    /// Encode into a queue slot.
    pub fn encode(&self) -> RawMsg {
        match *self {
            Request::Listen {
                req_id,
                proto,
                local,
                backlog,
                flags,
            } => W::new(K_LISTEN, req_id, 0)
                .u8(0, proto as u8)
                .u8(1, flags)
                .u32(4, backlog)
                .addr(8, Some(local))
                .done(),
            Request::Unlisten { handle } => W::new(K_UNLISTEN, 0, handle).done(),
            Request::Connect {
                req_id,
                proto,
                remote,
                local,
            } => W::new(K_CONNECT, req_id, 0)
                .u8(0, proto as u8)
                .addr(4, Some(remote))
                .addr(24, local)
                .done(),
            Request::Tx { handle } => W::new(K_TX, 0, handle).done(),
            Request::RxDrained { handle } => W::new(K_RX_DRAINED, 0, handle).done(),
            Request::Shutdown { handle, how } => {
                W::new(K_SHUTDOWN, 0, handle).u8(0, how as u8).done()
            }
            Request::Close { handle } => W::new(K_CLOSE, 0, handle).done(),
            Request::Abort { handle } => W::new(K_ABORT, 0, handle).done(),
            Request::Requeue { handle } => W::new(K_REQUEUE, 0, handle).done(),
            Request::UnlistenLinger { handle } => W::new(K_UNLISTEN_LINGER, 0, handle).done(),
            Request::Adopt { req_id, handle } => W::new(K_ADOPT, req_id, handle).done(),
            Request::CloseLinger { handle } => W::new(K_CLOSE_LINGER, 0, handle).done(),
            Request::Unbind { handle } => W::new(K_UNBIND, 0, handle).done(),
            Request::BindCheck {
                req_id,
                local,
                flags,
            } => W::new(K_BIND_CHECK, req_id, 0)
                .u8(1, flags)
                .addr(8, Some(local))
                .done(),
            Request::UdpConnect { handle, remote } => W::new(K_UDP_CONNECT, 0, handle)
                .addr(4, Some(remote))
                .done(),
            Request::SetOpt { handle, opt } => {
                let (code, v, v2, v3) = match opt {
                    SessOpt::NoDelay(b) => (1u8, b as u32, 0, 0),
                    SessOpt::KeepAlive {
                        idle_ms,
                        interval_ms,
                        probes,
                    } => (2, idle_ms, interval_ms, probes),
                    SessOpt::TimeoutMs(ms) => (3, ms, 0, 0),
                };
                W::new(K_SETOPT, 0, handle)
                    .u8(0, code)
                    .u32(4, v)
                    .u32(8, v2)
                    .u32(12, v3)
                    .done()
            }
        }
    }

    /// Decode from a queue slot written by an (untrusted) app.
    pub fn decode(m: &RawMsg) -> Result<Self, MsgError> {
        let r = R(&m.0);
        let handle = r.handle();
        Ok(match r.kind() {
            K_LISTEN => Request::Listen {
                req_id: r.req_id(),
                proto: Proto::from_u8(r.u8(0))?,
                backlog: r.u32(4),
                flags: r.u8(1),
                local: r.addr(8)?.ok_or(MsgError::BadField("local address"))?,
            },
            K_UNLISTEN => Request::Unlisten { handle },
            K_CONNECT => Request::Connect {
                req_id: r.req_id(),
                proto: Proto::from_u8(r.u8(0))?,
                remote: r.addr(4)?.ok_or(MsgError::BadField("remote address"))?,
                local: r.addr(24)?,
            },
            K_TX => Request::Tx { handle },
            K_RX_DRAINED => Request::RxDrained { handle },
            K_SHUTDOWN => Request::Shutdown {
                handle,
                how: match r.u8(0) {
                    0 => Shut::Read,
                    1 => Shut::Write,
                    2 => Shut::Both,
                    _ => return Err(MsgError::BadField("shutdown how")),
                },
            },
            K_CLOSE => Request::Close { handle },
            K_ABORT => Request::Abort { handle },
            K_REQUEUE => Request::Requeue { handle },
            K_UNLISTEN_LINGER => Request::UnlistenLinger { handle },
            K_CLOSE_LINGER => Request::CloseLinger { handle },
            K_UNBIND => Request::Unbind { handle },
            K_BIND_CHECK => Request::BindCheck {
                req_id: r.req_id(),
                flags: r.u8(1),
                local: r.addr(8)?.ok_or(MsgError::BadField("local address"))?,
            },
            K_ADOPT => Request::Adopt {
                req_id: r.req_id(),
                handle,
            },
            K_UDP_CONNECT => Request::UdpConnect {
                handle,
                remote: r.addr(4)?.ok_or(MsgError::BadField("remote address"))?,
            },
            K_SETOPT => Request::SetOpt {
                handle,
                opt: match r.u8(0) {
                    1 => SessOpt::NoDelay(r.u32(4) != 0),
                    2 => SessOpt::KeepAlive {
                        idle_ms: r.u32(4),
                        interval_ms: r.u32(8),
                        probes: r.u32(12),
                    },
                    3 => SessOpt::TimeoutMs(r.u32(4)),
                    _ => return Err(MsgError::BadField("option")),
                },
            },
            k => return Err(MsgError::UnknownKind(k)),
        })
    }
}

impl Event {
    /// A failed [`Event::Reply`].
    pub fn error_reply(req_id: u32, errno: i32) -> Self {
        Event::Reply {
            req_id,
            errno,
            handle: 0,
            segment: 0,
            desc: 0,
            local: None,
        }
    }

    /// Encode into a queue slot.
    pub fn encode(&self) -> RawMsg {
        match *self {
            Event::Reply {
                req_id,
                errno,
                handle,
                segment,
                desc,
                local,
            } => W::new(E_REPLY, req_id, handle)
                .u32(0, errno as u32)
                .u32(4, segment)
                .u32(8, desc)
                .addr(12, local)
                .done(),
            Event::Accepted {
                listener,
                handle,
                segment,
                desc,
            } => W::new(E_ACCEPTED, 0, handle)
                .u64(0, listener)
                .u32(8, segment)
                .u32(12, desc)
                .done(),
            Event::Rx { handle } => W::new(E_RX, 0, handle).done(),
            Event::TxSpace { handle } => W::new(E_TXSPACE, 0, handle).done(),
            Event::PeerClosed { handle } => W::new(E_PEER_CLOSED, 0, handle).done(),
            Event::Reset { handle, errno } => {
                W::new(E_RESET, 0, handle).u32(0, errno as u32).done()
            }
            Event::SoftError { handle, errno } => {
                W::new(E_SOFT_ERROR, 0, handle).u32(0, errno as u32).done()
            }
            Event::Shutdown => W::new(E_SHUTDOWN, 0, 0).done(),
        }
    }

    /// Decode from a queue slot.
    pub fn decode(m: &RawMsg) -> Result<Self, MsgError> {
        let r = R(&m.0);
        let handle = r.handle();
        Ok(match r.kind() {
            E_REPLY => Event::Reply {
                req_id: r.req_id(),
                errno: r.u32(0) as i32,
                handle,
                segment: r.u32(4),
                desc: r.u32(8),
                local: r.addr(12)?,
            },
            E_ACCEPTED => Event::Accepted {
                listener: r.u64(0),
                handle,
                segment: r.u32(8),
                desc: r.u32(12),
            },
            E_RX => Event::Rx { handle },
            E_TXSPACE => Event::TxSpace { handle },
            E_PEER_CLOSED => Event::PeerClosed { handle },
            E_RESET => Event::Reset {
                handle,
                errno: r.u32(0) as i32,
            },
            E_SOFT_ERROR => Event::SoftError {
                handle,
                errno: r.u32(0) as i32,
            },
            E_SHUTDOWN => Event::Shutdown,
            k => return Err(MsgError::UnknownKind(k)),
        })
    }
}

/// Size of the per-session descriptor the daemon writes into a segment.
pub const SESSION_DESC_SIZE: usize = 128;
const DESC_MAGIC: u32 = 0x4853_4431; // "HSD1"

/// Offset in a descriptor of the byte the *app* writes: the wake channel
/// (see [`crate::mq`]) its events should wake; 0 = any sleeping thread.
/// The daemon reads it only to choose an eventfd to write (anything out of
/// range counts as 0), never for memory access.
pub const DESC_CHANNEL_OFF: usize = 64;

/// Where a session's FIFOs live and who its endpoints are. Written by the
/// daemon into shared memory (the app trusts it; apart from the channel
/// byte at [`DESC_CHANNEL_OFF`], which the app owns, the daemon never reads
/// it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionDesc {
    /// Protocol.
    pub proto: Proto,
    /// Offset of the FIFO the app reads (daemon or peer produces).
    pub rx_off: u32,
    /// Capacity of the rx FIFO.
    pub rx_cap: u32,
    /// Offset of the FIFO the app writes.
    pub tx_off: u32,
    /// Capacity of the tx FIFO.
    pub tx_cap: u32,
    /// Local endpoint.
    pub local: Option<SocketAddr>,
    /// Remote endpoint.
    pub remote: Option<SocketAddr>,
    /// True when this is a cut-through session (peer app is on the same daemon).
    pub cut_through: bool,
}

impl SessionDesc {
    /// Serialize into `SESSION_DESC_SIZE` bytes.
    pub fn to_bytes(&self) -> [u8; SESSION_DESC_SIZE] {
        let mut b = [0u8; SESSION_DESC_SIZE];
        b[0..4].copy_from_slice(&DESC_MAGIC.to_le_bytes());
        b[4] = self.proto as u8;
        b[5] = self.cut_through as u8;
        b[8..12].copy_from_slice(&self.rx_off.to_le_bytes());
        b[12..16].copy_from_slice(&self.rx_cap.to_le_bytes());
        b[16..20].copy_from_slice(&self.tx_off.to_le_bytes());
        b[20..24].copy_from_slice(&self.tx_cap.to_le_bytes());
        put_addr(&mut b[24..44], self.local);
        put_addr(&mut b[44..64], self.remote);
        b
    }

    /// Parse (and sanity check) descriptor bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, MsgError> {
        if b.len() < SESSION_DESC_SIZE {
            return Err(MsgError::BadField("descriptor length"));
        }
        let u = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u(0) != DESC_MAGIC {
            return Err(MsgError::BadField("descriptor magic"));
        }
        Ok(SessionDesc {
            proto: Proto::from_u8(b[4])?,
            cut_through: b[5] != 0,
            rx_off: u(8),
            rx_cap: u(12),
            tx_off: u(16),
            tx_cap: u(20),
            local: get_addr(&b[24..44])?,
            remote: get_addr(&b[44..64])?,
        })
    }
}

/// Header in front of every UDP datagram in a FIFO: `len u32 | addr [20]`.
/// In the rx FIFO `addr` is the source; in the tx FIFO the destination (none =
/// the connected peer).
pub const DGRAM_HDR: usize = 24;

/// Encode a datagram header.
pub fn dgram_header(len: usize, addr: Option<SocketAddr>) -> [u8; DGRAM_HDR] {
    let mut h = [0u8; DGRAM_HDR];
    h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    put_addr(&mut h[4..24], addr);
    h
}

/// Decode a datagram header: (payload length, address).
pub fn parse_dgram_header(h: &[u8; DGRAM_HDR]) -> Result<(usize, Option<SocketAddr>), MsgError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    Ok((len, get_addr(&h[4..24])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let a4: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let a6: SocketAddr = "[2001:2::1]:443".parse().unwrap();
        let reqs = [
            Request::Listen {
                req_id: 7,
                proto: Proto::Tcp,
                local: a6,
                backlog: 128,
                flags: LISTEN_SHARED,
            },
            Request::Unlisten { handle: 1 << 40 },
            Request::Connect {
                req_id: 9,
                proto: Proto::Udp,
                remote: a4,
                local: Some(a6),
            },
            Request::Connect {
                req_id: 9,
                proto: Proto::Tcp,
                remote: a4,
                local: None,
            },
            Request::Tx { handle: 3 },
            Request::RxDrained { handle: 3 },
            Request::Shutdown {
                handle: 4,
                how: Shut::Write,
            },
            Request::Close { handle: 5 },
            Request::Abort { handle: 6 },
            Request::Requeue { handle: 7 },
            Request::UnlistenLinger { handle: 8 },
            Request::Adopt {
                req_id: 5,
                handle: 10,
            },
            Request::CloseLinger { handle: 11 },
            Request::Unbind { handle: 13 },
            Request::BindCheck {
                req_id: 12,
                local: a6,
                flags: LISTEN_SHARED,
            },
            Request::UdpConnect {
                handle: 9,
                remote: a4,
            },
            Request::SetOpt {
                handle: 6,
                opt: SessOpt::KeepAlive {
                    idle_ms: 1000,
                    interval_ms: 200,
                    probes: 3,
                },
            },
            Request::SetOpt {
                handle: 6,
                opt: SessOpt::NoDelay(true),
            },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn events_round_trip() {
        let a4: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let evs = [
            Event::Reply {
                req_id: 1,
                errno: 111,
                handle: 0,
                segment: 0,
                desc: 0,
                local: None,
            },
            Event::Reply {
                req_id: 1,
                errno: 0,
                handle: 77,
                segment: 2,
                desc: 4096,
                local: Some(a4),
            },
            Event::Accepted {
                listener: 1,
                handle: 2,
                segment: 3,
                desc: 64,
            },
            Event::Rx { handle: 1 },
            Event::TxSpace { handle: 1 },
            Event::PeerClosed { handle: 1 },
            Event::Reset {
                handle: 1,
                errno: 104,
            },
            Event::SoftError {
                handle: 1,
                errno: 111,
            },
            Event::Shutdown,
        ];
        for e in evs {
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            let mut m = [0u8; MSG_SIZE];
            for b in m.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Bias towards valid kinds so field validation gets exercised.
            m[0] = (x % 12) as u8;
            m[1] = 0;
            let _ = Request::decode(&RawMsg(m));
            let _ = SessionDesc::from_bytes(&m);
        }
        assert_eq!(
            Request::decode(&RawMsg([0xff; MSG_SIZE])),
            Err(MsgError::UnknownKind(0xffff))
        );
    }

    #[test]
    fn desc_round_trip() {
        let d = SessionDesc {
            proto: Proto::Tcp,
            rx_off: 4096,
            rx_cap: 65536,
            tx_off: 8192,
            tx_cap: 65536,
            local: Some("198.18.0.1:80".parse().unwrap()),
            remote: Some("[2001:2::2]:5555".parse().unwrap()),
            cut_through: true,
        };
        assert_eq!(SessionDesc::from_bytes(&d.to_bytes()), Ok(d));
    }
}
