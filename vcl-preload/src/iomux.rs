//! epoll, poll and select over a mix of kernel fds and hoststack sockets.
//!
//! Kernel fds stay in the kernel's own sets. For an epoll instance with
//! hoststack entries, the kernel set also holds the instance's own wake
//! channel eventfd (or, without one, the worker's wake eventfd), the
//! attach socket and a per-instance eventfd (tagged with
//! [`MAGIC`] data), so `epoll_wait` blocks in the
//! kernel exactly once when nothing is ready: no busy loop, signals
//! interrupt it, timeouts are the kernel's. Hoststack readiness is kept as a
//! ready list per instance (level, edge and one-shot semantics as Linux).

use crate::real;
use crate::state::{
    block, is_bypass, is_epoll, lock, st, Reg, SState, State, Woke, G, MAGIC, MAGIC_CHAN,
    MAGIC_CTRL, MAGIC_MQ, MAGIC_WAKE, R, REATTACH_EVERY,
};
use crate::sys::{self, efd_drain, efd_signal};
use libc::{c_int, epoll_event, pollfd};
use std::time::{Duration, Instant};

const ERR_HUP: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// A listener becomes "used" (and is woken if dormant) when the app waits on it.
fn touch_listener(s: &mut State, id: u64) -> R<()> {
    s.wake_listener(id)?;
    if let Some(k) = s.socks.get_mut(&id) {
        if matches!(k.state, SState::Listening { .. }) {
            k.used = true;
        }
    }
    Ok(())
}

/// epoll_ctl for a hoststack socket `fd`.
pub fn ctl(epfd: c_int, op: c_int, fd: c_int, ev: Option<epoll_event>) -> R<()> {
    if epfd == fd {
        return Err(libc::EINVAL);
    }
    let mut g = lock();
    let s = st(&mut g);
    let id = s.sock_of(fd).ok_or(libc::EBADF)?;
    if !s.eps.contains_key(&epfd) {
        let wake = s.ep_new(epfd).wake;
        // Adding the instance's eventfd checks that epfd is an epoll fd.
        let mut e = epoll_event {
            events: libc::EPOLLIN as u32,
            u64: MAGIC_WAKE,
        };
        // SAFETY: valid epoll_event.
        if unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, wake, &mut e) } < 0 {
            let err = sys::errno();
            s.ep_close(epfd);
            return Err(err);
        }
        if let Some(ep) = s.eps.get_mut(&epfd) {
            ep.magic_gen = 0;
        }
    }
    if op != libc::EPOLL_CTL_DEL {
        touch_listener(s, id)?;
    }
    if s.socks.get(&id).is_some_and(|k| k.klisten) {
        // Kernel clients of the listener's kernel side: the kernel set
        // watches the placeholder itself, with the app's data.
        let mut e = ev.unwrap_or(epoll_event { events: 0, u64: 0 });
        // SAFETY: valid epoll_event; errors (ENOENT/EEXIST) are harmless here.
        unsafe { real::epoll_ctl(epfd, op, fd, &mut e) };
    }
    s.ep_arm(epfd);
    let ep = s.eps.get_mut(&epfd).ok_or(libc::EBADF)?;
    match op {
        libc::EPOLL_CTL_ADD => {
            let ev = ev.ok_or(libc::EFAULT)?;
            if ep.regs.contains_key(&fd) {
                return Err(libc::EEXIST);
            }
            ep.regs.insert(
                fd,
                Reg {
                    sock: id,
                    events: ev.events,
                    data: ev.u64,
                    queued: false,
                    disabled: false,
                },
            );
            if let Some(k) = s.socks.get_mut(&id) {
                k.regs.push((epfd, fd));
            }
            s.touch(id);
        }
        libc::EPOLL_CTL_MOD => {
            let ev = ev.ok_or(libc::EFAULT)?;
            if ev.events & libc::EPOLLEXCLUSIVE as u32 != 0 {
                return Err(libc::EINVAL);
            }
            let r = ep.regs.get_mut(&fd).ok_or(libc::ENOENT)?;
            if r.events & libc::EPOLLEXCLUSIVE as u32 != 0 {
                return Err(libc::EINVAL);
            }
            r.events = ev.events;
            r.data = ev.u64;
            r.disabled = false;
            s.touch(id);
        }
        libc::EPOLL_CTL_DEL => {
            ep.regs.remove(&fd).ok_or(libc::ENOENT)?;
            ep.ready.retain(|&f| f != fd);
            if let Some(k) = s.socks.get_mut(&id) {
                k.regs.retain(|&(e, f)| !(e == epfd && f == fd));
            }
        }
        _ => return Err(libc::EINVAL),
    }
    if op != libc::EPOLL_CTL_MOD {
        s.sync_chan(id);
    }
    Ok(())
}

