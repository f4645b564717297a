//! OS-facing shared-memory pieces: memfd segments ([`ShmRegion`]), eventfds
//! ([`EventFd`]) and `SCM_RIGHTS` fd passing over unix `SOCK_SEQPACKET`
//! sockets ([`send_with_fds`], [`recv_with_fds`]). Every `unsafe` block of
//! the ABI's OS side lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Largest region [`ShmRegion::create`] / [`ShmRegion::map_fd`] accept (1 TiB).
pub const MAX_REGION_LEN: usize = 1 << 40;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 16;

/// Seals every region created here carries, and the one [`ShmRegion::map_fd`]
/// insists on: a peer holding the fd must not be able to shrink the file
/// under our mapping (touching a page past EOF raises `SIGBUS`).
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

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
        actual: u64,
    },
    /// Zero or larger than [`MAX_REGION_LEN`].
    #[error("invalid shared memory size {0}")]
    BadSize(usize),
    /// The fd is not a memfd sealed against shrinking, so the peer could
    /// truncate it under our mapping.
    #[error("shared memory fd is not sealed against shrinking")]
    NotSealed,
}

fn sys(call: &'static str) -> ShmError {
    ShmError::Sys {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A read/write `MAP_SHARED` mapping of a memfd. Unmapped on drop (the fd is
/// closed by its `OwnedFd`).
#[derive(Debug)]
pub struct ShmRegion {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the handle is a pointer to a mapping that stays valid until drop,
// plus an owned fd. It hands out only the raw pointer; all access to the
// bytes goes through the FIFO/queue handles' atomics and explicit copies
// (or the caller's own `unsafe`), which are designed for memory that another
// process writes concurrently anyway, so another thread of ours is no worse.
unsafe impl Send for ShmRegion {}
// SAFETY: `&ShmRegion` exposes only the pointer, length and a borrowed fd;
// see `Send`.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// Create a memfd named `name` (for `/proc/*/fd` only; NULs are dropped)
    /// of `len` bytes, zero-filled, seal it against resizing, and map it.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        if len == 0 || len > MAX_REGION_LEN {
            return Err(ShmError::BadSize(len));
        }
        let cname = CString::new(name.replace('\0', "")).unwrap_or_default();
        // SAFETY: valid NUL-terminated name; the returned fd is owned at once.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our fd; `len <= 2^40` fits `off_t`.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(sys("ftruncate"));
        }
        // SAFETY: plain fcntl on our fd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(sys("fcntl(F_ADD_SEALS)"));
        }
        Self::map(fd, len)
    }

    /// Map the first `len` bytes of a memfd received from the other side.
    /// The file must be at least `len` bytes and sealed against shrinking
    /// (as regions from [`ShmRegion::create`] are), else an error.
    pub fn map_fd(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        if len == 0 || len > MAX_REGION_LEN {
            return Err(ShmError::BadSize(len));
        }
        // SAFETY: plain fcntl on a valid fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(ShmError::NotSealed);
        }
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and a pointer to a live local.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(sys("fstat"));
        }
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual < len as u64 {
            return Err(ShmError::TooSmall {
                wanted: len,
                actual,
            });
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel
        // picks the address, so no existing memory is affected. Checked below.
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

    /// Base address (page aligned, valid for [`Self::len`] bytes while
    /// `self` lives).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length regions cannot be created.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (to pass to another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for ShmRegion {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; handles derived from
        // `as_ptr` must not outlive `self` per their own contracts.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A non-blocking, close-on-exec eventfd used as a wake-up doorbell.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd (counter 0, `EFD_CLOEXEC | EFD_NONBLOCK`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned at once.
        let r = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(r) };
        Ok(EventFd { fd })
    }

    /// Wrap an eventfd received from the other side (it should be
    /// non-blocking; a blocking one makes [`Self::drain`] block when unset).
    pub fn from_fd(fd: OwnedFd) -> Self {
        EventFd { fd }
    }

    /// Signal (add 1 to the counter). Errors are ignored: `EAGAIN` means the
    /// counter is saturated, which is already a pending signal.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reset the counter and return its value (0 if it was not signalled).
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Block until signalled or until `timeout` (`None`: forever), then
    /// drain. Ok(true) if it was signalled, Ok(false) on timeout or `EINTR`.
    /// Sub-millisecond timeouts round up to 1 ms.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, poll_ms);
        // SAFETY: one valid pollfd in a live local.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0 && self.drain() > 0)
    }

    /// The fd (to pass to another process or register with epoll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// poll(2) timeout in ms, rounded up, clamped to `i32::MAX`.
