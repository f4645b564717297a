//! AF_PACKET uplink with `recvmmsg`/`sendmmsg` batching.

use super::{ifreq, Batch, Uplink, UplinkError, UplinkStats};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BATCH: usize = 64;

/// An AF_PACKET socket bound to one interface.
pub struct AfPacket {
    fd: OwnedFd,
    name: String,
    mac: [u8; 6],
    mtu: usize,
    rx: Batch,
    tx: Batch,
    ignore_outgoing: bool,
    stats: UplinkStats,
}

fn sys(name: &str, call: &'static str) -> UplinkError {
    ifreq::err(name, call)
}

impl AfPacket {
    /// Open `ifname` (must exist; it is brought up).
    pub fn open(ifname: &str) -> Result<Self, UplinkError> {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain syscall; fd owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
        if raw < 0 {
            return Err(sys(ifname, "socket(AF_PACKET)"));
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut r = ifreq::new(ifname)?;
        // SAFETY: ioctl with a valid ifreq.
        if unsafe { libc::ioctl(raw, libc::SIOCGIFINDEX, &mut r) } < 0 {
            return Err(sys(ifname, "SIOCGIFINDEX"));
        }
        // SAFETY: set by SIOCGIFINDEX.
        let ifindex = unsafe { r.ifr_ifru.ifru_ifindex };
        let mut r = ifreq::new(ifname)?;
        // SAFETY: as above.
        if unsafe { libc::ioctl(raw, libc::SIOCGIFHWADDR, &mut r) } < 0 {
            return Err(sys(ifname, "SIOCGIFHWADDR"));
        }
        let mut mac = [0u8; 6];
        // SAFETY: hwaddr set by SIOCGIFHWADDR.
        let hw = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
        for (m, h) in mac.iter_mut().zip(hw.iter()) {
            *m = *h as u8;
        }
        let mtu = ifreq::mtu_and_up(raw, ifname)?;
        // SAFETY: sockaddr_ll is POD.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: binding with a valid sockaddr_ll.
        if unsafe { libc::bind(raw, &sll as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) } < 0 {
            return Err(sys(ifname, "bind(AF_PACKET)"));
        }
        let one: libc::c_int = 1;
        let setopt = |level, opt, v: libc::c_int| {
            // SAFETY: setsockopt with a local int.
            unsafe { libc::setsockopt(raw, level, opt, &v as *const _ as *const libc::c_void, 4) == 0 }
        };
        // Our own transmissions must not come back as input.
        let ignore_outgoing = setopt(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, one);
        setopt(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, one);
        // Per-frame checksum status (veth peers send partial checksums).
        setopt(libc::SOL_PACKET, libc::PACKET_AUXDATA, one);
        if !setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20) {
            setopt(libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20);
        }
        if !setopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20) {
            setopt(libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 20);
        }
        // Receive buffers take a whole 64 KiB IP packet: a local veth peer
        // with TSO/GSO hands us coalesced segments far above the MTU (a free
        // receive offload); smaller buffers would truncate and drop them.
        let rsize = 65536 + 256;
        let fsize = mtu + 14 + 64;
        Ok(AfPacket {
            fd,
            name: ifname.into(),
            mac,
            mtu,
            rx: Batch::new(BATCH, rsize),
            tx: Batch::new(BATCH, fsize),
            ignore_outgoing,
            stats: UplinkStats::default(),
        })
    }
}

/// Does the PACKET_AUXDATA of a received frame say the checksum is valid or
/// not yet computed (a local sender's partial checksum)?
fn aux_csum_ok(h: &libc::msghdr) -> bool {
    const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
    const TP_STATUS_CSUM_VALID: u32 = 1 << 7;
    // SAFETY: walking control messages the kernel wrote into the buffer
    // `h.msg_control` points at (sized in `msg_controllen`).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let aux = (libc::CMSG_DATA(c) as *const libc::tpacket_auxdata).read_unaligned();
                return aux.tp_status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID) != 0;
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    false
}

impl Uplink for AfPacket {
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
        let n = max.clamp(1, BATCH);
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: zeroed sockaddr_ll / mmsghdr are valid initial values.
        let mut addrs: [libc::sockaddr_ll; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut ctrl = [[0u64; 8]; BATCH];
        for i in 0..n {
            hdrs[i].msg_hdr.msg_control = ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
            iov[i].iov_base = self.rx.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = self.rx.bufs[i].len();
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let r = unsafe { libc::recvmmsg(self.fd.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut()) };
        self.stats.rx_syscalls += 1;
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UplinkError::Sys {
                    iface: self.name.clone(),
                    call: "recvmmsg",
                    source: e,
                }),
            };
        }
        for i in 0..r as usize {
            let len = hdrs[i].msg_len as usize;
            if !self.ignore_outgoing && addrs[i].sll_pkttype == libc::PACKET_OUTGOING as u8 {
                continue;
            }
            if len > self.rx.bufs[i].len() || hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.rx_truncated += 1;
                continue;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            let csum_ok = aux_csum_ok(&hdrs[i].msg_hdr);
            f(&self.rx.bufs[i][..len], csum_ok);
        }
        // The raw count, so callers keep reading while batches come back full.
        Ok(r as usize)
    }

    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        if self.tx.full() {
            let _ = self.flush();
        }
        let i = self.tx.n;
        if self.tx.bufs[i].len() < len {
            // Oversized frames (should not happen: smoltcp honours the MTU).
            self.tx.bufs[i].resize(len, 0);
        }
        self.tx.lens[i] = len;
        self.tx.n += 1;
        &mut self.tx.bufs[i][..len]
    }

    fn flush(&mut self) -> Result<(), UplinkError> {
        let n = self.tx.n;
        if n == 0 {
            return Ok(());
        }
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: zeroed mmsghdr is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iov[i].iov_base = self.tx.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = self.tx.lens[i];
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0usize;
        let mut tries = 0;
        while sent < n && tries < 4 {
            tries += 1;
            // SAFETY: headers point at live buffers.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), hdrs[sent..].as_mut_ptr(), (n - sent) as u32, libc::MSG_DONTWAIT) };
            self.stats.tx_syscalls += 1;
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                        // Drop the frame at the head; TCP retransmits.
                        self.stats.tx_dropped += 1;
                        sent += 1;
                    }
                    _ => {
                        self.stats.tx_dropped += (n - sent) as u64;
                        self.tx.n = 0;
                        return Err(UplinkError::Sys {
                            iface: self.name.clone(),
                            call: "sendmmsg",
                            source: e,
                        });
                    }
                }
                continue;
            }
            for i in sent..sent + r as usize {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += self.tx.lens[i] as u64;
            }
            sent += r as usize;
        }
        self.stats.tx_dropped += (n - sent) as u64;
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