/// An emulated epoll fd is being put into another poll set: keep its
/// eventfd signalled while it has ready hoststack entries.
pub fn mark_nested(epfd: c_int) {
    let mut g = lock();
    let s = st(&mut g);
    s.pump();
    s.any_nested = true;
    prune_ready(s, epfd);
    if let Some(ep) = s.eps.get_mut(&epfd) {
        let first = !ep.nested;
        ep.nested = true;
        if !ep.ready.is_empty() && !ep.signaled {
            ep.signaled = true;
            efd_signal(ep.wake);
        }
        if first && ep.chan.is_some() {
            // Waiters of the outer set must hear about this instance's
            // sockets: back to the worker's eventfd and "any sleeper".
            ep.magic_gen = 0;
            let ids: Vec<u64> = ep.regs.values().map(|r| r.sock).collect();
            s.ep_arm(epfd);
            for id in ids {
                s.sync_chan(id);
            }
        }
    }
}

/// An emulated instance went into the set `outer` (see
/// [`State::ep_mark_outer`]).
pub fn mark_outer(outer: c_int) {
    let mut g = lock();
    st(&mut g).ep_mark_outer(outer);
}

/// Drop entries of `epfd`'s ready list that are no longer ready (a
/// level-triggered socket stays queued after it is reported; the app may
/// have read it dry since). A nested instance's eventfd must say "ready"
/// only while something is: the outer set reports the instance itself.
fn prune_ready(s: &mut State, epfd: c_int) {
    let Some(ep) = s.eps.get(&epfd) else { return };
    let queued: Vec<c_int> = ep.ready.iter().copied().collect();
    let mut keep = Vec::with_capacity(queued.len());
    for fd in queued {
        let Some(&Reg {
            sock,
            events,
            disabled: false,
            ..
        }) = s.eps.get(&epfd).and_then(|e| e.regs.get(&fd))
        else {
            continue;
        };
        if s.events_of(sock, events & libc::EPOLLOUT as u32 != 0) & (events | ERR_HUP) != 0 {
            keep.push(fd);
        }
    }
    let Some(ep) = s.eps.get_mut(&epfd) else {
        return;
    };
    for fd in ep.ready.drain(..) {
        if let Some(r) = ep.regs.get_mut(&fd) {
            r.queued = false;
        }
    }
    for fd in keep {
        if let Some(r) = ep.regs.get_mut(&fd) {
            if !r.queued {
                r.queued = true;
                ep.ready.push_back(fd);
            }
        }
    }
    if ep.nested && ep.signaled && ep.ready.is_empty() {
        ep.signaled = false;
        efd_drain(ep.wake);
    }
}

/// Before any wait: nested instances whose eventfd is signalled only for
/// entries that went stale stop looking readable to their outer set.
fn refresh_nested(s: &mut State) {
    if !s.any_nested {
        return;
    }
    let stale: Vec<c_int> = s
        .eps
        .iter()
        .filter(|(_, e)| e.nested && e.signaled)
        .map(|(fd, _)| *fd)
        .collect();
    for epfd in stale {
        prune_ready(s, epfd);
    }
}

