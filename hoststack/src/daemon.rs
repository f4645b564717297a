//! The daemon's event loop: uplink, attach sockets, app control sockets,
//! worker wake-ups, the `hoststackctl` socket and signals, all in one epoll
//! set. In interrupt mode (the default) the loop sleeps in `epoll_wait` until
//! a frame, a request or a timer is due; app workers wake it only when it
//! said it was going to sleep (see `session_api::mq`), so a loaded daemon
//! makes no wake-up syscalls.

use crate::app::AppId;
use crate::config::{parse_mac, Config};
use crate::session::{Engine, SessionConfig};
use crate::stack::{FrameTx, Stack, StackConfig};
use crate::sys::{self, Epoll};
use crate::uplink::{self, Uplink};
use anyhow::{bail, Context, Result};
use session_api::proto::{AppCtrl, DaemonCtrl, CTRL_MAX};
use session_api::shm::{recv_with_fds, send_with_fds};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{IpAddress, IpCidr, Ipv6Address};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

const T_UPLINK: u64 = 1;
const T_SIGNAL: u64 = 2;
const T_CTL: u64 = 3;
const T_ATTACH: u64 = 0x100; // + namespace index
const T_PENDING: u64 = 1 << 40; // + pending connection id
const T_APP: u64 = 2 << 40; // + app id
const T_WAKE: u64 = 3 << 40; // + app id << 16 | worker

/// Frames the stack sends while a received batch is being read (the uplink
/// is borrowed by its receive call then): handed to the uplink right after
/// the batch, before anything else is sent. Every other path writes
/// straight into the uplink's own TX batch, saving a copy of each frame
/// (up to 64 KiB with TSO).
#[derive(Default)]
pub struct TxBatch {
    /// Grows to the high-water mark and stays there: reusing it costs no
    /// zeroing per frame.
    buf: Vec<u8>,
    used: usize,
    frames: Vec<(usize, usize, Option<u16>)>,
}

impl FrameTx for TxBatch {
    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        self.tx_frame_gso(len, None)
    }
    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        let start = self.used;
        self.used += len;
        if self.buf.len() < self.used {
            self.buf.resize(self.used, 0);
        }
        self.frames.push((start, len, gso));
        let f = &mut self.buf[start..start + len];
        uplink::clear_headers(f);
        f
    }
}

impl TxBatch {
    /// Append the frames to the uplink's TX batch (in order, ahead of
    /// anything written there later).
    fn hand_over(&mut self, up: &mut dyn Uplink) {
        for &(s, l, gso) in &self.frames {
            up.tx_frame_gso(l, gso).copy_from_slice(&self.buf[s..s + l]);
        }
        self.used = 0;
        self.frames.clear();
    }

    /// [`Self::hand_over`], then send the uplink's whole TX batch.
    fn send(&mut self, up: &mut dyn Uplink) {
        self.hand_over(up);
        if let Err(e) = up.flush() {
            tracing::debug!(error = %e, "uplink flush");
        }
    }
}

/// The uplink's own TX batch as a [`FrameTx`] (a `dyn Uplink` cannot be
/// used as a `dyn FrameTx` directly).
struct Direct<'a>(&'a mut dyn Uplink);

impl FrameTx for Direct<'_> {
    fn tx_frame(&mut self, len: usize) -> &mut [u8] {
        self.0.tx_frame(len)
    }
    fn tx_frame_gso(&mut self, len: usize, gso: Option<u16>) -> &mut [u8] {
        self.0.tx_frame_gso(len, gso)
    }
}

struct Namespace {
    name: String,
    secret: String,
    listener: OwnedFd,
    path: PathBuf,
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    engine: Engine,
    uplink: Box<dyn Uplink>,
    epoll: Epoll,
    namespaces: Vec<Namespace>,
    pending: HashMap<u64, (usize, OwnedFd)>,
    next_pending: u64,
    ctl: OwnedFd,
    ctl_path: PathBuf,
    sig: OwnedFd,
    start: Instant,
    tx: TxBatch,
    loops: u64,
    sleeps: u64,
    epoll_waits: u64,
    yields: u64,
    spin_pass: u32,
}