fn poll_ms(d: Duration) -> libc::c_int {
    let ms = d.as_nanos().div_ceil(1_000_000);
    ms.min(i32::MAX as u128) as libc::c_int
}

/// Control buffer big enough for one `SCM_RIGHTS` message of [`MAX_FDS`]
/// fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

const _: () = assert!(std::mem::size_of::<libc::c_int>() * MAX_FDS + 16 <= 128);

/// Where descriptors this library keeps for itself end up: set once per
/// process (see [`set_fd_placer`]).
static FD_PLACER: std::sync::OnceLock<fn(OwnedFd) -> OwnedFd> = std::sync::OnceLock::new();

/// Route every descriptor the client side opens or receives for itself
/// (the daemon socket, eventfds, segment memfds) through `placer` first.
/// An LD_PRELOAD shim shares the fd table with an app that may close or
/// `dup2` over numbers it does not know; the placer can move them out of
/// its way and remember them. Only the first call has an effect.
pub fn set_fd_placer(placer: fn(OwnedFd) -> OwnedFd) {
    let _ = FD_PLACER.set(placer);
}

/// `fd` after the process's placer (itself if none is set).
pub fn place_fd(fd: OwnedFd) -> OwnedFd {
    match FD_PLACER.get() {
        Some(p) => p(fd),
        None => fd,
    }
}