/// Report ready hoststack entries of `epfd` into `out`.
fn collect(s: &mut State, epfd: c_int, out: &mut [epoll_event]) -> usize {
    let mut n = 0;
    let mut requeue = Vec::new();
    let len = s.eps.get(&epfd).map_or(0, |e| e.ready.len());
    for _ in 0..len {
        if n == out.len() {
            break;
        }
        let Some(ep) = s.eps.get_mut(&epfd) else {
            break;
        };
        let Some(fd) = ep.ready.pop_front() else {
            break;
        };
        let Some(r) = ep.regs.get_mut(&fd) else {
            continue;
        };
        r.queued = false;
        if r.disabled {
            continue;
        }
        let (sock, events, data) = (r.sock, r.events, r.data);
        let mask = s.events_of(sock, events & libc::EPOLLOUT as u32 != 0) & (events | ERR_HUP);
        if mask == 0 {
            continue;
        }
        out[n] = epoll_event {
            events: mask,
            u64: data,
        };
        n += 1;
        if events & libc::EPOLLET as u32 != 0 && mask & libc::EPOLLIN as u32 != 0 {
            // Edge-triggered: the next arrival must report again even if
            // this data stays unread.
            if let Some(SState::Connected { sid } | SState::Udp { sid }) =
                s.socks.get(&sock).map(|k| k.state)
            {
                if let Some(w) = s.worker.as_mut() {
                    let _ = w.rearm_rx(sid);
                }
            }
        }
        let Some(ep) = s.eps.get_mut(&epfd) else {
            break;
        };
        if let Some(r) = ep.regs.get_mut(&fd) {
            if events & libc::EPOLLONESHOT as u32 != 0 {
                r.disabled = true;
            } else if events & libc::EPOLLET as u32 == 0 {
                r.queued = true;
                requeue.push(fd);
            }
        }
    }
    if let Some(ep) = s.eps.get_mut(&epfd) {
        ep.ready.extend(requeue);
        if ep.nested {
            if !ep.ready.is_empty() && !ep.signaled {
                ep.signaled = true;
                efd_signal(ep.wake);
            } else if ep.ready.is_empty() && ep.signaled {
                ep.signaled = false;
                efd_drain(ep.wake);
            }
        }
    }
    n
}

/// Drop the shim's own entries from kernel results, acting on them.
fn filter_magic(s: &mut State, epfd: c_int, ev: &mut [epoll_event], n: usize) -> usize {
    let (mut mq, mut ctrl) = (false, false);
    let mut k = 0;
    for i in 0..n {
        let d = ev[i].u64;
        if d & !0xffff == MAGIC && d & 0xffff <= 4 {
            match d {
                MAGIC_MQ => mq = true,
                MAGIC_CTRL => ctrl = true,
                MAGIC_CHAN => {
                    if let Some(c) = s.eps.get(&epfd).and_then(|ep| ep.chan.as_ref()) {
                        efd_drain(c.efd);
                    }
                }
                MAGIC_WAKE => {
                    if let Some(ep) = s.eps.get_mut(&epfd) {
                        efd_drain(ep.wake);
                        ep.signaled = false;
                    }
                }
                _ => {}
            }
            continue;
        }
        ev[k] = ev[i];
        k += 1;
    }
    if mq || ctrl {
        if let Some(w) = s.worker.as_mut() {
            if w.after_wake(mq, ctrl).is_err() {
                // The daemon is gone: its fds would stay readable (HUP)
                // forever; take them out of this set. Calls on hoststack
                // sockets now fail (ENETDOWN), kernel fds keep working.
                for fd in w.wait_fds() {
                    // SAFETY: removing our own fds from the app's epoll set.
                    unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                }
                s.daemon_gone = true;
            }
        }
    }
    k
}

fn kernel_wait(
    epfd: c_int,
    out: &mut [epoll_event],
    timeout: c_int,
    sig: Option<&libc::sigset_t>,
) -> (c_int, c_int) {
    // SAFETY: out is a valid array of out.len() events.
    let r = unsafe {
        real::epoll_pwait(
            epfd,
            out.as_mut_ptr(),
            out.len() as c_int,
            timeout,
            sig.map_or(std::ptr::null(), |p| p as *const _),
        )
    };
    (r, sys::errno())
}

