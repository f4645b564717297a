//! The shim's per-process state: one hoststack worker, the table of bypass
//! sockets keyed by their placeholder fds, the emulated epoll instances,
//! and the wait/wake protocol shared by every blocking call.
//!
//! Locking: one process-wide lock ([`STATE`]). Calls never sleep while
//! holding it: a thread that must wait announces itself (the worker's
//! sleep flag plus its own eventfd in `waiters`), releases the lock and
//! blocks in the kernel on the worker's wake eventfd, the attach socket,
//! its own eventfd and whatever kernel fds the call also waits for. Whoever
//! drains daemon events later signals the waiters, so no wake-up is lost
//! and no thread spins.

use crate::config::Config;
use crate::real;
use crate::sys::{self, efd_drain, efd_signal, Guard, Lock};
use libc::c_int;
use session_api::client::{
    App, AttachConfig, ConnectToken, Error as ApiError, ListenerId, Notify, SessionId, Worker,
};
use session_api::fasthash::{FastMap, FastSet};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// SO_RCVBUF/SO_SNDBUF reported until the app sets them (the daemon's
/// default FIFO size).
pub const DEFAULT_SOCKBUF: c_int = 256 * 1024;

/// errno-carrying result.
pub type R<T> = Result<T, c_int>;

/// Highest fd number the shim tracks; sockets above it stay in the kernel.
pub const MAX_FD: usize = 1 << 20;

static BYPASS: [AtomicBool; MAX_FD] = [const { AtomicBool::new(false) }; MAX_FD];
static EPOLL: [AtomicBool; MAX_FD] = [const { AtomicBool::new(false) }; MAX_FD];

/// This process's pid, noted when the library loads and in every fork
/// child: a hook that sees another pid runs in a vfork child.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Note the current pid (library load, fork child).
pub fn note_pid() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

/// Is `fd` a hoststack socket? (lock-free fast path for every hooked call)
#[inline]
pub fn is_bypass(fd: c_int) -> bool {
    flag(&BYPASS, fd)
}

/// Is `fd` an epoll instance the shim emulates bypass entries for?
#[inline]
pub fn is_epoll(fd: c_int) -> bool {
    flag(&EPOLL, fd)
}

/// Descriptors the shim keeps for itself (daemon socket, eventfds, segment
/// memfds): an app that closes every fd it does not know (daemons,
/// sandboxes: a close() loop, closefrom, close_range) must not close them,
/// or their numbers would be reused under the shim (an eventfd signal would
/// then write 8 bytes into the app's file).
static OWN: [AtomicBool; MAX_FD] = [const { AtomicBool::new(false) }; MAX_FD];
/// One past the highest fd ever marked in [`OWN`] (bounds range scans).
static OWN_END: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Is `fd` one of the shim's own descriptors?
#[inline]
pub fn is_own(fd: c_int) -> bool {
    flag(&OWN, fd)
}

/// One past the highest descriptor that may be the shim's own.
pub fn own_end() -> usize {
    OWN_END.load(Ordering::Relaxed)
}

/// Lowest number for the shim's own descriptors: half the soft fd limit,
/// at most 1024, so they stay out of the low numbers apps expect from
/// open() and pass to dup2 (and out of select()'s range when the limit
/// allows).
fn own_floor() -> c_int {
    // SAFETY: getrlimit writes one rlimit we own.
    let soft = unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 3;
        }
        rl.rlim_cur.min(MAX_FD as u64) as c_int
    };
    (soft / 2).clamp(3, 1024)
}

/// Take `fd` (fresh, ours) as one of the shim's own: moved to
/// `own_floor()` or above when there is room, close-on-exec, and marked so
/// the app's close calls leave it alone. Returns the number to use.
pub fn place_own(fd: c_int) -> c_int {
    if fd < 0 || fd as usize >= MAX_FD {
        return fd;
    }
    let floor = own_floor();
    let mut fd = fd;
    if fd < floor {
        // SAFETY: plain fcntl on our own descriptor; the result is checked.
        let n = unsafe { real::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor as usize) };
        if n >= 0 && (n as usize) < MAX_FD {
            // SAFETY: the original, now duplicated; nobody else holds it.
            unsafe { real::close(fd) };
            fd = n;
        } else if n >= 0 {
            // SAFETY: the dup we just made, unusable above MAX_FD.
            unsafe { real::close(n) };
        }
    }
    set_flag(&OWN, fd, true);
    OWN_END.fetch_max(fd as usize + 1, Ordering::Relaxed);
    fd
}

/// [`place_own`] for the client library's descriptors.
pub fn place_own_fd(fd: std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let n = place_own(fd.into_raw_fd());
    // SAFETY: `place_own` returns the descriptor it was given, or a dup of
    // it after closing the original: either way one we own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(n) }
}

/// Close one of the shim's own descriptors.
pub fn close_own(fd: c_int) -> c_int {
    set_flag(&OWN, fd, false);
    // SAFETY: our descriptor; forgotten above before its number is free.
    unsafe { real::close(fd) }
}

/// A close-on-exec, non-blocking eventfd of the shim's own.
fn own_eventfd() -> c_int {
    place_own(sys::eventfd())
}

#[inline]
fn flag(t: &[AtomicBool; MAX_FD], fd: c_int) -> bool {
    fd >= 0 && (fd as usize) < MAX_FD && t[fd as usize].load(Ordering::Relaxed)
}

fn set_flag(t: &[AtomicBool; MAX_FD], fd: c_int, v: bool) {
    if fd >= 0 && (fd as usize) < MAX_FD {
        t[fd as usize].store(v, Ordering::Relaxed);
    }
}

/// Settings from the environment, read when the library is loaded:
/// programs may clear their environment later (nginx does in its workers).
pub struct Env {
    pub cfg: Config,
    pub attach: AttachConfig,
}

static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();

pub fn env() -> &'static Env {
    ENV.get_or_init(|| Env {
        cfg: Config::from_env(),
        attach: AttachConfig::from_env("app"),
    })
}

/// The process-wide state.
pub static STATE: Lock<Option<State>> = Lock::new(None);

pub type G = Guard<'static, Option<State>>;

/// Lock the state, creating it on first use.
pub fn lock() -> G {
    let mut g = STATE.lock();
    if g.is_none() {
        *g = Some(State::new());
    }
    g
}

pub fn st(g: &mut G) -> &mut State {
    g.as_mut().expect("state initialised by lock()")
}

/// Wait until the daemon has handled what this worker sent so far (a bind
/// check of `addr` queued behind it is answered), at most 1 s: close()
/// should not hang on a wedged daemon.
fn close_barrier(w: &mut Worker, addr: SocketAddr) {
    w.set_reply_timeout(Duration::from_secs(1));
    let _ = w.bind_check(addr, 0);
    w.set_reply_timeout(session_api::client::REPLY_TIMEOUT);
}

/// The name an app attaches under: `program[pid]`.
fn app_name() -> String {
    let prog = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "app".into());
    format!("{prog}[{}]", std::process::id())
}

