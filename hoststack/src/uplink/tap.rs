//! TAP uplink (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`).

use super::{ifreq, is_queue_full, TxBatch, Uplink, UplinkError, UplinkStats};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Read buffer: any frame a TAP without offloads can hand us (MTU ≤ 64 KiB).
const RX_BUF: usize = 65536 + 256;

/// Options of [`Tap::open`].
#[derive(Debug, Clone, Default)]
pub struct TapOptions {
    /// The daemon's MAC; default: a random locally administered unicast MAC,
    /// distinct from the kernel side's own.
    pub mac: Option<[u8; 6]>,
}

/// A TAP device; the daemon is the host on the "wire" side of it, the kernel
/// the host on the other.
///
/// A TAP created here lives as long as the fd (it is not made persistent).
/// The fd keeps working when the netdev is moved to another network
/// namespace (`ip link set TAP netns NS`); the move takes the link down, so
/// whoever moves it brings it up again.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    mac: [u8; 6],
    mtu: usize,
    rx: Box<[u8]>,
    tx: TxBatch,
    stats: UplinkStats,
}

impl Tap {
    /// Create TAP `name`, or attach to an existing one (a name with `%d`
    /// lets the kernel pick; [`Uplink::name`] tells the result). The link is
    /// brought up. Needs CAP_NET_ADMIN (or ownership of a persistent TAP).
    pub fn open(name: &str, opts: &TapOptions) -> Result<Self, UplinkError> {
        let mut req = ifreq::new(name)?;
        // SAFETY: open(2) with a NUL-terminated constant path; the fd is
        // owned at once below.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => UplinkError::Permission {
                    iface: name.into(),
                    what: "/dev/net/tun",
                    need: "CAP_NET_ADMIN",
                },
                _ => UplinkError::Sys {
                    iface: name.into(),
                    call: "open(/dev/net/tun)",
                    source: e,
                },
            });
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the name and flags from a valid ifreq and
        // writes back the device's name.
        if unsafe { libc::ioctl(raw, libc::TUNSETIFF, &mut req as *mut libc::ifreq) } < 0 {
            return Err(ifreq::last_err(name, "TUNSETIFF", "TAP", "CAP_NET_ADMIN"));
        }
        let actual: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        let name = String::from_utf8_lossy(&actual).into_owned();

        // The tun fd takes no interface ioctls: use a throwaway socket.
        // SAFETY: plain syscall; the fd is owned at once below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(ifreq::last_err(
                &name,
                "socket(AF_INET)",
                "TAP",
                "CAP_NET_ADMIN",
            ));
        }
        // SAFETY: `s` is a fresh descriptor nobody else owns.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mtu = ifreq::mtu_and_up(s.as_raw_fd(), &name)?;
        let mac = opts.mac.unwrap_or_else(random_mac);
        tracing::debug!(interface = %name, mtu, "TAP uplink open");
        Ok(Tap {
            fd,
            name,
            mac,
            mtu,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            tx: TxBatch::new(mtu + 14 + 64),
            stats: UplinkStats::default(),
        })
    }
}

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getrandom writes at most `m.len()` bytes into `m`.
    let r = unsafe { libc::getrandom(m.as_mut_ptr().cast(), m.len(), libc::GRND_NONBLOCK) };
    if r != m.len() as isize {
        // No entropy yet (early boot): pid and time still make it unique
        // enough on one link.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        m[1..5].copy_from_slice(&t.to_le_bytes());
        m[5] = std::process::id() as u8;
    }
    m[0] = (m[0] & 0xfe) | 0x02;
    m
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

    fn recv_batch(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(&[u8], bool),
    ) -> Result<usize, UplinkError> {
        let mut n = 0;
        while n < max {
            // SAFETY: reads at most `rx.len()` bytes into our own buffer.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    self.rx.as_mut_ptr().cast(),
                    self.rx.len(),
                )
            };
            self.stats.rx_syscalls += 1;
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => Ok(n),
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
            let len = r as usize;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            // Without TUNSETOFFLOAD the kernel completes checksums before
            // handing a frame to the TAP: verify them.
            f(&self.rx[..len], false);
            n += 1;
        }
        Ok(n)
    }

    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        if self.tx.full() {
            // Failed frames are counted as dropped; see `flush`.
            let _ = self.flush();
        }
        self.tx.push(len)
    }

    fn flush(&mut self) -> Result<(), UplinkError> {
        let n = self.tx.n;
        self.tx.n = 0;
        let mut first_err = None;
        // A TAP takes one frame per write(2).
        for i in 0..n {
            let len = self.tx.lens[i];
            // SAFETY: writes `len` bytes from our own buffer of at least
            // that size.
            let r =
                unsafe { libc::write(self.fd.as_raw_fd(), self.tx.bufs[i].as_ptr().cast(), len) };
            self.stats.tx_syscalls += 1;
            if r >= 0 {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            self.stats.tx_dropped += 1;
            // Queue full, or this one frame is bad: drop it, go on.
            if is_queue_full(&e)
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EINVAL | libc::EMSGSIZE)
                )
            {
                continue;
            }
            // The device failed (e.g. EIO, EBADFD): drop the rest at once.
            self.stats.tx_dropped += (n - i - 1) as u64;
            first_err = Some(e);
            break;
        }
        match first_err {
            Some(e) => Err(UplinkError::Sys {
                iface: self.name.clone(),
                call: "write(tap)",
                source: e,
            }),
            None => Ok(()),
        }
    }

    fn stats(&self) -> UplinkStats {
        self.stats
    }

    fn name(&self) -> &str {
        &self.name
    }
}
