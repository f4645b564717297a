//! HTTP scenarios, kernel vs hoststack on the same CPUs: wrk (kernel, in the
//! peer namespace, CPU 0) against nginx (keep-alive and one connection per
//! request, 100 and 10 000 connections) and against Envoy (concurrency 1
//! and 2) in front of nginx. The server side (nginx, Envoy and, for
//! hoststack, the daemon) is pinned to CPU 1 in both runs. Both sides'
//! servers run at once; measurements alternate between them (each after
//! the server CPU has gone idle), so drift over the run hits both alike.
//!
//! The kernel run reaches its servers over a second veth pair with kernel
//! addresses (198.19.k.0/24); Envoy's upstream is nginx on 127.0.0.1. The
//! hoststack run reaches them over the daemon's veth; Envoy's upstream is
//! nginx on 127.0.0.1 under the shim (cut-through).
//!
//! CPU time is everything the server side spends: the busy time of CPU 1
//! (user, system, irq, softirq), where the servers and the daemon run and
//! nothing else does. The app's own CPU (nginx, or Envoy) comes from its
//! processes' user + system time. The whole machine's busy time (client
//! included) is recorded too: over a veth, which CPU does a packet's
//! kernel work depends on who sent it, so per-CPU figures shift work
//! between the sides (see [`Sample::machine_cpu_per_1k`]).

use anyhow::{bail, Result};
use envoy_integration::{
    envoy_args, envoy_bin, static_bootstrap, write_config, Cluster, Envoy, Listener,
};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use hoststack_tests::nginx::Site;
use hoststack_tests::wrk::WrkRun;
use hoststack_tests::{child_pids, clock_ticks, proc_cpu, run, wait_for, Testbed};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// One measured run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// Requests (or connections, one request each) per second.
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Server-side CPU seconds per 1000 requests: the busy time of the
    /// server CPU, where every server process and the daemon are pinned.
    pub cpu_per_1k: f64,
    /// CPU seconds per 1000 requests of the measured app alone (nginx, or
    /// Envoy in the Envoy scenarios): the per-worker view.
    pub app_cpu_per_1k: f64,
    /// Share of the server-side CPU spent in the kernel (sys + softirq + irq).
    pub kernel_share: f64,
    /// CPU seconds per 1000 requests of the whole machine (every CPU's busy
    /// time, the client included). Attribution-free: over a veth, the
    /// receive processing of a kernel server runs in the *sender's* softirq,
    /// on the client's CPU, while hoststack's daemon does it on the server
    /// CPU (and pays there for the client's receive of its replies).
    pub machine_cpu_per_1k: f64,
    /// Share of the app's own CPU (nginx, or Envoy) spent in system calls
    /// and the kernel work they do: what a shim can remove from it at most.
    pub app_kernel_share: f64,
    /// Share of all server processes' CPU (nginx, and Envoy) in the kernel:
    /// the measure of what the kernel path costs.
    pub servers_kernel_share: f64,
    /// System calls per request made by the app (perf), if measured.
    pub syscalls_per_req: Option<f64>,
    /// wrk socket errors + non-2xx responses.
    pub errors: u64,
}

/// Load shape for one wrk run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub conns: u32,
    pub secs: u64,
    /// A new connection per request (`Connection: close`).
    pub close: bool,
}

/// One scenario measured on both sides.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pair {
    pub scenario: String,
    /// "requests/s" or "connections/s".
    pub unit: String,
    pub kernel: Sample,
    pub hoststack: Sample,
    /// Lowest and highest all-in ratio (kernel CPU / hoststack CPU per
    /// request) over the rounds, each round's two runs taken back to back:
    /// how much the machine moved during the measurement.
    pub all_in_range: (f64, f64),
    /// The same for the whole machine's CPU.
    pub machine_range: (f64, f64),
}