/// How often a process whose daemon died looks for a new one (and the
/// longest it sleeps in one wait meanwhile).
pub const REATTACH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SState {
    /// Created, not yet bound to a transport: may still fall back to the kernel.
    Fresh,
    Listening {
        lid: ListenerId,
        local: SocketAddr,
    },
    /// A listener this process does not serve (yet): re-created on first use
    /// (after fork: nginx's master keeps it, its workers serve it).
    Dormant {
        local: SocketAddr,
    },
    Connecting {
        token: ConnectToken,
    },
    Connected {
        sid: SessionId,
    },
    Udp {
        sid: SessionId,
    },
    /// Connect failed (`so_error`).
    Failed,
    /// A connection inherited over fork: still the parent's session; the
    /// first use in this process adopts it ([`State::adopt`]).
    Inherited {
        handle: u64,
        udp: bool,
    },
    /// A connection this process cannot use (adoption failed).
    Orphan,
}

impl Opts {
    /// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT, with Linux's
    /// defaults for what is unset (7200 s, 75 s, 9 probes).
    pub fn keepalive_times(&self) -> (c_int, c_int, c_int) {
        let or = |v: c_int, d: c_int| if v > 0 { v } else { d };
        (
            or(self.keepidle, 7200),
            or(self.keepintvl, 75),
            or(self.keepcnt, 9),
        )
    }
}

/// The keepalive a socket's options ask for (see [`Opts::keepalive_times`]).
pub fn keepalive_of(o: &Opts) -> Option<(Duration, Duration, u32)> {
    let (idle, intvl, cnt) = o.keepalive_times();
    let secs = |v: c_int| Duration::from_secs(v as u64);
    o.keepalive.then(|| (secs(idle), secs(intvl), cnt as u32))
}

#[derive(Clone, Default)]
pub struct Opts {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub nodelay: bool,
    pub cork: bool,
    pub linger: Option<libc::linger>,
    pub rcvbuf: c_int,
    pub sndbuf: c_int,
    pub rcvtimeo: Option<Duration>,
    pub sndtimeo: Option<Duration>,
    pub keepidle: c_int,
    pub keepintvl: c_int,
    pub keepcnt: c_int,
    /// TCP_USER_TIMEOUT in ms (0: the daemon's default).
    pub user_timeout_ms: c_int,
    /// Other options accepted and remembered (level, name) -> value.
    pub other: FastMap<(c_int, c_int), Vec<u8>>,
}

pub struct Sock {
    pub domain: c_int,
    pub stype: c_int,
    pub state: SState,
    pub nonblock: bool,
    pub bound: Option<SocketAddr>,
    /// Connected UDP peer / TCP connect target.
    pub peer: Option<SocketAddr>,
    pub so_error: c_int,
    pub refs: u32,
    /// (epoll fd, registered fd) pairs this socket is in.
    pub regs: Vec<(c_int, c_int)>,
    pub rd_shut: bool,
    pub wr_shut: bool,
    /// A listener this process accepted on or waited on.
    pub used: bool,
    /// The placeholder also listens in the kernel (loopback or wildcard
    /// listeners): kernel clients on this host can connect too.
    pub klisten: bool,
    /// A listener kept as a passive member (takes no connections): the
    /// parent of a fork that never accepted.
    pub passive: bool,
    /// The process forked while this listener was open: children share it.
    pub forked: bool,
    pub backlog: u32,
    pub opts: Opts,
    /// The reset error was reported once (then reads see EOF, like Linux).
    pub reset_seen: bool,
    /// Wake channel last written into the session's descriptor.
    pub chan: u8,
    /// (token, ours): the daemon holds this socket's bound address for it
    /// until it listens, connects or closes. Not ours in a fork child: the
    /// parent's copy still holds it, so closing ours leaves it be.
    pub reserved: Option<(u64, bool)>,
}

impl Sock {
    /// [`LISTEN_V6ONLY`](session_api::msg::LISTEN_V6ONLY) if IPV6_V6ONLY is
    /// set on this IPv6 socket (the daemon's listen and bind-check flag).
    pub fn v6only_flag(&self) -> u8 {
        let on = self.domain == libc::AF_INET6
            && self
                .opts
                .other
                .get(&(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY))
                .is_some_and(|v| v.iter().any(|b| *b != 0));
        if on {
            session_api::msg::LISTEN_V6ONLY
        } else {
            0
        }
    }
}

pub struct Reg {
    pub sock: u64,
    pub events: u32,
    pub data: u64,
    pub queued: bool,
    pub disabled: bool,
}

/// An epoll instance with bypass entries: the kernel epoll set holds the
/// app's kernel fds plus the worker's wake fds (tagged with [`MAGIC`]); the
/// bypass entries and their ready list live here.
pub struct Ep {
    pub regs: FastMap<c_int, Reg>,
    pub ready: VecDeque<c_int>,
    /// Signalled when the instance has ready bypass entries and is nested
    /// in another poll set; also used to wake its waiters.
    pub wake: c_int,
    /// Worker generation whose fds are in the kernel set.
    pub magic_gen: u64,
    pub nested: bool,
    pub signaled: bool,
    /// Waits that returned hoststack events without looking at the kernel
    /// set, and when it was last looked at (see `iomux::wait_inner`).
    pub kernel_skips: u32,
    pub kernel_polled: Option<std::time::Instant>,
    /// The instance's own wake channel: its sleepers are woken only for
    /// events of sockets registered here alone, not for every event of the
    /// process (Envoy's main thread would otherwise wake for each of the
    /// worker thread's events).
    pub chan: Option<EpChan>,
    /// No channel for this instance (inherited over fork, or refused).
    pub no_chan: bool,
    /// Threads sleeping in this instance on its channel.
    pub chan_sleepers: u32,
}

/// A wake channel of the worker of generation `gen`.
pub struct EpChan {
    pub gen: u64,
    pub id: u8,
    pub efd: c_int,
}

/// epoll data tags of the shim's own fds in an app's epoll set.
pub const MAGIC: u64 = 0x4853_5f50_524c_0000;
pub const MAGIC_MQ: u64 = MAGIC | 1;
pub const MAGIC_CTRL: u64 = MAGIC | 2;
pub const MAGIC_WAKE: u64 = MAGIC | 3;
pub const MAGIC_CHAN: u64 = MAGIC | 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unattached,
    Attached,
    Failed,
}

pub struct State {
    pub cfg: Config,
    mode: Mode,
    pub worker: Option<Worker>,
    pub gen: u64,
    pub socks: FastMap<u64, Sock>,
    pub fds: FdTable,
    next_id: u64,
    pub by_sess: FastMap<SessionId, u64>,
    pub by_lid: FastMap<ListenerId, u64>,
    pub by_token: FastMap<ConnectToken, u64>,
    pub abandoned: FastSet<ConnectToken>,
    pub eps: FastMap<c_int, Ep>,
    sleepers: u32,
    /// Eventfds of sleeping threads, with the epoll instance each sleeps in
    /// (-1: a blocking call, woken for any event).
    waiters: Vec<(c_int, c_int)>,
    notes: Vec<Notify>,
    warned: bool,
    /// The daemon died: never wait on its fds again (they stay readable).
    pub daemon_gone: bool,
    /// Last try to attach to a daemon restarted in the dead one's place.
    last_reattach: Option<Instant>,
    /// Sockets in the `Inherited` state: while there are none, `adopt`
    /// (run before every operation) needs no table lookup.
    inherited: usize,
    /// Some epoll instance was put into another set (see
    /// `iomux::refresh_nested`).
    pub any_nested: bool,
    /// Unconnected kernel sockets (AF_INET, AF_INET6) whose dups stand in
    /// for accepted hoststack connections, each with its inode.
    templates: [(c_int, u64); 2],
}

