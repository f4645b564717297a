//! AF_PACKET uplink with `recvmmsg`/`sendmmsg` batching.

use super::ring::RxRing;
use super::{ifreq, is_queue_full, TxBatch, Uplink, UplinkError, UplinkStats, BATCH};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Socket buffer size asked for each way (frames arrive in bursts).
const SOCK_BUF: libc::c_int = 8 << 20;
/// Receive buffer per frame: a whole 64 KiB IP packet. A local veth peer
/// with TSO/GSO hands us coalesced segments far above the MTU (a free
/// receive offload); smaller buffers would truncate and drop them.
const RX_BUF: usize = 65536 + 256;
/// Control buffer per received frame: room for one PACKET_AUXDATA cmsg.
const CTRL_WORDS: usize = 8;

/// Options of [`AfPacket::open`].
#[derive(Debug, Clone, Default)]
pub struct AfPacketOptions {
    /// Use this MAC instead of the interface's own; a different one turns on
    /// promiscuous mode (real NICs filter frames to foreign MACs).
    pub mac: Option<[u8; 6]>,
    /// Receive every frame on the wire (`PACKET_MR_PROMISC`, dropped by the
    /// kernel when the socket closes).
    pub promiscuous: bool,
    /// Use virtio-net headers (`PACKET_VNET_HDR`): TCP segmentation and
    /// checksum offload towards the kernel ([`Uplink::tso`]).
    pub offload: bool,
    /// Receive through a memory-mapped ring (`PACKET_RX_RING`, TPACKET_V2)
    /// of this many MiB instead of `recvmmsg` (0); falls back to
    /// `recvmmsg` if the kernel refuses.
    pub rx_ring_mb: usize,
}

/// An AF_PACKET socket bound to one interface.
///
/// The interface must carry no kernel IP address (see [the module
/// docs](super)). Transmission bypasses the qdisc (`PACKET_QDISC_BYPASS`)
/// when the kernel allows it, so `tcpdump` on the interface does not show
/// the daemon's outgoing frames (the peer end of a veth does).
pub struct AfPacket {
    fd: OwnedFd,
    name: String,
    mac: [u8; 6],
    mtu: usize,
    rx: Vec<Box<[u8]>>,
    /// The mapped receive ring, when in use (then `rx` is empty).
    ring: Option<RxRing>,
    tx: TxBatch,
    /// PACKET_IGNORE_OUTGOING is unsupported: filter on `sll_pkttype`.
    skip_outgoing: bool,
    /// PACKET_VNET_HDR is on: every frame carries a 10-byte virtio-net
    /// header, which lets us hand the kernel TCP super-frames (TSO) and
    /// leave TCP checksums to it.
    vnet: bool,
    /// GSO segment size per pending TX frame (0 = none).
    gso: [u16; BATCH],
    stats: UplinkStats,
    /// Frames the kernel dropped for want of room (ring or socket buffer).
    rx_dropped: std::cell::Cell<u64>,
}

/// Size of `struct virtio_net_hdr`.
const VNET_HDR: usize = 10;
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_F_DATA_VALID: u8 = 2;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;

