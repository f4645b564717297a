//! Thin, checked wrappers over the syscalls the daemon loop needs: epoll,
//! signalfd and unix `SOCK_SEQPACKET` sockets. All of this module's `unsafe`
//! is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An epoll instance.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// Create with room for `max` events per wait.
    pub fn new(max: usize) -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            // SAFETY: `fd` is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; max.max(1)],
        })
    }

    /// Watch `fd` for input with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(|_| ())
    }

    /// Stop watching `fd` (errors ignored: closing an fd removes it anyway).
    pub fn del(&self, fd: RawFd) {
        // SAFETY: a null event pointer is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Wait up to `timeout_ms` (-1 = forever); returns the ready tokens.
    pub fn wait(&mut self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        // SAFETY: the buffer holds `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        out.extend(self.events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// Block SIGINT/SIGTERM/SIGPIPE for this thread (and threads it spawns) and
/// return a signalfd for the first two.
pub fn signalfd() -> io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        cvt(libc::pthread_sigmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// A non-blocking listening unix socket of `ty` (SOCK_SEQPACKET or SOCK_STREAM)
/// at `path` (a stale file is replaced).
pub fn unix_listen(path: &Path, ty: libc::c_int) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let (a, len) = session_api::sys::sockaddr_un(path)?;
    // SAFETY: plain syscalls on a fresh fd we own; `a` outlives the calls.
    unsafe {
        let fd = OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_UNIX,
            ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        ))?);
        cvt(libc::bind(
            fd.as_raw_fd(),
            &a as *const _ as *const libc::sockaddr,
            len,
        ))?;
        cvt(libc::listen(fd.as_raw_fd(), 512))?;
        Ok(fd)
    }
}

/// Accept one connection (non-blocking, close-on-exec); Ok(None) if none waits.
pub fn unix_accept(l: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address pointers are allowed; the fd returned is ours.
    let r = unsafe {
        libc::accept4(
            l,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ECONNABORTED) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: fresh descriptor from accept4.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(r) }))
}

/// Connect a SOCK_SEQPACKET / SOCK_STREAM unix socket (blocking, cloexec).
pub fn unix_connect(path: &Path, ty: libc::c_int) -> io::Result<OwnedFd> {
    let (a, len) = session_api::sys::sockaddr_un(path)?;
    // SAFETY: as in `unix_listen`.
    unsafe {
        let fd = OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_UNIX,
            ty | libc::SOCK_CLOEXEC,
            0,
        ))?);
        cvt(libc::connect(
            fd.as_raw_fd(),
            &a as *const _ as *const libc::sockaddr,
            len,
        ))?;
        Ok(fd)
    }
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// Drain a non-blocking fd (eventfd/signalfd) so level-triggered epoll quiets.
pub fn drain_fd(fd: RawFd) {
    let mut buf = [0u8; 128];
    for _ in 0..16 {
        // SAFETY: reading into a local buffer of the given size.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
    }
}

/// Keep glibc's mmap threshold fixed at 128 KiB: per-connection socket
/// buffers (256 KiB each) then always come from fresh zero pages, so
/// `vec![0; n]` costs no memset and only touched pages become resident.
/// (glibc otherwise raises the threshold after the first free and serves
/// later buffers from the heap, zeroing all of it: that dominated the CPU
/// at high connection rates.)
pub fn tune_malloc() {
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