pub fn api_errno(e: &ApiError) -> c_int {
    e.errno()
}

thread_local! {
    static TEFD: ThreadEfd = ThreadEfd(own_eventfd());
}

struct ThreadEfd(c_int);
impl Drop for ThreadEfd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            close_own(self.0);
        }
    }
}

fn thread_efd() -> c_int {
    TEFD.try_with(|t| t.0).unwrap_or(-1)
}

pub fn log_warn(cfg: &Config, msg: &str) {
    if cfg.log >= crate::config::LOG_WARN {
        sys::stderr(&format!(
            "hoststack preload[{}]: {msg}\n",
            std::process::id()
        ));
    }
}

pub fn log_debug(cfg: &Config, msg: impl FnOnce() -> String) {
    if cfg.log >= crate::config::LOG_DEBUG {
        sys::stderr(&format!(
            "hoststack preload[{}]: {}\n",
            std::process::id(),
            msg()
        ));
    }
}

/// fd -> socket id, indexed by the fd number (0 = none; ids start at 1):
/// looked up by every socket call, so one array load instead of a hash
/// probe, and 10 000 sockets fit in 80 KiB of cache.
#[derive(Default)]
pub struct FdTable(Vec<u64>);

impl FdTable {
    pub fn get(&self, fd: c_int) -> Option<u64> {
        let id = *self.0.get(usize::try_from(fd).ok()?)?;
        (id != 0).then_some(id)
    }

    /// Map `fd` (below [`MAX_FD`]: callers keep larger fds in the kernel).
    pub fn insert(&mut self, fd: c_int, id: u64) {
        let Ok(i) = usize::try_from(fd) else { return };
        if i >= MAX_FD {
            return;
        }
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        self.0[i] = id;
    }

    pub fn remove(&mut self, fd: c_int) -> Option<u64> {
        let slot = self.0.get_mut(usize::try_from(fd).ok()?)?;
        let id = std::mem::take(slot);
        (id != 0).then_some(id)
    }

    /// The fds mapped to `id`.
    pub fn fds_of(&self, id: u64) -> Vec<c_int> {
        (self.0.iter().enumerate())
            .filter(|&(_, v)| *v == id)
            .map(|(i, _)| i as c_int)
            .collect()
    }
}

/// What a wait ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// Something may have changed: look again.
    Again,
    Timeout,
    Intr,
}

/// The inode behind `fd`, if it is open.
fn inode_of(fd: c_int) -> Option<u64> {
    // SAFETY: fstat writes one `stat` we own; fstat is not hooked.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st.st_ino)
    }
}

impl State {
    /// A kernel fd to stand for an accepted hoststack connection: a dup of
    /// one unconnected kernel socket of the family. The app gets a real fd
    /// (its number, limits, close-on-exec; fstat says socket), and accept
    /// plus close cost two fd-table operations instead of creating and
    /// tearing down a kernel TCP socket each (those were 15% of the server
    /// CPU at 24 000 new connections per second). The app may have closed
    /// or replaced the template's fd number (closefrom, dup2): a dup that
    /// is not the template's inode means a new template. Returns -1 with
    /// errno set on failure.
    pub fn accept_placeholder(&mut self, domain: c_int, cloexec: bool) -> c_int {
        let slot = usize::from(domain == libc::AF_INET6);
        for _ in 0..2 {
            let (tfd, ino) = self.templates[slot];
            if tfd >= 0 {
                let cmd = if cloexec {
                    libc::F_DUPFD_CLOEXEC
                } else {
                    libc::F_DUPFD
                };
                // SAFETY: plain fcntl on an fd number; the result is checked.
                let nfd = unsafe { real::fcntl(tfd, cmd, 0) };
                if nfd >= 0 {
                    if inode_of(nfd) == Some(ino) {
                        return nfd;
                    }
                    // SAFETY: the dup we just made.
                    unsafe { real::close(nfd) };
                }
                // The number is the app's now (or free): leave it alone.
                self.templates[slot] = (-1, 0);
            }
            // SAFETY: plain syscall wrapper.
            let t = unsafe { real::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if t < 0 {
                return -1;
            }
            match inode_of(t) {
                Some(ino) => self.templates[slot] = (t, ino),
                None => return -1,
            }
        }
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = libc::EMFILE };
        -1
    }

    fn new() -> State {
        State {
            cfg: env().cfg.clone(),
            mode: Mode::Unattached,
            worker: None,
            gen: 0,
            socks: FastMap::default(),
            fds: FdTable::default(),
            next_id: 1,
            by_sess: FastMap::default(),
            by_lid: FastMap::default(),
            by_token: FastMap::default(),
            abandoned: FastSet::default(),
            eps: FastMap::default(),
            sleepers: 0,
            waiters: Vec::new(),
            notes: Vec::new(),
            warned: false,
            daemon_gone: false,
            last_reattach: None,
            inherited: 0,
            any_nested: false,
            templates: [(-1, 0); 2],
        }
    }

