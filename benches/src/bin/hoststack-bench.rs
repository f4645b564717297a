//! Side-by-side end-to-end benchmark: every scenario runs on hoststack and
//! on the kernel in the same run, on the same machine, and the table gives
//! the ratio. Needs root (it builds a veth + netns testbed, 198.18.0.0/15).
//!
//! `hoststack-bench [--quick] [--json FILE] [--markdown FILE] [--chart FILE.svg]`
//!
//! Roles used internally (kernel sockets; run inside the peer namespace, or
//! under `hoststack run` for the shim rows): `kernel-echo ADDR`,
//! `kernel-sink ADDR`, `kernel-source ADDR`, `kernel-hold ADDR`, `pingpong ADDR N`,
//! `udp-sink ADDR SECS`, `udp-blast ADDR SECS`.

#[path = "../chart.rs"]
mod chart;
#[path = "../http_bench.rs"]
mod http_bench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use hoststack_tests::Testbed;
use session_api::client::{App, Error as CErr};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "hoststack-bench", about = "hoststack vs kernel, side by side")]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Fewer iterations (CI smoke run).
    #[arg(long)]
    quick: bool,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// Daemon adaptive polling window (`--poll-spin-us`), 0 = pure interrupt.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Repetitions per scenario (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per wrk run in the HTTP scenarios (0 skips them).
    #[arg(long, alias = "nginx-secs", default_value_t = 5)]
    http_secs: u64,
    /// Only the HTTP scenarios (nginx, short connections, scale, Envoy).
    #[arg(long, alias = "nginx-only")]
    http_only: bool,
    /// Skip the 100 vs 10 000 connections scenario.
    #[arg(long)]
    no_scale: bool,
    /// Skip the Envoy scenarios.
    #[arg(long)]
    no_envoy: bool,
    /// Run only these HTTP scenarios (comma-separated: nginx = keep-alive,
    /// plain = keep-alive with sendfile off, short, scale, envoy); implies
    /// --http-only.
    #[arg(long, value_delimiter = ',', value_parser = ["nginx", "plain", "short", "scale", "envoy"])]
    only: Vec<String>,
    /// Draw the gains as an SVG bar chart here.
    #[arg(long)]
    chart: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
#[allow(clippy::enum_variant_names)] // the roles are all kernel-side peers
enum Role {
    /// Kernel TCP echo server (one connection at a time, nodelay).
    KernelEcho { addr: SocketAddr },
    /// Kernel TCP sink: reads each connection to EOF, replies "done N".
    KernelSink { addr: SocketAddr },
    /// Kernel TCP source: on each connection reads a line "N" and sends N
    /// bytes, then closes.
    KernelSource { addr: SocketAddr },
    /// Kernel TCP listener that accepts and holds connections.
    KernelHold { addr: SocketAddr },
    /// 64 B ping-pong client (kernel sockets, or the shim under
    /// `hoststack run`): prints "rtt_us N" (the median).
    Pingpong { addr: SocketAddr, n: usize },
    /// Count 64 B datagrams for SECS from the first one: prints "count N".
    UdpSink { addr: SocketAddr, secs: f64 },
    /// Send 64 B datagrams for SECS: prints "sent N".
    UdpBlast { addr: SocketAddr, secs: f64 },
}

const T: Duration = Duration::from_secs(60);

/// CPU for the client side (this process's main thread).
const CLIENT_CPU: usize = 0;
/// CPU for the server side: server threads, the daemon, peer processes.
pub(crate) const SERVER_CPU: usize = 1;

/// CPUs online (not `available_parallelism`, which shrinks to the calling
/// thread's affinity mask once it is pinned).
fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

/// Pin a thread or process (`pid` 0 = the calling thread) to one CPU.
fn pin(pid: i32, cpu: usize) {
    let n = online_cpus();
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pin every thread of process `pid` to one CPU.
fn pin_process(pid: u32, cpu: usize) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for t in tasks.into_iter().flatten().flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) {
            pin(tid, cpu);
        }
    }
}

fn kernel_echo(addr: SocketAddr) -> Result<()> {
    pin(0, SERVER_CPU);
    let l = TcpListener::bind(addr)?;
    println!("ready");
    for c in l.incoming() {
        let mut c = c?;
        c.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut b = [0u8; 65536];
            while let Ok(n) = c.read(&mut b) {
                if n == 0 || c.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn kernel_sink(addr: SocketAddr) -> Result<()> {
    pin(0, SERVER_CPU);
    let l = TcpListener::bind(addr)?;
    println!("ready");
    for c in l.incoming() {
        let mut c = c?;
        std::thread::spawn(move || {
            let mut b = vec![0u8; 1 << 20];
            let mut n = 0u64;
            while let Ok(k) = c.read(&mut b) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = c.write_all(format!("done {n}\n").as_bytes());
        });
    }
    Ok(())
}

fn kernel_source(addr: SocketAddr) -> Result<()> {
    pin(0, SERVER_CPU);
    let l = TcpListener::bind(addr)?;
    println!("ready");
    for c in l.incoming() {
        let mut c = c?;
        std::thread::spawn(move || -> Result<()> {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while c.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let mut left: u64 = String::from_utf8_lossy(&line).trim().parse()?;
            let buf = vec![3u8; 1 << 20];
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                c.write_all(&buf[..k])?;
                left -= k as u64;
            }
            Ok(())
        });
    }
    Ok(())
}

fn kernel_hold(addr: SocketAddr) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 20000,
        rlim_max: 20000,
    };
    // SAFETY: setrlimit with a valid struct; failure only limits the test.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let l = TcpListener::bind(addr)?;
    println!("ready");
    let mut held = Vec::new();
    for c in l.incoming() {
        held.push(c?);
    }
    Ok(())
}

fn pingpong_role(addr: SocketAddr, n: usize) -> Result<()> {
    pin(0, CLIENT_CPU);
    let rtt = kernel_pingpong(addr, n)?;
    println!("rtt_us {rtt}");
    Ok(())
}

