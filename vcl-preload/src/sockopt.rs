//! getsockopt/setsockopt on hoststack sockets. Options the stack implements
//! are applied (TCP_NODELAY, SO_KEEPALIVE with TCP_KEEPIDLE/TCP_KEEPINTVL/
//! TCP_KEEPCNT, TCP_USER_TIMEOUT, SO_LINGER,
//! SO_RCVTIMEO/SO_SNDTIMEO, SO_REUSEPORT); a documented set is accepted and
//! remembered; anything else falls back to a kernel socket when the socket
//! is still fresh, and fails with ENOPROTOOPT afterwards.

use crate::ops::Route;
use crate::real;
use crate::state::{keepalive_of, lock, st, SState, R};
use libc::c_int;
use std::time::Duration;

/// Options accepted and remembered without effect on the data path.
fn remembered(level: c_int, name: c_int) -> bool {
    match level {
        libc::SOL_SOCKET => matches!(
            name,
            libc::SO_REUSEADDR
                | libc::SO_BROADCAST
                | libc::SO_OOBINLINE
                | libc::SO_PRIORITY
                | libc::SO_RCVLOWAT
                | libc::SO_SNDLOWAT
                | libc::SO_RCVBUFFORCE
                | libc::SO_SNDBUFFORCE
                | libc::SO_TIMESTAMP
                | libc::SO_ZEROCOPY
                | libc::SO_BUSY_POLL
        ),
        libc::IPPROTO_TCP => matches!(
            name,
            libc::TCP_DEFER_ACCEPT
                | libc::TCP_QUICKACK
                | libc::TCP_CORK
                | libc::TCP_FASTOPEN
                | libc::TCP_FASTOPEN_CONNECT
                | libc::TCP_NOTSENT_LOWAT
                | libc::TCP_MAXSEG
                | libc::TCP_SYNCNT
                | libc::TCP_LINGER2
                | libc::TCP_WINDOW_CLAMP
        ),
        libc::IPPROTO_IP => matches!(
            name,
            libc::IP_TOS
                | libc::IP_TTL
                | libc::IP_RECVERR
                | libc::IP_MTU_DISCOVER
                | libc::IP_BIND_ADDRESS_NO_PORT
        ),
        libc::IPPROTO_IPV6 => matches!(
            name,
            libc::IPV6_V6ONLY | libc::IPV6_TCLASS | libc::IPV6_UNICAST_HOPS | libc::IPV6_RECVERR
        ),
        _ => false,
    }
}

fn int_of(val: &[u8]) -> R<c_int> {
    if val.len() < 4 {
        return Err(libc::EINVAL);
    }
    Ok(c_int::from_ne_bytes([val[0], val[1], val[2], val[3]]))
}

fn timeval_of(val: &[u8]) -> R<Option<Duration>> {
    if val.len() < std::mem::size_of::<libc::timeval>() {
        return Err(libc::EINVAL);
    }
    // SAFETY: length checked; timeval is plain data.
    let tv: libc::timeval =
        unsafe { std::ptr::read_unaligned(val.as_ptr() as *const libc::timeval) };
    if tv.tv_sec < 0 || !(0..1_000_000).contains(&tv.tv_usec) {
        return Err(libc::EDOM);
    }
    let d = Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
    Ok(if d.is_zero() { None } else { Some(d) })
}