    /// The daemon died (`daemon_gone`): attach to one restarted in its
    /// place, trying at most every [`REATTACH_EVERY`]. On success the dead
    /// worker is dropped without a word to anyone, every listener listens
    /// again at its address on the new daemon (joining the group other
    /// processes of the app re-create), UDP sockets bound to an address
    /// are bound there again, and connections fail with ECONNRESET (their
    /// state died with the daemon); epoll sets take the new worker's wake
    /// fds on their next wait. True when a new worker is attached.
    pub fn try_reattach(&mut self) -> bool {
        use session_api::msg::{LISTEN_JOIN, LISTEN_PASSIVE, LISTEN_SHARED};
        if !self.daemon_gone || self.mode != Mode::Attached {
            return false;
        }
        let now = Instant::now();
        if self
            .last_reattach
            .is_some_and(|t| now.duration_since(t) < REATTACH_EVERY)
        {
            return false;
        }
        self.last_reattach = Some(now);
        let mut cfg = env().attach.clone();
        cfg.name = app_name();
        let Ok(w) = App::attach(&cfg).and_then(|a| a.worker()) else {
            return false;
        };
        self.forget_worker(false);
        self.worker = Some(w);
        log_warn(
            &self.cfg,
            &format!(
                "hoststackd is back in {}: attached again",
                cfg.socket_dir.display()
            ),
        );
        self.daemon_gone = false;
        self.gen += 1;
        self.inherited = 0;
        let ids: Vec<u64> = self.socks.keys().copied().collect();
        for id in ids {
            let Some(k) = self.socks.get_mut(&id) else {
                continue;
            };
            k.reserved = None;
            let (state, backlog, v6only, passive, bound) =
                (k.state, k.backlog, k.v6only_flag(), k.passive, k.bound);
            let new = match state {
                SState::Listening { local, .. } | SState::Dormant { local } => {
                    let flags = LISTEN_JOIN
                        | LISTEN_SHARED
                        | v6only
                        | if passive { LISTEN_PASSIVE } else { 0 };
                    match self
                        .worker
                        .as_mut()
                        .map(|w| w.listen_with(local, backlog, flags))
                    {
                        Some(Ok((lid, local))) => SState::Listening { lid, local },
                        _ => SState::Dormant { local },
                    }
                }
                SState::Udp { .. } => {
                    match bound.and_then(|a| self.worker.as_mut()?.udp_bind(a).ok()) {
                        Some(sid) => SState::Udp { sid },
                        None => SState::Failed,
                    }
                }
                SState::Connecting { .. }
                | SState::Connected { .. }
                | SState::Inherited { .. }
                | SState::Orphan => SState::Failed,
                SState::Fresh | SState::Failed => continue,
            };
            if let Some(k) = self.socks.get_mut(&id) {
                // The old entry's index keys belong to the dead worker.
                k.state = SState::Fresh;
                if new == SState::Failed {
                    k.so_error = libc::ECONNRESET;
                }
            }
            self.set_state(id, new);
        }
        true
    }

    /// Attach (once per process, again after the daemon was restarted)
    /// and return the worker; Err when hoststack cannot be used.
    pub fn worker(&mut self) -> R<&mut Worker> {
        if !self.daemon_gone && self.worker.as_ref().is_some_and(Worker::is_gone) {
            // Found out by a call rather than by a wait (a process that
            // never sleeps on the daemon's fds, like nginx's master).
            self.daemon_gone = true;
        }
        if self.daemon_gone {
            self.try_reattach();
        }
        if self.worker.is_none() {
            if self.mode == Mode::Failed {
                return Err(libc::ENETDOWN);
            }
            let name = app_name();
            let mut cfg = env().attach.clone();
            cfg.name = name.clone();
            match App::attach(&cfg).and_then(|a| a.worker()) {
                Ok(w) => {
                    log_debug(&self.cfg, || format!("attached as {name}"));
                    self.worker = Some(w);
                    self.mode = Mode::Attached;
                    self.gen += 1;
                }
                Err(e) => {
                    self.mode = Mode::Failed;
                    if !self.warned {
                        self.warned = true;
                        let what = if self.cfg.strict {
                            "HOSTSTACK_STRICT is set: INET sockets fail with ENETDOWN"
                        } else {
                            "using kernel sockets"
                        };
                        log_warn(
                            &self.cfg,
                            &format!(
                                "cannot attach to hoststackd in {}: {e}; {what}",
                                cfg.socket_dir.display()
                            ),
                        );
                    }
                    return Err(libc::ENETDOWN);
                }
            }
        }
        self.worker.as_mut().ok_or(libc::ENETDOWN)
    }

    /// Should new INET sockets go to hoststack? Err(ENETDOWN) in strict
    /// mode when the daemon is unreachable; Ok(false) = kernel.
    pub fn want_bypass(&mut self) -> R<bool> {
        let strict = self.cfg.strict;
        match self.worker() {
            Ok(_) => Ok(true),
            Err(e) if strict => Err(e),
            Err(_) => Ok(false),
        }
    }

    pub fn add_sock(
        &mut self,
        fd: c_int,
        domain: c_int,
        stype: c_int,
        nonblock: bool,
        state: SState,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.socks.insert(
            id,
            Sock {
                domain,
                stype,
                state,
                nonblock,
                bound: None,
                peer: None,
                so_error: 0,
                refs: 1,
                regs: Vec::new(),
                rd_shut: false,
                wr_shut: false,
                used: false,
                klisten: false,
                passive: false,
                forked: false,
                backlog: 128,
                opts: Opts {
                    rcvbuf: DEFAULT_SOCKBUF,
                    sndbuf: DEFAULT_SOCKBUF,
                    ..Opts::default()
                },
                reset_seen: false,
                chan: 0,
                reserved: None,
            },
        );
        self.fds.insert(fd, id);
        set_flag(&BYPASS, fd, true);
        self.index(id);
        id
    }

    /// Keep the handle -> socket maps in step with the state.
    pub fn index(&mut self, id: u64) {
        let Some(s) = self.socks.get(&id) else { return };
        match s.state {
            SState::Listening { lid, .. } => {
                self.by_lid.insert(lid, id);
            }
            SState::Connecting { token } => {
                self.by_token.insert(token, id);
            }
            SState::Connected { sid } | SState::Udp { sid } => {
                self.by_sess.insert(sid, id);
            }
            _ => {}
        }
    }

    pub fn set_state(&mut self, id: u64, new: SState) {
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        match s.state {
            SState::Listening { lid, .. } => {
                self.by_lid.remove(&lid);
            }
            SState::Connecting { token } => {
                self.by_token.remove(&token);
            }
            SState::Connected { sid } | SState::Udp { sid } => {
                self.by_sess.remove(&sid);
            }
            SState::Inherited { .. } => self.inherited = self.inherited.saturating_sub(1),
            _ => {}
        }
        s.state = new;
        if matches!(new, SState::Connected { .. } | SState::Udp { .. }) {
            // A new session: its descriptor names no channel yet.
            s.chan = 0;
            self.index(id);
            self.sync_chan(id);
        } else {
            self.index(id);
        }
    }

    /// The wake channel of epoll instance `epfd`, if it has one that
    /// belongs to the current worker (nested instances use none: their
    /// events must reach whoever waits on the outer set).
    pub fn ep_chan(&self, epfd: c_int) -> Option<u8> {
        let ep = self.eps.get(&epfd)?;
        let c = ep.chan.as_ref()?;
        (c.gen == self.gen && !ep.nested).then_some(c.id)
    }

    /// Name in the session's descriptor the wake channel its events should
    /// use: that of the one epoll instance it is registered with, or none
    /// (any sleeper) when it is in several, or in none.
    pub fn sync_chan(&mut self, id: u64) {
        let Some(k) = self.socks.get(&id) else { return };
        let sid = match k.state {
            SState::Connected { sid } | SState::Udp { sid } => sid,
            _ => return,
        };
        let mut eps = k.regs.iter().map(|&(e, _)| e);
        let c = match eps.next() {
            Some(e) if eps.all(|x| x == e) => self.ep_chan(e).unwrap_or(0),
            _ => 0,
        };
        if k.chan == c {
            return;
        }
        if let Some(w) = self.worker.as_mut() {
            if w.set_wake_channel(sid, c).is_ok() {
                if let Some(k) = self.socks.get_mut(&id) {
                    k.chan = c;
                }
            }
        }
    }

