//! The socket calls on hoststack sockets. Each returns `R<T>` (an errno on
//! failure); `hooks` turns that into the C convention. Every function is
//! entered without the lock and takes it itself, so blocking calls can
//! release it while they sleep.

use crate::real;
use crate::state::{block, lock, st, SState, Woke, R};
use crate::sys::{self, any_addr, unmap};
use libc::c_int;
use session_api::client::Error as ApiError;
use session_api::msg::Shut;
use session_api::msg::{
    BIND_REUSEADDR, LISTEN_EXISTING, LISTEN_JOIN, LISTEN_PASSIVE, LISTEN_SHARED, LISTEN_V6ONLY,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Is this an INET stream/datagram socket hoststack should serve?
pub fn is_inet(domain: c_int, ty: c_int, proto: c_int) -> bool {
    let base = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    (domain == libc::AF_INET || domain == libc::AF_INET6)
        && ((base == libc::SOCK_STREAM && (proto == 0 || proto == libc::IPPROTO_TCP))
            || (base == libc::SOCK_DGRAM && (proto == 0 || proto == libc::IPPROTO_UDP)))
}

/// socket(): the kernel socket is created first and becomes the
/// placeholder (fd number, close-on-exec, a kernel fallback later).
pub fn socket(domain: c_int, ty: c_int, proto: c_int) -> R<c_int> {
    // SAFETY: plain syscall wrapper.
    let fd = unsafe { real::socket(domain, ty, proto) };
    if fd < 0 {
        return Err(sys::errno());
    }
    if !is_inet(domain, ty, proto) || fd as usize >= crate::state::MAX_FD {
        return Ok(fd);
    }
    let mut g = lock();
    let s = st(&mut g);
    match s.want_bypass() {
        Ok(true) => {
            let base = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            s.add_sock(
                fd,
                domain,
                base,
                ty & libc::SOCK_NONBLOCK != 0,
                SState::Fresh,
            );
            Ok(fd)
        }
        Ok(false) => Ok(fd),
        Err(e) => {
            drop(g);
            // SAFETY: our own fresh fd.
            unsafe { real::close(fd) };
            Err(e)
        }
    }
}

/// A v4-mapped address on a v6-only socket: what the kernel answers.
fn check_mapped(k: &crate::state::Sock, raw: &SocketAddr, errno: c_int) -> R<()> {
    match raw {
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() && k.v6only_flag() != 0 => {
            Err(errno)
        }
        _ => Ok(()),
    }
}

fn check_family(domain: c_int, a: &SocketAddr) -> R<()> {
    match (domain, a) {
        (libc::AF_INET, SocketAddr::V6(_)) => Err(libc::EAFNOSUPPORT),
        (libc::AF_INET6, SocketAddr::V4(_)) => Err(libc::EINVAL),
        _ => Ok(()),
    }
}

/// Outcome for calls that may hand the socket to the kernel.
pub enum Route<T> {
    Done(T),
    /// The socket is now a plain kernel socket: replay the call on it.
    Kernel,
}

pub fn bind(fd: c_int, raw: SocketAddr) -> R<Route<()>> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    let (domain, stype, state, bound) = {
        let k = &s.socks[&id];
        (k.domain, k.stype, k.state, k.bound)
    };
    check_family(domain, &raw)?;
    check_mapped(&s.socks[&id], &raw, libc::EINVAL)?;
    let a = unmap(raw);
    if state != SState::Fresh || bound.is_some() {
        return Err(libc::EINVAL);
    }
    if let SocketAddr::V6(v6) = raw {
        if !v6.ip().is_unspecified() && v6.ip().to_ipv4_mapped().is_none() {
            // Linux: a socket bound to one IPv6 address is v6-only.
            if let Some(k) = s.socks.get_mut(&id) {
                k.opts.other.insert(
                    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
                    1i32.to_ne_bytes().to_vec(),
                );
            }
        }
    }
    if s.cfg.kernel_only(a) || (stype == libc::SOCK_DGRAM && a.ip().is_loopback()) {
        s.to_kernel(id);
        return Ok(Route::Kernel);
    }
    if stype == libc::SOCK_DGRAM {
        let v6only = s.socks[&id].v6only_flag();
        let w = s.worker()?;
        let sid = w.udp_bind_with(a, v6only).map_err(|e| e.errno())?;
        let local = w.local_addr(sid).ok().flatten().unwrap_or(a);
        s.set_state(id, SState::Udp { sid });
        s.socks.get_mut(&id).ok_or(libc::EBADF)?.bound = Some(local);
    } else {
        // Kernel-exact errors (EADDRNOTAVAIL, EADDRINUSE) at bind() time.
        let k = &s.socks[&id];
        let flags = if k.opts.reuseport { LISTEN_SHARED } else { 0 }
            | if k.opts.reuseaddr { BIND_REUSEADDR } else { 0 }
            | k.v6only_flag();
        let w = s.worker()?;
        // The daemon holds the address from now on, as the kernel does:
        // other binds conflict, ephemeral ports avoid it.
        let (a, token) = w.bind_reserve(a, flags).map_err(|e| e.errno())?;
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        k.bound = Some(a);
        k.reserved = Some((token, true));
    }
    Ok(Route::Done(()))
}

