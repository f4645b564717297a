//! `PACKET_RX_RING` (TPACKET_V2): the kernel copies each received frame into
//! a ring mapped into the daemon, in the softirq that delivers it, and the
//! daemon reads frames from memory: no `recvmmsg` per batch, no socket
//! queue, no second copy on the daemon's CPU.
//!
//! The ring is shared with the kernel only (never with apps), but its
//! header fields are still bounds-checked before a frame is sliced.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

/// Frame slots hold an MTU-sized frame with the tpacket header, the
/// address and the virtio-net header in front. A bigger packet (a local
/// veth peer's 64 KiB GSO packet) lands truncated with `TP_STATUS_COPY`
/// and whole in the socket's receive queue (`PACKET_COPY_THRESH`), where
/// [`RxFrame::copy`] tells the caller to fetch it: ring order is kept.
const FRAME_SIZE: usize = 2048;
/// 512 frames per 1 MiB block (the kernel allocates blocks in power-of-two
/// pages).
const FRAMES_PER_BLOCK: usize = 512;
const BLOCK_SIZE: usize = 1 << 20;
const _: () = assert!(FRAME_SIZE * FRAMES_PER_BLOCK <= BLOCK_SIZE && FRAME_SIZE.is_multiple_of(16));

/// One received frame, as the ring describes it.
pub struct RxFrame<'a> {
    /// From the MAC header on (`tp_snaplen` bytes).
    pub data: &'a [u8],
    /// The `PACKET_VNET_HDR` header in front of the MAC header, if enabled.
    pub vnet: Option<&'a [u8]>,
    /// The kernel's `tp_status` (checksum state, truncation).
    pub status: u32,
    /// `tp_len`: the frame's real length (> data.len() if truncated).
    pub len: usize,
    /// `sll_pkttype` of the frame.
    pub pkttype: u8,
    /// Truncated here; the whole packet is next in the socket's queue.
    pub copy: bool,
}

/// A mapped TPACKET_V2 receive ring.
pub struct RxRing {
    base: *mut u8,
    map_len: usize,
    frames: usize,
    /// Next frame to look at.
    head: usize,
    vnet_len: usize,
}

// SAFETY: the mapping is owned by this value alone; the kernel is the only
// other party and synchronizes through `tp_status`.
unsafe impl Send for RxRing {}

fn setopt<T>(fd: RawFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` is a live value of the stated size for the duration of
    // the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl RxRing {
    /// Switch `fd` (an unbound or bound AF_PACKET socket, with
    /// PACKET_VNET_HDR already set if `vnet`) to TPACKET_V2 and map its
    /// receive ring.
    ///
    /// `mb` MiB of kernel memory, 512 frames per MiB. The ring must absorb
    /// what arrives while the daemon is busy or descheduled: 10 000 new
    /// keep-alive connections at once made a 32 MiB ring drop frames (SYN
    /// and request retransmits, p99 over 1 s), 64 MiB none.
    pub fn setup(fd: RawFd, vnet: bool, mb: usize) -> io::Result<RxRing> {
        let blocks = mb.clamp(1, 4096);
        setopt(
            fd,
            libc::PACKET_VERSION,
            &(libc::tpacket_versions::TPACKET_V2 as libc::c_int),
        )?;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: (blocks * FRAMES_PER_BLOCK) as u32,
        };
        setopt(fd, libc::PACKET_RX_RING, &req)?;
        let map_len = BLOCK_SIZE * blocks;
        // SAFETY: maps the ring the kernel just allocated for `fd`; the
        // result is checked before use and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RxRing {
            base: p.cast(),
            map_len,
            frames: blocks * FRAMES_PER_BLOCK,
            head: 0,
            vnet_len: if vnet { 10 } else { 0 },
        })
    }

    fn frame_ptr(&self, i: usize) -> *mut u8 {
        let off = (i / FRAMES_PER_BLOCK) * BLOCK_SIZE + (i % FRAMES_PER_BLOCK) * FRAME_SIZE;
        debug_assert!(off + FRAME_SIZE <= self.map_len);
        // SAFETY: `off + FRAME_SIZE` is within the mapping (i < frames).
        unsafe { self.base.add(off) }
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: `tp_status` is the first, 4-byte aligned field of the
        // frame header (frames start TPACKET_ALIGNMENT-aligned in a
        // page-aligned block); the kernel updates it concurrently, hence
        // the atomic view.
        unsafe { &*(self.frame_ptr(i) as *const AtomicU32) }
    }

    /// Is the next frame ours (one load, no system call)?
    pub fn ready(&self) -> bool {
        self.status(self.head).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Hand up to `max` ready frames to `f`, giving each back to the kernel
    /// after the call. Returns how many frames were consumed.
    pub fn drain(&mut self, max: usize, f: &mut dyn FnMut(RxFrame<'_>)) -> usize {
        let mut n = 0;
        while n < max {
            let i = self.head;
            let st = self.status(i).load(Ordering::Acquire);
            if st & libc::TP_STATUS_USER == 0 {
                break;
            }
            let p = self.frame_ptr(i);
            // SAFETY: the frame belongs to us until its status is reset;
            // the header is plain old data at the frame's start.
            let h = unsafe { (p as *const libc::tpacket2_hdr).read() };
            let hdr_len = std::mem::size_of::<libc::tpacket2_hdr>().next_multiple_of(16);
            // SAFETY: sockaddr_ll follows the aligned header inside the frame.
            let sll = unsafe { (p.add(hdr_len) as *const libc::sockaddr_ll).read_unaligned() };
            let mac = h.tp_mac as usize;
            let snap = h.tp_snaplen as usize;
            if mac >= self.vnet_len && mac + snap <= FRAME_SIZE {
                // SAFETY: bounds checked against the frame just above.
                let frame = unsafe { std::slice::from_raw_parts(p, FRAME_SIZE) };
                f(RxFrame {
                    data: &frame[mac..mac + snap],
                    vnet: (self.vnet_len > 0).then(|| &frame[mac - self.vnet_len..mac]),
                    status: st,
                    len: h.tp_len as usize,
                    pkttype: sll.sll_pkttype,
                    copy: st & libc::TP_STATUS_COPY != 0,
                });
            }
            self.status(i)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.head = (i + 1) % self.frames;
            n += 1;
        }
        n
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `setup`.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}
