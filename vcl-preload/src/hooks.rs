//! The exported libc entry points. Each checks (lock-free) whether the fd
//! is a hoststack socket and otherwise calls the real function at once.
//! A per-thread guard sends calls made from inside the shim straight to
//! libc, and a panic never unwinds into C: the call fails with EIO.

use crate::iomux;
use crate::ops::{self, Route};
use crate::real;
use crate::sockopt;
use crate::state::{is_bypass, is_epoll, is_own, lock, st, R};
use crate::sys::{self, read_sockaddr, write_sockaddr};
use libc::{c_int, c_uint, c_ulong, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};
use std::cell::Cell;
use std::net::SocketAddr;

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

pub(crate) struct Inside;

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|c| c.set(false));
    }
}

/// Mark this thread as inside the shim (None if it already is): calls it
/// makes into hooked functions go straight to libc.
pub(crate) fn enter() -> Option<Inside> {
    INSIDE
        .try_with(|c| {
            if c.get() {
                None
            } else {
                c.set(true);
                Some(Inside)
            }
        })
        .ok()
        .flatten()
}

/// Run the shim's implementation (`body`) unless we are already inside the
/// shim (then `real`), catching panics.
macro_rules! hook {
    ($real:expr, $body:expr) => {{
        match enter() {
            None => $real,
            Some(_inside) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| $body))
            {
                Ok(v) => v,
                Err(_) => {
                    sys::stderr(
                        "hoststack preload: internal error (panic); the call fails with EIO\n",
                    );
                    sys::set_errno(libc::EIO);
                    -1 as _
                }
            },
        }
    }};
}

fn ri(r: R<c_int>) -> c_int {
    match r {
        Ok(v) => v,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

fn rz(r: R<usize>) -> ssize_t {
    match r {
        Ok(v) => v as ssize_t,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

fn r0(r: R<()>) -> c_int {
    ri(r.map(|_| 0))
}

/// Scratch buffer for scatter reads.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            b.resize(len, 0);
        }
        f(&mut b[..len])
    })
}

/// # Safety
/// iov/cnt from the app.
unsafe fn iovs<'a>(iov: *const iovec, cnt: c_int) -> R<Vec<&'a [u8]>> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return Err(libc::EINVAL);
    }
    if cnt > 0 && iov.is_null() {
        return Err(libc::EFAULT);
    }
    let mut v = Vec::with_capacity(cnt as usize);
    for i in 0..cnt as usize {
        let e = &*iov.add(i);
        if e.iov_len > 0 {
            if e.iov_base.is_null() {
                return Err(libc::EFAULT);
            }
            v.push(std::slice::from_raw_parts(
                e.iov_base as *const u8,
                e.iov_len,
            ));
        }
    }
    Ok(v)
}

/// Receive into an iovec array (one receive, scattered).
///
/// # Safety
/// iov/cnt from the app.
unsafe fn recv_iov(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    flags: c_int,
) -> R<(usize, Option<SocketAddr>)> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) || (cnt > 0 && iov.is_null()) {
        return Err(libc::EINVAL);
    }
    let parts: Vec<iovec> = (0..cnt as usize).map(|i| *iov.add(i)).collect();
    if parts.len() == 1 {
        let b = std::slice::from_raw_parts_mut(parts[0].iov_base as *mut u8, parts[0].iov_len);
        return ops::recv(fd, b, flags);
    }
    let total: usize = parts.iter().map(|p| p.iov_len).sum::<usize>().min(16 << 20);
    with_scratch(total, |buf| {
        let (n, from) = ops::recv(fd, buf, flags)?;
        let mut off = 0;
        for p in &parts {
            if off >= n {
                break;
            }
            let k = p.iov_len.min(n - off);
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(off), p.iov_base as *mut u8, k);
            off += k;
        }
        Ok((n, from))
    })
}

unsafe fn opt_addr(addr: *const sockaddr, len: socklen_t) -> R<Option<SocketAddr>> {
    if addr.is_null() {
        Ok(None)
    } else {
        read_sockaddr(addr, len).map(Some)
    }
}

fn domain_of(fd: c_int) -> c_int {
    let mut g = lock();
    let s = st(&mut g);
    s.sock_of(fd)
        .and_then(|id| s.socks.get(&id))
        .map_or(libc::AF_INET, |k| k.domain)
}

// ---------------------------------------------------------------- sockets