/// Fold a ones'-complement sum to 16 bits.
fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Fill the virtio-net header in front of `frame` (= `buf[VNET_HDR..]`): for
/// TCP, store the pseudo-header sum in the checksum field and ask the kernel
/// to finish it (CHECKSUM_PARTIAL); with `gso`, ask it to segment too.
fn fill_vnet(buf: &mut [u8], gso: u16) {
    buf[..VNET_HDR].fill(0);
    let f = &mut buf[VNET_HDR..];
    if f.len() < 14 {
        return;
    }
    let (l3, tcp_off, pseudo) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f.len() >= 34 && f[23] == 6 => {
            let ihl = usize::from(f[14] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let tcp_len = total.saturating_sub(ihl) as u32;
            let s = sum16(&f[26..34]) + 6 + tcp_len;
            (4u8, 14 + ihl, s)
        }
        0x86dd if f.len() >= 54 && f[20] == 6 => {
            let plen = u32::from(u16::from_be_bytes([f[18], f[19]]));
            let s = sum16(&f[22..54]) + 6 + plen;
            (6u8, 54, s)
        }
        _ => return,
    };
    if f.len() < tcp_off + 20 {
        return;
    }
    let partial = fold(pseudo);
    f[tcp_off + 16..tcp_off + 18].copy_from_slice(&partial.to_be_bytes());
    let tcp_hdr = usize::from(f[tcp_off + 12] >> 4) * 4;
    let h = &mut buf[..VNET_HDR];
    h[0] = VNET_F_NEEDS_CSUM;
    if gso > 0 {
        h[1] = if l3 == 4 {
            VNET_GSO_TCPV4
        } else {
            VNET_GSO_TCPV6
        };
        h[2..4].copy_from_slice(&((tcp_off + tcp_hdr) as u16).to_le_bytes());
        h[4..6].copy_from_slice(&gso.to_le_bytes());
    }
    h[6..8].copy_from_slice(&(tcp_off as u16).to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
}

impl AfPacket {
    /// Open an AF_PACKET socket on `ifname` (which must exist; it is brought
    /// up if down). Needs CAP_NET_RAW.
    pub fn open(ifname: &str, opts: &AfPacketOptions) -> Result<Self, UplinkError> {
        let mut req = ifreq::new(ifname)?;
        // Protocol 0: no frames are queued until bind() names the interface
        // (ETH_P_ALL here would queue every interface's frames meanwhile).
        // SAFETY: plain syscall; the fd is owned at once below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(ifreq::last_err(
                ifname,
                "socket(AF_PACKET)",
                "AF_PACKET",
                "CAP_NET_RAW",
            ));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        ifreq::ioctl(raw, libc::SIOCGIFINDEX, &mut req, ifname, "SIOCGIFINDEX")?;
        // SAFETY: SIOCGIFINDEX wrote the `ifru_ifindex` member.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };

        let mut req = ifreq::new(ifname)?;
        ifreq::ioctl(raw, libc::SIOCGIFHWADDR, &mut req, ifname, "SIOCGIFHWADDR")?;
        // SAFETY: SIOCGIFHWADDR wrote the `ifru_hwaddr` member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut if_mac = [0u8; 6];
        for (m, h) in if_mac.iter_mut().zip(hw.sa_data.iter()) {
            *m = *h as u8;
        }
        warn_if_addressed(raw, ifname);
        let mtu = ifreq::mtu_and_up(raw, ifname)?;

        let setopt = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| -> bool {
            // SAFETY: the option value is a live c_int of the stated size.
            unsafe {
                libc::setsockopt(
                    raw,
                    level,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) == 0
            }
        };
        // Our own transmissions must not come back as input (Linux ≥ 4.20;
        // older kernels: filter them in recv_batch).
        let skip_outgoing = !setopt(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        // Best effort: without these it still works, only slower.
        setopt(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
        // Per-frame checksum status (veth peers send partial checksums).
        setopt(libc::SOL_PACKET, libc::PACKET_AUXDATA, 1);
        // virtio-net headers: TSO and checksum offload towards the kernel.
        let vnet = opts.offload && setopt(libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1);
        // After PACKET_VNET_HDR: the kernel refuses it once a ring exists.
        let ring = if opts.rx_ring_mb > 0 {
            // Packets too big for a ring slot also go whole to the socket
            // queue (TP_STATUS_COPY), read with recvmsg in ring order.
            setopt(libc::SOL_PACKET, libc::PACKET_COPY_THRESH, 1);
            match RxRing::setup(raw, vnet, opts.rx_ring_mb) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(interface = ifname, error = %e, "PACKET_RX_RING unavailable; receiving with recvmmsg");
                    None
                }
            }
        } else {
            None
        };
        // *FORCE passes the rmem_max/wmem_max caps (needs CAP_NET_ADMIN).
        if !setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCK_BUF) {
            setopt(libc::SOL_SOCKET, libc::SO_RCVBUF, SOCK_BUF);
        }
        if !setopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCK_BUF) {
            setopt(libc::SOL_SOCKET, libc::SO_SNDBUF, SOCK_BUF);
        }

        let mac = opts.mac.unwrap_or(if_mac);
        if opts.promiscuous || mac != if_mac {
            // SAFETY: packet_mreq is plain old data; all-zero is valid.
            let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
            mr.mr_ifindex = ifindex;
            mr.mr_type = libc::PACKET_MR_PROMISC as u16;
            // SAFETY: the option value is a live packet_mreq of that size.
            let r = unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_PACKET,
                    libc::PACKET_ADD_MEMBERSHIP,
                    (&mr as *const libc::packet_mreq).cast(),
                    std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(ifreq::last_err(
                    ifname,
                    "PACKET_ADD_MEMBERSHIP(PROMISC)",
                    "AF_PACKET",
                    "CAP_NET_RAW",
                ));
            }
        }

        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll of the stated size.
        let r = unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(ifreq::last_err(
                ifname,
                "bind(AF_PACKET)",
                "AF_PACKET",
                "CAP_NET_RAW",
            ));
        }
        tracing::debug!(
            interface = ifname,
            mtu,
            skip_outgoing,
            "AF_PACKET uplink open"
        );
        Ok(AfPacket {
            fd,
            name: ifname.into(),
            mac,
            mtu,
            rx: if ring.is_some() {
                // One buffer for the oversized packets of the ring.
                vec![vec![0u8; RX_BUF].into_boxed_slice()]
            } else {
                (0..BATCH)
                    .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
                    .collect()
            },
            ring,
            // Ethernet header + a VLAN tag + slack.
            // Offload: room for the virtio-net header and 64 KiB super-frames.
            tx: TxBatch::new(if vnet {
                VNET_HDR + 65536 + 64
            } else {
                mtu + 14 + 64
            }),
            skip_outgoing,
            vnet,
            gso: [0; BATCH],
            stats: UplinkStats::default(),
            rx_dropped: std::cell::Cell::new(0),
        })
    }

    fn sys_err(&self, call: &'static str, source: io::Error) -> UplinkError {
        UplinkError::Sys {
            iface: self.name.clone(),
            call,
            source,
        }
    }
}

