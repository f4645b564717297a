//! OS-facing shared-memory pieces: memfd segments, eventfds and `SCM_RIGHTS`
//! fd passing over unix `SOCK_SEQPACKET` sockets. Every `unsafe` block of
//! the ABI's OS side lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Errors creating or mapping shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A syscall failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The fd is smaller than the mapping asked for.
    #[error("shared memory file is {actual} bytes, expected at least {wanted}")]
    TooSmall {
        /// Bytes wanted.
        wanted: usize,
        /// Bytes present.
        actual: usize,
    },
    /// Zero-length or absurd size.
    #[error("invalid shared memory size {0}")]
    BadSize(usize),
}

fn sys(call: &'static str) -> ShmError {
    ShmError::Sys {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A `MAP_SHARED` mapping of a memfd.
pub struct ShmRegion {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain shared memory; every access from safe code goes
// through atomics or explicit copies (FIFO/queue handles), and the mapping
// stays valid until drop, so moving or sharing the handle across threads is
// sound.
unsafe impl Send for ShmRegion {}
// SAFETY: see `Send`: `&ShmRegion` only exposes the pointer and metadata.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// Create a memfd of `len` bytes (zero-filled, pages allocated on touch)
    /// and map it.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        if len == 0 || len > (1 << 40) {
            return Err(ShmError::BadSize(len));
        }
        let cname = CString::new(name.replace('\0', "")).unwrap_or_default();
        // SAFETY: valid NUL-terminated name; the returned fd is owned at once.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(sys("ftruncate"));
        }
        Self::map(fd, len)
    }

    /// Map an fd received from the other side; it must hold `len` bytes.
    pub fn map_fd(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        if len == 0 || len > (1 << 40) {
            return Err(ShmError::BadSize(len));
        }
        // SAFETY: fstat into a zeroed local struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(sys("fstat"));
        }
        if (st.st_size as u64) < len as u64 {
            return Err(ShmError::TooSmall {
                wanted: len,
                actual: st.st_size as usize,
            });
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        // SAFETY: mapping a file we hold open; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mmap"));
        }
        Ok(ShmRegion {
            fd,
            ptr: p.cast(),
            len,
        })
    }

    /// Base address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (zero-length regions cannot be created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (to pass to another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no references into the
        // region outlive `self` in safe code.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A non-blocking, close-on-exec eventfd.
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned at once.
        let r = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(r) },
        })
    }

    /// Wrap an eventfd received from the other side.
    pub fn from_fd(fd: OwnedFd) -> Self {
        EventFd { fd }
    }

    /// Signal (write 1). A saturated counter (EAGAIN) already signals.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reset the counter; returns its value (0 if nothing was signalled).
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a local.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Block until signalled or `timeout`; Ok(true) if signalled. EINTR
    /// returns Ok(false).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(r > 0 && self.drain() > 0)
    }

    /// The fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

const MAX_FDS: usize = 16;

/// Send one datagram with up to 16 fds attached (`SCM_RIGHTS`).
pub fn send_with_fds(sock: BorrowedFd, data: &[u8], fds: &[BorrowedFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 16]; // 128 bytes, 8-aligned: room for 16 fds
    // SAFETY: msghdr is POD; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is large enough for one cmsg with
        // `fds.len()` ints (space ≤ 128 bytes for ≤ 16 fds).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            let d = libc::CMSG_DATA(c) as *mut libc::c_int;
            for (i, f) in fds.iter().enumerate() {
                d.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at live locals for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive one datagram and up to `max_fds` fds. Truncated data or control
/// messages are an `InvalidData` error (received fds are closed).
pub fn recv_with_fds(sock: BorrowedFd, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: zeroed msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((max_fds.min(MAX_FDS) * 4) as u32) } as usize;
    // SAFETY: msg points at live locals.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `cbuf`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let d = libc::CMSG_DATA(c) as *const libc::c_int;
                for i in 0..payload / 4 {
                    fds.push(OwnedFd::from_raw_fd(d.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        drop(fds);
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control message truncated"));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_maps_twice_and_shares_bytes() {
        let a = ShmRegion::create("t", 1 << 16).unwrap();
        // SAFETY: in-bounds writes/reads of our own mappings.
        unsafe { *a.as_ptr().add(100) = 42 };
        let dup = a.fd().try_clone_to_owned().unwrap();
        let b = ShmRegion::map_fd(dup, 1 << 16).unwrap();
        assert_eq!(unsafe { *b.as_ptr().add(100) }, 42);
        let dup = a.fd().try_clone_to_owned().unwrap();
        assert!(matches!(ShmRegion::map_fd(dup, 1 << 20), Err(ShmError::TooSmall { .. })));
    }

    #[test]
    fn eventfd_signals() {
        let e = EventFd::new().unwrap();
        assert!(!e.wait(Some(Duration::from_millis(1))).unwrap());
        e.notify();
        assert!(e.wait(Some(Duration::from_millis(100))).unwrap());
        assert_eq!(e.drain(), 0);
    }

    #[test]
    fn fds_cross_a_seqpacket_pair() {
        let mut sv = [0; 2];
        // SAFETY: socketpair into a local array; fds owned below.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, sv.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let e = EventFd::new().unwrap();
        send_with_fds(a.as_fd(), b"hi", &[e.fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 1);
        let e2 = EventFd::from_fd(fds.into_iter().next().unwrap());
        e2.notify();
        assert!(e.wait(Some(Duration::from_millis(100))).unwrap());
        // Truncation is an error, not silent loss.
        send_with_fds(a.as_fd(), b"0123456789", &[]).unwrap();
        assert!(recv_with_fds(b.as_fd(), &mut buf, 4).is_err());
    }
}