pub fn listen(fd: c_int, backlog: c_int) -> R<()> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
    // Like Linux: the backlog is capped at SOMAXCONN (4096), and a negative
    // one (Envoy passes -1) means the cap.
    let backlog = if backlog < 0 {
        4096
    } else {
        backlog.clamp(1, 4096)
    } as u32;
    k.backlog = backlog;
    match k.state {
        SState::Listening { .. } | SState::Dormant { .. } => Ok(()),
        SState::Fresh if k.stype == libc::SOCK_STREAM => {
            let local = k.bound.unwrap_or_else(|| any_addr(k.domain));
            let flags = if k.opts.reuseport { LISTEN_SHARED } else { 0 } | k.v6only_flag();
            // Queued back to back with the listen: no other bind comes
            // between.
            s.give_back(id);
            let w = s.worker()?;
            let (lid, local) = w
                .listen_with(local, backlog, flags)
                .map_err(|e| e.errno())?;
            s.set_state(id, SState::Listening { lid, local });
            let klisten = kernel_listen(fd, local, backlog);
            if let Some(k) = s.socks.get_mut(&id) {
                k.bound = Some(local);
                k.klisten = klisten;
            }
            Ok(())
        }
        SState::Fresh | SState::Udp { .. } => Err(libc::EOPNOTSUPP),
        // A listener that was shut down may listen again.
        SState::Failed if k.stype == libc::SOCK_STREAM && k.bound.is_some() => {
            let local = k.bound.unwrap_or_else(|| any_addr(k.domain));
            let local = SocketAddr::new(local.ip(), 0);
            let w = s.worker()?;
            let (lid, local) = w.listen_with(local, backlog, 0).map_err(|e| e.errno())?;
            s.set_state(id, SState::Listening { lid, local });
            if let Some(k) = s.socks.get_mut(&id) {
                k.bound = Some(local);
            }
            Ok(())
        }
        _ => Err(libc::EINVAL),
    }
}

/// Also listen on the placeholder kernel socket (same address) when the
/// address is loopback or a wildcard, so that kernel clients on this host
/// (health checks, admin endpoints on 127.0.0.1) reach the app too. Other
/// addresses are the daemon's, not the kernel's: the placeholder is only
/// bound there (IP_FREEBIND, shared, nothing listens), so that a process
/// that receives the fd over a UNIX socket can read the address and join
/// the listener ([`adopt_passed`]). Best effort: a kernel-side conflict
/// just leaves it hoststack-only. True if the kernel listens too.
fn kernel_listen(fd: c_int, local: SocketAddr, backlog: u32) -> bool {
    let kernel_side = local.ip().is_loopback() || local.ip().is_unspecified();
    if !kernel_side {
        let one: c_int = 1;
        let (level, name) = if local.is_ipv4() {
            (libc::SOL_IP, libc::IP_FREEBIND)
        } else {
            (libc::SOL_IPV6, libc::IPV6_FREEBIND)
        };
        for (level, name) in [
            (level, name),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (libc::SOL_SOCKET, libc::SO_REUSEPORT),
        ] {
            // SAFETY: one int option value.
            unsafe {
                real::setsockopt(
                    fd,
                    level,
                    name,
                    &one as *const c_int as *const libc::c_void,
                    std::mem::size_of::<c_int>() as libc::socklen_t,
                )
            };
        }
    }
    let mut st: libc::sockaddr_storage = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let domain = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: st is a sockaddr_storage of `len` bytes.
    unsafe {
        sys::write_sockaddr(
            domain,
            local,
            &mut st as *mut _ as *mut libc::sockaddr,
            &mut len,
        );
        real::bind(fd, &st as *const _ as *const libc::sockaddr, len) == 0
            && kernel_side
            && real::listen(fd, backlog as c_int) == 0
    }
}