fn parse_cidr(s: &str, key: &'static str) -> Result<IpCidr> {
    s.parse::<IpCidr>()
        .map_err(|_| anyhow::anyhow!("{key}: {s:?} is not an address/prefix (e.g. 198.18.0.1/24)"))
}

impl Daemon {
    /// Open the uplink, the sockets, and build the stack.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        // Check every address before touching the system.
        for (key, v) in [
            ("uplink.ipv4", &cfg.uplink.ipv4),
            ("uplink.ipv6", &cfg.uplink.ipv6),
        ] {
            if let Some(a) = v {
                parse_cidr(a, key)?;
            }
        }
        let up = uplink::open(
            cfg.uplink.kind,
            &cfg.uplink.interface,
            cfg.uplink.mac.as_deref().map(parse_mac).transpose()?,
            cfg.uplink.offload,
            cfg.uplink.rx_ring_mb,
        )
        .with_context(|| format!("opening uplink {}", cfg.uplink.interface))?;
        let mac = match &cfg.uplink.mac {
            Some(m) => parse_mac(m)?,
            None => up.mac(),
        };
        let mut addrs = Vec::new();
        if let Some(a) = &cfg.uplink.ipv4 {
            addrs.push(parse_cidr(a, "uplink.ipv4")?);
        }
        if let Some(a) = &cfg.uplink.ipv6 {
            addrs.push(parse_cidr(a, "uplink.ipv6")?);
            // EUI-64 link-local so NDP from link-local peers works.
            let mut ll = [0u8; 16];
            ll[0] = 0xfe;
            ll[1] = 0x80;
            ll[8] = mac[0] ^ 2;
            ll[9] = mac[1];
            ll[10] = mac[2];
            ll[11] = 0xff;
            ll[12] = 0xfe;
            ll[13] = mac[3];
            ll[14] = mac[4];
            ll[15] = mac[5];
            addrs.push(IpCidr::new(IpAddress::Ipv6(Ipv6Address::from(ll)), 64));
        }
        let gateway4 = cfg
            .uplink
            .gateway4
            .as_deref()
            .map(|g| {
                g.parse()
                    .map_err(|_| anyhow::anyhow!("uplink.gateway4: {g:?} is not an IPv4 address"))
            })
            .transpose()?;
        let gateway6 = cfg
            .uplink
            .gateway6
            .as_deref()
            .map(|g| {
                g.parse()
                    .map_err(|_| anyhow::anyhow!("uplink.gateway6: {g:?} is not an IPv6 address"))
            })
            .transpose()?;
        let seed = {
            let mut b = [0u8; 8];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .ok();
            u64::from_le_bytes(b) ^ std::process::id() as u64
        };
        let stack = Stack::new(
            StackConfig {
                mac,
                mtu: up.mtu(),
                addrs,
                gateway4,
                gateway6,
                tcp_rx_buf: cfg.tcp.rx_buffer,
                tcp_tx_buf: cfg.tcp.tx_buffer,
                tcp_rx_buf_max: cfg.tcp.rx_buffer_max,
                tcp_rx_large_budget: cfg.tcp.rx_large_budget_mb << 20,
                tcp_ack_delay: (cfg.tcp.ack_delay_ms > 0)
                    .then(|| smoltcp::time::Duration::from_millis(cfg.tcp.ack_delay_ms)),
                tcp_ack_delay_max: smoltcp::time::Duration::from_millis(cfg.tcp.ack_delay_max_ms),
                tcp_timestamps: cfg.tcp.timestamps,
                tcp_loss_recovery: cfg.tcp.loss_recovery,
                tcp_user_timeout: (cfg.tcp.user_timeout_secs > 0)
                    .then(|| smoltcp::time::Duration::from_secs(cfg.tcp.user_timeout_secs)),
                udp_packets: 256,
                udp_bytes: 256 * 1024,
                max_flows: cfg.session.max_flows,
                seed,
                tso: up.tso(),
            },
            SInstant::from_micros(0),
        );
        let engine = Engine::new(
            stack,
            SessionConfig {
                fifo_size: cfg.session.fifo_size,
                ct_fifo_size: cfg.session.ct_fifo_size,
                segment_size: cfg.session.segment_size,
                ct_segment_size: cfg.session.ct_segment_size,
                connect_timeout: smoltcp::time::Duration::from_millis(cfg.tcp.connect_timeout_ms),
                max_sessions_per_app: cfg.session.max_sessions_per_app,
            },
        );
        std::fs::create_dir_all(&cfg.daemon.socket_dir)
            .with_context(|| format!("creating socket dir {}", cfg.daemon.socket_dir.display()))?;
        let epoll = Epoll::new(256)?;
        epoll.add(up.as_raw_fd(), T_UPLINK)?;
        let mut nss = cfg.namespaces.clone();
        if nss.is_empty() {
            nss.push(crate::config::NamespaceConfig {
                name: "default".into(),
                secret: std::env::var("HOSTSTACK_SECRET").unwrap_or_default(),
            });
        }
        let mut namespaces = Vec::new();
        for (i, n) in nss.iter().enumerate() {
            let path = cfg.daemon.socket_dir.join(format!("{}.sock", n.name));
            let l = sys::unix_listen(&path, libc::SOCK_SEQPACKET)
                .with_context(|| format!("listening on {}", path.display()))?;
            // Any local user may try to attach (apps often drop privileges,
            // like nginx's workers): the namespace secret is the check.
            // Restrict the socket directory to narrow it further.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
                .with_context(|| format!("chmod {}", path.display()))?;
            epoll.add(l.as_raw_fd(), T_ATTACH + i as u64)?;
            namespaces.push(Namespace {
                name: n.name.clone(),
                secret: n.secret.clone(),
                listener: l,
                path,
            });
        }
        let ctl_path = cfg.daemon.socket_dir.join("ctl.sock");
        let ctl = sys::unix_listen(&ctl_path, libc::SOCK_STREAM)
            .with_context(|| format!("listening on {}", ctl_path.display()))?;
        epoll.add(ctl.as_raw_fd(), T_CTL)?;
        let sig = sys::signalfd()?;
        epoll.add(sig.as_raw_fd(), T_SIGNAL)?;
        tracing::info!(
            interface = %cfg.uplink.interface,
            mac = ?mac,
            busy_poll = cfg.daemon.busy_poll,
            socket_dir = %cfg.daemon.socket_dir.display(),
            "hoststackd ready"
        );
        Ok(Daemon {
            cfg,
            engine,
            uplink: up,
            epoll,
            namespaces,
            pending: HashMap::new(),
            next_pending: 0,
            ctl,
            ctl_path,
            sig,
            start: Instant::now(),
            tx: TxBatch::default(),
            loops: 0,
            sleeps: 0,
            epoll_waits: 0,
            yields: 0,
            spin_pass: 0,
        })
    }

    fn now(&self) -> SInstant {
        SInstant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Run until SIGINT/SIGTERM.
    pub fn run(&mut self) -> Result<()> {
        let mut ready = Vec::with_capacity(256);
        let busy = self.cfg.daemon.busy_poll;
        let batch = self.cfg.daemon.rx_batch;
        let spin = std::time::Duration::from_micros(self.cfg.daemon.poll_spin_us);
        let yield_after_wake = self.cfg.daemon.yield_after_wake;
        let mut last_work = Instant::now();
        loop {
            self.loops += 1;
            // Wake the apps that got events in the last pass, now that the
            // whole batch is in their queues.
            if self.engine.flush_wakes() && yield_after_wake && !busy {
                // Let the apps just woken (on a shared CPU) handle their
                // batch now: their requests are then in the queues when
                // this pass decides whether to sleep, and need no wake-up.
                // Measured with Envoy on the daemon's CPU: -15% CPU per
                // request.
                self.yields += 1;
                std::thread::yield_now(); // sched_yield(2)
            }
            // Adaptive mode: keep polling for a short while after work, so a
            // reply arriving soon is caught without a sleep/wake-up pair.
            let spinning = !spin.is_zero() && last_work.elapsed() < spin;
            let now = self.now();
            let mut timeout: i32 = match self.engine.stack.next_deadline() {
                Some(t) if t <= now => 0,
                Some(t) => ((t - now).total_micros().div_ceil(1000)).min(1000) as i32,
                None => 1000,
            };
            let mut prepared = false;
            if busy || spinning {
                timeout = 0;
            } else if timeout > 0 {
                prepared = true;
                for a in self.engine.apps.values_mut() {
                    for w in a.workers.iter_mut().flatten() {
                        if !w.req.prepare_sleep() || !w.backlog.is_empty() {
                            timeout = 0;
                        }
                    }
                }
                if timeout > 0 {
                    self.sleeps += 1;
                }
            }
            // While spinning, look at the kernel side (epoll: uplink, sockets)
            // only every 8th pass; the app queues are checked every pass
            // from memory, without a syscall. A receive ring is checked from
            // memory every pass too; then epoll (control and attach sockets,
            // signals) is needed only every 64th.
            let ring_ready = self.uplink.rx_ready();
            let every = if ring_ready.is_some() { 63 } else { 7 };
            self.spin_pass = self.spin_pass.wrapping_add(1);
            let look = self.spin_pass & every == 0;
            if timeout > 0 || !(spinning || busy) || look {
                self.epoll_waits += 1;
                self.epoll.wait(timeout, &mut ready)?;
            } else {
                ready.clear();
            }
            if prepared {
                for a in self.engine.apps.values_mut() {
                    for w in a.workers.iter_mut().flatten() {
                        w.req.cancel_sleep();
                    }
                }
            }
            let now = self.now();
            let mut uplink_ready = match ring_ready {
                Some(r) => r,
                None => busy || (spinning && look),
            };
            for &tok in &ready {
                match tok {
                    T_UPLINK => uplink_ready = true,
                    T_SIGNAL => {
                        sys::drain_fd(self.sig.as_raw_fd());
                        tracing::info!("signal received, shutting down");
                        self.shutdown();
                        return Ok(());
                    }
                    T_CTL => self.serve_ctl(),
                    t if (T_ATTACH..T_ATTACH + 0x100).contains(&t) => {
                        self.accept_attach((t - T_ATTACH) as usize)
                    }
                    t if t & !0xff_ffff_ffff == T_PENDING => self.pending_attach(t),
                    t if t & !0xff_ffff_ffff == T_APP => {
                        self.app_ctrl(AppId((t & 0xffff_ffff) as u32), now)
                    }
                    t if t & !0xff_ffff_ffff == T_WAKE => {
                        let app = AppId(((t >> 16) & 0xff_ffff) as u32);
                        let w = (t & 0xffff) as u32;
                        if let Some(wk) = self.engine.apps.get_mut(&app).and_then(|a| a.worker(w)) {
                            wk.daemon_wake.drain();
                        }
                    }
                    _ => {}
                }
            }
            if uplink_ready {
                // Bounded: at most 4 batches before serving apps again.
                for _ in 0..4 {
                    let engine = &mut self.engine;
                    let tx = &mut self.tx;
                    let n = match self.uplink.recv_batch(batch, &mut |f: &[u8], ok: bool| {
                        engine.ingress(now, f, ok, tx)
                    }) {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(error = %e, "uplink receive");
                            0
                        }
                    };
                    // The frames the batch caused go first, then the
                    // flows' answers, straight into the uplink.
                    self.tx.hand_over(self.uplink.as_mut());
                    self.engine
                        .service_touched(now, &mut Direct(self.uplink.as_mut()));
                    self.tx.send(self.uplink.as_mut());
                    if n > 0 {
                        last_work = Instant::now();
                    }
                    if n < batch {
                        break;
                    }
                }
            }
            if self
                .engine
                .drain_requests(now, &mut Direct(self.uplink.as_mut()))
                > 0
            {
                last_work = Instant::now();
            }
            self.engine
                .poll_timers(now, &mut Direct(self.uplink.as_mut()));
            for app in self.engine.take_broken() {
                self.engine.stats.apps_killed += 1;
                self.drop_app_with(app, false, now);
            }
            self.tx.send(self.uplink.as_mut());
        }
    }

    /// An app went away (its attach socket closed): serve what it queued.
    fn drop_app(&mut self, app: AppId, now: SInstant) {
        self.drop_app_with(app, true, now)
    }

    fn drop_app_with(&mut self, app: AppId, drain: bool, now: SInstant) {
        if let Some(a) = self.engine.apps.get(&app) {
            self.epoll.del(a.ctrl.as_raw_fd());
            for w in a.workers.iter().flatten() {
                self.epoll.del(w.daemon_wake.as_raw_fd());
            }
        }
        self.engine
            .remove_app_with(app, drain, now, &mut Direct(self.uplink.as_mut()));
    }

    fn shutdown(&mut self) {
        let now = self.now();
        let ids: Vec<AppId> = self.engine.apps.keys().copied().collect();
        for id in ids {
            if let Some(a) = self.engine.apps.get_mut(&id) {
                for w in a.workers.iter_mut().flatten() {
                    let _ = w.post(&session_api::msg::Event::Shutdown, None);
                    w.flush_wake();
                }
            }
            self.drop_app(id, now);
        }
        self.tx.send(self.uplink.as_mut());
        for n in &self.namespaces {
            let _ = std::fs::remove_file(&n.path);
        }
        let _ = std::fs::remove_file(&self.ctl_path);
    }

    fn accept_attach(&mut self, ns: usize) {
        let Some(n) = self.namespaces.get(ns) else {
            return;
        };
        for _ in 0..64 {
            match sys::unix_accept(n.listener.as_raw_fd()) {
                Ok(Some(fd)) => {
                    let id = self.next_pending;
                    self.next_pending += 1;
                    if self.epoll.add(fd.as_raw_fd(), T_PENDING + id).is_ok() {
                        self.pending.insert(id, (ns, fd));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on attach socket");
                    break;
                }
            }
        }
        // Bound half-open attach connections.
        if self.pending.len() > 1024 {
            let victims: Vec<u64> = self
                .pending
                .keys()
                .take(self.pending.len() - 1024)
                .copied()
                .collect();
            for v in victims {
                if let Some((_, fd)) = self.pending.remove(&v) {
                    self.epoll.del(fd.as_raw_fd());
                }
            }
        }
    }

    fn refuse(fd: &OwnedFd, errno: i32, message: &str) {
        tracing::warn!(errno, message, "attach refused");
        let m = DaemonCtrl::Error {
            errno,
            message: message.into(),
        }
        .encode();
        let _ = send_with_fds(fd.as_fd(), &m, &[]);
    }

    fn pending_attach(&mut self, tok: u64) {
        let id = tok - T_PENDING;
        let Some((ns, fd)) = self.pending.remove(&id) else {
            return;
        };
        self.epoll.del(fd.as_raw_fd());
        let mut buf = vec![0u8; CTRL_MAX];
        let (n, fds) = match recv_with_fds(fd.as_fd(), &mut buf, 4) {
            Ok(x) => x,
            Err(e) => {
                Self::refuse(&fd, libc::EPROTO, &format!("bad attach message: {e}"));
                return;
            }
        };
        drop(fds);
        if n == 0 {
            return; // peer went away
        }
        let msg = match AppCtrl::decode(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                let errno = match e {
                    session_api::proto::ProtoError::Version { .. } => libc::EPROTONOSUPPORT,
                    _ => libc::EPROTO,
                };
                Self::refuse(&fd, errno, &e.to_string());
                return;
            }
        };
        let AppCtrl::Attach {
            namespace,
            secret,
            name,
            pid,
        } = msg
        else {
            Self::refuse(&fd, libc::EPROTO, "first message must be Attach");
            return;
        };
        let nsd = &self.namespaces[ns];
        if namespace != nsd.name {
            Self::refuse(
                &fd,
                libc::EACCES,
                &format!(
                    "namespace {namespace:?} does not match socket {:?}",
                    nsd.name
                ),
            );
            return;
        }
        if !constant_time_eq(secret.as_bytes(), nsd.secret.as_bytes()) {
            Self::refuse(&fd, libc::EACCES, "wrong namespace secret");
            return;
        }
        let raw = fd.as_raw_fd();
        let app = match self.engine.add_app(name.clone(), namespace, pid, fd) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create app segment");
                return;
            }
        };
        let a = &self.engine.apps[&app];
        let seg = &a.segments[&a.main_segment];
        let m = DaemonCtrl::AttachOk {
            app_id: app.0,
            segment: seg.id,
            size: seg.region.len() as u64,
        }
        .encode();
        if send_with_fds(a.ctrl.as_fd(), &m, &[seg.region.fd()]).is_err()
            || self.epoll.add(raw, T_APP + app.0 as u64).is_err()
        {
            let now = self.now();
            self.engine
                .remove_app(app, now, &mut Direct(self.uplink.as_mut()));
            return;
        }
        tracing::info!(app = app.0, name, pid, "app attached");
    }

    fn app_ctrl(&mut self, app: AppId, now: SInstant) {
        let mut buf = vec![0u8; CTRL_MAX];
        for _ in 0..16 {
            let Some(a) = self.engine.apps.get_mut(&app) else {
                return;
            };
            let r = recv_with_fds(a.ctrl.as_fd(), &mut buf, 4);
            let n = match r {
                Ok((0, _)) => {
                    // Detach: honour requests still queued (graceful closes)
                    // before resetting whatever is left open.
                    self.engine
                        .drain_requests(now, &mut Direct(self.uplink.as_mut()));
                    self.drop_app(app, now);
                    return;
                }
                Ok((n, _fds)) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.drop_app(app, now);
                    return;
                }
            };
            match AppCtrl::decode(&buf[..n]) {
                Ok(AppCtrl::AddWorker) => {
                    let seg = a.main_segment;
                    match a.add_worker() {
                        Ok(idx) => {
                            let Some(w) = a.workers[idx as usize].as_ref() else {
                                return;
                            };
                            let (rq, _eq) =
                                (session_api::mq::mq_footprint(crate::app::REQ_SLOTS), 0);
                            let m = DaemonCtrl::WorkerOk {
                                worker: w.index,
                                segment: seg,
                                req_off: w.q_off,
                                req_slots: crate::app::REQ_SLOTS,
                                evt_off: w.q_off + rq as u32,
                                evt_slots: crate::app::EVT_SLOTS,
                            }
                            .encode();
                            let tok = T_WAKE | (app.0 as u64) << 16 | w.index as u64;
                            let wfd = w.daemon_wake.as_raw_fd();
                            let sent = send_with_fds(
                                a.ctrl.as_fd(),
                                &m,
                                &[w.daemon_wake.fd(), w.app_wake.fd()],
                            );
                            if sent.is_err() || self.epoll.add(wfd, tok).is_err() {
                                self.drop_app(app, now);
                                return;
                            }
                        }
                        Err(e) => {
                            let m = DaemonCtrl::Error {
                                errno: e.raw_os_error().unwrap_or(libc::ENOMEM),
                                message: format!("cannot add worker: {e}"),
                            }
                            .encode();
                            let _ = send_with_fds(a.ctrl.as_fd(), &m, &[]);
                        }
                    }
                }
                Ok(AppCtrl::DelWorker { worker }) => {
                    if let Some(w) = a.worker(worker) {
                        let fd = w.daemon_wake.as_raw_fd();
                        self.epoll.del(fd);
                    }
                    self.engine
                        .drain_requests(now, &mut Direct(self.uplink.as_mut()));
                    self.engine
                        .remove_worker(app, worker, now, &mut Direct(self.uplink.as_mut()));
                }
                Ok(AppCtrl::AddChannel { worker }) => {
                    // Disjoint borrows: the reply goes out with the
                    // channel's eventfd still borrowed from the worker.
                    let ctrl = &a.ctrl;
                    let w = a.workers.get_mut(worker as usize).and_then(|w| w.as_mut());
                    let r = match w {
                        Some(w) => w.add_channel().map(|c| {
                            c.map(|(channel, efd)| {
                                (DaemonCtrl::ChannelOk { worker, channel }.encode(), efd.fd())
                            })
                        }),
                        None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
                    };
                    let refuse = |errno: i32, why: String| {
                        let m = DaemonCtrl::Error {
                            errno,
                            message: format!("no wake channel for worker {worker}: {why}"),
                        };
                        send_with_fds(ctrl.as_fd(), &m.encode(), &[])
                    };
                    let sent = match r {
                        Ok(Some((m, fd))) => send_with_fds(ctrl.as_fd(), &m, &[fd]),
                        Ok(None) => refuse(libc::EMFILE, "all taken".into()),
                        Err(e) => refuse(e.raw_os_error().unwrap_or(libc::ENOMEM), e.to_string()),
                    };
                    if sent.is_err() {
                        self.drop_app(app, now);
                        return;
                    }
                }
                Ok(AppCtrl::DelChannel { worker, channel }) => {
                    if let Some(w) = a.worker(worker) {
                        w.del_channel(channel);
                    }
                }
                Ok(AppCtrl::Attach { .. }) | Err(_) => {
                    tracing::warn!(app = app.0, "malformed control message; disconnecting app");
                    self.drop_app(app, now);
                    return;
                }
            }
        }
    }

    fn serve_ctl(&mut self) {
        for _ in 0..8 {
            let fd = match sys::unix_accept(self.ctl.as_raw_fd()) {
                Ok(Some(fd)) => fd,
                _ => return,
            };
            let mut s = std::os::unix::net::UnixStream::from(fd);
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(std::time::Duration::from_millis(500)));
            let mut line = Vec::new();
            let mut b = [0u8; 256];
            while !line.contains(&b'\n') && line.len() < 4096 {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => line.extend_from_slice(&b[..n]),
                }
            }
            let cmd = String::from_utf8_lossy(&line).trim().to_string();
            let reply = self.ctl_reply(&cmd);
            let _ = s.write_all(reply.to_string().as_bytes());
            let _ = s.write_all(b"\n");
        }
    }

    /// Answer a `hoststackctl` query (JSON).
    fn ctl_reply(&mut self, cmd: &str) -> serde_json::Value {
        use serde_json::json;
        let apps: Vec<serde_json::Value> = self
            .engine
            .apps
            .values()
            .map(|a| {
                json!({
                    "id": a.id.0, "name": a.name, "namespace": a.namespace, "pid": a.pid,
                    "workers": a.workers.iter().flatten().map(|w| json!({
                        "index": w.index, "requests": w.requests, "events": w.events,
                        "wakeups": w.wakeups, "backlog": w.backlog.len(),
                        "channels": w.channels.iter().filter(|c| c.is_some()).count(),
                    })).collect::<Vec<_>>(),
                    "shm_bytes": a.shm_bytes(),
                })
            })
            .collect();
        let st = self.uplink.stats();
        let iface = json!({
            "name": self.uplink.name(), "kind": format!("{:?}", self.cfg.uplink.kind),
            "mac": self.uplink.mac().map(|b| format!("{b:02x}")).join(":"), "mtu": self.uplink.mtu(),
            "ipv4": self.cfg.uplink.ipv4, "ipv6": self.cfg.uplink.ipv6,
            "gateway4": self.cfg.uplink.gateway4, "gateway6": self.cfg.uplink.gateway6,
            "stats": st,
        });
        let counters = json!({
            "stack": self.engine.stack.stats(),
            "session": self.engine.stats,
            "flows": self.engine.stack.flow_count(),
            "sessions": self.engine.session_count(),
            "apps": self.engine.apps.len(),
            "loops": self.loops,
            "sleeps": self.sleeps,
            "epoll_waits": self.epoll_waits,
            "yields": self.yields,
            "rss_bytes": sys::rss_bytes(),
        });
        match cmd {
            "apps" | "workers" => json!({ "apps": apps }),
            "sessions" => {
                json!({ "sessions": self.engine.session_info(), "listeners": self.engine.listener_info() })
            }
            "interfaces" => json!({ "interfaces": [iface] }),
            "counters" => json!({ "counters": counters }),
            _ => json!({
                "apps": apps,
                "sessions": self.engine.session_info(),
                "listeners": self.engine.listener_info(),
                "interfaces": [iface],
                "counters": counters,
            }),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuse to start without what we need, with a clear message.
pub fn preflight(cfg: &Config) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && cfg.uplink.kind == uplink::UplinkKind::AfPacket {
        bail!("hoststackd needs root (CAP_NET_RAW) to open an AF_PACKET uplink");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingress_batch_reuses_its_buffer_and_clears_headers() {
        let mut b = TxBatch::default();
        b.tx_frame(1000).fill(0xaa);
        b.tx_frame_gso(3000, Some(1448)).fill(0xbb);
        assert_eq!(b.frames, vec![(0, 1000, None), (1000, 3000, Some(1448))]);
        b.used = 0;
        b.frames.clear();
        let f = b.tx_frame(2000);
        assert!(f[..160].iter().all(|&x| x == 0), "stale header bytes");
        assert_eq!(
            b.buf.len(),
            4000,
            "no growth while the high-water mark holds"
        );
    }
}
