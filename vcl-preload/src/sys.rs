//! Small OS helpers: the process-wide futex lock (fork-safe: it can be
//! taken in a `pthread_atfork` prepare handler and released in the parent
//! and child handlers), errno, eventfds, sockaddr conversion and a look at
//! the fork children's descriptors.

use crate::real;
use libc::{c_int, sockaddr, socklen_t};
use std::cell::UnsafeCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};

/// A futex mutex (0 free, 1 locked, 2 locked with waiters).
pub struct Lock<T> {
    state: AtomicU32,
    val: UnsafeCell<T>,
}

// SAFETY: access to `val` is serialised by `state`.
unsafe impl<T: Send> Sync for Lock<T> {}

impl<T> Lock<T> {
    pub const fn new(v: T) -> Self {
        Lock {
            state: AtomicU32::new(0),
            val: UnsafeCell::new(v),
        }
    }

    pub fn lock(&self) -> Guard<'_, T> {
        self.raw_lock();
        Guard { l: self }
    }

    /// Take the lock without a guard (fork prepare handler).
    pub fn raw_lock(&self) {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        while self.state.swap(2, Ordering::Acquire) != 0 {
            futex(&self.state, libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, 2);
        }
    }

    /// Release a lock taken with [`Lock::raw_lock`].
    ///
    /// # Safety
    /// The caller holds the lock and has no guard for it.
    pub unsafe fn raw_unlock(&self) {
        if self.state.swap(0, Ordering::Release) == 2 {
            futex(&self.state, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
        }
    }

    /// In a forked child: the only thread left; whoever held the lock in
    /// the parent is gone.
    ///
    /// # Safety
    /// Only in a child right after fork, before other threads exist.
    pub unsafe fn force_unlock(&self) {
        self.state.store(0, Ordering::Release);
    }

    /// Access while the lock is held without a guard (fork handlers).
    ///
    /// # Safety
    /// The caller holds the lock (raw_lock) and no guard exists.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_locked(&self) -> &mut T {
        &mut *self.val.get()
    }
}

fn futex(a: &AtomicU32, op: c_int, val: u32) {
    // SAFETY: a valid futex word; the kernel only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            a.as_ptr(),
            op,
            val,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

pub struct Guard<'a, T> {
    l: &'a Lock<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves the lock is held.
        unsafe { &*self.l.val.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves the lock is held.
        unsafe { &mut *self.l.val.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { self.l.raw_unlock() }
    }
}

pub fn errno() -> c_int {
    // SAFETY: errno location is always valid for this thread.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> c_int {
    // SAFETY: no pointers.
    unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }
}