/// A descriptor that arrived over a UNIX socket (SCM_RIGHTS) may be the
/// placeholder of another process's hoststack listener: Envoy's hot
/// restart hands its listeners to the new Envoy this way. Its kernel
/// socket carries the listener's address ([`kernel_listen`]); if the
/// daemon has a listener there, join it (never create one), so the fd
/// serves here as it did there. Anything else is left alone.
pub fn adopt_passed(fd: c_int) {
    if fd < 0 || fd as usize >= crate::state::MAX_FD || crate::state::is_bypass(fd) {
        return;
    }
    let int_opt = |level: c_int, name: c_int| -> Option<c_int> {
        let mut v: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: one int and its length.
        let r = unsafe {
            real::getsockopt(
                fd,
                level,
                name,
                &mut v as *mut c_int as *mut libc::c_void,
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    let Some(domain) = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN) else {
        return;
    };
    if !(domain == libc::AF_INET || domain == libc::AF_INET6)
        || int_opt(libc::SOL_SOCKET, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
    {
        return;
    }
    let mut sa: libc::sockaddr_storage = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: sa is a sockaddr_storage of `len` bytes.
    let r = unsafe { real::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) };
    if r != 0 {
        return;
    }
    // SAFETY: the kernel wrote `len` bytes of a sockaddr.
    let Ok(local) = (unsafe { sys::read_sockaddr(&sa as *const _ as *const libc::sockaddr, len) })
    else {
        return;
    };
    let local = unmap(local);
    if local.port() == 0 {
        return;
    }
    let v6only = domain == libc::AF_INET6
        && int_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_some_and(|v| v != 0);
    let klisten = int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    // SAFETY: F_GETFL takes no pointer.
    let nonblock = unsafe { real::fcntl(fd, libc::F_GETFL, 0) } & libc::O_NONBLOCK != 0;
    let mut g = lock();
    let s = st(&mut g);
    let Ok(w) = s.worker() else {
        return;
    };
    // Passive until this process polls or accepts on it (like a forked
    // child's inherited listener): one that only holds it takes nothing.
    let flags = LISTEN_JOIN
        | LISTEN_SHARED
        | LISTEN_EXISTING
        | LISTEN_PASSIVE
        | if v6only { LISTEN_V6ONLY } else { 0 };
    let Ok((lid, local)) = w.listen_with(local, 4096, flags) else {
        return;
    };
    let id = s.add_sock(fd, domain, libc::SOCK_STREAM, nonblock, SState::Fresh);
    s.set_state(id, SState::Listening { lid, local });
    if let Some(k) = s.socks.get_mut(&id) {
        k.bound = Some(local);
        k.klisten = klisten;
        k.passive = true;
        if v6only {
            k.opts.other.insert(
                (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
                1i32.to_ne_bytes().to_vec(),
            );
        }
    }
}

fn unsafe_zeroed() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Is a kernel connection waiting on the placeholder of a listener?
fn kernel_pending(fd: c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { real::ppoll(&mut p, 1, &zero, std::ptr::null()) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// What accept() found.
pub enum Accepted {
    /// A hoststack connection: (fd, peer, domain).
    Bypass(c_int, Option<SocketAddr>, c_int),
    /// A kernel connection waits on the placeholder: accept it there.
    Kernel,
}

fn deadline(t: Option<Duration>) -> Option<Instant> {
    t.map(|t| Instant::now() + t)
}

pub fn accept(fd: c_int, flags: c_int) -> R<Accepted> {
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        return Err(libc::EINVAL);
    }
    let mut dl = None;
    let mut first = true;
    let mut g = lock();
    loop {
        let s = st(&mut g);
        let id = s.sock_of(fd).ok_or(libc::EBADF)?;
        s.wake_listener(id)?;
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        if k.stype == libc::SOCK_DGRAM {
            return Err(libc::EOPNOTSUPP);
        }
        let SState::Listening { lid, .. } = k.state else {
            return Err(libc::EINVAL);
        };
        k.used = true;
        let (nonblock, domain, opts) = (k.nonblock, k.domain, k.opts.clone());
        if first {
            dl = deadline(k.opts.rcvtimeo);
            first = false;
        }
        let w = s.worker()?;
        match w.accept(lid, Some(Duration::ZERO)) {
            Ok(sid) => {
                let peer = w.peer_addr(sid).ok().flatten();
                let nfd = s.accept_placeholder(domain, flags & libc::SOCK_CLOEXEC != 0);
                let w = s.worker()?;
                if nfd < 0 || nfd as usize >= crate::state::MAX_FD {
                    let e = if nfd < 0 { sys::errno() } else { libc::EMFILE };
                    if nfd >= 0 {
                        // SAFETY: our own fd.
                        unsafe { real::close(nfd) };
                    }
                    let _ = w.abort(sid);
                    return Err(e);
                }
                let nid = s.add_sock(
                    nfd,
                    domain,
                    libc::SOCK_STREAM,
                    flags & libc::SOCK_NONBLOCK != 0,
                    SState::Connected { sid },
                );
                if let Some(n) = s.socks.get_mut(&nid) {
                    // Linux: accepted sockets inherit the listener's options.
                    n.opts = opts;
                    n.opts.reuseport = false;
                    n.peer = peer;
                }
                s.apply_opts(nid);
                return Ok(Accepted::Bypass(nfd, peer, domain));
            }
            Err(ApiError::WouldBlock) => {
                let klisten = s.socks.get(&id).is_some_and(|k| k.klisten);
                if klisten && kernel_pending(fd) {
                    return Ok(Accepted::Kernel);
                }
                if nonblock {
                    return Err(libc::EAGAIN);
                }
                let mut kp = [libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                }];
                let extra: &mut [libc::pollfd] = if klisten { &mut kp } else { &mut [] };
                let (g2, woke) = block(g, dl, extra, None);
                g = g2;
                match woke {
                    Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
                    Woke::Intr => {}
                    Woke::Timeout => return Err(libc::EAGAIN),
                    Woke::Again => {}
                }
            }
            Err(e) => return Err(e.errno()),
        }
    }
}

pub fn connect(fd: c_int, raw: SocketAddr) -> R<Route<()>> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    let k = &s.socks[&id];
    let (domain, stype, state, nonblock, bound, sndtimeo) = (
        k.domain,
        k.stype,
        k.state,
        k.nonblock,
        k.bound,
        k.opts.sndtimeo,
    );
    check_family(domain, &raw)?;
    check_mapped(k, &raw, libc::ENETUNREACH)?;
    let a = unmap(raw);
    if a.port() == 0 && stype == libc::SOCK_STREAM {
        return Err(libc::ECONNREFUSED);
    }
    let kernel = s.cfg.kernel_only(a) || (stype == libc::SOCK_DGRAM && a.ip().is_loopback());
    if stype == libc::SOCK_DGRAM {
        match state {
            SState::Fresh if kernel => {
                s.to_kernel(id);
                return Ok(Route::Kernel);
            }
            SState::Fresh => {
                let w = s.worker()?;
                let sid = w.udp_connect(a).map_err(|e| e.errno())?;
                let local = w.local_addr(sid).ok().flatten();
                s.set_state(id, SState::Udp { sid });
                let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
                k.peer = Some(a);
                k.bound = local;
                return Ok(Route::Done(()));
            }
            SState::Udp { sid } => {
                let w = s.worker()?;
                w.udp_set_peer(sid, a).map_err(|e| e.errno())?;
                s.socks.get_mut(&id).ok_or(libc::EBADF)?.peer = Some(a);
                return Ok(Route::Done(()));
            }
            _ => return Err(libc::EINVAL),
        }
    }
    match state {
        SState::Fresh | SState::Failed => {}
        SState::Connecting { .. } => {
            if nonblock {
                return Err(libc::EALREADY);
            }
        }
        SState::Connected { .. } | SState::Listening { .. } | SState::Dormant { .. } => {
            return Err(libc::EISCONN)
        }
        SState::Orphan | SState::Udp { .. } | SState::Inherited { .. } => {
            return Err(libc::EISCONN)
        }
    }
    if matches!(state, SState::Fresh | SState::Failed) {
        if kernel && state == SState::Fresh {
            s.to_kernel(id);
            return Ok(Route::Kernel);
        }
        let local = bound.filter(|b| b.port() != 0 || !b.ip().is_unspecified());
        s.give_back(id);
        let w = s.worker()?;
        let token = w.connect_start(a, local).map_err(|e| e.errno())?;
        s.set_state(id, SState::Connecting { token });
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        k.peer = Some(a);
        k.so_error = 0;
    }
    // Loopback connects are answered by the daemon at once (cut-through or
    // refused): wait for the answer even on non-blocking sockets, so a
    // refusal can fall back to a kernel listener on the same port.
    let loopback = a.ip().is_loopback();
    if nonblock && !loopback {
        return Err(libc::EINPROGRESS);
    }
    let dl = if loopback {
        Some(Instant::now() + Duration::from_secs(5))
    } else {
        deadline(sndtimeo)
    };
    loop {
        let s = st(&mut g);
        s.finish_connect(id);
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        match k.state {
            SState::Connected { .. } => return Ok(Route::Done(())),
            SState::Failed => {
                let e = std::mem::take(&mut k.so_error);
                if loopback && e == libc::ECONNREFUSED && state == SState::Fresh {
                    s.to_kernel(id);
                    return Ok(Route::Kernel);
                }
                return Err(if e == 0 { libc::ECONNREFUSED } else { e });
            }
            _ => {}
        }
        let (g2, woke) = block(g, dl, &mut [], None);
        g = g2;
        match woke {
            Woke::Intr => return Err(libc::EINTR),
            Woke::Timeout if loopback => return Err(libc::ETIMEDOUT),
            Woke::Timeout => return Err(libc::EINPROGRESS),
            Woke::Again => {}
        }
    }
}

/// One receive. Returns (bytes, source address).
pub fn recv(fd: c_int, buf: &mut [u8], flags: c_int) -> R<(usize, Option<SocketAddr>)> {
    if flags & libc::MSG_OOB != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let dontwait = flags & libc::MSG_DONTWAIT != 0;
    let peek = flags & libc::MSG_PEEK != 0;
    let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
    let mut got = 0usize;
    let mut dl = None;
    let mut first = true;
    let mut g = lock();
    loop {
        let s = st(&mut g);
        let id = s.sock_of(fd).ok_or(libc::EBADF)?;
        s.finish_connect(id);
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        if first {
            dl = deadline(k.opts.rcvtimeo);
            first = false;
        }
        let nonblock = k.nonblock || dontwait;
        match k.state {
            SState::Connected { sid } => {
                if k.rd_shut {
                    return Ok((got, None));
                }
                let reset_seen = k.reset_seen;
                let w = s.worker()?;
                if peek {
                    let n = w.peek(sid, buf).map_err(|e| e.errno())?;
                    if n > 0 || buf.is_empty() {
                        return Ok((n, None));
                    }
                    let r = w.ready(sid).map_err(|e| e.errno())?;
                    if let Some(e) = r.error {
                        return Err(e);
                    }
                    if r.hup {
                        return Ok((0, None));
                    }
                } else if buf.is_empty() {
                    // recv(len 0) on TCP waits for data/EOF like Linux.
                    let r = w.ready(sid).map_err(|e| e.errno())?;
                    if r.readable {
                        return Ok((0, None));
                    }
                } else {
                    match w.read(sid, &mut buf[got..], Some(Duration::ZERO)) {
                        Ok(n) => {
                            got += n;
                            if n == 0 || !waitall || got == buf.len() {
                                return Ok((got, None));
                            }
                        }
                        Err(ApiError::WouldBlock) => {
                            if got > 0 && !waitall {
                                return Ok((got, None));
                            }
                        }
                        Err(ApiError::Errno(e))
                            if e == libc::ECONNRESET || e == libc::ETIMEDOUT =>
                        {
                            if got > 0 {
                                return Ok((got, None));
                            }
                            if reset_seen {
                                return Ok((0, None));
                            }
                            if let Some(k) = s.socks.get_mut(&id) {
                                k.reset_seen = true;
                            }
                            return Err(e);
                        }
                        Err(e) => return Err(e.errno()),
                    }
                }
            }
            SState::Udp { sid } => {
                let w = s.worker()?;
                match w.recv_from(sid, buf, Some(Duration::ZERO)) {
                    Ok((n, from)) => return Ok((n, from)),
                    Err(ApiError::WouldBlock) => {}
                    Err(e) => return Err(e.errno()),
                }
            }
            SState::Fresh if k.stype == libc::SOCK_DGRAM => {
                // An unbound UDP socket: bind it to a port (like Linux) so
                // it can receive at all.
                let a = any_addr(k.domain);
                let w = s.worker()?;
                let sid = w.udp_bind(a).map_err(|e| e.errno())?;
                s.set_state(id, SState::Udp { sid });
                continue;
            }
            SState::Connecting { .. } => {}
            SState::Failed => {
                let e = std::mem::take(&mut k.so_error);
                return Err(if e == 0 { libc::ENOTCONN } else { e });
            }
            _ => return Err(libc::ENOTCONN),
        }
        if nonblock {
            return Err(libc::EAGAIN);
        }
        let (g2, woke) = block(g, dl, &mut [], None);
        g = g2;
        match woke {
            Woke::Intr if got > 0 => return Ok((got, None)),
            Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
            Woke::Intr => {}
            Woke::Timeout if got > 0 => return Ok((got, None)),
            Woke::Timeout => return Err(libc::EAGAIN),
            Woke::Again => {}
        }
    }
}

fn sigpipe(flags: c_int) {
    if flags & libc::MSG_NOSIGNAL == 0 {
        // SAFETY: raise has no memory preconditions.
        unsafe { libc::raise(libc::SIGPIPE) };
    }
}

/// Send from `bufs` (gathered). `to` for unconnected UDP.
pub fn send(fd: c_int, bufs: &[&[u8]], flags: c_int, to: Option<SocketAddr>) -> R<Route<usize>> {
    if flags & libc::MSG_OOB != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let dontwait = flags & libc::MSG_DONTWAIT != 0;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut sent = 0usize;
    let mut dl = None;
    let mut first = true;
    let mut g = lock();
    loop {
        let s = st(&mut g);
        let id = s.sock_of(fd).ok_or(libc::EBADF)?;
        s.finish_connect(id);
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        if first {
            dl = deadline(k.opts.sndtimeo);
            first = false;
        }
        let nonblock = k.nonblock || dontwait;
        match k.state {
            SState::Connected { sid } => {
                if k.wr_shut {
                    sigpipe(flags);
                    return Err(libc::EPIPE);
                }
                let reset_seen = k.reset_seen;
                let w = s.worker()?;
                let mut blocked = false;
                // Skip what was sent already, then write buffer by buffer.
                let mut skip = sent;
                for b in bufs {
                    if skip >= b.len() {
                        skip -= b.len();
                        continue;
                    }
                    let part = &b[skip..];
                    skip = 0;
                    match w.write(sid, part, Some(Duration::ZERO)) {
                        Ok(n) => {
                            sent += n;
                            if n < part.len() {
                                blocked = true;
                                break;
                            }
                        }
                        Err(ApiError::WouldBlock) => {
                            blocked = true;
                            break;
                        }
                        Err(ApiError::Errno(e)) => {
                            if sent > 0 {
                                return Ok(Route::Done(sent));
                            }
                            if e == libc::ECONNRESET && !reset_seen {
                                if let Some(k) = s.socks.get_mut(&id) {
                                    k.reset_seen = true;
                                }
                                return Err(e);
                            }
                            sigpipe(flags);
                            return Err(libc::EPIPE);
                        }
                        Err(e) => return Err(e.errno()),
                    }
                }
                if !blocked || sent == total {
                    return Ok(Route::Done(sent));
                }
                if nonblock {
                    return if sent > 0 {
                        Ok(Route::Done(sent))
                    } else {
                        Err(libc::EAGAIN)
                    };
                }
            }
            SState::Udp { sid } => {
                let dest = to.or(k.peer);
                if dest.is_none() {
                    return Err(libc::EDESTADDRREQ);
                }
                let data: Vec<u8>;
                let one: &[u8] = if bufs.len() == 1 {
                    bufs[0]
                } else {
                    data = bufs.concat();
                    &data
                };
                let w = s.worker()?;
                match w.send_to(sid, one, dest, Some(Duration::ZERO)) {
                    Ok(n) => return Ok(Route::Done(n)),
                    Err(ApiError::WouldBlock) => {
                        if nonblock {
                            return Err(libc::EAGAIN);
                        }
                    }
                    Err(e) => return Err(e.errno()),
                }
            }
            SState::Fresh if k.stype == libc::SOCK_DGRAM => {
                let Some(to) = to else {
                    return Err(libc::EDESTADDRREQ);
                };
                if s.cfg.kernel_only(to) || to.ip().is_loopback() {
                    s.to_kernel(id);
                    return Ok(Route::Kernel);
                }
                let a = any_addr(k.domain);
                let w = s.worker()?;
                let sid = w.udp_bind(a).map_err(|e| e.errno())?;
                s.set_state(id, SState::Udp { sid });
                continue;
            }
            SState::Connecting { .. } => {
                if nonblock {
                    return Err(libc::EAGAIN);
                }
            }
            SState::Failed => {
                let e = std::mem::take(&mut k.so_error);
                if e != 0 {
                    return Err(e);
                }
                sigpipe(flags);
                return Err(libc::EPIPE);
            }
            _ => {
                sigpipe(flags);
                return Err(libc::EPIPE);
            }
        }
        let (g2, woke) = block(g, dl, &mut [], None);
        g = g2;
        match woke {
            Woke::Intr | Woke::Timeout if sent > 0 => return Ok(Route::Done(sent)),
            Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
            Woke::Intr => {}
            Woke::Timeout => return Err(libc::EAGAIN),
            Woke::Again => {}
        }
    }
}

/// sendfile to a hoststack socket: file bytes go straight into the tx FIFO,
/// never more than fits (so nothing read from the file is lost).
pub fn sendfile(out: c_int, inp: c_int, off: Option<&mut i64>, count: usize) -> R<usize> {
    let mut sent = 0usize;
    let mut pos = off;
    let mut buf = Vec::new();
    let mut g = lock();
    loop {
        let s = st(&mut g);
        let id = s.sock_of(out).ok_or(libc::EBADF)?;
        s.adopt(id);
        let k = s.socks.get(&id).ok_or(libc::EBADF)?;
        let nonblock = k.nonblock;
        let dl = deadline(k.opts.sndtimeo);
        let SState::Connected { sid } = k.state else {
            return if matches!(k.state, SState::Udp { .. }) {
                Err(libc::EINVAL)
            } else {
                Err(libc::ENOTCONN)
            };
        };
        if k.wr_shut {
            sigpipe(0);
            return Err(libc::EPIPE);
        }
        let w = s.worker()?;
        if sent == count {
            return Ok(sent);
        }
        let r = w.ready(sid).map_err(|e| e.errno())?;
        if let Some(e) = r.error {
            if sent > 0 {
                return Ok(sent);
            }
            return Err(e);
        }
        let free = w.tx_free(sid).map_err(|e| e.errno())?;
        if free > 0 {
            let n = free.min(count - sent).min(1 << 20);
            buf.resize(n, 0);
            // SAFETY: buf has n bytes; the app's file descriptor.
            let r = unsafe {
                match pos.as_deref() {
                    Some(p) => real::pread64(inp, buf.as_mut_ptr() as *mut _, n, *p),
                    None => real::read(inp, buf.as_mut_ptr() as *mut _, n),
                }
            };
            if r < 0 {
                let e = sys::errno();
                return if sent > 0 { Ok(sent) } else { Err(e) };
            }
            if r == 0 {
                return Ok(sent);
            }
            let r = r as usize;
            let mut done = 0;
            while done < r {
                match w.write(sid, &buf[done..r], Some(Duration::ZERO)) {
                    Ok(n) => done += n,
                    Err(ApiError::WouldBlock) => break,
                    Err(e) => {
                        return if sent + done > 0 {
                            Ok(sent + done)
                        } else {
                            Err(e.errno())
                        }
                    }
                }
            }
            if done < r && pos.is_none() {
                // Give unsent bytes back to the file position.
                // SAFETY: lseek on the app's fd.
                unsafe { libc::lseek(inp, -((r - done) as i64), libc::SEEK_CUR) };
            }
            sent += done;
            if let Some(p) = pos.as_deref_mut() {
                *p += done as i64;
            }
            continue;
        }
        // Full: ask for a writable notification (epoll EPOLLOUT / wake-up).
        if w.want_writable(sid).unwrap_or(true) {
            continue;
        }
        if nonblock {
            return if sent > 0 {
                Ok(sent)
            } else {
                Err(libc::EAGAIN)
            };
        }
        let (g2, woke) = block(g, dl, &mut [], None);
        g = g2;
        match woke {
            Woke::Intr | Woke::Timeout if sent > 0 => return Ok(sent),
            Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
            Woke::Intr => {}
            Woke::Timeout => return Err(libc::EAGAIN),
            Woke::Again => {}
        }
    }
}

/// Most bytes one splice moves through the shim.
const SPLICE_MAX: usize = 1 << 20;

/// splice(2) with a hoststack TCP socket on one side (`sock_in`: the
/// input) and a kernel pipe on the other, as HAProxy's kernel splicing
/// does. The kernel cannot move pages out of or into a FIFO, so the bytes
/// are copied through the shim, under the kernel's rules: the socket's
/// O_NONBLOCK and timeouts govern waiting for the socket, SPLICE_F_NONBLOCK
/// or the pipe's O_NONBLOCK waiting for the pipe, and nothing is taken
/// from one side that the other cannot take now (the pipe is written
/// before the socket's bytes are consumed; the pipe is read only up to the
/// room in the socket's FIFO). Errors in the kernel's order.
pub fn splice(
    sock: c_int,
    pipe: c_int,
    sock_in: bool,
    sock_off: bool,
    pipe_off: bool,
    len: usize,
    flags: libc::c_uint,
) -> R<usize> {
    let all =
        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MORE | libc::SPLICE_F_GIFT;
    if len == 0 {
        return Ok(0);
    }
    if flags & !all != 0 {
        return Err(libc::EINVAL);
    }
    let fl = sys::splice_pipe(pipe, sock_in)?;
    if pipe_off {
        return Err(libc::ESPIPE);
    }
    if sock_off {
        return Err(libc::EINVAL);
    }
    let pipe_nonblock = flags & libc::SPLICE_F_NONBLOCK != 0 || fl & libc::O_NONBLOCK != 0;
    // One buffer per thread, reused: HAProxy splices every few KiB.
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    let want = len.min(SPLICE_MAX);
    let run = |b: &mut [u8]| {
        if sock_in {
            splice_to_pipe(sock, pipe, pipe_nonblock, b)
        } else {
            splice_from_pipe(pipe, sock, pipe_nonblock, b)
        }
    };
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => {
            if b.len() < want {
                b.resize(want, 0);
            }
            run(&mut b[..want])
        }
        // A splice from a signal handler that interrupted one.
        Err(_) => run(&mut vec![0u8; want]),
    })
}