/// Both sides' medians and the per-round spread of the CPU ratios.
struct Measured {
    kernel: Sample,
    hoststack: Sample,
    all_in_range: (f64, f64),
    machine_range: (f64, f64),
}

/// (min, max) of `f(kernel run) / f(hoststack run)` over the rounds.
fn ratio_range(k: &[Sample], h: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64) {
    k.iter()
        .zip(h)
        .map(|(a, b)| f(a) / f(b))
        .fold((f64::INFINITY, 0.0), |(lo, hi), r| (lo.min(r), hi.max(r)))
}

/// (busy, kernel) seconds of one CPU from /proc/stat: busy is user, nice,
/// system, irq and softirq; kernel is system, irq and softirq. Counting the
/// server CPU as a whole leaves nothing out (softirq work done on behalf of
/// any process) and counts nothing twice (tick-based accounting charges a
/// softirq tick both to the interrupted task and to the CPU's softirq).
fn cpu_times(cpu: usize) -> (f64, f64) {
    stat_times(&format!("cpu{cpu} "))
}

/// (busy, kernel) seconds of the `/proc/stat` line starting with `key`
/// ("cpu " = all CPUs).
fn stat_times(key: &str) -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .map(|l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            let g = |i: usize| f.get(i).copied().unwrap_or(0.0) / clock_ticks();
            (g(0) + g(1) + g(2) + g(5) + g(6), g(2) + g(5) + g(6))
        })
        .unwrap_or((0.0, 0.0))
}

/// Count the syscalls of `pid` for `secs` with perf, if perf works here.
fn perf_syscalls(pid: u32, secs: u64) -> Option<std::process::Child> {
    Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            "raw_syscalls:sys_enter",
            "-p",
            &pid.to_string(),
            "--",
            "sleep",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()
}

fn perf_count(c: Option<std::process::Child>) -> Option<f64> {
    let out = c?.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next()?.trim().parse().ok())
}

fn wrk(tb: &Testbed, url: &str, load: Load, latency: bool) -> Result<String> {
    // 10 000 connections need more than the default 1024 descriptors.
    let mut script = format!(
        "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn); exec wrk -t1 -c{} -d{}s --timeout 10s",
        load.conns, load.secs
    );
    if latency {
        script.push_str(" --latency");
    }
    if load.close {
        script.push_str(" -H 'Connection: close'");
    }
    script.push(' ');
    script.push_str(url);
    let out = tb
        .peer_cmd("taskset", &["-c", "0", "sh", "-c", &script])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What to count for one measurement.
struct Who {
    /// The app whose own CPU gives the per-worker figure.
    app: Vec<u32>,
    /// Every server process (nginx, and Envoy in front of it).
    servers: Vec<u32>,
    /// Process whose syscalls are counted, if any.
    perf: Option<u32>,
}

fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut v = pids.to_vec();
    for p in pids {
        v.extend(child_pids(*p));
    }
    v
}

/// Wait (at most 15 s) until the server CPU is idle: what the previous
/// run left behind (closing connections, the other side's servers) must
/// not be charged to the next one.
fn settle() {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        let a = cpu_times(super::SERVER_CPU).0;
        std::thread::sleep(Duration::from_millis(200));
        if cpu_times(super::SERVER_CPU).0 - a < 0.2 * 0.03 {
            return;
        }
    }
}