/// Warn when the interface has a kernel IPv4 address: the kernel would then
/// answer ARP and reset TCP for the daemon's traffic too.
fn warn_if_addressed(fd: RawFd, ifname: &str) {
    let Ok(mut req) = ifreq::new(ifname) else {
        return;
    };
    req.ifr_ifru.ifru_addr.sa_family = libc::AF_INET as libc::sa_family_t;
    // SAFETY: SIOCGIFADDR reads/writes one valid ifreq (fails with
    // EADDRNOTAVAIL when there is no address, which is what we want).
    if unsafe { libc::ioctl(fd, libc::SIOCGIFADDR, &mut req as *mut libc::ifreq) } == 0 {
        tracing::warn!(
            interface = ifname,
            "interface has a kernel IPv4 address; the kernel will also answer for \
             its traffic. Remove it (`ip addr flush dev {ifname}`): the daemon owns \
             the addresses"
        );
    }
}

/// Does the PACKET_AUXDATA of a received frame say the L4 checksum is valid
/// or not yet computed (a local sender's partial checksum)?
fn aux_csum_ok(h: &libc::msghdr) -> bool {
    // SAFETY: walks the control messages the kernel wrote into the buffer
    // `h.msg_control` points at, bounded by `msg_controllen`; the payload is
    // read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let aux = libc::CMSG_DATA(c)
                    .cast::<libc::tpacket_auxdata>()
                    .read_unaligned();
                return status_csum_ok(aux.tp_status);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    false
}

/// Does a packet's `tp_status` say the L4 checksum is valid or not yet
/// computed (a local sender's partial checksum)?
fn status_csum_ok(tp_status: u32) -> bool {
    tp_status & (libc::TP_STATUS_CSUMNOTREADY | libc::TP_STATUS_CSUM_VALID) != 0
}

