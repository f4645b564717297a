//! Uplinks: the daemon's L2 devices, with batched I/O.
//!
//! * [`af_packet::AfPacket`]: an AF_PACKET socket bound to a named interface
//!   (e.g. one end of a veth), receiving through a mapped ring (`ring`,
//!   `PACKET_RX_RING`) or `recvmmsg`, sending with `sendmmsg` in batches. The kernel
//!   still sees that interface, so it must carry **no kernel IP address**
//!   (and should have IPv6 disabled): the daemon owns the addresses, and the
//!   kernel would otherwise answer ARP/NDP and reset TCP for them too.
//! * [`tap::Tap`]: a TAP device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`); the
//!   daemon is the host on the "wire" side, with a MAC of its own.
//!
//! Buffers are allocated once at open; nothing allocates per packet, and no
//! I/O error panics. A frame the kernel refuses (ENOBUFS/EAGAIN) is dropped
//! and counted in [`UplinkStats::tx_dropped`]: TCP retransmits it.
//!
//! This module (with [`crate::sys`]) is where the daemon's `unsafe` lives.

pub mod af_packet;
mod ring;
pub mod tap;

use std::io;
use std::os::fd::RawFd;

pub use af_packet::{AfPacket, AfPacketOptions};
pub use tap::{Tap, TapOptions};

/// Frames per `recvmmsg`/`sendmmsg` batch (and the TX batch size).
pub const BATCH: usize = 64;

/// Errors opening or driving an uplink. Every message names the interface.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NotFound(String),
    /// Missing privileges.
    #[error("permission denied opening {what} on {iface} (need {need})")]
    Permission {
        /// Interface name.
        iface: String,
        /// What was being opened, e.g. "AF_PACKET".
        what: &'static str,
        /// The capability that is missing.
        need: &'static str,
    },
    /// The name is empty, too long (≥ 16 bytes) or contains a NUL.
    #[error("invalid interface name {0:?}")]
    BadName(String),
    /// Any other failed system call.
    #[error("interface {iface}: {call} failed: {source}")]
    Sys {
        /// Interface name.
        iface: String,
        /// The call that failed.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Counters of a device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UplinkStats {
    /// Frames received and handed to the caller.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames dropped on send (kernel queue full or send error).
    pub tx_dropped: u64,
    /// Received frames dropped because they did not fit a receive buffer.
    pub rx_truncated: u64,
    /// Frames the kernel dropped before we read them: the receive ring or
    /// socket buffer was full (AF_PACKET `PACKET_STATISTICS`).
    pub rx_dropped: u64,
    /// Receive system calls.
    pub rx_syscalls: u64,
    /// Frames read from the mapped receive ring (AF_PACKET `rx_ring`):
    /// no system call each.
    pub rx_ring_frames: u64,
    /// Send system calls.
    pub tx_syscalls: u64,
}

/// Which kind of device (`uplink.kind` in the config, `--uplink` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkKind {
    /// AF_PACKET on an existing interface (`af-packet`).
    AfPacket,
    /// A TAP device, created if missing (`tap`).
    Tap,
}

/// A batched L2 device.
pub trait Uplink: Send {
    /// fd to watch in epoll (readable when frames wait).
    fn as_raw_fd(&self) -> RawFd;
    /// The daemon's MAC address on this link.
    fn mac(&self) -> [u8; 6];
    /// IP MTU (L2 payload), e.g. 1500.
    fn mtu(&self) -> usize;
    /// Receive up to `max` frames in one batch and call `f` on each full
    /// Ethernet frame together with `csum_ok`: true when the kernel vouches
    /// for the L4 checksum or has not filled it in yet (a local veth peer
    /// sends partial checksums that must not be verified).
    ///
    /// Returns how many frames were taken from the kernel, including any
    /// skipped (truncated, or our own outgoing ones), so `== max` means more
    /// may wait. `Ok(0)` when nothing waits; never blocks.
    fn recv_batch(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(&[u8], bool),
    ) -> Result<usize, UplinkError>;
    /// Whether frames wait, if the device can tell from memory (a mapped
    /// receive ring) without a system call; `None` if it cannot.
    fn rx_ready(&self) -> Option<bool> {
        None
    }
    /// Append a frame of `len` bytes to the pending TX batch and return the
    /// buffer to fill (all of it). Flushes first when the batch is full.
    fn tx_frame(&mut self, len: usize) -> &mut [u8];
    /// Can the device take TCP super-frames (up to 64 KiB, segmented by the
    /// kernel at the given MSS) and compute TCP checksums itself? Then the
    /// stack leaves TCP checksums to it.
    fn tso(&self) -> bool {
        false
    }
    /// [`Uplink::tx_frame`] for a frame that may exceed the MTU: `gso` is the
    /// TCP segment size the device must cut it into.
    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        let _ = gso;
        self.tx_frame(len)
    }
    /// Send the pending batch. Frames the kernel refuses are dropped and
    /// counted; an error is returned only for a failure other than a full
    /// queue (e.g. the interface went away), after the batch is discarded.
    fn flush(&mut self) -> Result<(), UplinkError>;
    /// Counters.
    fn stats(&self) -> UplinkStats;
    /// Interface name.
    fn name(&self) -> &str;
}