/// Socket -> pipe: peek, write what the pipe takes, consume that much.
fn splice_to_pipe(sock: c_int, pipe: c_int, pipe_nonblock: bool, buf: &mut [u8]) -> R<usize> {
    let mut dl = None;
    let mut first = true;
    let mut g = lock();
    loop {
        let s = st(&mut g);
        let id = s.sock_of(sock).ok_or(libc::EBADF)?;
        s.finish_connect(id);
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        if first {
            dl = deadline(k.opts.rcvtimeo);
            first = false;
        }
        let nonblock = k.nonblock;
        let mut pipe_full = false;
        match k.state {
            SState::Connected { sid } => {
                if k.rd_shut {
                    return Ok(0);
                }
                let reset_seen = k.reset_seen;
                let w = s.worker()?;
                // No more than the pipe has room for (a page at least: its
                // slots may hold less than a page each).
                let room = sys::pipe_room(pipe).max(4096).min(buf.len());
                let n = w.peek(sid, &mut buf[..room]).map_err(|e| e.errno())?;
                if n > 0 {
                    match sys::pipe_write_nowait(pipe, &buf[..n]) {
                        Ok(m) => {
                            // The bytes are in the pipe: consume them (they
                            // are there, so this never waits).
                            let mut done = 0;
                            while done < m {
                                match w.read(sid, &mut buf[done..m], Some(Duration::ZERO)) {
                                    Ok(0) | Err(ApiError::WouldBlock) => break,
                                    Ok(x) => done += x,
                                    Err(e) => return Err(e.errno()),
                                }
                            }
                            return Ok(m);
                        }
                        Err(libc::EAGAIN) if !pipe_nonblock => pipe_full = true,
                        Err(e) => return Err(e),
                    }
                } else {
                    let r = w.ready(sid).map_err(|e| e.errno())?;
                    if let Some(e) = r.error {
                        if reset_seen {
                            return Ok(0);
                        }
                        if let Some(k) = s.socks.get_mut(&id) {
                            k.reset_seen = true;
                        }
                        return Err(e);
                    }
                    if r.hup {
                        return Ok(0);
                    }
                }
            }
            SState::Connecting { .. } => {}
            SState::Udp { .. } => return Err(libc::EINVAL),
            SState::Failed => {
                let e = std::mem::take(&mut k.so_error);
                return Err(if e == 0 { libc::ENOTCONN } else { e });
            }
            _ => return Err(libc::ENOTCONN),
        }
        let woke = if pipe_full {
            // Data waits and the pipe is full: wait for room (or for news
            // of the socket).
            let mut p = [libc::pollfd {
                fd: pipe,
                events: libc::POLLOUT,
                revents: 0,
            }];
            let (g2, woke) = block(g, None, &mut p, None);
            g = g2;
            woke
        } else {
            if nonblock {
                return Err(libc::EAGAIN);
            }
            let (g2, woke) = block(g, dl, &mut [], None);
            g = g2;
            woke
        };
        match woke {
            Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
            Woke::Timeout => return Err(libc::EAGAIN),
            _ => {}
        }
    }
}