    pub fn sock_of(&self, fd: c_int) -> Option<u64> {
        self.fds.get(fd)
    }

    /// Map another fd (a dup) to the same socket.
    pub fn add_fd(&mut self, fd: c_int, id: u64) {
        if let Some(s) = self.socks.get_mut(&id) {
            s.refs += 1;
            self.fds.insert(fd, id);
            set_flag(&BYPASS, fd, true);
        }
    }

    /// Forget `fd` (the caller closes the kernel fd); the socket is released
    /// when its last fd goes.
    pub fn drop_fd(&mut self, fd: c_int) {
        let Some(id) = self.fds.remove(fd) else {
            return;
        };
        set_flag(&BYPASS, fd, false);
        let last = match self.socks.get_mut(&id) {
            Some(s) => {
                s.refs = s.refs.saturating_sub(1);
                s.refs == 0
            }
            None => false,
        };
        if last {
            self.release(id, fd);
        }
    }

    /// Give a Fresh socket back to the kernel: its placeholder *is* a kernel
    /// socket of the right type, so the app's fd simply stops being special.
    /// Epoll registrations move into the kernel sets.
    pub fn to_kernel(&mut self, id: u64) {
        self.give_back(id);
        let fds = self.fds.fds_of(id);
        for fd in &fds {
            self.fds.remove(*fd);
            set_flag(&BYPASS, *fd, false);
        }
        if let Some(s) = self.socks.remove(&id) {
            for (epfd, fd) in s.regs {
                if let Some(ep) = self.eps.get_mut(&epfd) {
                    if let Some(r) = ep.regs.remove(&fd) {
                        let mut ev = libc::epoll_event {
                            events: r.events,
                            u64: r.data,
                        };
                        // SAFETY: valid epoll_event.
                        unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                    }
                }
            }
            if let Some(fd) = fds.first() {
                // Mirror the emulated O_NONBLOCK onto the kernel socket.
                // SAFETY: fcntl on the app's own fd.
                unsafe {
                    let fl = real::fcntl(*fd, libc::F_GETFL, 0);
                    if fl >= 0 {
                        let nfl = if s.nonblock {
                            fl | libc::O_NONBLOCK
                        } else {
                            fl & !libc::O_NONBLOCK
                        };
                        real::fcntl(*fd, libc::F_SETFL, nfl as usize);
                    }
                }
            }
        }
    }

    /// The socket is about to listen or connect on its bound address (or
    /// leaves hoststack): give back the daemon's reservation of it.
    pub fn give_back(&mut self, id: u64) {
        let Some(token) = self.socks.get_mut(&id).and_then(|k| k.reserved.take()) else {
            return;
        };
        if let Some(w) = self.worker.as_mut() {
            let _ = w.unbind(token.0);
        }
    }

    /// The last fd of a socket is gone (`fd`, still open until the caller
    /// closes it): close its session.
    fn release(&mut self, id: u64, fd: c_int) {
        let Some(s) = self.socks.remove(&id) else {
            return;
        };
        // A connection that lived through a fork lingers only while a child
        // could still take it over: one that holds the same kernel file.
        // Once every child has exited or exec'd (close-on-exec dropped its
        // copy), the peer gets the FIN now instead of 2 s later.
        let linger = s.forked
            && matches!(s.state, SState::Connected { .. } | SState::Udp { .. })
            && inode_of(fd)
                .and_then(crate::sys::a_child_holds_socket)
                .unwrap_or(true);
        if matches!(s.state, SState::Inherited { .. }) {
            self.inherited = self.inherited.saturating_sub(1);
        }
        for (epfd, fd) in &s.regs {
            if let Some(ep) = self.eps.get_mut(epfd) {
                if ep.regs.get(fd).is_some_and(|r| r.sock == id) {
                    ep.regs.remove(fd);
                }
            }
        }
        let abort = s
            .opts
            .linger
            .is_some_and(|l| l.l_onoff != 0 && l.l_linger == 0);
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        if let Some((token, true)) = s.reserved {
            if w.unbind(token).is_ok() && s.state == SState::Fresh {
                // Free once close() returns (see the listener case below).
                if let Some(a) = s.bound {
                    close_barrier(w, a);
                }
            }
        }
        match s.state {
            SState::Listening { lid, local } => {
                self.by_lid.remove(&lid);
                // After a fork the children may still be joining: keep the
                // address for them instead of refusing connections.
                if s.forked {
                    let _ = w.unlisten_linger(lid);
                } else if w.unlisten(lid).is_ok() {
                    // As with the kernel, the address is free once close()
                    // returns: a process told "I closed it" may bind it at
                    // once (Envoy's hot restart hands its admin port over
                    // so). The daemon has left the group when it answers a
                    // bind check queued behind the unlisten: one round
                    // trip, for listeners only.
                    close_barrier(w, local);
                }
            }
            SState::Connected { sid } | SState::Udp { sid } => {
                self.by_sess.remove(&sid);
                // Linux resets a connection closed with unread data.
                let unread = s.state != SState::Udp { sid } && w.nread(sid).unwrap_or(0) > 0;
                let _ = if abort || unread && !linger {
                    w.abort(sid)
                } else if linger {
                    // A child may be about to use its copy (inetd style).
                    w.close_linger(sid)
                } else {
                    w.close(sid)
                };
            }
            SState::Connecting { token } => {
                self.by_token.remove(&token);
                self.abandoned.insert(token);
            }
            _ => {}
        }
    }

    /// Running in a vfork child (`posix_spawn`, Python's `subprocess`)?
    /// It shares this memory with the suspended parent until it execs, and
    /// closes its copies of the fds first (`close_range`): forgetting
    /// sockets or epoll sets here would close the parent's connections
    /// (through the shared request queue) and wake channels. No atfork
    /// handler runs for vfork, so the pid tells.
    pub fn in_vfork_child(&self) -> bool {
        std::process::id() != PID.load(Ordering::Relaxed)
    }

