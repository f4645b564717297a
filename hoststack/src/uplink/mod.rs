//! Uplinks: the daemon's L2 devices, with batched I/O.
//!
//! * [`af_packet::AfPacket`]: an AF_PACKET socket bound to a named interface
//!   (e.g. one end of a veth), `recvmmsg`/`sendmmsg` in batches. The
//!   interface must carry no kernel IP address: the daemon owns the
//!   addresses, and the kernel would otherwise answer for them too.
//! * [`tap::Tap`]: a TAP device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`).
//!
//! Neither allocates per packet nor panics on I/O errors: a frame the
//! kernel refuses (ENOBUFS/EAGAIN) is dropped and counted (TCP retransmits).

pub mod af_packet;
pub mod tap;

use std::os::fd::RawFd;

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NotFound(String),
    /// Missing privileges.
    #[error("permission denied opening {0} (need root / CAP_NET_RAW, CAP_NET_ADMIN)")]
    Permission(String),
    /// Bad name.
    #[error("invalid interface name {0:?}")]
    BadName(String),
    /// Another OS error.
    #[error("{iface}: {call} failed: {source}")]
    Sys {
        /// Interface.
        iface: String,
        /// Call.
        call: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// Counters of a device.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct UplinkStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames dropped on send (kernel queue full).
    pub tx_dropped: u64,
    /// Frames that did not fit a receive buffer.
    pub rx_truncated: u64,
    /// Receive system calls.
    pub rx_syscalls: u64,
    /// Send system calls.
    pub tx_syscalls: u64,
}

/// Which kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkKind {
    /// AF_PACKET on a named interface.
    AfPacket,
    /// A TAP device.
    Tap,
}

/// A batched L2 device.
pub trait Uplink: Send {
    /// fd to watch in epoll (readable when frames wait).
    fn as_raw_fd(&self) -> RawFd;
    /// Our MAC address.
    fn mac(&self) -> [u8; 6];
    /// IP MTU.
    fn mtu(&self) -> usize;
    /// Receive up to `max` frames, calling `f` on each full Ethernet frame
    /// with `csum_ok`: true when the kernel vouches for (or has not yet
    /// filled in) the L4 checksum — a frame from a local veth peer carries a
    /// partial checksum that must not be verified. Ok(0) when nothing
    /// waits; never blocks.
    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[u8], bool)) -> Result<usize, UplinkError>;
    /// A buffer for one outgoing frame of `len` bytes, appended to the
    /// pending batch (flushed automatically when full).
    fn tx_frame(&mut self, len: usize) -> &mut [u8];
    /// Send the pending batch.
    fn flush(&mut self) -> Result<(), UplinkError>;
    /// Counters.
    fn stats(&self) -> UplinkStats;
    /// Interface name.
    fn name(&self) -> &str;
}

/// Open a device by kind and name. `mac` overrides the TAP's MAC (AF_PACKET
/// uses the interface's own).
pub fn open(kind: UplinkKind, name: &str, mac: Option<[u8; 6]>) -> Result<Box<dyn Uplink>, UplinkError> {
    Ok(match kind {
        UplinkKind::AfPacket => Box::new(af_packet::AfPacket::open(name)?),
        UplinkKind::Tap => Box::new(tap::Tap::open(name, mac)?),
    })
}

/// Shared ioctl helpers.
pub(crate) mod ifreq {
    use super::UplinkError;
    use std::os::fd::RawFd;

    pub(crate) fn new(name: &str) -> Result<libc::ifreq, UplinkError> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(UplinkError::BadName(name.into()));
        }
        // SAFETY: ifreq is plain old data.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(b) {
            *d = *s as libc::c_char;
        }
        Ok(r)
    }

    pub(crate) fn err(name: &str, call: &'static str) -> UplinkError {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => UplinkError::NotFound(name.into()),
            Some(libc::EPERM) | Some(libc::EACCES) => UplinkError::Permission(name.into()),
            _ => UplinkError::Sys {
                iface: name.into(),
                call,
                source: e,
            },
        }
    }

    /// Read MTU and bring the link up; returns the MTU.
    pub(crate) fn mtu_and_up(fd: RawFd, name: &str) -> Result<usize, UplinkError> {
        let mut r = new(name)?;
        // SAFETY: ioctl with a valid ifreq.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut r) } < 0 {
            return Err(err(name, "SIOCGIFMTU"));
        }
        // SAFETY: union field written by the kernel for SIOCGIFMTU.
        let mtu = unsafe { r.ifr_ifru.ifru_mtu } as usize;
        let mut r = new(name)?;
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut r) } < 0 {
            return Err(err(name, "SIOCGIFFLAGS"));
        }
        // SAFETY: flags field set by SIOCGIFFLAGS.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short == 0 {
            r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            // SAFETY: as above.
            if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut r) } < 0 {
                return Err(err(name, "SIOCSIFFLAGS"));
            }
        }
        Ok(mtu.clamp(576, 65535))
    }
}

/// Preallocated frame buffers for one batch.
pub(crate) struct Batch {
    pub(crate) bufs: Vec<Vec<u8>>,
    pub(crate) lens: Vec<usize>,
    pub(crate) n: usize,
}

impl Batch {
    pub(crate) fn new(count: usize, size: usize) -> Self {
        Batch {
            bufs: (0..count).map(|_| vec![0u8; size]).collect(),
            lens: vec![0; count],
            n: 0,
        }
    }
    pub(crate) fn full(&self) -> bool {
        self.n == self.bufs.len()
    }
}
