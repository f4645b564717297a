//! The attach protocol spoken over the daemon's unix `SOCK_SEQPACKET` socket
//! (one socket per app namespace).
//!
//! Each datagram is `magic u32 | abi u32 | type u16 | body`, little endian.
//! Strings are `len u16 | utf-8 bytes`. File descriptors (segments, eventfds)
//! travel in the same datagram as `SCM_RIGHTS`. Every decoder checks lengths:
//! a malformed message is an error, never a panic.

use crate::segment::ABI_VERSION;

/// First four bytes of every control datagram.
pub const CTRL_MAGIC: u32 = 0x4b54_5348; // "HSTK"
/// Largest control datagram.
pub const CTRL_MAX: usize = 4096;

/// Errors decoding a control message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// Not a hoststack control message.
    #[error("bad magic in control message")]
    BadMagic,
    /// Peer speaks another ABI version.
    #[error("ABI version mismatch: peer {peer}, ours {ours}")]
    Version {
        /// The peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// Truncated or malformed body.
    #[error("malformed control message: {0}")]
    Malformed(&'static str),
    /// Unknown message type.
    #[error("unknown control message type {0}")]
    UnknownType(u16),
}

/// App → daemon control messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppCtrl {
    /// First message: identify and authenticate.
    Attach {
        /// App namespace (must match the socket's namespace).
        namespace: String,
        /// The namespace secret.
        secret: String,
        /// Human readable app name (shown by hoststackctl).
        name: String,
        /// Process id (informational).
        pid: u32,
    },
    /// Register a worker (a thread that gets its own queue pair).
    AddWorker,
    /// Remove a worker; its sessions are closed.
    DelWorker {
        /// Worker index.
        worker: u32,
    },
    /// Ask for a wake channel of `worker` (see [`crate::mq`]): answered
    /// with [`DaemonCtrl::ChannelOk`] and the channel's eventfd, or
    /// [`DaemonCtrl::Error`] when all are taken.
    AddChannel {
        /// Worker index.
        worker: u32,
    },
    /// Give a wake channel back (no answer).
    DelChannel {
        /// Worker index.
        worker: u32,
        /// Channel id.
        channel: u32,
    },
}

/// Daemon → app control messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonCtrl {
    /// Attach accepted. Carries the app's first segment fd.
    AttachOk {
        /// App id.
        app_id: u32,
        /// Id of the segment passed with this message.
        segment: u32,
        /// Its size in bytes.
        size: u64,
    },
    /// Request refused.
    Error {
        /// errno-style code (EACCES, EPROTO, ENOMEM...).
        errno: i32,
        /// Human readable reason.
        message: String,
    },
    /// Worker registered. Carries two eventfds: `[daemon_wake, app_wake]`:
    /// the app writes `daemon_wake` when the daemon sleeps; the daemon writes
    /// `app_wake` when the worker sleeps.
    WorkerOk {
        /// Worker index.
        worker: u32,
        /// Segment holding both queues.
        segment: u32,
        /// app→daemon queue offset and slot count.
        req_off: u32,
        /// Slots of the request queue.
        req_slots: u32,
        /// daemon→app queue offset and slot count.
        evt_off: u32,
        /// Slots of the event queue.
        evt_slots: u32,
    },
    /// A new segment for this app (cut-through or growth); fd attached.
    Segment {
        /// Segment id.
        segment: u32,
        /// Size in bytes.
        size: u64,
    },
    /// A wake channel for `worker`; its eventfd (which the daemon writes
    /// when a thread sleeps on the channel and an event for it arrives) is
    /// attached.
    ChannelOk {
        /// Worker index.
        worker: u32,
        /// Channel id (1..63).
        channel: u32,
    },
    /// A cut-through segment whose peer app is gone: no session uses it
    /// any more, the app should unmap it.
    SegmentGone {
        /// Segment id.
        segment: u32,
    },
}

struct Enc(Vec<u8>);
impl Enc {
    fn new(ty: u16) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&CTRL_MAGIC.to_le_bytes());
        v.extend_from_slice(&ABI_VERSION.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        Enc(v)
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn str(mut self, s: &str) -> Self {
        let b = &s.as_bytes()[..s.len().min(1024)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

struct Dec<'a>(&'a [u8]);
impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(self.u32()? as u64 | (self.u32()? as u64) << 32)
    }
    fn str(&mut self) -> Result<String, ProtoError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not utf-8"))
    }
    fn header(buf: &'a [u8]) -> Result<(u16, Self), ProtoError> {
        let mut d = Dec(buf);
        if d.u32().map_err(|_| ProtoError::BadMagic)? != CTRL_MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let v = d.u32()?;
        if v != ABI_VERSION {
            return Err(ProtoError::Version {
                peer: v,
                ours: ABI_VERSION,
            });
        }
        let ty = d.u16()?;
        Ok((ty, d))
    }
}