    /// Drain daemon events and queue the sockets they concern on the epoll
    /// instances they are registered with; wake sleeping threads.
    pub fn pump(&mut self) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        // Requests deferred during an epoll batch go out now.
        w.flush_wake();
        let mut notes = std::mem::take(&mut self.notes);
        notes.clear();
        let dead = w.poll_events(&mut notes, Some(Duration::ZERO)).is_err();
        let mut touched = dead;
        for n in notes.drain(..) {
            let id = match n {
                Notify::Readable(s) | Notify::Writable(s) => self.by_sess.get(&s).copied(),
                Notify::Accept(l) => self.by_lid.get(&l).copied(),
                Notify::Connected(t) => {
                    if self.abandoned.remove(&t) {
                        if let Some(w) = self.worker.as_mut() {
                            if let Ok(Some(s)) = w.connect_finish(t) {
                                let _ = w.close(s);
                            }
                        }
                        None
                    } else {
                        self.by_token.get(&t).copied()
                    }
                }
            };
            if let Some(id) = id {
                touched = true;
                self.touch(id);
            }
        }
        self.notes = notes;
        if dead {
            // Every socket may have changed (all fail now).
            let ids: Vec<u64> = self.socks.keys().copied().collect();
            for id in ids {
                self.touch(id);
            }
        }
        if touched {
            // Threads in blocking calls may wait for any socket; a thread
            // in an epoll instance only when that instance has something
            // to report.
            for &(fd, epfd) in &self.waiters {
                if epfd < 0 || dead || self.eps.get(&epfd).is_some_and(|e| !e.ready.is_empty()) {
                    efd_signal(fd);
                }
            }
        }
    }

    /// Wake every sleeping thread (a local state change such as shutdown).
    pub fn wake_all(&mut self) {
        for &(fd, _) in &self.waiters {
            efd_signal(fd);
        }
    }

    /// Queue `id` on its epoll instances.
    pub fn touch(&mut self, id: u64) {
        let Some(s) = self.socks.get(&id) else { return };
        for &(epfd, fd) in &s.regs {
            if let Some(ep) = self.eps.get_mut(&epfd) {
                if let Some(r) = ep.regs.get_mut(&fd) {
                    if r.sock == id && !r.queued && !r.disabled {
                        r.queued = true;
                        ep.ready.push_back(fd);
                        if ep.nested && !ep.signaled {
                            ep.signaled = true;
                            efd_signal(ep.wake);
                        }
                    }
                }
            }
        }
    }

    /// First use of a socket inherited over fork: take the session over
    /// from the parent (the daemon checks that it is our parent's).
    pub fn adopt(&mut self, id: u64) {
        if self.inherited == 0 {
            return;
        }
        let Some(SState::Inherited { handle, udp }) = self.socks.get(&id).map(|s| s.state) else {
            return;
        };
        let new = match self
            .worker()
            .and_then(|w| w.adopt(handle).map_err(|e| api_errno(&e)))
        {
            Ok(sid) if udp => SState::Udp { sid },
            Ok(sid) => SState::Connected { sid },
            Err(e) => {
                log_debug(&self.cfg, || {
                    format!("cannot adopt an inherited connection: errno {e}")
                });
                SState::Orphan
            }
        };
        self.set_state(id, new);
    }

    /// Finish a pending connect if its reply arrived.
    pub fn finish_connect(&mut self, id: u64) {
        self.adopt(id);
        let Some(SState::Connecting { token }) = self.socks.get(&id).map(|s| s.state) else {
            return;
        };
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        match w.connect_finish(token) {
            Ok(Some(sid)) => {
                self.set_state(id, SState::Connected { sid });
                self.apply_opts(id);
            }
            Ok(None) => {}
            Err(e) => {
                let e = api_errno(&e);
                self.set_state(id, SState::Failed);
                if let Some(s) = self.socks.get_mut(&id) {
                    s.so_error = e;
                }
            }
        }
    }

    /// Push remembered TCP options to a new session.
    pub fn apply_opts(&mut self, id: u64) {
        let Some(s) = self.socks.get(&id) else { return };
        let SState::Connected { sid } = s.state else {
            return;
        };
        let (nodelay, ka, ut) = (
            s.opts.nodelay,
            keepalive_of(&s.opts),
            s.opts.user_timeout_ms,
        );
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        if nodelay {
            let _ = w.set_nodelay(sid, true);
        }
        if ka.is_some() {
            let _ = w.set_keepalive(sid, ka);
        }
        if ut > 0 {
            let _ = w.set_user_timeout(sid, Some(Duration::from_millis(ut as u64)));
        }
    }

    /// This process is about to accept on a listener: re-create a dormant
    /// one (joining the group the parent or siblings serve) or turn a
    /// passive membership active. The new membership exists before the old
    /// one goes, so waiting connections are never refused.
    pub fn wake_listener(&mut self, id: u64) -> R<()> {
        use session_api::msg::{LISTEN_JOIN, LISTEN_SHARED};
        let Some(s) = self.socks.get(&id) else {
            return Err(libc::EBADF);
        };
        let (local, old) = match s.state {
            SState::Dormant { local } => (local, None),
            SState::Listening { lid, local } if s.passive => (local, Some(lid)),
            _ => return Ok(()),
        };
        let (backlog, v6only) = (s.backlog, s.v6only_flag());
        let w = self.worker()?;
        let (lid, local) = w
            .listen_with(local, backlog, LISTEN_JOIN | LISTEN_SHARED | v6only)
            .map_err(|e| api_errno(&e))?;
        if let Some(old) = old {
            let _ = w.unlisten(old);
        }
        log_debug(&self.cfg, || format!("listener {local} active"));
        self.set_state(id, SState::Listening { lid, local });
        if let Some(k) = self.socks.get_mut(&id) {
            k.passive = false;
        }
        Ok(())
    }

    /// Epoll/poll readiness of a socket (EPOLL* bits), finishing pending
    /// connects; `want_out` asks for a writable notification if not writable.
    pub fn events_of(&mut self, id: u64, want_out: bool) -> u32 {
        self.adopt(id);
        self.finish_connect(id);
        let Some(s) = self.socks.get(&id) else {
            return 0;
        };
        let (state, stype, rd_shut, wr_shut, so_error, reset_seen) = (
            s.state,
            s.stype,
            s.rd_shut,
            s.wr_shut,
            s.so_error,
            s.reset_seen,
        );
        let (i, o, e, h, rh) = (
            libc::EPOLLIN as u32,
            libc::EPOLLOUT as u32,
            libc::EPOLLERR as u32,
            libc::EPOLLHUP as u32,
            libc::EPOLLRDHUP as u32,
        );
        match state {
            SState::Fresh => {
                if stype == libc::SOCK_STREAM {
                    o | h
                } else {
                    o
                }
            }
            SState::Listening { lid, .. } => {
                match self.worker.as_mut().map(|w| w.accept_ready(lid)) {
                    Some(Ok(true)) => i,
                    _ => 0,
                }
            }
            SState::Dormant { .. } | SState::Connecting { .. } => 0,
            SState::Connected { sid } | SState::Udp { sid } => {
                let Some(w) = self.worker.as_mut() else {
                    return e | h;
                };
                let Ok(mut r) = w.ready(sid) else {
                    return e | h;
                };
                if want_out && !r.writable {
                    r.writable = w.want_writable(sid).unwrap_or(true);
                }
                let mut m = 0;
                if r.readable || rd_shut {
                    m |= i;
                }
                if rd_shut {
                    m |= rh;
                }
                if r.writable {
                    m |= o;
                }
                if matches!(state, SState::Connected { .. }) {
                    if r.hup {
                        m |= rh | i;
                        if wr_shut {
                            m |= h;
                        }
                    }
                    if r.error.is_some() {
                        m |= i | o | h | rh;
                        if !reset_seen {
                            m |= e;
                        }
                    }
                } else if r.error.is_some() {
                    // A connected UDP socket's pending ICMP error.
                    m |= e;
                }
                m
            }
            SState::Failed => i | o | h | rh | if so_error != 0 { e } else { 0 },
            SState::Orphan | SState::Inherited { .. } => o | h,
        }
    }

    /// Drop the worker without a word to the daemon (it belongs to the
    /// parent, or the daemon is dead) and everything keyed by it: the
    /// epoll instances' wake channels (our copies of their eventfds are
    /// closed; `no_chan` keeps an instance from asking for a new one) and
    /// the session, listener and connect indexes. Epoll sets take the next
    /// worker's wake fds on their next wait.
    fn forget_worker(&mut self, no_chan: bool) {
        if let Some(w) = self.worker.take() {
            w.detach_after_fork();
        }
        for ep in self.eps.values_mut() {
            if let Some(c) = ep.chan.take() {
                close_own(c.efd);
            }
            ep.no_chan |= no_chan;
            ep.chan_sleepers = 0;
            ep.magic_gen = 0;
        }
        self.by_sess.clear();
        self.by_lid.clear();
        self.by_token.clear();
        self.abandoned.clear();
    }

    /// A fork child: drop the parent's worker without telling the daemon;
    /// listeners go dormant, inherited connections become orphans.
    pub fn after_fork_child(&mut self) {
        // The parent's channels are not ours; an inherited instance (shared
        // with the parent) keeps waking the old way.
        self.forget_worker(true);
        self.mode = Mode::Unattached;
        self.sleepers = 0;
        self.waiters.clear();
        for s in self.socks.values_mut() {
            if let Some((_, ours)) = s.reserved.as_mut() {
                *ours = false;
            }
            s.state = match s.state {
                SState::Listening { local, .. } | SState::Dormant { local } => {
                    s.used = false;
                    s.passive = false;
                    SState::Dormant { local }
                }
                SState::Fresh => SState::Fresh,
                SState::Failed => SState::Failed,
                SState::Connected { sid } => SState::Inherited {
                    handle: sid.0,
                    udp: false,
                },
                SState::Udp { sid } => SState::Inherited {
                    handle: sid.0,
                    udp: true,
                },
                SState::Inherited { handle, udp } => SState::Inherited { handle, udp },
                _ => SState::Orphan,
            };
        }
        self.inherited = self
            .socks
            .values()
            .filter(|s| matches!(s.state, SState::Inherited { .. }))
            .count();
        // Inherited listeners stay open in the child even if the parent
        // closes them: join their groups now, passive until this process
        // accepts on them.
        use session_api::msg::{LISTEN_JOIN, LISTEN_PASSIVE, LISTEN_SHARED};
        let inherited: Vec<(u64, SocketAddr, u32, u8)> = self
            .socks
            .iter()
            .filter_map(|(id, s)| match s.state {
                SState::Dormant { local } => Some((*id, local, s.backlog, s.v6only_flag())),
                _ => None,
            })
            .collect();
        for (id, local, backlog, v6only) in inherited {
            let Ok(w) = self.worker() else { return };
            if let Ok((lid, local)) = w.listen_with(
                local,
                backlog,
                LISTEN_JOIN | LISTEN_SHARED | LISTEN_PASSIVE | v6only,
            ) {
                self.set_state(id, SState::Listening { lid, local });
                if let Some(k) = self.socks.get_mut(&id) {
                    k.passive = true;
                }
            }
        }
    }

    /// In the parent after fork: listeners this process never served
    /// become passive members, so connections go to the children (nginx's
    /// master never accepts) and wait in the backlog until one of them
    /// joins; the parent turns active again if it accepts after all.
    pub fn after_fork_parent(&mut self) {
        use session_api::msg::{LISTEN_JOIN, LISTEN_PASSIVE, LISTEN_SHARED};
        for s in self.socks.values_mut() {
            if matches!(
                s.state,
                SState::Listening { .. }
                    | SState::Dormant { .. }
                    | SState::Connected { .. }
                    | SState::Udp { .. }
            ) {
                s.forked = true;
            }
        }
        let idle: Vec<u64> = self
            .socks
            .iter()
            .filter(|(_, s)| matches!(s.state, SState::Listening { .. }) && !s.used && !s.passive)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            let Some((SState::Listening { lid, local }, backlog, v6only)) = self
                .socks
                .get(&id)
                .map(|s| (s.state, s.backlog, s.v6only_flag()))
            else {
                continue;
            };
            let Some(w) = self.worker.as_mut() else {
                return;
            };
            let Ok((nlid, local)) = w.listen_with(
                local,
                backlog,
                LISTEN_JOIN | LISTEN_SHARED | LISTEN_PASSIVE | v6only,
            ) else {
                continue;
            };
            let _ = w.unlisten(lid);
            log_debug(&self.cfg, || {
                format!("fork: listener {local} passive in the parent")
            });
            self.set_state(id, SState::Listening { lid: nlid, local });
            if let Some(k) = self.socks.get_mut(&id) {
                k.passive = true;
            }
        }
    }

    /// Make sure the kernel epoll set `epfd` holds this process's wake fds:
    /// its own wake channel's eventfd if it can have one, else the worker's
    /// eventfd (woken for every event).
    pub fn ep_arm(&mut self, epfd: c_int) {
        if self.daemon_gone {
            return;
        }
        let gen = self.gen;
        let Some(ep) = self.eps.get(&epfd) else {
            return;
        };
        if ep.magic_gen == gen {
            return;
        }
        if !ep.no_chan && !ep.nested && ep.chan.as_ref().is_none_or(|c| c.gen != gen) {
            self.ep_get_chan(epfd);
        }
        let chan = self.ep_chan(epfd);
        let fds = self.worker.as_ref().map(|w| w.wait_fds());
        let Some(ep) = self.eps.get_mut(&epfd) else {
            return;
        };
        let add = |fd: c_int, tag: u64| {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: tag,
            };
            // SAFETY: valid epoll_event; EEXIST is fine.
            unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        };
        if ep.magic_gen == 0 && ep.wake >= 0 {
            add(ep.wake, MAGIC_WAKE);
        }
        if let Some([wake, ctrl]) = fds {
            match (chan, ep.chan.as_ref()) {
                (Some(_), Some(c)) => add(c.efd, MAGIC_CHAN),
                _ => add(wake, MAGIC_MQ),
            }
            add(ctrl, MAGIC_CTRL);
            ep.magic_gen = gen;
        }
    }

    /// Ask the daemon for a wake channel for instance `epfd`.
    fn ep_get_chan(&mut self, epfd: c_int) {
        let gen = self.gen;
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        let r = w.add_channel();
        // The caller holds the set; the round trip does not remove it.
        let Some(ep) = self.eps.get_mut(&epfd) else {
            return;
        };
        match r {
            Ok((id, fd)) => {
                if let Some(old) = ep.chan.take() {
                    // Our eventfd of an older worker.
                    close_own(old.efd);
                }
                use std::os::fd::IntoRawFd;
                ep.chan = Some(EpChan {
                    gen,
                    id,
                    efd: fd.into_raw_fd(),
                });
            }
            Err(e) => {
                ep.no_chan = true;
                log_debug(&self.cfg, || {
                    format!("epoll {epfd}: no wake channel ({e}); woken for every event")
                });
            }
        }
    }

    pub fn ep_new(&mut self, epfd: c_int) -> &mut Ep {
        set_flag(&EPOLL, epfd, true);
        self.eps.entry(epfd).or_insert_with(|| Ep {
            regs: FastMap::default(),
            ready: VecDeque::new(),
            wake: own_eventfd(),
            magic_gen: 0,
            nested: false,
            signaled: false,
            kernel_skips: 0,
            kernel_polled: None,
            chan: None,
            no_chan: false,
            chan_sleepers: 0,
        })
    }

    /// `epfd` holds an emulated instance (nested): its waits must go
    /// through the shim and sleep on the worker's eventfd (the nested
    /// instance's sockets name no channel); the pump then signals the
    /// nested instance, which the kernel reports to this set.
    pub fn ep_mark_outer(&mut self, epfd: c_int) {
        let gen = self.gen;
        let ep = self.ep_new(epfd);
        ep.no_chan = true;
        let Some(c) = ep.chan.take() else { return };
        ep.magic_gen = 0;
        if c.gen == gen {
            if let Some(w) = self.worker.as_mut() {
                w.del_channel(c.id);
            }
        }
        close_own(c.efd);
    }

    pub fn ep_close(&mut self, epfd: c_int) {
        if let Some(ep) = self.eps.remove(&epfd) {
            set_flag(&EPOLL, epfd, false);
            for (fd, r) in &ep.regs {
                if let Some(s) = self.socks.get_mut(&r.sock) {
                    s.regs.retain(|&(e, f)| !(e == epfd && f == *fd));
                }
                self.sync_chan(r.sock);
            }
            if ep.wake >= 0 {
                close_own(ep.wake);
            }
            if let Some(c) = ep.chan {
                if c.gen == self.gen {
                    if let Some(w) = self.worker.as_mut() {
                        w.del_channel(c.id);
                    }
                }
                close_own(c.efd);
            }
        }
    }
}

