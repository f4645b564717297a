//! Client-side syscalls: connecting the attach socket and waiting on the
//! worker's wake eventfd together with the attach socket (so a dead daemon
//! wakes blocked calls). All `unsafe` of the client is here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// A `sockaddr_un` for a filesystem path, with its length.
pub fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + b.len() + 1) as libc::socklen_t;
    Ok((a, len))
}

/// Connect a `SOCK_SEQPACKET` unix socket at `path` (close-on-exec).
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let (a, len) = sockaddr_un(path)?;
    // SAFETY: fresh fd owned immediately; `a` outlives the connect call.
    unsafe {
        let r = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = crate::shm::place_fd(OwnedFd::from_raw_fd(r));
        if libc::connect(fd.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Readiness of the two descriptors a worker waits on.
#[derive(Debug, Default, Clone, Copy)]
pub struct WaitResult {
    /// The wake eventfd fired.
    pub woken: bool,
    /// The attach socket is readable (a message) or hung up.
    pub ctrl: bool,
}

/// poll(2) on the wake eventfd and the attach socket. EINTR returns early
/// with nothing ready.
pub fn wait2(
    wake: BorrowedFd,
    ctrl: BorrowedFd,
    timeout: Option<Duration>,
) -> io::Result<WaitResult> {
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ctrl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = match timeout {
        None => -1,
        Some(d) => {
            d.as_millis().min(i32::MAX as u128) as i32 + i32::from(d.subsec_micros() % 1000 != 0)
        }
    };
    // SAFETY: `fds` is a valid array of two pollfd for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(WaitResult::default());
        }
        return Err(e);
    }
    Ok(WaitResult {
        woken: fds[0].revents != 0,
        ctrl: fds[1].revents != 0,
    })
}