fn udp_sink(addr: SocketAddr, secs: f64) -> Result<()> {
    pin(0, SERVER_CPU);
    let s = std::net::UdpSocket::bind(addr)?;
    println!("ready");
    println!("count {}", udp_count(&s, secs)?);
    Ok(())
}

/// Count 64 B datagrams on `s` for `secs` from the first one.
fn udp_count(s: &std::net::UdpSocket, secs: f64) -> Result<u64> {
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    count_datagrams(secs, |b| Ok(s.recv(b).ok()))
}

/// Count 64 B datagrams for `secs` from the first one; `recv` returns a
/// datagram's length, or `None` after ~100 ms without one.
fn count_datagrams(
    secs: f64,
    mut recv: impl FnMut(&mut [u8]) -> Result<Option<usize>>,
) -> Result<u64> {
    let mut b = [0u8; 2048];
    let give_up = Instant::now() + T;
    let mut first = None;
    let mut n = 0u64;
    loop {
        let now = Instant::now();
        match first {
            Some(t0) if now.duration_since(t0).as_secs_f64() >= secs => break,
            None if now > give_up => bail!("no datagram within {T:?}"),
            _ => {}
        }
        if recv(&mut b)? == Some(64) {
            first.get_or_insert(now);
            n += 1;
        }
    }
    Ok(n)
}

fn udp_blast(addr: SocketAddr, secs: f64) -> Result<()> {
    pin(0, CLIENT_CPU);
    println!("sent {}", udp_send(addr, secs)?);
    Ok(())
}

/// Send 64 B datagrams to `addr` for `secs`; returns how many.
fn udp_send(addr: SocketAddr, secs: f64) -> Result<u64> {
    let s = std::net::UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let msg = [5u8; 64];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            // ENOBUFS/EAGAIN under overload: the datagram is dropped, as
            // UDP allows; the sink counts what arrived.
            if s.send_to(&msg, addr).is_ok() {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Blast 64 B datagrams at `addr` from the peer namespace while `sink`
/// (already bound there) counts them for `secs`: received messages/s.
fn udp_receive_rate(
    tb: &Testbed,
    addr: SocketAddr,
    secs: f64,
    sink: std::thread::JoinHandle<Result<u64>>,
) -> Result<f64> {
    let mut blast = peer_role_args(
        tb,
        &["udp-blast", &addr.to_string(), &(secs + 1.0).to_string()],
        "",
    )?;
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("udp sink panicked"))??;
    blast.success(T)?;
    Ok(got as f64 / secs)
}

/// Native UDP sender (uplink) for `secs`; returns datagrams sent.
fn native_udp_blast(app: &App, to: SocketAddr, secs: f64) -> Result<u64> {
    let mut w = app.worker()?;
    let s = w.udp_bind("0.0.0.0:0".parse()?)?;
    let msg = [5u8; 64];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            w.send_to(s, &msg, Some(to), Some(T))?;
            n += 1;
        }
    }
    w.close(s)?;
    Ok(n)
}

/// Native UDP receiver: counts 64 B datagrams for `secs` from the first.
fn native_udp_sink(
    app: &App,
    addr: SocketAddr,
    secs: f64,
) -> Result<(
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<Result<u64>>,
)> {
    let app = app.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || -> Result<u64> {
        pin(0, SERVER_CPU);
        let mut w = app.worker()?;
        let s = w.udp_bind(addr)?;
        tx.send(())?;
        let n = count_datagrams(secs, |b| {
            match w.recv_from(s, b, Some(Duration::from_millis(100))) {
                Ok((k, _)) => Ok(Some(k)),
                Err(CErr::WouldBlock) | Err(CErr::TimedOut) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })?;
        w.close(s)?;
        Ok(n)
    });
    Ok((rx, h))
}

/// One measured scenario.
#[derive(serde::Serialize, Clone)]
struct Row {
    scenario: String,
    metric: String,
    hoststack: f64,
    kernel: f64,
    /// hoststack / kernel for throughput, kernel / hoststack for latency:
    /// > 1 means hoststack is better.
    gain: f64,
    note: String,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Ping-pong over any byte stream; returns the median RTT in µs.
fn pingpong_rtts(n: usize, mut rt: impl FnMut(&mut [u8; 64]) -> Result<()>) -> Result<f64> {
    let mut msg = [7u8; 64];
    for _ in 0..(n / 10).max(10) {
        rt(&mut msg)?; // warm-up
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        rt(&mut msg)?;
        v.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(v))
}

fn kernel_pingpong(addr: SocketAddr, n: usize) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, T)?;
    s.set_nodelay(true)?;
    pingpong_rtts(n, |m| {
        s.write_all(m)?;
        s.read_exact(m)?;
        Ok(())
    })
}

fn native_pingpong(app: &App, addr: SocketAddr, n: usize, busy: bool) -> Result<(f64, u64)> {
    let mut w = app.worker()?;
    w.set_busy_poll(busy);
    let s = w.connect(addr, Some(T))?;
    w.set_nodelay(s, true)?;
    let before = w.stats().syscalls;
    let rtt = pingpong_rtts(n, |m| {
        w.write_all(s, m, Some(T))?;
        let mut got = 0;
        while got < 64 {
            let k = w.read(s, &mut m[got..], Some(T))?;
            if k == 0 {
                bail!("EOF");
            }
            got += k;
        }
        Ok(())
    })?;
    let sys = w.stats().syscalls - before;
    w.close(s)?;
    pin(0, CLIENT_CPU);
    Ok((rtt, sys))
}