/// Sleep until daemon events, a waiter signal, one of `extra` or the
/// deadline. Takes the locked state and returns it locked again.
pub fn block(
    mut g: G,
    deadline: Option<Instant>,
    extra: &mut [libc::pollfd],
    sigmask: Option<&libc::sigset_t>,
) -> (G, Woke) {
    let s = st(&mut g);
    let tefd = thread_efd();
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(3 + extra.len());
    let mut base = 0;
    if let Some(w) = s.worker.as_mut().filter(|_| !s.daemon_gone) {
        if !w.prepare_sleep() {
            if s.sleepers == 0 {
                w.cancel_sleep();
            }
            s.pump();
            return (g, Woke::Again);
        }
        let [wake, ctrl] = w.wait_fds();
        for fd in [wake, ctrl, tefd] {
            pfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        base = 3;
        s.sleepers += 1;
        s.waiters.push((tefd, -1));
    }
    pfds.extend_from_slice(extra);
    // With the daemon gone, wake up now and then to look for a new one
    // (the caller sees `Again`, and its next call tries).
    let wait_until = if s.daemon_gone {
        let cap = Instant::now() + REATTACH_EVERY;
        Some(deadline.map_or(cap, |d| d.min(cap)))
    } else {
        deadline
    };
    let ts = wait_until.map(sys::ts_left);
    drop(g);
    // SAFETY: pfds is a valid array; ts and sigmask are null or valid.
    let r = unsafe {
        real::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
            sigmask.map_or(std::ptr::null(), |m| m as *const _),
        )
    };
    let err = sys::errno();
    let mut g = lock();
    let s = st(&mut g);
    if base == 3 {
        s.sleepers = s.sleepers.saturating_sub(1);
        if let Some(p) = s.waiters.iter().position(|&(f, _)| f == tefd) {
            s.waiters.swap_remove(p);
        }
        if pfds[2].revents != 0 {
            efd_drain(tefd);
        }
        let sleepers = s.sleepers;
        if let Some(w) = s.worker.as_mut() {
            if sleepers == 0 {
                w.cancel_sleep();
            }
            if w.after_wake(pfds[0].revents != 0, pfds[1].revents != 0)
                .is_err()
            {
                s.daemon_gone = true;
            }
        }
        s.pump();
    }
    for (e, p) in extra.iter_mut().zip(&pfds[base..]) {
        e.revents = p.revents;
    }
    let woke = if r < 0 && err == libc::EINTR {
        Woke::Intr
    } else if r == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
        Woke::Timeout
    } else {
        Woke::Again
    };
    (g, woke)
}