/// setsockopt. On a fresh socket the kernel placeholder gets the option too,
/// which validates it exactly as Linux does.
pub fn set(fd: c_int, level: c_int, name: c_int, val: &[u8]) -> R<Route<()>> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    if level == libc::IPPROTO_TCP && s.socks[&id].stype == libc::SOCK_DGRAM {
        return Err(libc::EOPNOTSUPP);
    }
    let fresh = s.socks[&id].state == SState::Fresh;
    if (level, name) == (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        && (!fresh || s.socks[&id].bound.is_some())
    {
        // Linux: fixed once the socket has a port.
        return Err(libc::EINVAL);
    }
    let known = matches!(
        (level, name),
        (libc::SOL_SOCKET, libc::SO_REUSEPORT)
            | (libc::SOL_SOCKET, libc::SO_KEEPALIVE)
            | (libc::SOL_SOCKET, libc::SO_LINGER)
            | (libc::SOL_SOCKET, libc::SO_RCVBUF)
            | (libc::SOL_SOCKET, libc::SO_SNDBUF)
            | (libc::SOL_SOCKET, libc::SO_RCVTIMEO)
            | (libc::SOL_SOCKET, libc::SO_SNDTIMEO)
            | (libc::IPPROTO_TCP, libc::TCP_NODELAY)
            | (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)
            | (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)
            | (libc::IPPROTO_TCP, libc::TCP_KEEPCNT)
            | (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)
    ) || remembered(level, name);
    if !known {
        if fresh {
            // The stack cannot honour it: the socket stays in the kernel.
            s.to_kernel(id);
            return Ok(Route::Kernel);
        }
        return Err(libc::ENOPROTOOPT);
    }
    if fresh {
        // SAFETY: val is a valid slice.
        let r =
            unsafe { real::setsockopt(fd, level, name, val.as_ptr() as *const _, val.len() as _) };
        if r < 0 {
            return Err(crate::sys::errno());
        }
    }
    let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
    let sid = match k.state {
        SState::Connected { sid } => Some(sid),
        _ => None,
    };
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_REUSEPORT) => k.opts.reuseport = int_of(val)? != 0,
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => k.opts.reuseaddr = int_of(val)? != 0,
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE)
        | (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)
        | (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)
        | (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => {
            let v = int_of(val)?;
            // Linux's bounds (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL,
            // MAX_TCP_KEEPCNT).
            match name {
                libc::SO_KEEPALIVE => {
                    let on = v != 0;
                    if on == k.opts.keepalive {
                        return Ok(Route::Done(()));
                    }
                    k.opts.keepalive = on;
                }
                libc::TCP_KEEPIDLE | libc::TCP_KEEPINTVL if !(1..=32767).contains(&v) => {
                    return Err(libc::EINVAL)
                }
                libc::TCP_KEEPCNT if !(1..=127).contains(&v) => return Err(libc::EINVAL),
                libc::TCP_KEEPIDLE => k.opts.keepidle = v,
                libc::TCP_KEEPINTVL => k.opts.keepintvl = v,
                _ => k.opts.keepcnt = v,
            }
            // Off, or on with the new timing: one request either way (a
            // change while keepalive is off only takes effect once on).
            let ka = keepalive_of(&k.opts);
            if name == libc::SO_KEEPALIVE || ka.is_some() {
                if let (Some(sid), Ok(w)) = (sid, s.worker()) {
                    w.set_keepalive(sid, ka).map_err(|e| e.errno())?;
                }
            }
        }
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT) => {
            let v = int_of(val)?;
            if v < 0 {
                return Err(libc::EINVAL);
            }
            k.opts.user_timeout_ms = v;
            if let (Some(sid), Ok(w)) = (sid, s.worker()) {
                let t = (v > 0).then(|| Duration::from_millis(v as u64));
                w.set_user_timeout(sid, t).map_err(|e| e.errno())?;
            }
        }
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => {
            let on = int_of(val)? != 0;
            let changed = on != k.opts.nodelay;
            k.opts.nodelay = on;
            // nginx sets it on every keep-alive turn: only a change costs a
            // request to the daemon.
            if let (Some(sid), true, Ok(w)) = (sid, changed, s.worker()) {
                w.set_nodelay(sid, on).map_err(|e| e.errno())?;
            }
        }
        // Around every response with `tcp_nopush on` (nginx): a flag, no
        // allocation. The daemon already sends what a batch wrote at once.
        (libc::IPPROTO_TCP, libc::TCP_CORK) => k.opts.cork = int_of(val)? != 0,
        (libc::SOL_SOCKET, libc::SO_LINGER) => {
            if val.len() < std::mem::size_of::<libc::linger>() {
                return Err(libc::EINVAL);
            }
            // SAFETY: length checked; linger is plain data.
            k.opts.linger =
                Some(unsafe { std::ptr::read_unaligned(val.as_ptr() as *const libc::linger) });
        }
        (libc::SOL_SOCKET, libc::SO_RCVBUF) | (libc::SOL_SOCKET, libc::SO_SNDBUF) => {
            // Linux doubles the value (bookkeeping overhead) with a floor.
            let v = int_of(val)?.max(0).saturating_mul(2);
            if name == libc::SO_RCVBUF {
                k.opts.rcvbuf = v.max(2304);
            } else {
                k.opts.sndbuf = v.max(4608);
            }
        }
        (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => k.opts.rcvtimeo = timeval_of(val)?,
        (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => k.opts.sndtimeo = timeval_of(val)?,
        _ => {
            if val.len() > 256 {
                return Err(libc::EINVAL);
            }
            k.opts.other.insert((level, name), val.to_vec());
        }
    }
    Ok(Route::Done(()))
}