#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int {
    if !ops::is_inet(domain, ty, proto) {
        return real::socket(domain, ty, proto);
    }
    hook!(
        real::socket(domain, ty, proto),
        ri(ops::socket(domain, ty, proto))
    )
}

#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if !is_bypass(fd) {
        return real::bind(fd, addr, len);
    }
    hook!(real::bind(fd, addr, len), {
        match read_sockaddr(addr, len).and_then(|a| ops::bind(fd, a)) {
            Ok(Route::Done(())) => 0,
            Ok(Route::Kernel) => real::bind(fd, addr, len),
            Err(e) => ri(Err(e)),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    if !is_bypass(fd) {
        return real::listen(fd, backlog);
    }
    hook!(real::listen(fd, backlog), r0(ops::listen(fd, backlog)))
}

#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    if !is_bypass(fd) {
        return real::accept4(fd, addr, len, flags);
    }
    hook!(real::accept4(fd, addr, len, flags), {
        match ops::accept(fd, flags) {
            Ok(ops::Accepted::Bypass(nfd, peer, domain)) => {
                if let Some(p) = peer {
                    write_sockaddr(domain, p, addr, len);
                }
                nfd
            }
            // A kernel client of the listener's kernel side: a plain kernel socket.
            Ok(ops::Accepted::Kernel) => real::accept4(fd, addr, len, flags),
            Err(e) => ri(Err(e)),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    accept4(fd, addr, len, 0)
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if !is_bypass(fd) {
        return real::connect(fd, addr, len);
    }
    hook!(real::connect(fd, addr, len), {
        match read_sockaddr(addr, len).and_then(|a| ops::connect(fd, a)) {
            Ok(Route::Done(())) => 0,
            Ok(Route::Kernel) => real::connect(fd, addr, len),
            Err(e) => ri(Err(e)),
        }
    })
}

// ---------------------------------------------------------------- receive

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    if !is_bypass(fd) {
        return real::read(fd, buf, n);
    }
    if n == 0 {
        // read(2) of zero bytes returns 0 at once on a socket.
        return 0;
    }
    hook!(real::read(fd, buf, n), {
        if buf.is_null() && n > 0 {
            rz(Err(libc::EFAULT))
        } else {
            let b = if n == 0 {
                &mut [][..]
            } else {
                std::slice::from_raw_parts_mut(buf as *mut u8, n)
            };
            rz(ops::recv(fd, b, 0).map(|r| r.0))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    read(fd, buf, n)
}

fn chk_fail() -> ! {
    sys::stderr("*** buffer overflow detected ***: terminated\n");
    std::process::abort()
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if !is_bypass(fd) {
        return real::readv(fd, iov, cnt);
    }
    hook!(
        real::readv(fd, iov, cnt),
        rz(recv_iov(fd, iov, cnt, 0).map(|r| r.0))
    )
}

#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if !is_bypass(fd) {
        return real::recvfrom(fd, buf, n, flags, addr, alen);
    }
    hook!(real::recvfrom(fd, buf, n, flags, addr, alen), {
        if buf.is_null() && n > 0 {
            rz(Err(libc::EFAULT))
        } else {
            let b = if n == 0 {
                &mut [][..]
            } else {
                std::slice::from_raw_parts_mut(buf as *mut u8, n)
            };
            match ops::recv(fd, b, flags) {
                Ok((k, from)) => {
                    if let Some(f) = from {
                        write_sockaddr(domain_of(fd), f, addr, alen);
                    } else if !alen.is_null() && !addr.is_null() {
                        // TCP: Linux leaves the address untouched, length 0.
                        *alen = 0;
                    }
                    k as ssize_t
                }
                Err(e) => rz(Err(e)),
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    recvfrom(
        fd,
        buf,
        n,
        flags,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    recv(fd, buf, n, flags)
}

#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    recvfrom(fd, buf, n, flags, addr, alen)
}

unsafe fn recvmsg_impl(fd: c_int, msg: *mut msghdr, flags: c_int) -> R<usize> {
    if msg.is_null() {
        return Err(libc::EFAULT);
    }
    let m = &mut *msg;
    let (n, from) = recv_iov(fd, m.msg_iov, m.msg_iovlen as c_int, flags)?;
    if !m.msg_name.is_null() {
        let mut len = m.msg_namelen;
        match from {
            Some(f) => write_sockaddr(domain_of(fd), f, m.msg_name as *mut sockaddr, &mut len),
            None => len = 0,
        }
        m.msg_namelen = len;
    }
    m.msg_controllen = 0;
    m.msg_flags = 0;
    Ok(n)
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if !is_bypass(fd) {
        let r = real::recvmsg(fd, msg, flags);
        if r >= 0 && !msg.is_null() && (*msg).msg_controllen > 0 {
            let e = sys::errno();
            let _: c_int = hook!(0, {
                adopt_passed_fds(&*msg);
                0
            });
            sys::set_errno(e);
        }
        return r;
    }
    hook!(
        real::recvmsg(fd, msg, flags),
        rz(recvmsg_impl(fd, msg, flags))
    )
}

/// Descriptors passed in `msg` (SCM_RIGHTS) that are hoststack listeners
/// of another process are adopted ([`ops::adopt_passed`]).
///
/// # Safety
/// `msg` is a message header the kernel just filled in.
unsafe fn adopt_passed_fds(msg: &msghdr) {
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
            let data = libc::CMSG_DATA(c) as *const c_int;
            let n = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                / std::mem::size_of::<c_int>();
            for i in 0..n {
                ops::adopt_passed(data.add(i).read_unaligned());
            }
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
}

#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
    t: *mut libc::timespec,
) -> c_int {
    if !is_bypass(fd) {
        return real::recvmmsg(fd, v, n, flags, t);
    }
    hook!(real::recvmmsg(fd, v, n, flags, t), {
        let mut got = 0;
        let mut r = Ok(0);
        for i in 0..n as usize {
            // After the first message, never wait (like Linux without MSG_WAITFORONE
            // semantics for the rest when data runs out).
            let f = if i == 0 {
                flags & !libc::MSG_WAITFORONE
            } else {
                flags | libc::MSG_DONTWAIT
            };
            let e = &mut *v.add(i);
            match recvmsg_impl(fd, &mut e.msg_hdr, f) {
                Ok(k) => {
                    e.msg_len = k as c_uint;
                    got += 1;
                }
                Err(err) => {
                    if got == 0 {
                        r = Err(err);
                    }
                    break;
                }
            }
        }
        if got > 0 {
            got
        } else {
            ri(r)
        }
    })
}

// ---------------------------------------------------------------- send

fn send_route(fd: c_int, r: R<Route<usize>>, replay: impl FnOnce() -> ssize_t) -> ssize_t {
    let _ = fd;
    match r {
        Ok(Route::Done(n)) => n as ssize_t,
        Ok(Route::Kernel) => replay(),
        Err(e) => rz(Err(e)),
    }
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if !is_bypass(fd) {
        return real::write(fd, buf, n);
    }
    hook!(real::write(fd, buf, n), {
        if buf.is_null() && n > 0 {
            rz(Err(libc::EFAULT))
        } else {
            let b = if n == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(buf as *const u8, n)
            };
            send_route(fd, ops::send(fd, &[b], 0, None), || real::write(fd, buf, n))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if !is_bypass(fd) {
        return real::writev(fd, iov, cnt);
    }
    hook!(real::writev(fd, iov, cnt), {
        match iovs(iov, cnt) {
            Ok(v) => send_route(fd, ops::send(fd, &v, 0, None), || {
                real::writev(fd, iov, cnt)
            }),
            Err(e) => rz(Err(e)),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    alen: socklen_t,
) -> ssize_t {
    if !is_bypass(fd) {
        return real::sendto(fd, buf, n, flags, addr, alen);
    }
    hook!(real::sendto(fd, buf, n, flags, addr, alen), {
        if buf.is_null() && n > 0 {
            rz(Err(libc::EFAULT))
        } else {
            match opt_addr(addr, alen) {
                Ok(to) => {
                    let b = if n == 0 {
                        &[][..]
                    } else {
                        std::slice::from_raw_parts(buf as *const u8, n)
                    };
                    send_route(fd, ops::send(fd, &[b], flags, to.map(sys::unmap)), || {
                        real::sendto(fd, buf, n, flags, addr, alen)
                    })
                }
                Err(e) => rz(Err(e)),
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    sendto(fd, buf, n, flags, std::ptr::null(), 0)
}

unsafe fn sendmsg_impl(fd: c_int, msg: *const msghdr, flags: c_int) -> R<Route<usize>> {
    if msg.is_null() {
        return Err(libc::EFAULT);
    }
    let m = &*msg;
    let to = opt_addr(m.msg_name as *const sockaddr, m.msg_namelen)?;
    let v = iovs(m.msg_iov, m.msg_iovlen as c_int)?;
    ops::send(fd, &v, flags, to.map(sys::unmap))
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !is_bypass(fd) {
        return real::sendmsg(fd, msg, flags);
    }
    hook!(
        real::sendmsg(fd, msg, flags),
        send_route(fd, sendmsg_impl(fd, msg, flags), || real::sendmsg(
            fd, msg, flags
        ))
    )
}

#[no_mangle]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
) -> c_int {
    if !is_bypass(fd) {
        return real::sendmmsg(fd, v, n, flags);
    }
    hook!(real::sendmmsg(fd, v, n, flags), {
        let mut sent = 0;
        let mut r = Ok(0);
        for i in 0..n as usize {
            let e = &mut *v.add(i);
            match sendmsg_impl(fd, &e.msg_hdr, flags) {
                Ok(Route::Done(k)) => {
                    e.msg_len = k as c_uint;
                    sent += 1;
                }
                Ok(Route::Kernel) => {
                    // Became a kernel socket: the rest goes through the kernel.
                    let k = real::sendmmsg(fd, v.add(i), n - i as c_uint, flags);
                    return if k < 0 && sent > 0 {
                        sent
                    } else if k < 0 {
                        k
                    } else {
                        sent + k
                    };
                }
                Err(err) => {
                    if sent == 0 {
                        r = Err(err);
                    }
                    break;
                }
            }
        }
        if sent > 0 {
            sent
        } else {
            ri(r)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    inp: c_int,
    off: *mut libc::off64_t,
    n: size_t,
) -> ssize_t {
    if !is_bypass(out) {
        return real::sendfile64(out, inp, off, n);
    }
    hook!(real::sendfile64(out, inp, off, n), {
        if is_bypass(inp) {
            rz(Err(libc::EINVAL))
        } else {
            rz(ops::sendfile(out, inp, off.as_mut(), n))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn sendfile(
    out: c_int,
    inp: c_int,
    off: *mut libc::off_t,
    n: size_t,
) -> ssize_t {
    sendfile64(out, inp, off as *mut libc::off64_t, n)
}

#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    let (a, b) = (is_bypass(fd_in), is_bypass(fd_out));
    if !a && !b {
        return real::splice(fd_in, off_in, fd_out, off_out, len, flags);
    }
    hook!(real::splice(fd_in, off_in, fd_out, off_out, len, flags), {
        if a && b {
            // Two sockets: neither side is a pipe.
            rz(if len == 0 { Ok(0) } else { Err(libc::EINVAL) })
        } else if a {
            rz(ops::splice(
                fd_in,
                fd_out,
                true,
                !off_in.is_null(),
                !off_out.is_null(),
                len,
                flags,
            ))
        } else {
            rz(ops::splice(
                fd_out,
                fd_in,
                false,
                !off_out.is_null(),
                !off_in.is_null(),
                len,
                flags,
            ))
        }
    })
}

// ---------------------------------------------------------------- lifetime

#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if !is_bypass(fd) {
        return real::shutdown(fd, how);
    }
    hook!(real::shutdown(fd, how), r0(ops::shutdown(fd, how)))
}

/// Forget `fd` in the shim's tables (the kernel fd is closed by the caller).
fn forget_fd(fd: c_int) {
    let mut g = lock();
    let s = st(&mut g);
    if s.in_vfork_child() {
        // Its fds are its own copies; the sockets stay the parent's.
        return;
    }
    if is_bypass(fd) {
        s.drop_fd(fd);
    }
    if is_epoll(fd) {
        s.ep_close(fd);
    }
}

/// A call from the app (not from inside the shim) aimed at one of the
/// shim's own descriptors.
fn app_targets_own(fd: c_int) -> bool {
    is_own(fd) && INSIDE.try_with(|c| !c.get()).unwrap_or(false)
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if is_own(fd) {
        return match enter() {
            // The shim closing its own (a worker or segment going away).
            None => crate::state::close_own(fd),
            // The app closing a number it never opened (a sweep over every
            // fd): for the app it is gone, the shim keeps it.
            Some(_inside) => 0,
        };
    }
    if !is_bypass(fd) && !is_epoll(fd) {
        return real::close(fd);
    }
    hook!(real::close(fd), {
        forget_fd(fd);
        real::close(fd)
    })
}

/// close_range() around the shim's own descriptors (setting close-on-exec
/// on them is harmless: they have it).
unsafe fn close_range_sparing_own(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 || first > last {
        return real::close_range(first, last, flags);
    }
    let end = (last as usize).min(crate::state::own_end().saturating_sub(1));
    let mut lo = first as usize;
    for fd in first as usize..=end {
        if is_own(fd as c_int) {
            if fd > lo {
                let r = real::close_range(lo as c_uint, (fd - 1) as c_uint, flags);
                if r != 0 {
                    return r;
                }
            }
            lo = fd + 1;
        }
    }
    if lo <= last as usize {
        real::close_range(lo as c_uint, last, flags)
    } else {
        0
    }
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let r = close_range_sparing_own(first, last, flags);
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        if let Some(_inside) = enter() {
            let hi = (last as usize).min(crate::state::MAX_FD - 1);
            let mut fd = first as usize;
            while fd <= hi {
                if is_bypass(fd as c_int) || is_epoll(fd as c_int) {
                    forget_fd(fd as c_int);
                }
                fd += 1;
            }
        }
    }
    r
}

/// glibc's closefrom() closes with the raw system call, past our
/// close_range hook: route it through the hook.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    close_range(low.max(0) as c_uint, c_uint::MAX, 0);
}

/// dup2/dup3 onto one of the shim's own descriptors would close it under
/// the shim: refuse with EBUSY (what Linux returns when the target number
/// is being allocated) and say why.
fn refuse_own_target(new: c_int) -> c_int {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        crate::state::log_warn(
            &crate::state::env().cfg,
            &format!("fd {new} is the preload's own (daemon socket, eventfd or segment); dup2 onto it fails with EBUSY (said once)"),
        );
    }
    sys::set_errno(libc::EBUSY);
    -1
}

fn dup_track(old: c_int, new: c_int) {
    let mut g = lock();
    let s = st(&mut g);
    if s.in_vfork_child() {
        return;
    }
    if let Some(id) = s.sock_of(old) {
        s.add_fd(new, id);
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let r = real::dup(fd);
    if r >= 0 && is_bypass(fd) {
        if let Some(_i) = enter() {
            dup_track(fd, r);
        }
    }
    r
}

unsafe fn dup_to(old: c_int, new: c_int, r: c_int) -> c_int {
    if r >= 0 && old != new && (is_bypass(new) || is_epoll(new) || is_bypass(old)) {
        if let Some(_i) = enter() {
            // The kernel closed whatever `new` was.
            forget_fd(new);
            if is_bypass(old) {
                dup_track(old, new);
            }
        }
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if old != new && app_targets_own(new) {
        return refuse_own_target(new);
    }
    let r = real::dup2(old, new);
    dup_to(old, new, r)
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if old != new && app_targets_own(new) {
        return refuse_own_target(new);
    }
    let r = real::dup3(old, new, flags);
    dup_to(old, new, r)
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    if !is_bypass(fd) {
        return real::fcntl(fd, cmd, arg);
    }
    hook!(real::fcntl(fd, cmd, arg), {
        match cmd {
            libc::F_GETFL => {
                let r = real::fcntl(fd, cmd, arg);
                match (r >= 0).then(|| ops::nonblock(fd)).flatten() {
                    Some(true) => r | libc::O_NONBLOCK,
                    Some(false) => r & !libc::O_NONBLOCK,
                    None => r,
                }
            }
            libc::F_SETFL => {
                let r = real::fcntl(fd, cmd, arg);
                if r >= 0 {
                    ops::set_nonblock(fd, arg as c_int & libc::O_NONBLOCK != 0);
                }
                r
            }
            libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
                let r = real::fcntl(fd, cmd, arg);
                if r >= 0 {
                    dup_track(fd, r);
                }
                r
            }
            _ => real::fcntl(fd, cmd, arg),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl(fd, cmd, arg)
}

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: usize) -> c_int {
    if !is_bypass(fd) {
        return real::ioctl(fd, req, arg);
    }
    hook!(real::ioctl(fd, req, arg), {
        let p = arg as *mut c_int;
        match req {
            libc::FIONBIO => {
                if p.is_null() {
                    ri(Err(libc::EFAULT))
                } else {
                    ops::set_nonblock(fd, *p != 0);
                    real::ioctl(fd, req, arg)
                }
            }
            libc::FIONREAD | libc::TIOCOUTQ => {
                if p.is_null() {
                    ri(Err(libc::EFAULT))
                } else {
                    match ops::queued(fd, req == libc::TIOCOUTQ) {
                        Ok(n) => {
                            *p = n;
                            0
                        }
                        Err(e) => ri(Err(e)),
                    }
                }
            }
            _ => real::ioctl(fd, req, arg),
        }
    })
}

// ---------------------------------------------------------------- names & options

unsafe fn name_impl(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, peer: bool) -> c_int {
    if addr.is_null() || len.is_null() {
        return ri(Err(libc::EFAULT));
    }
    match ops::sockname(fd, peer) {
        Ok((a, domain)) => {
            write_sockaddr(domain, a, addr, len);
            0
        }
        Err(e) => ri(Err(e)),
    }
}

#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if !is_bypass(fd) {
        return real::getsockname(fd, addr, len);
    }
    hook!(
        real::getsockname(fd, addr, len),
        name_impl(fd, addr, len, false)
    )
}

#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if !is_bypass(fd) {
        return real::getpeername(fd, addr, len);
    }
    hook!(
        real::getpeername(fd, addr, len),
        name_impl(fd, addr, len, true)
    )
}

#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    if !is_bypass(fd) {
        return real::getsockopt(fd, level, name, val, len);
    }
    hook!(real::getsockopt(fd, level, name, val, len), {
        if len.is_null() || (val.is_null() && *len > 0) {
            ri(Err(libc::EFAULT))
        } else if (*len as c_int) < 0 {
            ri(Err(libc::EINVAL))
        } else {
            match sockopt::get(fd, level, name) {
                Ok(v) => {
                    let n = (*len as usize).min(v.len());
                    std::ptr::copy_nonoverlapping(v.as_ptr(), val as *mut u8, n);
                    *len = n as socklen_t;
                    0
                }
                Err(e) => ri(Err(e)),
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    if !is_bypass(fd) {
        return real::setsockopt(fd, level, name, val, len);
    }
    hook!(real::setsockopt(fd, level, name, val, len), {
        if val.is_null() && len > 0 {
            ri(Err(libc::EFAULT))
        } else {
            let v = if len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(val as *const u8, len as usize)
            };
            match sockopt::set(fd, level, name, v) {
                Ok(Route::Done(())) => 0,
                Ok(Route::Kernel) => real::setsockopt(fd, level, name, val, len),
                Err(e) => ri(Err(e)),
            }
        }
    })
}

// ---------------------------------------------------------------- epoll

fn forget_stale_epoll(fd: c_int) {
    if fd >= 0 && is_epoll(fd) {
        if let Some(_i) = enter() {
            let mut g = lock();
            st(&mut g).ep_close(fd);
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    let r = real::epoll_create(size);
    forget_stale_epoll(r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    let r = real::epoll_create1(flags);
    forget_stale_epoll(r);
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut libc::epoll_event,
) -> c_int {
    if !is_bypass(fd) {
        if is_epoll(fd) && op != libc::EPOLL_CTL_DEL {
            if let Some(_i) = enter() {
                iomux::mark_nested(fd);
                iomux::mark_outer(epfd);
            }
        }
        return real::epoll_ctl(epfd, op, fd, ev);
    }
    hook!(real::epoll_ctl(epfd, op, fd, ev), {
        let e = if ev.is_null() { None } else { Some(*ev) };
        r0(iomux::ctl(epfd, op, fd, e))
    })
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    n: c_int,
    timeout: c_int,
    sig: *const libc::sigset_t,
) -> c_int {
    if !is_epoll(epfd) {
        return real::epoll_pwait(epfd, ev, n, timeout, sig);
    }
    hook!(real::epoll_pwait(epfd, ev, n, timeout, sig), {
        if n <= 0 || ev.is_null() {
            ri(Err(libc::EINVAL))
        } else {
            let out = std::slice::from_raw_parts_mut(ev, n as usize);
            let (dl, zero) = iomux::deadline_ms(timeout);
            ri(iomux::wait(epfd, out, dl, zero, sig.as_ref()).map(|k| k as c_int))
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    n: c_int,
    timeout: c_int,
) -> c_int {
    epoll_pwait(epfd, ev, n, timeout, std::ptr::null())
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    n: c_int,
    t: *const libc::timespec,
    sig: *const libc::sigset_t,
) -> c_int {
    if !is_epoll(epfd) {
        return real::epoll_pwait2(epfd, ev, n, t, sig);
    }
    hook!(real::epoll_pwait2(epfd, ev, n, t, sig), {
        if n <= 0 || ev.is_null() {
            ri(Err(libc::EINVAL))
        } else {
            match iomux::deadline_ts(t) {
                Ok((dl, zero)) => {
                    let out = std::slice::from_raw_parts_mut(ev, n as usize);
                    ri(iomux::wait(epfd, out, dl, zero, sig.as_ref()).map(|k| k as c_int))
                }
                Err(e) => ri(Err(e)),
            }
        }
    })
}

// ---------------------------------------------------------------- poll / select

unsafe fn any_bypass(fds: *const libc::pollfd, n: libc::nfds_t) -> bool {
    if fds.is_null() {
        return false;
    }
    (0..n as usize).any(|i| {
        let fd = (*fds.add(i)).fd;
        is_bypass(fd) || is_epoll(fd)
    })
}

#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    if !any_bypass(fds, n) {
        return real::poll(fds, n, timeout);
    }
    hook!(real::poll(fds, n, timeout), {
        let v = std::slice::from_raw_parts_mut(fds, n as usize);
        let (dl, zero) = iomux::deadline_ms(timeout);
        ri(iomux::poll(v, dl, zero, None).map(|k| k as c_int))
    })
}

#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    if (n as usize).saturating_mul(std::mem::size_of::<libc::pollfd>()) > fdslen {
        chk_fail();
    }
    poll(fds, n, timeout)
}

#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    t: *const libc::timespec,
    sig: *const libc::sigset_t,
) -> c_int {
    if !any_bypass(fds, n) {
        return real::ppoll(fds, n, t, sig);
    }
    hook!(real::ppoll(fds, n, t, sig), {
        match iomux::deadline_ts(t) {
            Ok((dl, zero)) => {
                let v = std::slice::from_raw_parts_mut(fds, n as usize);
                ri(iomux::poll(v, dl, zero, sig.as_ref()).map(|k| k as c_int))
            }
            Err(e) => ri(Err(e)),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    t: *const libc::timespec,
    sig: *const libc::sigset_t,
    fdslen: size_t,
) -> c_int {
    if (n as usize).saturating_mul(std::mem::size_of::<libc::pollfd>()) > fdslen {
        chk_fail();
    }
    ppoll(fds, n, t, sig)
}

#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    if !iomux::sets_have_bypass(nfds, [r, w, e]) {
        return real::select(nfds, r, w, e, tv);
    }
    hook!(real::select(nfds, r, w, e, tv), {
        let (dl, zero) = if tv.is_null() {
            (None, false)
        } else {
            let t = &*tv;
            if t.tv_sec < 0 || t.tv_usec < 0 {
                return ri(Err(libc::EINVAL));
            }
            let d = std::time::Duration::from_secs(t.tv_sec as u64)
                + std::time::Duration::from_micros(t.tv_usec as u64);
            (Some(std::time::Instant::now() + d), d.is_zero())
        };
        let res = iomux::select(nfds, [r, w, e], dl, zero, None);
        if let (false, Some(d)) = (tv.is_null(), dl) {
            // Linux reports the time left.
            let left = d.saturating_duration_since(std::time::Instant::now());
            (*tv).tv_sec = left.as_secs() as libc::time_t;
            (*tv).tv_usec = left.subsec_micros() as libc::suseconds_t;
        }
        ri(res.map(|k| k as c_int))
    })
}

#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    t: *const libc::timespec,
    sig: *const libc::sigset_t,
) -> c_int {
    if !iomux::sets_have_bypass(nfds, [r, w, e]) {
        return real::pselect(nfds, r, w, e, t, sig);
    }
    hook!(real::pselect(nfds, r, w, e, t, sig), {
        match iomux::deadline_ts(t) {
            Ok((dl, zero)) => {
                ri(iomux::select(nfds, [r, w, e], dl, zero, sig.as_ref()).map(|k| k as c_int))
            }
            Err(err) => ri(Err(err)),
        }
    })
}