/// Native echo server on a thread (one worker, serves one connection).
fn native_echo_thread(
    app: &App,
    addr: SocketAddr,
    busy: bool,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let app = app.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || -> Result<()> {
        pin(0, SERVER_CPU);
        let mut w = app.worker()?;
        w.set_busy_poll(busy);
        let l = w.listen(addr)?;
        tx.send(())?;
        let s = w.accept(l, Some(T))?;
        let mut b = [0u8; 65536];
        loop {
            let n = match w.read(s, &mut b, Some(T)) {
                Ok(0) | Err(CErr::Errno(_)) => break,
                Ok(n) => n,
                Err(e) => return Err(e.into()),
            };
            w.write_all(s, &b[..n], Some(T))?;
        }
        let _ = w.close(s);
        w.unlisten(l)?;
        Ok(())
    });
    rx.recv_timeout(T).context("echo thread did not start")?;
    Ok(h)
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn kernel_bulk_lo(bytes: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let h = std::thread::spawn(move || -> Result<u64> {
        pin(0, SERVER_CPU);
        let (mut c, _) = l.accept()?;
        let mut b = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = c.read(&mut b)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok(n)
    });
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let got = h.join().map_err(|_| anyhow::anyhow!("sink panicked"))??;
    let d = t0.elapsed();
    if got != sent {
        bail!("kernel loopback lost bytes: {got} != {sent}");
    }
    Ok(gbps(sent, d))
}

fn native_bulk_ct(app: &App, port: u16, bytes: u64) -> Result<f64> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let app2 = app.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || -> Result<u64> {
        pin(0, SERVER_CPU);
        let mut w = app2.worker()?;
        let l = w.listen(addr)?;
        tx.send(())?;
        let s = w.accept(l, Some(T))?;
        let mut b = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = w.read(s, &mut b, Some(T))?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        w.close(s)?;
        w.unlisten(l)?;
        Ok(n)
    });
    rx.recv_timeout(T)?;
    let mut w = app.worker()?;
    let s = w.connect(addr, Some(T))?;
    let buf = vec![1u8; 1 << 20];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        w.write_all(s, &buf, Some(T))?;
        sent += buf.len() as u64;
    }
    w.close(s)?;
    let got = h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let d = t0.elapsed();
    if got != sent {
        bail!("cut-through lost bytes: {got} != {sent}");
    }
    Ok(gbps(sent, d))
}

/// How much a bulk sender sends.
#[derive(Clone, Copy)]
enum Amount {
    /// This many bytes, in 1 MiB writes.
    Bytes(u64),
    /// For this many seconds, in 64 KiB writes. Under loss the rate may be
    /// orders of magnitude below the loss-free one: a byte count could take
    /// minutes.
    Secs(f64),
}

impl Amount {
    fn write_size(self) -> usize {
        match self {
            Amount::Bytes(_) => 1 << 20,
            Amount::Secs(_) => 64 << 10,
        }
    }

    fn more(self, sent: u64, t0: Instant) -> bool {
        match self {
            Amount::Bytes(b) => sent < b,
            Amount::Secs(s) => t0.elapsed().as_secs_f64() < s,
        }
    }
}

/// Send to a `kernel-sink` and wait for its "done N": Gbit/s over the
/// whole exchange.
fn kernel_bulk_to(addr: SocketAddr, amount: Amount) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, T)?;
    s.set_write_timeout(Some(T))?;
    s.set_read_timeout(Some(T))?;
    let buf = vec![1u8; amount.write_size()];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while amount.more(sent, t0) {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let d = t0.elapsed();
    if r.trim() != format!("done {sent}") {
        bail!("sink said {r:?} after {sent} bytes");
    }
    Ok(gbps(sent, d))
}

fn native_bulk_to(app: &App, addr: SocketAddr, amount: Amount) -> Result<f64> {
    let mut w = app.worker()?;
    let s = w.connect(addr, Some(T))?;
    let buf = vec![1u8; amount.write_size()];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while amount.more(sent, t0) {
        w.write_all(s, &buf, Some(T))?;
        sent += buf.len() as u64;
    }
    w.shutdown(s, session_api::msg::Shut::Write)?;
    let mut r = Vec::new();
    let mut b = [0u8; 64];
    loop {
        let n = w.read(s, &mut b, Some(T))?;
        if n == 0 {
            break;
        }
        r.extend_from_slice(&b[..n]);
    }
    let d = t0.elapsed();
    w.close(s)?;
    let r = String::from_utf8_lossy(&r);
    if r.trim() != format!("done {sent}") {
        bail!("sink said {r:?} after {sent} bytes");
    }
    Ok(gbps(sent, d))
}

/// What a bulk receiver asks a `kernel-source` for: the bytes, or (timed)
/// more than it will read before it hangs up.
fn source_request(amount: Amount) -> String {
    match amount {
        Amount::Bytes(b) => format!("{b}\n"),
        Amount::Secs(_) => format!("{}\n", 1u64 << 50),
    }
}

/// Receive from a `kernel-source` (to EOF, or until the time is up and
/// then hang up): Gbit/s.
fn kernel_bulk_from(addr: SocketAddr, amount: Amount) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, T)?;
    s.set_read_timeout(Some(T))?;
    let t0 = Instant::now();
    s.write_all(source_request(amount).as_bytes())?;
    let mut b = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while !matches!(amount, Amount::Secs(x) if t0.elapsed().as_secs_f64() >= x) {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let d = t0.elapsed();
    if let Amount::Bytes(want) = amount {
        if got != want {
            bail!("kernel source sent {got} of {want} bytes");
        }
    }
    Ok(gbps(got, d))
}

fn native_bulk_from(app: &App, addr: SocketAddr, amount: Amount) -> Result<f64> {
    let mut w = app.worker()?;
    let s = w.connect(addr, Some(T))?;
    let t0 = Instant::now();
    w.write_all(s, source_request(amount).as_bytes(), Some(T))?;
    let mut b = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while !matches!(amount, Amount::Secs(x) if t0.elapsed().as_secs_f64() >= x) {
        let n = w.read(s, &mut b, Some(T))?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let d = t0.elapsed();
    match amount {
        Amount::Bytes(want) => {
            w.close(s)?;
            if got != want {
                bail!("kernel source sent {got} of {want} bytes");
            }
        }
        // Unread data on the way: hang up.
        Amount::Secs(_) => w.abort(s)?,
    }
    Ok(gbps(got, d))
}

/// Drops `percent`% of the TCP packets to and from `ports` in the peer
/// namespace (nftables, random per packet; a veth carries TSO/GRO
/// super-frames, so one drop can take up to 64 KiB) while it lives.
struct Loss<'a> {
    tb: &'a Testbed,
    table: String,
}