/// One wrk run against `url` from the peer namespace.
fn measure(tb: &Testbed, url: &str, who: &Who, load: Load) -> Result<Sample> {
    settle();
    // Warm-up (connections, caches).
    let _ = wrk(tb, url, Load { secs: 1, ..load }, false)?;
    settle();
    let app = with_children(&who.app);
    let servers = with_children(&who.servers);
    let cpu = |v: &[u32]| -> Vec<(f64, f64)> { v.iter().map(|p| proc_cpu(*p)).collect() };
    let (a0, s0) = (cpu(&app), cpu(&servers));
    let m0 = stat_times("cpu ");
    let c0 = cpu_times(super::SERVER_CPU);
    let perf = who.perf.and_then(|p| perf_syscalls(p, load.secs));
    let text = wrk(tb, url, load, true)?;
    let c1 = cpu_times(super::SERVER_CPU);
    let m1 = stat_times("cpu ");
    let (a1, s1) = (cpu(&app), cpu(&servers));
    let w = WrkRun::parse(&text)?;
    let (rps, p50, p99, errors) = (w.rps, w.p50_ms, w.p99_ms, w.bad());
    let delta = |b: &[(f64, f64)], a: &[(f64, f64)]| {
        b.iter()
            .zip(a)
            .fold((0.0, 0.0), |(u, s), (b, a)| (u + a.0 - b.0, s + a.1 - b.1))
    };
    let (au, asys) = delta(&a0, &a1);
    let (su, ssys) = delta(&s0, &s1);
    let (busy, kernel) = (c1.0 - c0.0, c1.1 - c0.1);
    let requests = rps * load.secs as f64;
    if requests < 1.0 {
        bail!("wrk got no response from {url} in {} s:\n{text}", load.secs);
    }
    // A few errors are normal at 10 000 connections (connect timeouts);
    // more than 1% means the numbers would not mean much.
    if errors as f64 > (requests * 0.01).max(0.0) {
        bail!("wrk reported {errors} errors for {requests:.0} requests:\n{text}");
    }
    Ok(Sample {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        cpu_per_1k: busy / (requests / 1000.0),
        app_cpu_per_1k: (au + asys) / (requests / 1000.0),
        kernel_share: kernel / busy.max(1e-9),
        machine_cpu_per_1k: (m1.0 - m0.0) / (requests / 1000.0),
        app_kernel_share: asys / (au + asys).max(1e-9),
        servers_kernel_share: ssys / (su + ssys).max(1e-9),
        syscalls_per_req: perf_count(perf).map(|s| s / requests.max(1.0)),
        errors,
    })
}

fn wait_up(tb: &Testbed, url: &str) -> Result<()> {
    wait_for(&format!("{url} to answer"), Duration::from_secs(30), || {
        Ok(tb
            .peer_cmd("curl", &["-sf", "-o", "/dev/null", "--max-time", "2", url])
            .status()
            .map(|s| s.success())
            .unwrap_or(false))
    })
}

fn med(v: &[Sample]) -> Sample {
    let m = |f: &dyn Fn(&Sample) -> f64| super::median(v.iter().map(f).collect());
    let sys: Vec<f64> = v.iter().filter_map(|s| s.syscalls_per_req).collect();
    Sample {
        rps: m(&|s| s.rps),
        p50_ms: m(&|s| s.p50_ms),
        p99_ms: m(&|s| s.p99_ms),
        cpu_per_1k: m(&|s| s.cpu_per_1k),
        app_cpu_per_1k: m(&|s| s.app_cpu_per_1k),
        kernel_share: m(&|s| s.kernel_share),
        machine_cpu_per_1k: m(&|s| s.machine_cpu_per_1k),
        app_kernel_share: m(&|s| s.app_kernel_share),
        servers_kernel_share: m(&|s| s.servers_kernel_share),
        syscalls_per_req: (!sys.is_empty()).then(|| super::median(sys)),
        errors: v.iter().map(|s| s.errors).sum(),
    }
}

/// Which HTTP scenarios to run, and how long.
pub struct Plan {
    pub reps: usize,
    pub secs: u64,
    /// nginx keep-alive (Debian's stock settings).
    pub nginx: bool,
    pub short: bool,
    /// nginx keep-alive with sendfile off.
    pub plain: bool,
    pub scale: bool,
    pub envoy: bool,
}

/// Everything one side (kernel or hoststack) needs to start its servers.
struct Side<'a> {
    /// Address wrk connects to (nginx on :8400, Envoy on :8410+c).
    front: std::net::Ipv4Addr,
    /// The daemon, for the hoststack side.
    daemon: Option<&'a Daemon>,
    /// nginx's loopback port, Envoy's upstream.
    upstream_port: u16,
}