impl AppCtrl {
    /// Serialize.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            AppCtrl::Attach {
                namespace,
                secret,
                name,
                pid,
            } => Enc::new(1).str(namespace).str(secret).str(name).u32(*pid).0,
            AppCtrl::AddWorker => Enc::new(2).0,
            AppCtrl::DelWorker { worker } => Enc::new(3).u32(*worker).0,
            AppCtrl::AddChannel { worker } => Enc::new(4).u32(*worker).0,
            AppCtrl::DelChannel { worker, channel } => Enc::new(5).u32(*worker).u32(*channel).0,
        }
    }
    /// Parse an untrusted datagram.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let (ty, mut d) = Dec::header(buf)?;
        Ok(match ty {
            1 => AppCtrl::Attach {
                namespace: d.str()?,
                secret: d.str()?,
                name: d.str()?,
                pid: d.u32()?,
            },
            2 => AppCtrl::AddWorker,
            3 => AppCtrl::DelWorker { worker: d.u32()? },
            4 => AppCtrl::AddChannel { worker: d.u32()? },
            5 => AppCtrl::DelChannel {
                worker: d.u32()?,
                channel: d.u32()?,
            },
            t => return Err(ProtoError::UnknownType(t)),
        })
    }
}

impl DaemonCtrl {
    /// Serialize.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            DaemonCtrl::AttachOk {
                app_id,
                segment,
                size,
            } => Enc::new(101).u32(*app_id).u32(*segment).u64(*size).0,
            DaemonCtrl::Error { errno, message } => Enc::new(102).u32(*errno as u32).str(message).0,
            DaemonCtrl::WorkerOk {
                worker,
                segment,
                req_off,
                req_slots,
                evt_off,
                evt_slots,
            } => {
                Enc::new(103)
                    .u32(*worker)
                    .u32(*segment)
                    .u32(*req_off)
                    .u32(*req_slots)
                    .u32(*evt_off)
                    .u32(*evt_slots)
                    .0
            }
            DaemonCtrl::Segment { segment, size } => Enc::new(104).u32(*segment).u64(*size).0,
            DaemonCtrl::SegmentGone { segment } => Enc::new(105).u32(*segment).0,
            DaemonCtrl::ChannelOk { worker, channel } => Enc::new(106).u32(*worker).u32(*channel).0,
        }
    }
    /// Parse.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let (ty, mut d) = Dec::header(buf)?;
        Ok(match ty {
            101 => DaemonCtrl::AttachOk {
                app_id: d.u32()?,
                segment: d.u32()?,
                size: d.u64()?,
            },
            102 => DaemonCtrl::Error {
                errno: d.u32()? as i32,
                message: d.str()?,
            },
            103 => DaemonCtrl::WorkerOk {
                worker: d.u32()?,
                segment: d.u32()?,
                req_off: d.u32()?,
                req_slots: d.u32()?,
                evt_off: d.u32()?,
                evt_slots: d.u32()?,
            },
            104 => DaemonCtrl::Segment {
                segment: d.u32()?,
                size: d.u64()?,
            },
            105 => DaemonCtrl::SegmentGone { segment: d.u32()? },
            106 => DaemonCtrl::ChannelOk {
                worker: d.u32()?,
                channel: d.u32()?,
            },
            t => return Err(ProtoError::UnknownType(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = AppCtrl::Attach {
            namespace: "default".into(),
            secret: "s3cret".into(),
            name: "echo".into(),
            pid: 42,
        };
        assert_eq!(AppCtrl::decode(&a.encode()), Ok(a));
        let d = DaemonCtrl::WorkerOk {
            worker: 1,
            segment: 2,
            req_off: 3,
            req_slots: 4,
            evt_off: 5,
            evt_slots: 6,
        };
        assert_eq!(DaemonCtrl::decode(&d.encode()), Ok(d));
        let e = DaemonCtrl::Error {
            errno: 13,
            message: "bad secret".into(),
        };
        assert_eq!(DaemonCtrl::decode(&e.encode()), Ok(e));
        let g = DaemonCtrl::SegmentGone { segment: 9 };
        assert_eq!(DaemonCtrl::decode(&g.encode()), Ok(g));
        let c = DaemonCtrl::ChannelOk {
            worker: 2,
            channel: 7,
        };
        assert_eq!(DaemonCtrl::decode(&c.encode()), Ok(c));
        for a in [
            AppCtrl::AddChannel { worker: 3 },
            AppCtrl::DelChannel {
                worker: 3,
                channel: 9,
            },
        ] {
            assert_eq!(AppCtrl::decode(&a.encode()), Ok(a));
        }
    }

    #[test]
    fn malformed_is_error() {
        assert_eq!(AppCtrl::decode(b""), Err(ProtoError::BadMagic));
        assert_eq!(AppCtrl::decode(b"junkjunkjunk"), Err(ProtoError::BadMagic));
        let mut v = AppCtrl::AddWorker.encode();
        v[4] = 99;
        assert!(matches!(
            AppCtrl::decode(&v),
            Err(ProtoError::Version { .. })
        ));
        let mut a = AppCtrl::Attach {
            namespace: "n".into(),
            secret: "s".into(),
            name: "x".into(),
            pid: 1,
        }
        .encode();
        a.truncate(a.len() - 2);
        assert!(matches!(AppCtrl::decode(&a), Err(ProtoError::Malformed(_))));
        // Every truncation of every message is an error, never a panic.
        let full = DaemonCtrl::AttachOk {
            app_id: 1,
            segment: 1,
            size: 1 << 20,
        }
        .encode();
        for n in 0..full.len() {
            assert!(DaemonCtrl::decode(&full[..n]).is_err());
        }
    }
}
