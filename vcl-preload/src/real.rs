//! The libc functions the shim wraps, looked up once with
//! `dlsym(RTLD_NEXT, ..)` and cached. The shim never calls the libc symbol
//! directly for an intercepted function: that would land in its own hook.

use libc::{c_char, c_int, c_uint, c_void, size_t, sockaddr, socklen_t, ssize_t};
use std::sync::atomic::{AtomicUsize, Ordering};

fn lookup(slot: &AtomicUsize, name: &'static [u8]) -> usize {
    let p = slot.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: `name` is NUL-terminated; dlsym has no other preconditions.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) } as usize;
    // 1 marks "looked up, not found" so the lookup is not repeated.
    let v = if f == 0 { 1 } else { f };
    slot.store(v, Ordering::Relaxed);
    v
}

macro_rules! real {
    ($( $name:ident ( $($arg:ident : $t:ty),* ) -> $ret:ty; )*) => {
        $(
            /// The next definition of this libc function (normally glibc's).
            ///
            /// # Safety
            /// As for the libc function itself.
            pub unsafe fn $name($($arg: $t),*) -> $ret {
                static SLOT: AtomicUsize = AtomicUsize::new(0);
                let p = lookup(&SLOT, concat!(stringify!($name), "\0").as_bytes());
                if p == 1 {
                    *libc::__errno_location() = libc::ENOSYS;
                    return -1 as $ret;
                }
                // SAFETY: the symbol has this C signature in glibc.
                let f: unsafe extern "C" fn($($t),*) -> $ret = std::mem::transmute(p);
                f($($arg),*)
            }
        )*
    };
}

real! {
    socket(domain: c_int, ty: c_int, proto: c_int) -> c_int;
    bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    listen(fd: c_int, backlog: c_int) -> c_int;
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    readv(fd: c_int, iov: *const libc::iovec, n: c_int) -> ssize_t;
    write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    writev(fd: c_int, iov: *const libc::iovec, n: c_int) -> ssize_t;
    pread64(fd: c_int, buf: *mut c_void, n: size_t, off: libc::off64_t) -> ssize_t;
    recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t;
    recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t;
    recvmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int, t: *mut libc::timespec) -> c_int;
    sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t;
    sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t;
    sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int;
    sendfile64(out: c_int, inp: c_int, off: *mut libc::off64_t, n: size_t) -> ssize_t;
    splice(fd_in: c_int, off_in: *mut libc::loff_t, fd_out: c_int, off_out: *mut libc::loff_t, len: size_t, flags: c_uint) -> ssize_t;
    shutdown(fd: c_int, how: c_int) -> c_int;
    close(fd: c_int) -> c_int;
    close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int;
    dup(fd: c_int) -> c_int;
    dup2(a: c_int, b: c_int) -> c_int;
    dup3(a: c_int, b: c_int, flags: c_int) -> c_int;
    fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int;
    ioctl(fd: c_int, req: libc::c_ulong, arg: usize) -> c_int;
    getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int;
    setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int;
    epoll_create1(flags: c_int) -> c_int;
    epoll_ctl(ep: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int;
    epoll_pwait(ep: c_int, ev: *mut libc::epoll_event, n: c_int, t: c_int, sig: *const libc::sigset_t) -> c_int;
    epoll_pwait2(ep: c_int, ev: *mut libc::epoll_event, n: c_int, t: *const libc::timespec, sig: *const libc::sigset_t) -> c_int;
    poll(fds: *mut libc::pollfd, n: libc::nfds_t, t: c_int) -> c_int;
    select(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, t: *mut libc::timeval) -> c_int;
    epoll_create(size: c_int) -> c_int;
    ppoll(fds: *mut libc::pollfd, n: libc::nfds_t, t: *const libc::timespec, sig: *const libc::sigset_t) -> c_int;
    pselect(n: c_int, r: *mut libc::fd_set, w: *mut libc::fd_set, e: *mut libc::fd_set, t: *const libc::timespec, sig: *const libc::sigset_t) -> c_int;
}