/// Open a device by kind and name. `mac` is the daemon's MAC: for a TAP it
/// replaces the generated one; for AF_PACKET, a MAC other than the
/// interface's own turns on promiscuous mode (a real NIC filters frames to
/// foreign MACs) and [`Uplink::mac`] reports it.
pub fn open(
    kind: UplinkKind,
    name: &str,
    mac: Option<[u8; 6]>,
    offload: bool,
    rx_ring_mb: usize,
) -> Result<Box<dyn Uplink>, UplinkError> {
    Ok(match kind {
        UplinkKind::AfPacket => Box::new(AfPacket::open(
            name,
            &AfPacketOptions {
                mac,
                offload,
                rx_ring_mb,
                ..AfPacketOptions::default()
            },
        )?),
        UplinkKind::Tap => Box::new(Tap::open(name, &TapOptions { mac })?),
    })
}

/// `ifreq` ioctls shared by both devices.
mod ifreq {
    use super::UplinkError;
    use std::os::fd::RawFd;

    /// An `ifreq` naming `name`.
    pub(super) fn new(name: &str) -> Result<libc::ifreq, UplinkError> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(UplinkError::BadName(name.into()));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(b) {
            *d = *s as libc::c_char;
        }
        Ok(r)
    }

    /// `ioctl(fd, req, r)`, mapping failure to an [`UplinkError`].
    pub(super) fn ioctl(
        fd: RawFd,
        req: libc::Ioctl,
        r: &mut libc::ifreq,
        name: &str,
        call: &'static str,
    ) -> Result<(), UplinkError> {
        // SAFETY: every request used here reads/writes one `ifreq`, and `r`
        // is a valid, exclusively borrowed one.
        if unsafe { libc::ioctl(fd, req, r as *mut libc::ifreq) } < 0 {
            return Err(last_err(name, call, "the interface", "CAP_NET_ADMIN"));
        }
        Ok(())
    }

    /// The last OS error as an [`UplinkError`] for `name`.
    pub(super) fn last_err(
        name: &str,
        call: &'static str,
        what: &'static str,
        need: &'static str,
    ) -> UplinkError {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => UplinkError::NotFound(name.into()),
            Some(libc::EPERM) | Some(libc::EACCES) => UplinkError::Permission {
                iface: name.into(),
                what,
                need,
            },
            _ => UplinkError::Sys {
                iface: name.into(),
                call,
                source: e,
            },
        }
    }

    /// Read the MTU and bring the link up if it is down; returns the MTU.
    pub(super) fn mtu_and_up(fd: RawFd, name: &str) -> Result<usize, UplinkError> {
        let mut r = new(name)?;
        ioctl(fd, libc::SIOCGIFMTU, &mut r, name, "SIOCGIFMTU")?;
        // SAFETY: SIOCGIFMTU wrote the `ifru_mtu` member.
        let mtu = unsafe { r.ifr_ifru.ifru_mtu };
        let mut r = new(name)?;
        ioctl(fd, libc::SIOCGIFFLAGS, &mut r, name, "SIOCGIFFLAGS")?;
        // SAFETY: SIOCGIFFLAGS wrote the `ifru_flags` member.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short == 0 {
            r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            ioctl(fd, libc::SIOCSIFFLAGS, &mut r, name, "SIOCSIFFLAGS")?;
        }
        // Below the IPv4 minimum is nonsense; above 64 KiB cannot be framed.
        Ok((mtu.max(0) as usize).clamp(576, 65535))
    }
}

/// Preallocated TX frame buffers for one batch.
struct TxBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    n: usize,
}

impl TxBatch {
    fn new(size: usize) -> Self {
        TxBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            lens: vec![0; BATCH],
            n: 0,
        }
    }

    fn full(&self) -> bool {
        self.n == self.bufs.len()
    }

    /// Claim the next slot for `len` bytes (the caller flushed if full).
    fn push(&mut self, len: usize) -> &mut [u8] {
        let i = self.n;
        if self.bufs[i].len() < len {
            // Only for frames above the MTU, which the stack does not build;
            // grows this slot once rather than failing.
            self.bufs[i].resize(len, 0);
        }
        self.lens[i] = len;
        self.n += 1;
        let f = &mut self.bufs[i][..len];
        clear_headers(f);
        f
    }
}

/// How much of each outgoing frame is cleared before the stack writes it:
/// Ethernet plus the longest IPv4 and TCP headers (134 bytes), and a
/// virtio-net header in front (10) with room to spare. The stack writes every
/// byte of a frame except the padding after the last TCP option; clearing
/// the headers keeps bytes of an earlier frame (another connection's data)
/// out of that padding, without zeroing the payload the stack overwrites.
const HEADER_ROOM: usize = 160;

/// Clear the header part (the first 160 bytes) of a reused frame buffer:
/// the stack writes every other byte itself.
pub fn clear_headers(frame: &mut [u8]) {
    let n = frame.len().min(HEADER_ROOM);
    frame[..n].fill(0);
}

/// Is this errno a full queue, i.e. drop the frame and go on?
fn is_queue_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_tx_slot_starts_with_clear_headers() {
        let mut b = TxBatch::new(1514);
        b.push(1514).fill(0xaa);
        b.n = 0;
        let f = b.push(1514);
        assert!(
            f[..HEADER_ROOM].iter().all(|&x| x == 0),
            "stale header bytes"
        );
        // The payload is the stack's to overwrite: not zeroed again.
        assert!(f[HEADER_ROOM..].iter().all(|&x| x == 0xaa));
        b.n = 0;
        assert_eq!(b.push(60).len(), 60);
    }
}
