//! wrk -> nginx (64 B body, keep-alive, 1 worker), kernel vs hoststack, on
//! the same CPUs: wrk on CPU 0 in the peer namespace; nginx (and the daemon
//! for hoststack) on CPU 1. Both paths cross a veth: the kernel's nginx is
//! reached over a second veth pair with kernel addresses (198.19.k.0/24),
//! hoststack's over the daemon's veth.
//!
//! CPU time is everything the server side spends: nginx's processes
//! (user + sys), the daemon (hoststack only), and the server CPU's softirq
//! and irq time from /proc/stat.

use anyhow::{bail, Context, Result};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use hoststack_tests::{child_pids, clock_ticks, proc_cpu, run, unique_tag, wait_for, Testbed};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// One measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rps: f64,
    pub p99_ms: f64,
    /// Server-side CPU seconds per 1000 requests.
    pub cpu_per_1k: f64,
    /// Share of that CPU spent in the kernel (sys + softirq + irq).
    pub kernel_share: f64,
    /// System calls per request made by the nginx worker (perf), if measurable.
    pub syscalls_per_req: Option<f64>,
}

/// irq + softirq seconds of one CPU.
fn cpu_irq(cpu: usize) -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let key = format!("cpu{cpu} ");
    s.lines()
        .find(|l| l.starts_with(&key))
        .map(|l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.get(5).copied().unwrap_or(0.0) + f.get(6).copied().unwrap_or(0.0)) / clock_ticks()
        })
        .unwrap_or(0.0)
}

struct Site {
    dir: PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn site() -> Result<Site> {
    let dir = std::env::temp_dir().join(format!("hs-bench-nginx-{}", unique_tag()));
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/small"), [b'x'; 64])?;
    run(&["chmod", "-R", "a+rX", &dir.display().to_string()])?;
    Ok(Site { dir })
}

fn conf(s: &Site, name: &str, listen: &str) -> Result<PathBuf> {
    let d = s.dir.display();
    let text = format!(
        "worker_processes 1;\ndaemon off;\nerror_log {d}/{name}.err warn;\npid {d}/{name}.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s; open_file_cache max=64;\n\
         server {{ listen {listen}; root {d}/www; }} }}\n"
    );
    let p = s.dir.join(format!("{name}.conf"));
    std::fs::write(&p, text)?;
    Ok(p)
}

fn parse_wrk(out: &str) -> Result<(f64, f64, u64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim())
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => n,
            })
        })
        .unwrap_or(f64::NAN);
    let mut errors = 0;
    for l in out.lines() {
        if l.contains("Socket errors") || l.contains("Non-2xx") {
            errors += 1;
        }
    }
    Ok((rps, p99, errors))
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

/// Measure one server (`master` pid; `daemon` pid for hoststack) with wrk
/// from the peer namespace.
fn measure(
    tb: &Testbed,
    url: &str,
    master: u32,
    daemon: Option<u32>,
    secs: u64,
    conns: u32,
) -> Result<Sample> {
    let workers = child_pids(master);
    let worker = *workers.first().context("nginx has no worker")?;
    let mut pids = vec![master];
    pids.extend(&workers);
    pids.extend(daemon);
    // Warm up (connections, caches).
    let _ = tb
        .peer_cmd(
            "taskset",
            &["-c", "0", "wrk", "-t1", &format!("-c{conns}"), "-d1s", url],
        )
        .output()?;
    let before: Vec<(f64, f64)> = pids.iter().map(|p| proc_cpu(*p)).collect();
    let irq0 = cpu_irq(super::SERVER_CPU);
    let perf = perf_syscalls(worker, secs);
    let out = tb
        .peer_cmd(
            "taskset",
            &[
                "-c",
                "0",
                "wrk",
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--latency",
                url,
            ],
        )
        .output()?;
    let irq = cpu_irq(super::SERVER_CPU) - irq0;
    let after: Vec<(f64, f64)> = pids.iter().map(|p| proc_cpu(*p)).collect();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rps, p99, errors) = parse_wrk(&text)?;
    if errors > 0 {
        bail!("wrk reported errors:\n{text}");
    }
    let (mut user, mut sys) = (0.0, 0.0);
    for (b, a) in before.iter().zip(&after) {
        user += a.0 - b.0;
        sys += a.1 - b.1;
    }
    let total = user + sys + irq;
    let requests = rps * secs as f64;
    let syscalls = perf_count(perf);
    Ok(Sample {
        rps,
        p99_ms: p99,
        cpu_per_1k: total / (requests / 1000.0),
        kernel_share: (sys + irq) / total.max(1e-9),
        syscalls_per_req: syscalls.map(|s| s / requests.max(1.0)),
    })
}