impl<'a> Loss<'a> {
    /// `None` when nft is not installed (the rows are then skipped).
    fn start(tb: &'a Testbed, percent: u32, ports: &[u16]) -> Result<Option<Self>> {
        if std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_err()
        {
            return Ok(None);
        }
        let table = format!("hsbench_loss_{}", std::process::id());
        let set = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet {table} {{\n\
             chain in {{ type filter hook input priority 0; tcp dport {{ {set} }} numgen random mod 100 < {percent} drop; }}\n\
             chain out {{ type filter hook output priority 0; tcp sport {{ {set} }} numgen random mod 100 < {percent} drop; }}\n\
             }}\n"
        );
        let mut c = tb.peer_cmd("nft", &["-f", "-"]);
        c.stdin(std::process::Stdio::piped());
        let mut child = c.spawn().context("nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        if !child.wait()?.success() {
            bail!("nft refused the loss rules");
        }
        Ok(Some(Loss { tb, table }))
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        let _ = self
            .tb
            .peer_cmd("nft", &["delete", "table", "inet", &self.table])
            .status();
    }
}

fn peer_role(tb: &Testbed, role: &str, addr: &str) -> Result<Proc> {
    peer_role_args(tb, &[role, addr], "ready")
}

/// This binary in the peer namespace with `args`; waits for `ready`.
fn peer_role_args(tb: &Testbed, args: &[&str], ready: &str) -> Result<Proc> {
    let me = std::env::current_exe()?;
    let me = me.display().to_string();
    let mut p = Proc::spawn(tb.peer_cmd(&me, args), args[0])?;
    if !ready.is_empty() {
        p.expect(ready, T)?;
    }
    Ok(p)
}

/// This binary under the shim (`hoststack run`), pinned to `cpu`.
fn shim_role(d: &Daemon, cpu: usize, args: &[&str]) -> Result<Proc> {
    let mut c = std::process::Command::new("taskset");
    c.args(["-c", &cpu.to_string()])
        .arg(bin("hoststack")?)
        .args(["run", "--strict", "--"])
        .arg(std::env::current_exe()?)
        .args(args)
        .envs(d.env());
    Proc::spawn(c, args[0])
}

/// The number after `key` in a line of `p`'s output.
fn expect_num(p: &mut Proc, key: &str) -> Result<f64> {
    let l = p.expect(key, T)?;
    l.trim()
        .strip_prefix(key)
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("bad line {l:?}"))
}

/// 64 B ping-pong with this binary's kernel-socket client and echo under
/// the shim: cut-through (echo on loopback under the shim too) or uplink
/// (`echo` = a kernel echo in the peer namespace). Median RTT in µs.
fn shim_pingpong(d: &Daemon, echo: Option<SocketAddr>, port: u16, n: usize) -> Result<f64> {
    let (addr, _server) = match echo {
        Some(a) => (a, None),
        None => {
            let a: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let mut p = shim_role(d, SERVER_CPU, &["kernel-echo", &a.to_string()])?;
            p.expect("ready", T)?;
            (a, Some(p))
        }
    };
    let mut c = shim_role(
        d,
        CLIENT_CPU,
        &["pingpong", &addr.to_string(), &n.to_string()],
    )?;
    let rtt = expect_num(&mut c, "rtt_us")?;
    c.success(T)?;
    Ok(rtt)
}

/// The HTTP scenarios (nginx keep-alive, short connections, 100 vs 10 000
/// connections, Envoy c1/c2), kernel then hoststack.
fn http_pairs(cli: &Cli, tb: &Testbed) -> Result<Vec<http_bench::Pair>> {
    // The daemon shares CPU 1 with the servers: spinning would only steal
    // their cycles (measured: 0.66x vs 0.75x requests per CPU second).
    // 32 KiB FIFOs: 10 000 sessions x 2 FIFOs fit an app's segment.
    let d = Daemon::start(tb, &["--poll-spin-us", "0", "--fifo-size", "32768"])?;
    if let Some(c) = d.child.as_ref() {
        pin_process(c.id(), SERVER_CPU);
    }
    let secs = if cli.quick {
        cli.http_secs.min(2)
    } else {
        cli.http_secs
    };
    let want = |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == name);
    http_bench::run_pairs(
        tb,
        &d,
        &http_bench::Plan {
            reps: cli.reps.max(1),
            secs,
            nginx: want("nginx"),
            short: want("short"),
            plain: want("plain"),
            scale: !cli.no_scale && want("scale"),
            envoy: !cli.no_envoy && want("envoy"),
        },
    )
}

/// The most removing a kernel share of the CPU can gain: 1 / (1 - share).
fn bound(kernel_share: f64) -> f64 {
    1.0 / (1.0 - kernel_share).max(1e-3)
}