/// Send one datagram on a `SOCK_SEQPACKET` (or datagram) unix socket with up
/// to [`MAX_FDS`] fds attached as `SCM_RIGHTS`; `MSG_NOSIGNAL`, so a closed
/// peer gives `EPIPE` rather than a signal. Returns the bytes sent.
pub fn send_with_fds(sock: BorrowedFd, data: &[u8], fds: &[BorrowedFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; 128]);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * std::mem::size_of::<libc::c_int>()) as libc::c_uint;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `cbuf` is 8-aligned and `space <= 128` bytes (asserted at
        // compile time for MAX_FDS), so the first cmsghdr and its `payload`
        // bytes of data lie inside it; CMSG_FIRSTHDR is non-null because
        // `msg_controllen >= size_of::<cmsghdr>()`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
            let d = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (i, f) in fds.iter().enumerate() {
                d.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov`, `data` and `cbuf`, all live for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive one datagram into `buf` with up to `max_fds` (capped at
/// [`MAX_FDS`]) fds, which arrive close-on-exec (`MSG_CMSG_CLOEXEC`).
///
/// Non-blocking (`MSG_DONTWAIT`): with nothing queued it fails with
/// `WouldBlock`. A datagram longer than `buf` or carrying more fds than
/// `max_fds` is an `InvalidData` error, and any fds that did arrive with it
/// are closed. A return of `(0, _)` on a `SOCK_SEQPACKET` socket means the
/// peer hung up.
pub fn recv_with_fds(
    sock: BorrowedFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 128]);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if max_fds > 0 {
        let payload = (max_fds * std::mem::size_of::<libc::c_int>()) as libc::c_uint;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation (<= 128, see above).
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
    }
    // SAFETY: `msg` points at `iov`, `buf` and `cbuf`, all live for the call,
    // with lengths that match them.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `cbuf`, using
    // the CMSG_* macros, which stay within `msg_controllen` (as updated by
    // the kernel). Each SCM_RIGHTS fd is a fresh descriptor installed for us,
    // so taking ownership of it is correct.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let d = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    fds.push(place_fd(OwnedFd::from_raw_fd(d.add(i).read_unaligned())));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        drop(fds);
        let what = if msg.msg_flags & libc::MSG_TRUNC != 0 {
            "message"
        } else {
            "control data"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} truncated"),
        ));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two fds into a live local array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
    }

    /// How many of our fds refer to the memfd called `name`.
    fn open_memfds(name: &str) -> usize {
        let want = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_str() == Some(want.as_str()))
            .count()
    }

    #[test]
    fn region_maps_twice_and_shares_bytes() {
        let a = ShmRegion::create("t\0x", 1 << 16).unwrap();
        assert_eq!(a.len(), 1 << 16);
        assert!(!a.is_empty());
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        // SAFETY: in-bounds write to our own mapping.
        unsafe { *a.as_ptr().add(100) = 42 };
        let b = ShmRegion::map_fd(a.fd().try_clone_to_owned().unwrap(), 1 << 16).unwrap();
        // SAFETY: in-bounds read of our own mapping.
        assert_eq!(unsafe { *b.as_ptr().add(100) }, 42);
        // A shorter mapping is fine, a longer one is refused.
        assert!(ShmRegion::map_fd(a.fd().try_clone_to_owned().unwrap(), 4096).is_ok());
        let r = ShmRegion::map_fd(a.fd().try_clone_to_owned().unwrap(), 1 << 20);
        assert!(matches!(
            r,
            Err(ShmError::TooSmall {
                wanted: 1048576,
                actual: 65536
            })
        ));
        assert!(matches!(
            ShmRegion::create("t", 0),
            Err(ShmError::BadSize(0))
        ));
        assert!(matches!(
            ShmRegion::map_fd(a.fd().try_clone_to_owned().unwrap(), 0),
            Err(ShmError::BadSize(0))
        ));
    }

    #[test]
    fn regions_cannot_be_shrunk_and_unsealed_fds_are_refused() {
        let a = ShmRegion::create("t", 8192).unwrap();
        // SAFETY: plain syscall on our fd; expected to fail because of seals.
        assert!(unsafe { libc::ftruncate(a.fd().as_raw_fd(), 0) } < 0);
        // An unsealed memfd (what a hostile peer could send) is refused.
        // SAFETY: valid C string; the fd is owned at once.
        let raw = unsafe { libc::memfd_create(c"u".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 8192) }, 0);
        assert!(matches!(
            ShmRegion::map_fd(fd, 8192),
            Err(ShmError::NotSealed)
        ));
        // So is something that is not a memfd at all.
        let e = EventFd::new().unwrap();
        let r = ShmRegion::map_fd(e.fd().try_clone_to_owned().unwrap(), 8192);
        assert!(matches!(r, Err(ShmError::NotSealed)));
    }

    #[test]
    fn eventfd_signals() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.drain(), 0);
        assert!(!e.wait(Some(Duration::from_millis(1))).unwrap());
        assert!(!e.wait(Some(Duration::from_micros(10))).unwrap());
        e.notify();
        e.notify();
        assert_eq!(e.drain(), 2);
        e.notify();
        assert!(e.wait(Some(Duration::from_millis(100))).unwrap());
        assert_eq!(e.drain(), 0, "wait drains");
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::from_millis(5)), 5);
        assert_eq!(poll_ms(Duration::from_secs(u64::MAX)), i32::MAX);
    }

    #[test]
    fn eventfd_wakes_a_blocked_thread() {
        let e = std::sync::Arc::new(EventFd::new().unwrap());
        let e2 = e.clone();
        let t = std::thread::spawn(move || e2.wait(Some(Duration::from_secs(10))).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        e.notify();
        assert!(t.join().unwrap());
    }

    #[test]
    fn fds_cross_a_seqpacket_pair() {
        let (a, b) = pair();
        let e = EventFd::new().unwrap();
        send_with_fds(a.as_fd(), b"hi", &[e.fd()]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFD on a valid fd.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
        let e2 = EventFd::from_fd(fds.into_iter().next().unwrap());
        e2.notify();
        assert!(e.wait(Some(Duration::from_millis(100))).unwrap());

        // Sixteen fds, and a zero-length message carrying fds.
        let evs: Vec<EventFd> = (0..MAX_FDS).map(|_| EventFd::new().unwrap()).collect();
        let bfds: Vec<BorrowedFd> = evs.iter().map(|e| e.fd()).collect();
        assert_eq!(send_with_fds(a.as_fd(), b"", &bfds).unwrap(), 0);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS).unwrap();
        assert_eq!((n, fds.len()), (0, MAX_FDS));
        let too_many: Vec<BorrowedFd> = (0..=MAX_FDS).map(|_| e.fd()).collect();
        let err = send_with_fds(a.as_fd(), b"x", &too_many).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        // Nothing queued: WouldBlock rather than blocking.
        let err = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn truncation_is_an_error_and_closes_fds() {
        let (a, b) = pair();
        let e = ShmRegion::create("hs-trunc-test", 4096).unwrap();
        let mut buf = [0u8; 4];
        // Data truncated.
        send_with_fds(a.as_fd(), b"0123456789", &[]).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Control data truncated: more fds than we accept, and none leak.
        assert_eq!(open_memfds("hs-trunc-test"), 1);
        send_with_fds(a.as_fd(), b"x", &[e.fd(), e.fd(), e.fd()]).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        send_with_fds(a.as_fd(), b"y", &[e.fd()]).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            open_memfds("hs-trunc-test"),
            1,
            "fds of a rejected message are closed"
        );
        // Hang-up reads as a zero-length message.
        drop(a);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }
}