/// epoll_wait/epoll_pwait on an instance with hoststack entries.
pub fn wait(
    epfd: c_int,
    out: &mut [epoll_event],
    deadline: Option<Instant>,
    zero: bool,
    sig: Option<&libc::sigset_t>,
) -> R<usize> {
    let (r, g) = wait_inner(epfd, out, deadline, zero, sig);
    // Between this return and the app's next epoll_wait it handles the
    // events: requests it makes meanwhile wake the daemon once, at the
    // next wait (one wake-up per batch, not per request; a blocking call
    // or any other wait flushes too). Done under the lock the wait still
    // holds (one lock round per call).
    let mut g = g.unwrap_or_else(lock);
    if let Some(w) = st(&mut g).worker.as_mut() {
        w.set_defer_wake(matches!(r, Ok(n) if n > 0));
    }
    r
}

/// While hoststack sockets keep an instance busy, look at its kernel fds
/// (a real, non-blocking `epoll_wait`: one syscall) only on every 8th wait
/// or once a millisecond has passed since the last look. A kernel fd that
/// is ready meanwhile waits at most that long; a wait with no hoststack
/// events always asks the kernel.
fn skip_kernel_poll(s: &mut State, epfd: c_int) -> bool {
    const EVERY: u32 = 8;
    const MAX_AGE: std::time::Duration = std::time::Duration::from_millis(1);
    let Some(ep) = s.eps.get_mut(&epfd) else {
        return false;
    };
    let now = Instant::now();
    let fresh = ep
        .kernel_polled
        .is_some_and(|t| now.duration_since(t) < MAX_AGE);
    if fresh && ep.kernel_skips + 1 < EVERY {
        ep.kernel_skips += 1;
        return true;
    }
    ep.kernel_skips = 0;
    ep.kernel_polled = Some(now);
    false
}

fn wait_inner(
    epfd: c_int,
    out: &mut [epoll_event],
    deadline: Option<Instant>,
    zero: bool,
    sig: Option<&libc::sigset_t>,
) -> (R<usize>, Option<G>) {
    let mut g: G = lock();
    loop {
        let s = st(&mut g);
        s.try_reattach();
        s.pump();
        refresh_nested(s);
        if !s.eps.contains_key(&epfd) {
            drop(g);
            let t = if zero { 0 } else { sys::ms_left(deadline) };
            let (r, e) = kernel_wait(epfd, out, t, sig);
            return (if r < 0 { Err(e) } else { Ok(r as usize) }, None);
        }
        s.ep_arm(epfd);
        let n = collect(s, epfd, out);
        let expired = zero || deadline.is_some_and(|d| Instant::now() >= d);
        if n > 0 && !expired && skip_kernel_poll(s, epfd) {
            return (Ok(n), Some(g));
        }
        if n > 0 || expired {
            // Kernel fds too, without blocking.
            let (r, e) = kernel_wait(epfd, &mut out[n..], 0, None);
            if r < 0 {
                return (if n > 0 { Ok(n) } else { Err(e) }, Some(g));
            }
            let k = filter_magic(s, epfd, &mut out[n..], r as usize);
            if k == 0 && n == 0 && !expired {
                continue;
            }
            return (Ok(n + k), Some(g));
        }
        // Sleep on the instance's own channel when it has one: only events
        // of its sockets wake it.
        let chan = s.ep_chan(epfd);
        let alone = s.eps.get(&epfd).is_none_or(|e| e.chan_sleepers == 0);
        let sleepers_ok = s.worker.as_mut().is_none_or(|w| match chan {
            Some(c) => {
                let ok = w.prepare_sleep_channel(c);
                if !ok && alone {
                    w.cancel_sleep_channel(c);
                }
                ok
            }
            None => w.prepare_sleep(),
        });
        if !sleepers_ok {
            continue;
        }
        let wake = s.eps.get(&epfd).map_or(-1, |e| e.wake);
        // With the daemon gone, wake up now and then to look for a new one.
        let mut t = sys::ms_left(deadline);
        if s.daemon_gone {
            let cap = REATTACH_EVERY.as_millis() as c_int;
            t = if t < 0 { cap } else { t.min(cap) };
        }
        s.sleep_begin(wake, epfd, chan);
        drop(g);
        let (r, e) = kernel_wait(epfd, out, t, sig);
        g = lock();
        let s = st(&mut g);
        s.sleep_end(wake, epfd, chan);
        if r < 0 {
            return (Err(e), Some(g));
        }
        let k = filter_magic(s, epfd, out, r as usize);
        s.pump();
        let n = collect(s, epfd, &mut out[k..]);
        if k + n > 0 {
            return (Ok(k + n), Some(g));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return (Ok(0), Some(g));
        }
    }
}