/// Generic rows (JSON, chart) from the HTTP pairs.
fn http_rows(pairs: &[http_bench::Pair]) -> Vec<Row> {
    let mut rows = Vec::new();
    for p in pairs {
        let (k, h) = (&p.kernel, &p.hoststack);
        let row = |metric: &str, hv: f64, kv: f64, higher_better: bool, note: String| Row {
            scenario: p.scenario.clone(),
            metric: metric.into(),
            hoststack: hv,
            kernel: kv,
            gain: if higher_better { hv / kv } else { kv / hv },
            note,
        };
        let cpu1_bound = bound(k.kernel_share);
        let eff = k.cpu_per_1k / h.cpu_per_1k;
        rows.push(row(&p.unit, h.rps, k.rps, true, String::new()));
        rows.push(row(
            "p50 latency (ms)",
            h.p50_ms,
            k.p50_ms,
            false,
            String::new(),
        ));
        rows.push(row(
            "p99 latency (ms)",
            h.p99_ms,
            k.p99_ms,
            false,
            String::new(),
        ));
        rows.push(row(
            "CPU ms per 1000 requests (all-in)",
            h.cpu_per_1k * 1000.0,
            k.cpu_per_1k * 1000.0,
            false,
            format!(
                "busy time of CPU 1 (servers + daemon + softirq); kernel share {:.0}% (kernel run), {:.0}% (hoststack run)",
                k.kernel_share * 100.0,
                h.kernel_share * 100.0
            ),
        ));
        rows.push(row(
            "requests per CPU-second (all-in)",
            1000.0 / h.cpu_per_1k,
            1000.0 / k.cpu_per_1k,
            true,
            format!(
                "bound from the kernel share: {cpu1_bound:.2}x; reached {:.0}% of it",
                eff / cpu1_bound * 100.0
            ),
        ));
        rows.push(row(
            "requests per machine CPU-second (both CPUs, client included)",
            1000.0 / h.machine_cpu_per_1k,
            1000.0 / k.machine_cpu_per_1k,
            true,
            "attribution-free: over a veth a kernel server's receive runs on the client's CPU"
                .into(),
        ));
        rows.push(row(
            "requests per app CPU-second (per worker)",
            1000.0 / h.app_cpu_per_1k,
            1000.0 / k.app_cpu_per_1k,
            true,
            format!(
                "the app's own CPU (nginx, or Envoy); daemon not counted; ceiling {:.2}x (app kernel share {:.0}%)",
                bound(k.app_kernel_share),
                k.app_kernel_share * 100.0
            ),
        ));
        if let (Some(hs), Some(ks)) = (h.syscalls_per_req, k.syscalls_per_req) {
            rows.push(row(
                "syscalls per request",
                hs,
                ks,
                false,
                "nginx worker, perf".into(),
            ));
        }
    }
    rows
}

/// The HTTP table: one line per side and the ratio.
fn http_markdown(pairs: &[http_bench::Pair]) -> String {
    let mut md = String::from(
        "| scenario | side | rate | p50 ms | p99 ms | CPU ms / 1000 req (all-in) | kernel share | req per CPU-s (all-in) | req per app CPU-s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in pairs {
        for (side, s) in [("kernel", &p.kernel), ("hoststack", &p.hoststack)] {
            md.push_str(&format!(
                "| {} | {side} | {:.0} {} | {:.2} | {:.2} | {:.1} | {:.0}% | {:.0} | {:.0} |\n",
                p.scenario,
                s.rps,
                p.unit,
                s.p50_ms,
                s.p99_ms,
                s.cpu_per_1k * 1000.0,
                s.kernel_share * 100.0,
                1000.0 / s.cpu_per_1k,
                1000.0 / s.app_cpu_per_1k
            ));
        }
        let (k, h) = (&p.kernel, &p.hoststack);
        md.push_str(&format!(
            "| {} | **ratio** | **{:.2}x** | {:.2}x | {:.2}x | {:.2}x | bound {:.2}x | **{:.2}x** ({:.2}-{:.2}) | **{:.2}x** |\n",
            p.scenario,
            h.rps / k.rps,
            k.p50_ms / h.p50_ms,
            k.p99_ms / h.p99_ms,
            k.cpu_per_1k / h.cpu_per_1k,
            bound(k.kernel_share),
            k.cpu_per_1k / h.cpu_per_1k,
            p.all_in_range.0,
            p.all_in_range.1,
            k.app_cpu_per_1k / h.app_cpu_per_1k
        ));
    }
    md
}

/// How far each HTTP result is from what removing the kernel path can give:
/// the whole machine's CPU, and the bounds computed three ways.
fn http_accounting_markdown(pairs: &[http_bench::Pair]) -> String {
    let mut md = String::from(
        "| scenario | machine CPU ms / 1000 req, kernel | hoststack | ratio | bound from CPU 1's kernel share | reached | bound from the servers' kernel share | reached | per-app ceiling | reached |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in pairs {
        let (k, h) = (&p.kernel, &p.hoststack);
        let all_in = k.cpu_per_1k / h.cpu_per_1k;
        let per_app = k.app_cpu_per_1k / h.app_cpu_per_1k;
        let (b1, b2, b3) = (
            bound(k.kernel_share),
            bound(k.servers_kernel_share),
            bound(k.app_kernel_share),
        );
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2}x ({:.2}-{:.2}) | {b1:.2}x | {:.0}% | {b2:.2}x | {:.0}% | {b3:.2}x | {:.0}% |\n",
            p.scenario,
            k.machine_cpu_per_1k * 1000.0,
            h.machine_cpu_per_1k * 1000.0,
            k.machine_cpu_per_1k / h.machine_cpu_per_1k,
            p.machine_range.0,
            p.machine_range.1,
            all_in / b1 * 100.0,
            all_in / b2 * 100.0,
            per_app / b3 * 100.0,
        ));
    }
    md
}