impl Side<'_> {
    fn tag(&self) -> &'static str {
        if self.daemon.is_some() {
            "hs"
        } else {
            "kernel"
        }
    }

    /// `taskset -c 1 [hoststack run --strict --] args...`
    fn cmd(&self, args: &[String]) -> Result<Command> {
        let mut c = Command::new("taskset");
        c.args(["-c", &super::SERVER_CPU.to_string()]);
        if let Some(d) = self.daemon {
            c.arg(bin("hoststack")?)
                .args(["run", "--strict", "--"])
                .envs(d.env());
        }
        c.args(args);
        Ok(c)
    }

    /// nginx (1 worker) on the front address and on loopback; its URL.
    fn nginx(&self, tb: &Testbed, site: &Site) -> Result<(Proc, String)> {
        let front = format!("{}:8400", self.front);
        let lo = format!("127.0.0.1:{}", self.upstream_port);
        let conf = site.conf_listens(&format!("{}-nginx", self.tag()), &[&front, &lo], 1)?;
        let ng = Proc::spawn(self.cmd(&site.args(&conf))?, "nginx")?;
        let url = format!("http://{front}/small");
        wait_up(tb, &url)?;
        Ok((ng, url))
    }

    /// Envoy with `workers` workers in front of this side's nginx; its URL.
    fn envoy(&self, tb: &Testbed, site: &Site, workers: u32) -> Result<(Envoy, String)> {
        let listen: SocketAddr = format!("{}:{}", self.front, 8410 + workers).parse()?;
        let admin: SocketAddr = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        )
        .parse()?;
        let lo: SocketAddr = format!("127.0.0.1:{}", self.upstream_port).parse()?;
        let cfg = static_bootstrap(
            admin,
            &[Listener::http("ingress", listen, "nginx")],
            &[Cluster::fixed("nginx", &[lo])],
        );
        let tag = self.tag();
        let cpath = write_config(&site.dir.join(format!("{tag}-envoy{workers}.json")), &cfg)?;
        let log = site.dir.join(format!("{tag}-envoy{workers}.log"));
        let mut args = vec![envoy_bin()?.display().to_string()];
        args.extend(envoy_args(&cpath, workers, &log));
        let envoy = Envoy::spawn(self.cmd(&args)?, admin, &log)?;
        let url = format!("http://{listen}/small");
        wait_up(tb, &url)?;
        Ok((envoy, url))
    }
}

fn nginx_who(ng: &Proc, perf: bool) -> Who {
    Who {
        app: vec![ng.pid()],
        servers: vec![ng.pid()],
        perf: if perf {
            child_pids(ng.pid()).first().copied()
        } else {
            None
        },
    }
}

/// `reps` measurements of each side, alternating (kernel first on even
/// rounds, hoststack first on odd ones) so that drift of the machine over
/// the run hits both sides alike; medians.
fn pair(
    tb: &Testbed,
    reps: usize,
    kernel: (&str, &Who),
    hs: (&str, &Who),
    load: Load,
) -> Result<Measured> {
    let (mut k, mut h) = (Vec::new(), Vec::new());
    for r in 0..reps {
        if r % 2 == 0 {
            k.push(measure(tb, kernel.0, kernel.1, load)?);
            h.push(measure(tb, hs.0, hs.1, load)?);
        } else {
            h.push(measure(tb, hs.0, hs.1, load)?);
            k.push(measure(tb, kernel.0, kernel.1, load)?);
        }
    }
    Ok(Measured {
        kernel: med(&k),
        hoststack: med(&h),
        all_in_range: ratio_range(&k, &h, |s| s.cpu_per_1k),
        machine_range: ratio_range(&k, &h, |s| s.machine_cpu_per_1k),
    })
}