fn epoll_to_poll(m: u32) -> i16 {
    // EPOLLIN/PRI/OUT/ERR/HUP/RDHUP share POLL* values.
    let mut p = (m & 0x201f) as i16;
    if m & libc::EPOLLIN as u32 != 0 {
        p |= libc::POLLRDNORM;
    }
    if m & libc::EPOLLOUT as u32 != 0 {
        p |= libc::POLLWRNORM;
    }
    p
}

/// poll/ppoll over mixed fds.
pub fn poll(
    fds: &mut [pollfd],
    deadline: Option<Instant>,
    zero: bool,
    sig: Option<&libc::sigset_t>,
) -> R<usize> {
    for p in fds.iter() {
        if is_epoll(p.fd) {
            mark_nested(p.fd);
        }
    }
    let mut g = lock();
    // Kernel fds, plus the kernel side of listening hoststack sockets.
    let klisten: Vec<usize> = {
        let s = st(&mut g);
        (0..fds.len())
            .filter(|&i| {
                is_bypass(fds[i].fd)
                    && s.sock_of(fds[i].fd)
                        .and_then(|id| s.socks.get(&id))
                        .is_some_and(|k| k.klisten)
            })
            .collect()
    };
    let kidx: Vec<usize> = (0..fds.len())
        .filter(|&i| !is_bypass(fds[i].fd))
        .chain(klisten.iter().copied())
        .collect();
    let mut kfds: Vec<pollfd> = kidx
        .iter()
        .map(|&i| pollfd {
            fd: fds[i].fd,
            events: fds[i].events,
            revents: 0,
        })
        .collect();
    loop {
        let s = st(&mut g);
        s.try_reattach();
        s.pump();
        let mut n = 0;
        for p in fds.iter_mut() {
            if !is_bypass(p.fd) {
                continue;
            }
            p.revents = 0;
            let Some(id) = s.sock_of(p.fd) else {
                p.revents = libc::POLLNVAL;
                n += 1;
                continue;
            };
            touch_listener(s, id)?;
            let want = (p.events as u16 as u32) | ERR_HUP;
            let m = s.events_of(id, p.events & (libc::POLLOUT | libc::POLLWRNORM) != 0);
            let r = epoll_to_poll(m)
                & (want as i16 | libc::POLLRDNORM | libc::POLLWRNORM)
                & (p.events | ERR_HUP as i16);
            p.revents = r;
            if r != 0 {
                n += 1;
            }
        }
        let expired = zero || deadline.is_some_and(|d| Instant::now() >= d);
        if n > 0 || expired {
            for k in kfds.iter_mut() {
                k.revents = 0;
            }
            if !kfds.is_empty() {
                drop(g);
                // SAFETY: kfds is a valid array.
                let r = unsafe {
                    real::ppoll(
                        kfds.as_mut_ptr(),
                        kfds.len() as _,
                        &libc::timespec {
                            tv_sec: 0,
                            tv_nsec: 0,
                        },
                        std::ptr::null(),
                    )
                };
                if r < 0 && n == 0 {
                    return Err(sys::errno());
                }
                g = lock();
            }
            for (j, &i) in kidx.iter().enumerate() {
                if is_bypass(fds[i].fd) {
                    // A listener's kernel side adds to its hoststack readiness.
                    fds[i].revents |= kfds[j].revents & libc::POLLIN;
                } else {
                    fds[i].revents = kfds[j].revents;
                }
            }
            drop(g);
            n = fds.iter().filter(|p| p.revents != 0).count();
            return Ok(n);
        }
        let (g2, woke) = block(g, deadline, &mut kfds, sig);
        g = g2;
        let mut kn = kfds.iter().filter(|p| p.revents != 0).count();
        match woke {
            Woke::Intr => return Err(libc::EINTR),
            Woke::Timeout if kn == 0 => {
                // One last look at hoststack sockets.
                continue;
            }
            _ => {}
        }
        if kn > 0 {
            // Kernel fds fired: add whatever hoststack sockets are ready now.
            let s = st(&mut g);
            for p in fds.iter_mut() {
                if is_bypass(p.fd) {
                    if let Some(id) = s.sock_of(p.fd) {
                        let m = s.events_of(id, false);
                        p.revents = epoll_to_poll(m) & (p.events | ERR_HUP as i16);
                    }
                }
            }
            for (j, &i) in kidx.iter().enumerate() {
                if is_bypass(fds[i].fd) {
                    fds[i].revents |= kfds[j].revents & libc::POLLIN;
                } else {
                    fds[i].revents = kfds[j].revents;
                }
            }
            kn = fds.iter().filter(|p| p.revents != 0).count();
            return Ok(kn);
        }
    }
}