/// Pipe -> socket: read from the pipe at most the room in the FIFO, write
/// it all. An empty pipe is looked at first, as the kernel does.
fn splice_from_pipe(pipe: c_int, sock: c_int, pipe_nonblock: bool, buf: &mut [u8]) -> R<usize> {
    let mut dl = None;
    let mut first = true;
    let mut g = lock();
    loop {
        let in_pipe = sys::pipe_len(pipe);
        if in_pipe == 0 && sys::poll_now(pipe, libc::POLLHUP) {
            // Empty, and no writer is left.
            return Ok(0);
        }
        if in_pipe == 0 {
            if pipe_nonblock {
                return Err(libc::EAGAIN);
            }
            let mut p = [libc::pollfd {
                fd: pipe,
                events: libc::POLLIN,
                revents: 0,
            }];
            let (g2, woke) = block(g, None, &mut p, None);
            g = g2;
            if matches!(woke, Woke::Intr) && !sys::restart_after_signal() {
                return Err(libc::EINTR);
            }
            continue;
        }
        let s = st(&mut g);
        let id = s.sock_of(sock).ok_or(libc::EBADF)?;
        s.finish_connect(id);
        let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
        if first {
            dl = deadline(k.opts.sndtimeo);
            first = false;
        }
        let nonblock = k.nonblock;
        match k.state {
            SState::Connected { sid } => {
                if k.wr_shut {
                    sigpipe(0);
                    return Err(libc::EPIPE);
                }
                let w = s.worker()?;
                let r = w.ready(sid).map_err(|e| e.errno())?;
                if let Some(e) = r.error {
                    if e == libc::EPIPE {
                        sigpipe(0);
                    }
                    return Err(e);
                }
                let free = w.tx_free(sid).map_err(|e| e.errno())?;
                if free > 0 {
                    let n = free.min(buf.len()).min(in_pipe);
                    let got = match sys::pipe_read_nowait(pipe, &mut buf[..n]) {
                        Ok(got) => got,
                        // Emptied by someone else since the poll: look again.
                        Err(libc::EAGAIN) => continue,
                        Err(e) => return Err(e),
                    };
                    if got == 0 {
                        return Ok(0);
                    }
                    // It fits (at most the room just measured, and only
                    // this thread writes under the lock): all of it goes.
                    let mut done = 0;
                    while done < got {
                        match w.write(sid, &buf[done..got], Some(Duration::ZERO)) {
                            Ok(x) => done += x,
                            Err(ApiError::WouldBlock) => {
                                // Not expected; never drop what left the pipe.
                                match w.write(sid, &buf[done..got], None) {
                                    Ok(x) => done += x,
                                    Err(e) => {
                                        return if done > 0 { Ok(done) } else { Err(e.errno()) }
                                    }
                                }
                            }
                            Err(e) => return if done > 0 { Ok(done) } else { Err(e.errno()) },
                        }
                    }
                    return Ok(got);
                }
                if w.want_writable(sid).unwrap_or(true) {
                    continue;
                }
            }
            SState::Connecting { .. } => {}
            SState::Udp { .. } => return Err(libc::EINVAL),
            SState::Failed => {
                let e = std::mem::take(&mut k.so_error);
                return Err(if e == 0 { libc::ENOTCONN } else { e });
            }
            _ => {
                sigpipe(0);
                return Err(libc::EPIPE);
            }
        }
        if nonblock {
            return Err(libc::EAGAIN);
        }
        let (g2, woke) = block(g, dl, &mut [], None);
        g = g2;
        match woke {
            Woke::Intr if !sys::restart_after_signal() => return Err(libc::EINTR),
            Woke::Timeout => return Err(libc::EAGAIN),
            _ => {}
        }
    }
}