fn wait_up(tb: &Testbed, url: &str) -> Result<()> {
    wait_for(&format!("{url} to answer"), Duration::from_secs(30), || {
        Ok(tb
            .peer_cmd("curl", &["-s", "-o", "/dev/null", "--max-time", "2", url])
            .status()
            .map(|s| s.success())
            .unwrap_or(false))
    })
}

/// Kernel nginx, then nginx under the shim; `reps` runs each, medians.
pub fn run_pair(tb: &Testbed, d: &Daemon, reps: usize, secs: u64) -> Result<(Sample, Sample)> {
    if run(&["sh", "-c", "command -v nginx && command -v wrk"]).is_err() {
        bail!("nginx and wrk are needed: run scripts/setup.sh");
    }
    let s = site()?;
    let link = tb.kernel_link()?;
    let conns = 32;
    let kurl = format!("http://{}:8400/small", link.local);
    let kconf = conf(&s, "kernel", &format!("{}:8400", link.local))?;
    let mut kng = Proc::spawn(
        {
            let mut c = Command::new("taskset");
            c.args([
                "-c",
                "1",
                "nginx",
                "-c",
                &kconf.display().to_string(),
                "-p",
                &s.dir.display().to_string(),
            ]);
            c
        },
        "kernel nginx",
    )?;
    wait_up(tb, &kurl)?;
    let mut ks = Vec::new();
    for _ in 0..reps {
        ks.push(measure(tb, &kurl, kng.pid(), None, secs, conns)?);
    }
    kng.signal(libc::SIGQUIT);
    let _ = kng.wait(Duration::from_secs(10));
    let hurl = format!("http://{}:8401/small", tb.daemon_ip4);
    let hconf = conf(&s, "hoststack", &format!("{}:8401", tb.daemon_ip4))?;
    let mut c = Command::new("taskset");
    c.args(["-c", "1"])
        .arg(bin("hoststack")?)
        .args([
            "run",
            "--strict",
            "--",
            "nginx",
            "-c",
            &hconf.display().to_string(),
            "-p",
            &s.dir.display().to_string(),
        ])
        .envs(d.env());
    let mut hng = Proc::spawn(c, "nginx (hoststack)")?;
    wait_up(tb, &hurl)?;
    let dpid = d.child.as_ref().map(|c| c.id());
    let mut hs = Vec::new();
    for _ in 0..reps {
        hs.push(measure(tb, &hurl, hng.pid(), dpid, secs, conns)?);
    }
    hng.signal(libc::SIGQUIT);
    let _ = hng.wait(Duration::from_secs(10));
    Ok((med(&ks), med(&hs)))
}

fn med(v: &[Sample]) -> Sample {
    let m = |f: &dyn Fn(&Sample) -> f64| super::median(v.iter().map(f).collect());
    let sys: Vec<f64> = v.iter().filter_map(|s| s.syscalls_per_req).collect();
    Sample {
        rps: m(&|s| s.rps),
        p99_ms: m(&|s| s.p99_ms),
        cpu_per_1k: m(&|s| s.cpu_per_1k),
        kernel_share: m(&|s| s.kernel_share),
        syscalls_per_req: (!sys.is_empty()).then(|| super::median(sys)),
    }
}