/// The same from a virtio-net header's flags, or from the packet status.
fn vnet_csum_ok(vnet: &[u8], status_ok: bool) -> bool {
    status_ok || vnet[0] & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) != 0
}

/// A received buffer (`len` bytes, virtio-net header first if `vnet`) as
/// (frame, checksum vouched for); `None` if too short for the header.
fn strip_vnet(buf: &[u8], len: usize, vnet: bool, status_ok: bool) -> Option<(&[u8], bool)> {
    if !vnet {
        return Some((&buf[..len], status_ok));
    }
    (len >= VNET_HDR).then(|| (&buf[VNET_HDR..len], vnet_csum_ok(buf, status_ok)))
}

/// Receive one whole packet from the socket queue into `buf` (a ring
/// frame said it is there): its length and whether PACKET_AUXDATA vouches
/// for its checksum. `None` if nothing was queued or it did not fit.
fn recv_whole(fd: RawFd, buf: &mut [u8]) -> Option<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut ctrl = [0u64; CTRL_WORDS];
    // SAFETY: msghdr is plain old data; zero is valid.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = std::mem::size_of::<[u64; CTRL_WORDS]>() as _;
    // SAFETY: `h` points at live buffers of the stated sizes for the call.
    let r = unsafe { libc::recvmsg(fd, &mut h, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    if r < 0 || r as usize > buf.len() || h.msg_flags & libc::MSG_TRUNC != 0 {
        return None;
    }
    Some((r as usize, aux_csum_ok(&h)))
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

    fn recv_batch(
        &mut self,
        max: usize,
        f: &mut dyn FnMut(&[u8], bool),
    ) -> Result<usize, UplinkError> {
        let n = max.min(BATCH);
        if n == 0 {
            return Ok(0);
        }
        if let Some(ring) = self.ring.as_mut() {
            let (skip_outgoing, vnet, fd) = (self.skip_outgoing, self.vnet, self.fd.as_raw_fd());
            let stats = &mut self.stats;
            let big = &mut self.rx[0];
            return Ok(ring.drain(n, &mut |fr| {
                if fr.copy {
                    // The whole packet waits in the socket queue; take it
                    // even if it is skipped, to keep the two in step.
                    stats.rx_syscalls += 1;
                    let Some((len, csum_ok)) = recv_whole(fd, big) else {
                        stats.rx_truncated += 1;
                        return;
                    };
                    if skip_outgoing && fr.pkttype == libc::PACKET_OUTGOING {
                        return;
                    }
                    stats.rx_frames += 1;
                    stats.rx_bytes += len as u64;
                    if let Some((frame, ok)) = strip_vnet(big, len, vnet, csum_ok) {
                        f(frame, ok);
                    }
                    return;
                }
                if skip_outgoing && fr.pkttype == libc::PACKET_OUTGOING {
                    return;
                }
                if fr.data.len() < fr.len {
                    stats.rx_truncated += 1;
                    return;
                }
                stats.rx_frames += 1;
                stats.rx_ring_frames += 1;
                stats.rx_bytes += fr.len as u64;
                let csum_ok = status_csum_ok(fr.status);
                f(
                    fr.data,
                    fr.vnet.map_or(csum_ok, |h| vnet_csum_ok(h, csum_ok)),
                );
            }));
        }
        // The headers live on the stack, rebuilt per call: they hold raw
        // pointers (a device holding them would not be Send), and filling
        // them costs far less than the system call. The frame buffers
        // themselves are allocated once, in `open`.
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: sockaddr_ll and mmsghdr are plain old data; zero is valid.
        let mut addrs: [libc::sockaddr_ll; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut ctrl = [[0u64; CTRL_WORDS]; BATCH];
        for i in 0..n {
            iov[i].iov_base = self.rx[i].as_mut_ptr().cast();
            iov[i].iov_len = self.rx[i].len();
            let h = &mut hdrs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<[u64; CTRL_WORDS]>() as _;
        }
        // SAFETY: the first `n` headers point at live buffers of the stated
        // sizes, all outliving the call; MSG_DONTWAIT makes it non-blocking.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        self.stats.rx_syscalls += 1;
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                // A pending error of the device (e.g. ENETDOWN) is reported
                // once and then cleared by the kernel: no error loop.
                _ => Err(self.sys_err("recvmmsg", e)),
            };
        }
        let got = r as usize;
        for i in 0..got {
            if self.skip_outgoing && addrs[i].sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            // With MSG_TRUNC, msg_len is the frame's real length.
            let len = hdrs[i].msg_len as usize;
            if len > self.rx[i].len() || hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.rx_truncated += 1;
                continue;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            let csum_ok = aux_csum_ok(&hdrs[i].msg_hdr);
            if let Some((frame, ok)) = strip_vnet(&self.rx[i], len, self.vnet, csum_ok) {
                f(frame, ok);
            }
        }
        Ok(got)
    }

    fn rx_ready(&self) -> Option<bool> {
        self.ring.as_ref().map(RxRing::ready)
    }

    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        self.tx_frame_gso(len, None)
    }

    fn tso(&self) -> bool {
        self.vnet
    }

    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        if self.tx.full() {
            // Errors are logged by the next explicit flush's caller; the
            // frames are already counted as dropped.
            let _ = self.flush();
        }
        if self.vnet {
            self.gso[self.tx.n] = gso.unwrap_or(0);
            &mut self.tx.push(len + VNET_HDR)[VNET_HDR..]
        } else {
            self.tx.push(len)
        }
    }

    fn flush(&mut self) -> Result<(), UplinkError> {
        let n = self.tx.n;
        if n == 0 {
            return Ok(());
        }
        self.tx.n = 0;
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain old data; zero is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            if self.vnet {
                let len = self.tx.lens[i];
                fill_vnet(&mut self.tx.bufs[i][..len], self.gso[i]);
            }
            iov[i].iov_base = self.tx.bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = self.tx.lens[i];
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0usize;
        let mut first_err = None;
        let (mut interrupted, mut full) = (0, 0);
        // Every round sends ≥ 1 frame or drops ≥ 1 (EINTR is retried a
        // bounded number of times): at most `n` + 4 calls.
        while sent < n {
            // SAFETY: headers `sent..n` point at live buffers; no address is
            // given, so the bound interface is used.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    hdrs[sent..n].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            self.stats.tx_syscalls += 1;
            if r > 0 {
                for len in &self.tx.lens[sent..sent + r as usize] {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += *len as u64;
                }
                sent += r as usize;
                full = 0;
                continue;
            }
            if r == 0 {
                // Nothing taken and no error: drop the head, never spin.
                self.stats.tx_dropped += 1;
                sent += 1;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) if interrupted < 4 => interrupted += 1,
                // Still full after dropping one: drop the rest rather than
                // spend a system call per frame while overloaded.
                Some(libc::EAGAIN | libc::ENOBUFS) if full > 0 => {
                    self.stats.tx_dropped += (n - sent) as u64;
                    sent = n;
                }
                // Queue full, or this one frame is bad: drop it, go on.
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EMSGSIZE | libc::EINVAL) => {
                    self.stats.tx_dropped += 1;
                    sent += 1;
                    full += usize::from(is_queue_full(&e));
                    if !is_queue_full(&e) && first_err.is_none() {
                        first_err = Some(e);
                    }
                }
                // The device itself failed (e.g. ENETDOWN): drop the rest.
                _ => {
                    self.stats.tx_dropped += (n - sent) as u64;
                    sent = n;
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(self.sys_err("sendmmsg", e)),
            None => Ok(()),
        }
    }

    fn stats(&self) -> UplinkStats {
        // The kernel's drop count resets on every read: accumulate it.
        // SAFETY: tpacket_stats is plain old data; getsockopt writes at
        // most `len` bytes into it.
        let mut ks: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: as above; the fd is ours.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut ks as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if r == 0 {
            self.rx_dropped
                .set(self.rx_dropped.get() + u64::from(ks.tp_drops));
        }
        UplinkStats {
            rx_dropped: self.rx_dropped.get(),
            ..self.stats
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}
