//! TAP uplink (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`).

use super::{ifreq, Batch, Uplink, UplinkError, UplinkStats};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BATCH: usize = 64;

/// A TAP device; the daemon is the host on the "wire" side of it.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    mac: [u8; 6],
    mtu: usize,
    rxbuf: Vec<u8>,
    tx: Batch,
    stats: UplinkStats,
}

impl Tap {
    /// Create (or attach to) tap `name`. `mac` is the daemon's MAC (default:
    /// a random locally administered one, distinct from the kernel's).
    pub fn open(name: &str, mac: Option<[u8; 6]>) -> Result<Self, UplinkError> {
        // SAFETY: open(2) with a constant path; fd owned at once.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(ifreq::err(name, "open(/dev/net/tun)"));
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut r = ifreq::new(name)?;
        r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF with a valid ifreq.
        if unsafe { libc::ioctl(raw, libc::TUNSETIFF, &mut r) } < 0 {
            return Err(ifreq::err(name, "TUNSETIFF"));
        }
        // A throwaway socket for the interface ioctls.
        // SAFETY: plain syscall; fd owned at once.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(ifreq::err(name, "socket"));
        }
        // SAFETY: fresh descriptor.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mtu = ifreq::mtu_and_up(s.as_raw_fd(), name)?;
        let mac = mac.unwrap_or_else(|| {
            let mut m = [0u8; 6];
            let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut m));
            m[0] = (m[0] & 0xfe) | 0x02;
            m
        });
        Ok(Tap {
            fd,
            name: name.into(),
            mac,
            mtu,
            rxbuf: vec![0u8; 65536],
            tx: Batch::new(BATCH, mtu + 14 + 64),
            stats: UplinkStats::default(),
        })
    }
}

impl Uplink for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[u8], bool)) -> Result<usize, UplinkError> {
        let mut n = 0;
        while n < max {
            // SAFETY: reading into our own buffer of the given size.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), self.rxbuf.as_mut_ptr().cast(), self.rxbuf.len()) };
            self.stats.rx_syscalls += 1;
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(n),
                    _ => Err(UplinkError::Sys {
                        iface: self.name.clone(),
                        call: "read(tap)",
                        source: e,
                    }),
                };
            }
            if r == 0 {
                return Ok(n);
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += r as u64;
            // Without offloads the kernel completes checksums before a tap read.
            f(&self.rxbuf[..r as usize], false);
            n += 1;
        }
        Ok(n)
    }

    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        if self.tx.full() {
            let _ = self.flush();
        }
        let i = self.tx.n;
        if self.tx.bufs[i].len() < len {
            self.tx.bufs[i].resize(len, 0);
        }
        self.tx.lens[i] = len;
        self.tx.n += 1;
        &mut self.tx.bufs[i][..len]
    }

    fn flush(&mut self) -> Result<(), UplinkError> {
        for i in 0..self.tx.n {
            let len = self.tx.lens[i];
            // SAFETY: writing from our own buffer.
            let r = unsafe { libc::write(self.fd.as_raw_fd(), self.tx.bufs[i].as_ptr().cast(), len) };
            self.stats.tx_syscalls += 1;
            if r < 0 {
                self.stats.tx_dropped += 1;
            } else {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
            }
        }
        self.tx.n = 0;
        Ok(())
    }

    fn stats(&self) -> UplinkStats {
        self.stats
    }

    fn name(&self) -> &str {
        &self.name
    }
}