fn put_int(v: c_int) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// getsockopt: the option's bytes (the caller truncates to the app's length).
pub fn get(fd: c_int, level: c_int, name: c_int) -> R<Vec<u8>> {
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    s.finish_connect(id);
    if level == libc::IPPROTO_TCP && s.socks[&id].stype == libc::SOCK_DGRAM {
        return Err(libc::EOPNOTSUPP);
    }
    // A pending reset is the socket error until reported once.
    if let (libc::SOL_SOCKET, libc::SO_ERROR) = (level, name) {
        let k = &s.socks[&id];
        if let (SState::Connected { sid }, 0, false) = (k.state, k.so_error, k.reset_seen) {
            let err = s
                .worker
                .as_mut()
                .and_then(|w| w.ready(sid).ok())
                .and_then(|r| r.error);
            if let Some(e) = err {
                if let Some(k) = s.socks.get_mut(&id) {
                    k.reset_seen = true;
                }
                return Ok(put_int(e));
            }
        }
        // A connected UDP socket's ICMP error: reported (and cleared) once.
        if let (SState::Udp { sid }, 0) = (k.state, k.so_error) {
            if let Some(Ok(Some(e))) = s.worker.as_mut().map(|w| w.take_soft_error(sid)) {
                return Ok(put_int(e));
            }
        }
    }
    let k = s.socks.get_mut(&id).ok_or(libc::EBADF)?;
    let tv = |d: Option<Duration>| {
        let d = d.unwrap_or_default();
        let t = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: timeval is plain data.
        unsafe {
            std::slice::from_raw_parts(
                &t as *const _ as *const u8,
                std::mem::size_of::<libc::timeval>(),
            )
        }
        .to_vec()
    };
    let b = |v: bool| put_int(v as c_int);
    Ok(match (level, name) {
        (libc::SOL_SOCKET, libc::SO_TYPE) => put_int(k.stype),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => put_int(k.domain),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => put_int(if k.stype == libc::SOCK_STREAM {
            libc::IPPROTO_TCP
        } else {
            libc::IPPROTO_UDP
        }),
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => b(matches!(
            k.state,
            SState::Listening { .. } | SState::Dormant { .. }
        )),
        (libc::SOL_SOCKET, libc::SO_ERROR) => put_int(std::mem::take(&mut k.so_error)),
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => b(k.opts.reuseaddr),
        (libc::SOL_SOCKET, libc::SO_REUSEPORT) => b(k.opts.reuseport),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => b(k.opts.keepalive),
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => put_int(k.opts.rcvbuf),
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => put_int(k.opts.sndbuf),
        (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => tv(k.opts.rcvtimeo),
        (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => tv(k.opts.sndtimeo),
        (libc::SOL_SOCKET, libc::SO_LINGER) => {
            let l = k.opts.linger.unwrap_or(libc::linger {
                l_onoff: 0,
                l_linger: 0,
            });
            let mut v = put_int(l.l_onoff);
            v.extend_from_slice(&l.l_linger.to_ne_bytes());
            v
        }
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => b(k.opts.nodelay),
        (libc::IPPROTO_TCP, libc::TCP_CORK) => b(k.opts.cork),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => put_int(k.opts.keepalive_times().0),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => put_int(k.opts.keepalive_times().1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => put_int(k.opts.keepalive_times().2),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT) => put_int(k.opts.user_timeout_ms),
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG) if !k.opts.other.contains_key(&(level, name)) => {
            put_int(1448)
        }
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => b"cubic\0".to_vec(),
        (libc::IPPROTO_TCP, libc::TCP_INFO) => {
            // SAFETY: tcp_info is plain data; zeroed is valid.
            let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
            ti.tcpi_state = match k.state {
                SState::Connected { .. } => 1,  // TCP_ESTABLISHED
                SState::Connecting { .. } => 2, // TCP_SYN_SENT
                SState::Listening { .. } | SState::Dormant { .. } => 10,
                _ => 7, // TCP_CLOSE
            };
            ti.tcpi_snd_mss = 1448;
            ti.tcpi_rcv_mss = 1448;
            ti.tcpi_pmtu = 1500;
            ti.tcpi_snd_cwnd = 10;
            ti.tcpi_rtt = 100;
            // SAFETY: as above.
            unsafe {
                std::slice::from_raw_parts(
                    &ti as *const _ as *const u8,
                    std::mem::size_of::<libc::tcp_info>(),
                )
            }
            .to_vec()
        }
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if !k.opts.other.contains_key(&(level, name)) => {
            b(false)
        }
        (libc::IPPROTO_IP, libc::IP_TTL) | (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
            if !k.opts.other.contains_key(&(level, name)) =>
        {
            put_int(64)
        }
        _ => match k.opts.other.get(&(level, name)) {
            Some(v) => v.clone(),
            None if remembered(level, name) => put_int(0),
            None => return Err(libc::ENOPROTOOPT),
        },
    })
}