/// Every planned scenario, kernel and hoststack (daemon `d`) side by side:
/// both sides' servers run at once (idle ones cost nothing) and their
/// measurements alternate. One [`Pair`] per scenario.
pub fn run_pairs(tb: &Testbed, d: &Daemon, plan: &Plan) -> Result<Vec<Pair>> {
    if run(&["sh", "-c", "command -v nginx && command -v wrk"]).is_err() {
        bail!("nginx and wrk are needed: run scripts/setup.sh");
    }
    if plan.envoy {
        envoy_bin()?;
    }
    let site = Site::new()?;
    let link = tb.kernel_link()?;
    let ks = Side {
        front: link.local,
        daemon: None,
        upstream_port: 8402,
    };
    let hs = Side {
        front: tb.daemon_ip4,
        daemon: Some(d),
        upstream_port: 8403,
    };
    let (mut kng, kurl) = ks.nginx(tb, &site)?;
    let (mut hng, hurl) = hs.nginx(tb, &site)?;
    let reps = plan.reps.max(1);
    let mut out = Vec::new();
    let mut add = |scenario: String, unit: &str, m: Measured| {
        out.push(Pair {
            scenario,
            unit: unit.into(),
            kernel: m.kernel,
            hoststack: m.hoststack,
            all_in_range: m.all_in_range,
            machine_range: m.machine_range,
        })
    };
    let ka = Load {
        conns: 32,
        secs: plan.secs,
        close: false,
    };
    // `/small` or, under `/plain/`, the same file with sendfile off.
    let nginx = |path: &str, perf: bool, load: Load| {
        let url = |u: &str| u.replace("/small", path);
        pair(
            tb,
            reps,
            (&url(&kurl), &nginx_who(&kng, perf)),
            (&url(&hurl), &nginx_who(&hng, perf)),
            load,
        )
    };
    if plan.nginx {
        add(
            "wrk -> nginx, 64 B keep-alive (32 conns)".into(),
            "requests/s",
            nginx("/small", true, ka)?,
        );
    }
    if plan.plain {
        // The same file through nginx's own read + writev path.
        add(
            "wrk -> nginx, 64 B keep-alive, sendfile off (32 conns)".into(),
            "requests/s",
            nginx("/plain/small", false, ka)?,
        );
    }
    if plan.short {
        add(
            "short connections: wrk -> nginx, new connection per request".into(),
            "connections/s",
            nginx("/small", false, Load { close: true, ..ka })?,
        );
    }
    if plan.scale {
        for conns in [100, 10_000] {
            add(
                format!("scale: wrk -> nginx keep-alive, {conns} connections"),
                "requests/s",
                nginx("/small", false, Load { conns, ..ka })?,
            );
        }
    }
    if plan.envoy {
        for workers in [1u32, 2] {
            let (ke, keurl) = ks.envoy(tb, &site, workers)?;
            let (he, heurl) = hs.envoy(tb, &site, workers)?;
            let who = |e: &Envoy, ng: &Proc| Who {
                app: vec![e.pid()],
                servers: vec![e.pid(), ng.pid()],
                perf: None,
            };
            add(
                format!("wrk -> Envoy (concurrency {workers}) -> nginx, keep-alive (32 conns)"),
                "requests/s",
                pair(
                    tb,
                    reps,
                    (&keurl, &who(&ke, &kng)),
                    (&heurl, &who(&he, &hng)),
                    ka,
                )?,
            );
            // Nothing was lost on either side.
            for (e, side) in [(&ke, "kernel"), (&he, "hoststack")] {
                if e.stat("http.ingress.downstream_rq_5xx")? > 0 {
                    bail!("Envoy ({side}) answered 5xx under load");
                }
            }
            ke.stop()?;
            he.stop()?;
        }
    }
    for ng in [&mut kng, &mut hng] {
        ng.signal(libc::SIGQUIT);
        let _ = ng.wait(Duration::from_secs(10));
    }
    Ok(out)
}