/// Does any fd in the select sets belong to hoststack?
pub fn sets_have_bypass(nfds: c_int, sets: [*mut libc::fd_set; 3]) -> bool {
    for fd in 0..nfds.max(0) {
        if !is_bypass(fd) && !is_epoll(fd) {
            continue;
        }
        for set in sets {
            // SAFETY: the app passes sets of at least nfds bits.
            if !set.is_null() && unsafe { libc::FD_ISSET(fd, set) } {
                return true;
            }
        }
    }
    false
}

/// select/pselect via [`poll`].
pub fn select(
    nfds: c_int,
    sets: [*mut libc::fd_set; 3],
    deadline: Option<Instant>,
    zero: bool,
    sig: Option<&libc::sigset_t>,
) -> R<usize> {
    if nfds < 0 {
        return Err(libc::EINVAL);
    }
    let mut pfds = Vec::new();
    for fd in 0..nfds {
        let mut ev = 0;
        // SAFETY: as above.
        unsafe {
            if !sets[0].is_null() && libc::FD_ISSET(fd, sets[0]) {
                ev |= libc::POLLIN;
            }
            if !sets[1].is_null() && libc::FD_ISSET(fd, sets[1]) {
                ev |= libc::POLLOUT;
            }
            if !sets[2].is_null() && libc::FD_ISSET(fd, sets[2]) {
                ev |= libc::POLLPRI;
            }
        }
        if ev != 0 {
            pfds.push(pollfd {
                fd,
                events: ev,
                revents: 0,
            });
        }
    }
    poll(&mut pfds, deadline, zero, sig)?;
    if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        return Err(libc::EBADF);
    }
    let mut n = 0;
    for set in sets {
        if !set.is_null() {
            // SAFETY: as above.
            unsafe { libc::FD_ZERO(set) };
        }
    }
    for p in &pfds {
        // SAFETY: as above.
        unsafe {
            if p.events & libc::POLLIN != 0
                && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            {
                libc::FD_SET(p.fd, sets[0]);
                n += 1;
            }
            if p.events & libc::POLLOUT != 0 && p.revents & (libc::POLLOUT | libc::POLLERR) != 0 {
                libc::FD_SET(p.fd, sets[1]);
                n += 1;
            }
            if p.events & libc::POLLPRI != 0 && p.revents & libc::POLLPRI != 0 {
                libc::FD_SET(p.fd, sets[2]);
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Deadline from a millisecond timeout (<0 = forever).
pub fn deadline_ms(ms: c_int) -> (Option<Instant>, bool) {
    if ms < 0 {
        (None, false)
    } else {
        (
            Some(Instant::now() + Duration::from_millis(ms as u64)),
            ms == 0,
        )
    }
}

/// Deadline from a timespec pointer (null = forever).
///
/// # Safety
/// `ts` is null or valid.
pub unsafe fn deadline_ts(ts: *const libc::timespec) -> R<(Option<Instant>, bool)> {
    if ts.is_null() {
        return Ok((None, false));
    }
    let t = &*ts;
    if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
        return Err(libc::EINVAL);
    }
    let d = Duration::new(t.tv_sec as u64, t.tv_nsec as u32);
    Ok((Some(Instant::now() + d), d.is_zero()))
}