pub fn shutdown(fd: c_int, how: c_int) -> R<()> {
    if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
        return Err(libc::EINVAL);
    }
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    s.finish_connect(id);
    let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
    match k.state {
        SState::Connected { sid } => {
            let reset = s
                .worker
                .as_mut()
                .and_then(|w| w.ready(sid).ok())
                .is_some_and(|r| r.error.is_some());
            if reset {
                return Err(libc::ENOTCONN);
            }
            let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
            if how != libc::SHUT_WR {
                k.rd_shut = true;
            }
            let wr = how != libc::SHUT_RD && !k.wr_shut;
            if how != libc::SHUT_RD {
                k.wr_shut = true;
            }
            if wr {
                let w = s.worker()?;
                w.shutdown(sid, Shut::Write).map_err(|e| e.errno())?;
            }
            s.touch(id);
            // Threads blocked on this socket must see the change.
            s.wake_all();
            Ok(())
        }
        SState::Listening { lid, .. } if how != libc::SHUT_WR => {
            // Linux: the listener stops; a blocked accept fails with EINVAL.
            if std::mem::take(&mut k.klisten) {
                // SAFETY: the app's own fd; stops the kernel side too.
                unsafe { real::shutdown(fd, libc::SHUT_RD) };
            }
            let w = s.worker()?;
            let _ = w.unlisten(lid);
            s.set_state(id, SState::Failed);
            s.touch(id);
            s.wake_all();
            Ok(())
        }
        SState::Udp { .. } => {
            k.rd_shut |= how != libc::SHUT_WR;
            Ok(())
        }
        _ => Err(libc::ENOTCONN),
    }
}