impl State {
    /// A thread is about to sleep in the kernel in epoll instance `epfd`,
    /// whose set holds `wake` (signalled by whoever drains events for it
    /// meanwhile), on the instance's wake channel `chan` or, without one,
    /// on the worker's eventfd.
    pub fn sleep_begin(&mut self, wake: c_int, epfd: c_int, chan: Option<u8>) {
        match (chan, self.eps.get_mut(&epfd)) {
            (Some(_), Some(ep)) => ep.chan_sleepers += 1,
            _ => self.sleepers += 1,
        }
        if wake >= 0 {
            self.waiters.push((wake, epfd));
        }
    }

    /// The thread is back (lock held).
    pub fn sleep_end(&mut self, wake: c_int, epfd: c_int, chan: Option<u8>) {
        if let Some(p) = self.waiters.iter().position(|&(f, _)| f == wake) {
            self.waiters.swap_remove(p);
        }
        if let Some(c) = chan {
            // If the set was closed meanwhile its channel may belong to
            // another set by now: leave the bit alone (at worst one
            // spurious wake-up for that set's thread).
            let last = self.eps.get_mut(&epfd).is_some_and(|ep| {
                ep.chan_sleepers = ep.chan_sleepers.saturating_sub(1);
                ep.chan_sleepers == 0 && ep.chan.as_ref().is_some_and(|k| k.id == c)
            });
            if last {
                if let Some(w) = self.worker.as_mut() {
                    w.cancel_sleep_channel(c);
                }
            }
            return;
        }
        self.sleepers = self.sleepers.saturating_sub(1);
        if self.sleepers == 0 {
            if let Some(w) = self.worker.as_mut() {
                w.cancel_sleep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_table_maps_fds_and_ignores_impossible_ones() {
        let mut t = FdTable::default();
        assert_eq!(t.get(5), None);
        t.insert(5, 7);
        t.insert(9, 7);
        t.insert(3, 8);
        t.insert(-1, 9);
        t.insert(MAX_FD as c_int, 9);
        assert_eq!(
            (t.get(5), t.get(9), t.get(3), t.get(4)),
            (Some(7), Some(7), Some(8), None)
        );
        assert_eq!(
            (t.get(-1), t.get(MAX_FD as c_int), t.get(c_int::MAX)),
            (None, None, None)
        );
        assert_eq!(t.fds_of(7), vec![5, 9]);
        assert_eq!(t.remove(5), Some(7));
        assert_eq!(
            (t.remove(5), t.remove(-3), t.remove(1 << 30)),
            (None, None, None)
        );
        assert_eq!(t.fds_of(7), vec![9]);
    }
}