pub fn efd_signal(fd: c_int) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { real::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

pub fn efd_drain(fd: c_int) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 (non-blocking fd).
    unsafe { real::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// The kernel fd of a splice's pipe side: its `F_GETFL` flags. EBADF for
/// a bad fd or one not open in the direction needed, EINVAL for a fd that
/// is no pipe (the kernel's answers when neither side is a pipe).
pub fn splice_pipe(fd: c_int, write: bool) -> Result<c_int, c_int> {
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { real::fcntl(fd, libc::F_GETFL, 0) };
    if fl < 0 {
        return Err(libc::EBADF);
    }
    let acc = fl & libc::O_ACCMODE;
    if (write && acc == libc::O_RDONLY) || (!write && acc == libc::O_WRONLY) {
        return Err(libc::EBADF);
    }
    // SAFETY: stat is plain old data; zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into an owned value.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(libc::EBADF);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(libc::EINVAL);
    }
    Ok(fl)
}

/// Write what fits into a pipe now, never blocking (EAGAIN when full).
pub fn pipe_write_nowait(fd: c_int, buf: &[u8]) -> Result<usize, c_int> {
    pipe_nowait(fd, buf.as_ptr() as *mut u8, buf.len(), true)
}

/// Read what a pipe holds now, never blocking (EAGAIN when empty, 0 when
/// empty with no writer left).
pub fn pipe_read_nowait(fd: c_int, buf: &mut [u8]) -> Result<usize, c_int> {
    pipe_nowait(fd, buf.as_mut_ptr(), buf.len(), false)
}

/// One non-blocking pipe read or write, whatever the pipe's own flags:
/// `RWF_NOWAIT`, or on kernels without it for pipes, `poll` first and then
/// at most what cannot block (a write of `PIPE_BUF` bytes needs one free
/// slot; a read returns what is there).
fn pipe_nowait(fd: c_int, p: *mut u8, len: usize, write: bool) -> Result<usize, c_int> {
    let iov = libc::iovec {
        iov_base: p as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: one iovec over the caller's buffer of `len` bytes (writable
    // for a read), which outlives the call.
    let r = unsafe {
        if write {
            libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT)
        } else {
            libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT)
        }
    };
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = errno();
    if e != libc::EOPNOTSUPP && e != libc::ENOSYS {
        return Err(e);
    }
    if !poll_now(fd, if write { libc::POLLOUT } else { libc::POLLIN }) {
        return Err(libc::EAGAIN);
    }
    // SAFETY: as above; poll said this does not block.
    let r = unsafe {
        if write {
            real::write(fd, p as *const libc::c_void, len.min(libc::PIPE_BUF))
        } else {
            real::read(fd, p as *mut libc::c_void, len)
        }
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// Free bytes in a pipe: its capacity (`F_GETPIPE_SZ`) less what it holds;
/// `usize::MAX` if either is unknown.
pub fn pipe_room(fd: c_int) -> usize {
    // SAFETY: F_GETPIPE_SZ takes no pointer.
    let cap = unsafe { real::fcntl(fd, libc::F_GETPIPE_SZ, 0) };
    match (usize::try_from(cap), fionread(fd)) {
        (Ok(cap), Some(used)) if cap > 0 => cap.saturating_sub(used),
        _ => usize::MAX,
    }
}

/// Bytes a pipe holds (0 if unknown).
pub fn pipe_len(fd: c_int) -> usize {
    fionread(fd).unwrap_or(0)
}

/// `FIONREAD` of a kernel fd.
fn fionread(fd: c_int) -> Option<usize> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`.
    let r = unsafe {
        real::ioctl(
            fd,
            libc::FIONREAD as libc::c_ulong,
            &mut n as *mut c_int as usize,
        )
    };
    (r >= 0).then_some(n.max(0) as usize)
}

/// Is `ev` (or a hang-up) on `fd` right now?
pub fn poll_now(fd: c_int, ev: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { real::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (ev | libc::POLLHUP | libc::POLLERR) != 0
}

/// Parse a sockaddr from the app. EINVAL/EAFNOSUPPORT like the kernel.
///
/// # Safety
/// `addr` points to `len` readable bytes (or is null).
pub unsafe fn read_sockaddr(addr: *const sockaddr, len: socklen_t) -> Result<SocketAddr, c_int> {
    if addr.is_null() {
        return Err(libc::EFAULT);
    }
    if (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return Err(libc::EINVAL);
    }
    match (*addr).sa_family as c_int {
        libc::AF_INET => {
            if (len as usize) < std::mem::size_of::<libc::sockaddr_in>() {
                return Err(libc::EINVAL);
            }
            let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            if (len as usize) < std::mem::size_of::<libc::sockaddr_in6>() {
                return Err(libc::EINVAL);
            }
            let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        libc::AF_UNSPEC => Err(libc::EAFNOSUPPORT),
        _ => Err(libc::EAFNOSUPPORT),
    }
}

/// A v4-mapped v6 address back to v4 (the daemon speaks plain v4).
pub fn unmap(a: SocketAddr) -> SocketAddr {
    if let SocketAddr::V6(v6) = a {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            return SocketAddr::new(IpAddr::V4(v4), v6.port());
        }
    }
    a
}

/// Write `a` for a socket of `domain` (v4 addresses become v4-mapped for
/// AF_INET6 sockets), truncating to `*len` like the kernel and storing the
/// full size in `*len`.
///
/// # Safety
/// `addr`/`len` are null or point to app memory of `*len` bytes.
pub unsafe fn write_sockaddr(
    domain: c_int,
    a: SocketAddr,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let mut st: libc::sockaddr_storage = std::mem::zeroed();
    let size = match (domain, a) {
        (libc::AF_INET6, a) => {
            let (ip, port, flow, scope) = match a {
                SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                SocketAddr::V6(v6) => (*v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()),
            };
            let s = &mut *(&mut st as *mut _ as *mut libc::sockaddr_in6);
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = port.to_be();
            s.sin6_addr.s6_addr = ip.octets();
            s.sin6_flowinfo = flow;
            s.sin6_scope_id = scope;
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        (_, a) => {
            let ip = match a.ip() {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            let s = &mut *(&mut st as *mut _ as *mut libc::sockaddr_in);
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(ip).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
    };
    let n = (*len as usize).min(size);
    std::ptr::copy_nonoverlapping(&st as *const _ as *const u8, addr as *mut u8, n);
    *len = size as socklen_t;
}

/// The unspecified address of a domain.
pub fn any_addr(domain: c_int) -> SocketAddr {
    if domain == libc::AF_INET6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

/// Write raw bytes to stderr without going through the hooks.
pub fn stderr(msg: &str) {
    // SAFETY: writes a valid buffer to fd 2.
    unsafe { real::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
}

/// Milliseconds until `deadline` for poll (-1 = forever).
pub fn ms_left(deadline: Option<std::time::Instant>) -> c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(std::time::Instant::now());
            left.as_millis().min(i32::MAX as u128) as c_int
                + if left.subsec_nanos() % 1_000_000 != 0 {
                    1
                } else {
                    0
                }
        }
    }
}

/// A timespec for `deadline` (None = null pointer semantics handled by caller).
pub fn ts_left(deadline: std::time::Instant) -> libc::timespec {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    libc::timespec {
        tv_sec: left.as_secs() as libc::time_t,
        tv_nsec: left.subsec_nanos() as libc::c_long,
    }
}

/// After a blocking call was interrupted: would the kernel have restarted
/// it? (SA_RESTART on the handler.) We cannot tell which signal arrived, so
/// restart only if every installed handler asks for it.
pub fn restart_after_signal() -> bool {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: querying only (null new action).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            continue;
        }
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN && old.sa_flags & libc::SA_RESTART == 0 {
            return false;
        }
    }
    true
}

/// Does a child of this process hold a descriptor of the socket with inode
/// `ino`? A child that exited or exec'd (close-on-exec) holds none. None
/// when it cannot be told: no `/proc/<pid>/task/<tid>/children` (a kernel
/// without CONFIG_PROC_CHILDREN) or a child whose fds we may not list.
/// Reads only the links' text (`socket:[ino]`), never the files behind
/// them (a stat could hang on a dead FUSE mount). Costs a directory walk
/// per child; the shim asks only when it closes a connection that lived
/// through a fork.
pub fn a_child_holds_socket(ino: u64) -> Option<bool> {
    let me = std::process::id();
    let want = std::ffi::OsString::from(format!("socket:[{ino}]"));
    for task in std::fs::read_dir(format!("/proc/{me}/task")).ok()? {
        // Children are listed under the thread that forked them.
        let kids = match std::fs::read_to_string(task.ok()?.path().join("children")) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The thread exited meanwhile, or no children lists at all.
                if std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists() {
                    continue;
                }
                return None;
            }
            Err(_) => return None,
        };
        for pid in kids.split_whitespace() {
            let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
                Ok(d) => d,
                // Exited and reaped since the list was read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            };
            for f in fds.flatten() {
                if std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == want) {
                    return Some(true);
                }
            }
        }
    }
    Some(false)
}