pub fn sockname(fd: c_int, peer: bool) -> R<(SocketAddr, c_int)> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    s.finish_connect(id);
    let k = s.socks.get(&id).ok_or(libc::EBADF)?;
    let domain = k.domain;
    let (state, bound, kpeer) = (k.state, k.bound, k.peer);
    if peer {
        return match state {
            SState::Connected { sid } => {
                let w = s.worker()?;
                if w.ready(sid).is_ok_and(|r| r.error.is_some()) {
                    return Err(libc::ENOTCONN);
                }
                let a = w
                    .peer_addr(sid)
                    .ok()
                    .flatten()
                    .or(kpeer)
                    .ok_or(libc::ENOTCONN)?;
                Ok((a, domain))
            }
            SState::Udp { .. } => kpeer.map(|a| (a, domain)).ok_or(libc::ENOTCONN),
            _ => Err(libc::ENOTCONN),
        };
    }
    let a = match state {
        SState::Connected { sid } | SState::Udp { sid } => {
            let w = s.worker()?;
            w.local_addr(sid).ok().flatten().or(bound)
        }
        SState::Listening { local, .. } | SState::Dormant { local } => Some(local),
        _ => bound,
    };
    Ok((a.unwrap_or_else(|| any_addr(domain)), domain))
}

/// FIONREAD / TIOCOUTQ.
pub fn queued(fd: c_int, outq: bool) -> R<c_int> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    s.adopt(id);
    let k = s.socks.get(&id).ok_or(libc::EBADF)?;
    match k.state {
        SState::Connected { sid } | SState::Udp { sid } => {
            let w = s.worker()?;
            let n = if outq { w.unsent(sid) } else { w.nread(sid) };
            Ok(n.map_err(|e| e.errno())?.min(i32::MAX as usize) as c_int)
        }
        SState::Listening { .. } | SState::Dormant { .. } => Err(libc::EINVAL),
        _ => Ok(0),
    }
}

pub fn set_nonblock(fd: c_int, on: bool) {
    let mut g = lock();
    let s = st(&mut g);
    if let Some(id) = s.sock_of(fd) {
        if let Some(k) = s.socks.get_mut(&id) {
            k.nonblock = on;
        }
    }
}

pub fn nonblock(fd: c_int) -> Option<bool> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd)?;
    s.socks.get(&id).map(|k| k.nonblock)
}