fn run_all(cli: &Cli) -> Result<(Vec<http_bench::Pair>, Vec<Row>)> {
    if cli.http_only || !cli.only.is_empty() {
        pin(0, CLIENT_CPU);
        let tb = Testbed::new()?;
        return Ok((http_pairs(cli, &tb)?, Vec::new()));
    }
    let reps = cli.reps.max(1);
    // Client side on CPU 0; servers, the daemon and peer processes on CPU 1,
    // for hoststack and kernel runs alike.
    pin(0, CLIENT_CPU);
    let n_pp = if cli.quick { 2000 } else { 20000 };
    let bulk: u64 = if cli.quick { 256 << 20 } else { 1 << 30 };
    let mut rows = Vec::new();
    let tb = Testbed::new()?;
    // First, while the daemon's veth end has no kernel address (the kernel
    // runs below give it one).
    let http = if cli.http_secs > 0 {
        http_pairs(cli, &tb)?
    } else {
        Vec::new()
    };
    let udp_secs = if cli.quick { 1.0 } else { 2.0 };
    let peer = tb.peer_ip4;
    let _echo = peer_role(&tb, "kernel-echo", &format!("{peer}:5001"))?;
    let _sink = peer_role(&tb, "kernel-sink", &format!("{peer}:5002"))?;
    let _hold = peer_role(&tb, "kernel-hold", &format!("{peer}:5003"))?;
    let _source = peer_role(&tb, "kernel-source", &format!("{peer}:5006"))?;
    let echo_addr: SocketAddr = format!("{peer}:5001").parse()?;
    let sink_addr: SocketAddr = format!("{peer}:5002").parse()?;
    // The same sink over IPv6 (TSO builds IPv6 super-frames too).
    let _sink6 = peer_role(&tb, "kernel-sink", &format!("[{}]:5007", tb.peer_ip6))?;
    let sink6_addr: SocketAddr = format!("[{}]:5007", tb.peer_ip6).parse()?;
    let source_addr: SocketAddr = format!("{peer}:5006").parse()?;
    // Packet-loss rows: 1% of the bulk flows' packets dropped at the peer.
    let loss_secs = if cli.quick { 1.0 } else { 3.0 };
    let (mut up_rx, mut up_tx_loss, mut up_rx_loss) = (vec![], vec![], vec![]);
    let (mut k_rx, mut k_tx_loss, mut k_rx_loss) = (vec![], vec![], vec![]);
    let mut loss_ok = true;

    // ---- hoststack side ----
    let (mut ct_rtt, mut ct_busy_rtt, mut up_rtt, mut ct_bulk, mut up_bulk) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut up_bulk6, mut k_veth_bulk6) = (vec![], vec![]);
    let (mut ct_sys, mut up_sys) = (vec![], vec![]);
    let mut scale = Vec::new();
    let (mut shim_ct_rtt, mut shim_up_rtt) = (vec![], vec![]);
    let (mut udp_tx, mut udp_rx) = (vec![], vec![]);
    let udp_rx_addr: SocketAddr = format!("{}:5005", tb.daemon_ip4).parse()?;
    let udp_tx_addr: SocketAddr = format!("{peer}:5004").parse()?;
    {
        let spin = cli.spin_us.to_string();
        let d = Daemon::start(&tb, &["--poll-spin-us", &spin])?;
        if let Some(c) = d.child.as_ref() {
            pin_process(c.id(), SERVER_CPU);
        }
        let app = App::attach(&d.attach_config("bench"))?;
        for r in 0..reps {
            let port = 6000 + r as u16 * 10;
            let h = native_echo_thread(&app, format!("127.0.0.1:{port}").parse()?, false)?;
            let (rtt, sys) =
                native_pingpong(&app, format!("127.0.0.1:{port}").parse()?, n_pp, false)?;
            h.join().map_err(|_| anyhow::anyhow!("echo panicked"))??;
            ct_rtt.push(rtt);
            ct_sys.push(sys as f64 / (n_pp + n_pp / 10) as f64);
            let h = native_echo_thread(&app, format!("127.0.0.1:{}", port + 1).parse()?, true)?;
            let (rtt, _) =
                native_pingpong(&app, format!("127.0.0.1:{}", port + 1).parse()?, n_pp, true)?;
            h.join().map_err(|_| anyhow::anyhow!("echo panicked"))??;
            ct_busy_rtt.push(rtt);
            let loops0 = d.counter(&["epoll_waits"])?;
            let (rtt, sys) = native_pingpong(&app, echo_addr, n_pp, false)?;
            let loops = d.counter(&["epoll_waits"])? - loops0;
            up_rtt.push(rtt);
            // App syscalls + daemon epoll_waits, per echoed message (the
            // uplink's recvmmsg/sendmmsg are counted separately below).
            up_sys.push((sys + loops) as f64 / (n_pp + n_pp / 10) as f64);
            ct_bulk.push(native_bulk_ct(&app, port + 2, bulk)?);
            up_bulk.push(native_bulk_to(&app, sink_addr, Amount::Bytes(bulk / 2))?);
            up_bulk6.push(native_bulk_to(&app, sink6_addr, Amount::Bytes(bulk / 2))?);
            up_rx.push(native_bulk_from(
                &app,
                source_addr,
                Amount::Bytes(bulk / 2),
            )?);
            // The same ping-pong through the shim (std sockets under
            // `hoststack run`).
            shim_ct_rtt.push(shim_pingpong(&d, None, port + 3, n_pp)?);
            shim_up_rtt.push(shim_pingpong(&d, Some(echo_addr), 0, n_pp)?);
            // UDP, 64 B: native sender -> kernel sink in the peer namespace,
            // and kernel sender in the peer namespace -> native receiver.
            let mut sink = peer_role_args(
                &tb,
                &["udp-sink", &udp_tx_addr.to_string(), &udp_secs.to_string()],
                "ready",
            )?;
            native_udp_blast(&app, udp_tx_addr, udp_secs + 1.0)?;
            udp_tx.push(expect_num(&mut sink, "count")? / udp_secs);
            let (ready, h) = native_udp_sink(&app, udp_rx_addr, udp_secs)?;
            ready.recv_timeout(T)?;
            udp_rx.push(udp_receive_rate(&tb, udp_rx_addr, udp_secs, h)?);
        }
        match Loss::start(&tb, 1, &[5002, 5006])? {
            Some(_loss) => {
                for _ in 0..reps {
                    up_tx_loss.push(native_bulk_to(&app, sink_addr, Amount::Secs(loss_secs))?);
                    up_rx_loss.push(native_bulk_from(
                        &app,
                        source_addr,
                        Amount::Secs(loss_secs),
                    )?);
                }
            }
            None => loss_ok = false,
        }
        // Scale: the same bulk flow with many idle connections open.
        let hold: SocketAddr = format!("{peer}:5003").parse()?;
        let mut w = app.worker()?;
        let mut idle = Vec::new();
        for target in [100usize, 5000] {
            while idle.len() < target {
                let mut toks = Vec::new();
                for _ in 0..(target - idle.len()).min(100) {
                    toks.push(w.connect_start(hold, None)?);
                }
                for t in toks {
                    let t0 = Instant::now();
                    loop {
                        if let Some(s) = w.connect_finish(t)? {
                            idle.push(s);
                            break;
                        }
                        if t0.elapsed() > T {
                            bail!("idle connection timed out");
                        }
                        let mut v = Vec::new();
                        w.poll_events(&mut v, Some(Duration::from_millis(10)))?;
                    }
                }
            }
            let mut v = vec![];
            for _ in 0..reps {
                v.push(native_bulk_to(&app, sink_addr, Amount::Bytes(bulk / 2))?);
            }
            scale.push((target, median(v)));
        }
        for s in idle {
            let _ = w.abort(s);
        }
    }
    // ---- kernel side, same veth: give the daemon's end a kernel address ----
    let (mut k_lo_rtt, mut k_veth_rtt, mut k_lo_bulk, mut k_veth_bulk) =
        (vec![], vec![], vec![], vec![]);
    let (mut k_udp_tx, mut k_udp_rx) = (vec![], vec![]);
    {
        let run = |a: &[&str]| -> Result<()> {
            let st = std::process::Command::new("ip").args(a).status()?;
            if !st.success() {
                bail!("ip {a:?} failed");
            }
            Ok(())
        };
        run(&[
            "addr",
            "add",
            &format!("{}/24", tb.daemon_ip4),
            "dev",
            &tb.daemon_if,
        ])?;
        // The testbed keeps the kernel's IPv6 off this interface while the
        // daemon owns it.
        std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tb.daemon_if),
            "0",
        )?;
        run(&[
            "-6",
            "addr",
            "add",
            &format!("{}/{}", tb.daemon_ip6, tb.prefix_len6),
            "dev",
            &tb.daemon_if,
            "nodad",
        ])?;
        std::thread::sleep(Duration::from_millis(300));
        for r in 0..reps {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let a = l.local_addr()?;
            let h = std::thread::spawn(move || -> Result<()> {
                pin(0, SERVER_CPU);
                let (mut c, _) = l.accept()?;
                c.set_nodelay(true)?;
                let mut b = [0u8; 65536];
                loop {
                    let n = c.read(&mut b)?;
                    if n == 0 {
                        return Ok(());
                    }
                    c.write_all(&b[..n])?;
                }
            });
            k_lo_rtt.push(kernel_pingpong(a, n_pp)?);
            h.join().map_err(|_| anyhow::anyhow!("echo panicked"))??;
            k_veth_rtt.push(kernel_pingpong(echo_addr, n_pp)?);
            k_lo_bulk.push(kernel_bulk_lo(bulk)?);
            k_veth_bulk.push(kernel_bulk_to(sink_addr, Amount::Bytes(bulk / 2))?);
            k_veth_bulk6.push(kernel_bulk_to(sink6_addr, Amount::Bytes(bulk / 2))?);
            k_rx.push(kernel_bulk_from(source_addr, Amount::Bytes(bulk / 2))?);
            let mut sink = peer_role_args(
                &tb,
                &["udp-sink", &udp_tx_addr.to_string(), &udp_secs.to_string()],
                "ready",
            )?;
            udp_send(udp_tx_addr, udp_secs + 1.0)?;
            k_udp_tx.push(expect_num(&mut sink, "count")? / udp_secs);
            let ks = std::net::UdpSocket::bind(udp_rx_addr)?;
            let h = std::thread::spawn(move || {
                pin(0, SERVER_CPU);
                udp_count(&ks, udp_secs)
            });
            k_udp_rx.push(udp_receive_rate(&tb, udp_rx_addr, udp_secs, h)?);
            let _ = r;
        }
        if loss_ok {
            if let Some(_loss) = Loss::start(&tb, 1, &[5002, 5006])? {
                for _ in 0..reps {
                    k_tx_loss.push(kernel_bulk_to(sink_addr, Amount::Secs(loss_secs))?);
                    k_rx_loss.push(kernel_bulk_from(source_addr, Amount::Secs(loss_secs))?);
                }
            }
        }
    }
    let lat = |s: &str, h: f64, k: f64, note: &str| Row {
        scenario: s.into(),
        metric: "RTT p50 (us)".into(),
        hoststack: h,
        kernel: k,
        gain: k / h,
        note: note.into(),
    };
    let thr = |s: &str, h: f64, k: f64, note: &str| Row {
        scenario: s.into(),
        metric: "Gbit/s".into(),
        hoststack: h,
        kernel: k,
        gain: h / k,
        note: note.into(),
    };
    let klo = median(k_lo_rtt);
    let kveth = median(k_veth_rtt);
    rows.push(lat(
        "64 B ping-pong, cut-through vs kernel loopback (interrupt)",
        median(ct_rtt),
        klo,
        "",
    ));
    rows.push(lat(
        "64 B ping-pong, cut-through busy-poll vs kernel loopback",
        median(ct_busy_rtt),
        klo,
        "apps spin",
    ));
    rows.push(lat(
        "64 B ping-pong, uplink vs kernel over the same veth",
        median(up_rtt),
        kveth,
        "peer: kernel echo in netns",
    ));
    rows.push(lat(
        "64 B ping-pong through the shim, cut-through vs kernel loopback",
        median(shim_ct_rtt),
        klo,
        "unmodified std sockets under hoststack run",
    ));
    rows.push(lat(
        "64 B ping-pong through the shim, uplink vs kernel over the same veth",
        median(shim_up_rtt),
        kveth,
        "peer: kernel echo in netns",
    ));
    let msgs = |s: &str, h: f64, k: f64, note: &str| Row {
        scenario: s.into(),
        metric: "messages/s".into(),
        hoststack: h,
        kernel: k,
        gain: h / k,
        note: note.into(),
    };
    rows.push(msgs(
        "UDP 64 B send: native API vs kernel socket",
        median(udp_tx),
        median(k_udp_tx),
        "received by a kernel sink in netns; sender on CPU 0",
    ));
    rows.push(msgs(
        "UDP 64 B receive: native API vs kernel socket",
        median(udp_rx),
        median(k_udp_rx),
        "kernel sender in netns on CPU 0; receiver (+daemon) on CPU 1",
    ));
    let klob = median(k_lo_bulk);
    rows.push(thr(
        "bulk 1 flow, cut-through vs kernel loopback",
        median(ct_bulk),
        klob,
        "",
    ));
    let kv = median(k_veth_bulk);
    rows.push(thr(
        "bulk 1 flow, uplink vs kernel over the same veth",
        median(up_bulk),
        kv,
        "to a kernel sink in netns",
    ));
    rows.push(thr(
        "bulk 1 flow over IPv6, uplink vs kernel over the same veth",
        median(up_bulk6),
        median(k_veth_bulk6),
        "to a kernel sink in netns",
    ));
    rows.push(thr(
        "bulk 1 flow received, uplink vs kernel over the same veth",
        median(up_rx),
        median(k_rx),
        "from a kernel source in netns",
    ));
    if !up_tx_loss.is_empty() && !k_tx_loss.is_empty() {
        rows.push(thr(
            "bulk 1 flow sent, 1% packet loss",
            median(up_tx_loss),
            median(k_tx_loss),
            "nftables drops at the peer, both ways",
        ));
        rows.push(thr(
            "bulk 1 flow received, 1% packet loss",
            median(up_rx_loss),
            median(k_rx_loss),
            "nftables drops at the peer, both ways",
        ));
    }
    for (n, g) in &scale {
        rows.push(thr(
            &format!("bulk 1 flow with {n} idle connections open"),
            *g,
            kv,
            "per-packet cost vs flow count",
        ));
    }
    let (ct_sys, up_sys) = (median(ct_sys), median(up_sys));
    rows.push(Row {
        scenario: "syscalls per echoed message, cut-through (interrupt)".into(),
        metric: "syscalls/msg".into(),
        hoststack: ct_sys,
        kernel: 2.0,
        gain: 2.0 / ct_sys.max(1e-9),
        note: "client side; kernel = write + read".into(),
    });
    rows.push(Row {
        scenario: "syscalls per echoed message, uplink (interrupt)".into(),
        metric: "syscalls/msg".into(),
        hoststack: up_sys,
        kernel: 2.0,
        gain: 2.0 / up_sys.max(1e-9),
        note: "client + daemon epoll_wait, excl. recvmmsg/sendmmsg".into(),
    });
    Ok((http, rows))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::KernelEcho { addr }) => return kernel_echo(addr),
        Some(Role::KernelSink { addr }) => return kernel_sink(addr),
        Some(Role::KernelSource { addr }) => return kernel_source(addr),
        Some(Role::KernelHold { addr }) => return kernel_hold(addr),
        Some(Role::Pingpong { addr, n }) => return pingpong_role(addr, n),
        Some(Role::UdpSink { addr, secs }) => return udp_sink(addr, secs),
        Some(Role::UdpBlast { addr, secs }) => return udp_blast(addr, secs),
        None => {}
    }
    let (http, micro) = run_all(&cli)?;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let mut md = format!(
        "Measured {date}, commit {commit}, {} CPUs ({cpus}), medians of {} runs. \
         Clients (wrk, senders) pinned to CPU 0; servers, the daemon and peer processes to CPU 1, \
         on both sides. Ratio / gain > 1 = hoststack better.\n\n",
        online_cpus(),
        cli.reps,
    );
    if !http.is_empty() {
        md.push_str(
            "HTTP (wrk in the peer namespace; hoststack daemon poll_spin_us=0; all-in = busy time of CPU 1, where every server-side \
             process and the daemon run (user + system + irq + softirq); app = nginx, or Envoy alone; bound = 1/(1 - kernel share of the kernel run); \
             (lo-hi) = the lowest and highest ratio of single rounds, each round one run of each side back to back; \
             nginx runs with Debian's stock `sendfile on; tcp_nopush on`):\n\n",
        );
        md.push_str(&http_markdown(&http));
        md.push_str(
            "\nAccounting: the whole machine's busy time (both CPUs, wrk included), and how much of each bound was \
             reached. Over a veth a packet's kernel work runs on the CPU that sent it: a kernel server's TCP receive runs \
             on the client's CPU 0, while hoststack's daemon does that work on CPU 1 and, when it sends, runs the client's \
             TCP receive there too. Bounds: 1/(1 - kernel share) of the kernel run, from CPU 1's busy time, from the \
             server processes' own time (nginx, Envoy: the issue's measure), and for the app alone (the most a shim \
             can take out of the app's own CPU: its system time).\n\n",
        );
        md.push_str(&http_accounting_markdown(&http));
        md.push('\n');
    }
    if !micro.is_empty() {
        md.push_str(&format!(
            "Transport micro-benchmarks (daemon poll_spin_us={}):\n\n",
            cli.spin_us
        ));
        md.push_str(
            "| scenario | metric | hoststack | kernel | gain | note |\n|---|---|---:|---:|---:|---|\n",
        );
        for r in &micro {
            md.push_str(&format!(
                "| {} | {} | {:.2} | {:.2} | {:.2}x | {} |\n",
                r.scenario, r.metric, r.hoststack, r.kernel, r.gain, r.note
            ));
        }
    }
    let mut rows = http_rows(&http);
    rows.extend(micro);
    println!("{md}");
    if let Some(p) = &cli.markdown {
        std::fs::write(p, &md)?;
    }
    if let Some(p) = &cli.json {
        let v = serde_json::json!({ "date": date, "commit": commit, "cpu": cpus,
            "cpus": online_cpus(), "reps": cli.reps, "http": http, "rows": rows });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    if let Some(p) = &cli.chart {
        let bars: Vec<(String, f64)> = rows
            .iter()
            .filter(|r| {
                !r.metric.starts_with("p50")
                    && !r.metric.starts_with("CPU ms")
                    && !r.metric.starts_with("syscalls")
                    && r.gain.is_finite()
            })
            .map(|r| (format!("{} | {}", r.scenario, r.metric), r.gain))
            .collect();
        let title =
            format!("hoststack vs kernel ({date}, {commit}): ratio, > 1 = hoststack better");
        std::fs::write(p, chart::svg(&title, &bars))?;
    }
    Ok(())
}
