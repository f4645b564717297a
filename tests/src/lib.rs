//! Test support: a private network testbed and helpers to run a real
//! `hoststackd` and apps against kernel peers.
//!
//! [`Testbed::new`] creates a veth pair: the daemon's end stays in the root
//! namespace with no IP address, IPv6 disabled and forwarding off (the daemon
//! owns the addresses; the kernel must neither answer nor route for them);
//! the peer end moves into a fresh network namespace with 198.18.k.2/24 and
//! 2001:2:0:k::2/64 and no default route, so nothing can leave the machine.
//! Everything is removed on drop, also when a test panics;
//! [`Testbed::cleanup_stale`] removes leftovers of killed runs.
//!
//! Names carry the test process's pid and a counter ([`unique_tag`]), so
//! tests in threads and parallel test binaries never clash: namespaces are
//! `hsp<tag>`, veths `hsd<tag>a`/`hsd<tag>b`, TAPs `hst<tag>`.

pub mod daemon;
pub mod nginx;
pub mod wrk;

use anyhow::{bail, ensure, Context, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name part unique to this process and call: `<pid>x<counter in base 36>`
/// (≤ 11 chars, so `hsd<tag>a` fits the 15-char interface name limit).
pub fn unique_tag() -> String {
    let mut n = COUNTER.fetch_add(1, Ordering::SeqCst) % (36 * 36 * 36);
    let mut digits = Vec::new();
    loop {
        digits.push(std::char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    let n: String = digits.iter().rev().collect();
    format!("{}x{n}", std::process::id())
}

/// Parse the pid out of `<prefix><pid>x<counter>[suffix]`.
fn tag_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, n) = rest.split_once('x')?;
    let n = n.trim_end_matches(['a', 'b']);
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    pid.parse().ok()
}

/// Run a command to completion; fail with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the network tests need root (network namespaces, veth, AF_PACKET, TAP); \
             run scripts/test.sh as root"
        );
    }
    Ok(())
}

/// A network namespace `hsp<tag>` with `lo` up, deleted on drop.
pub struct Netns {
    /// Namespace name.
    pub name: String,
}

impl Netns {
    /// Create a fresh namespace (needs root).
    pub fn new() -> Result<Self> {
        require_root()?;
        Testbed::cleanup_stale();
        let ns = Netns {
            name: format!("hsp{}", unique_tag()),
        };
        run(&["ip", "netns", "add", &ns.name])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Run `ip -n <ns> args...`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        run(&v)
    }

    /// A command that runs `program args` inside the namespace.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the virtual links inside it.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// A veth pair with the peer end in its own network namespace.
pub struct Testbed {
    /// Daemon-side interface (root namespace, no IP).
    pub daemon_if: String,
    /// Peer network namespace.
    pub peer_ns: String,
    /// Peer-side interface (inside `peer_ns`).
    pub peer_if: String,
    /// Address the daemon should own.
    pub daemon_ip4: Ipv4Addr,
    /// The peer's kernel address.
    pub peer_ip4: Ipv4Addr,
    /// Daemon IPv6 address.
    pub daemon_ip6: Ipv6Addr,
    /// Peer IPv6 address.
    pub peer_ip6: Ipv6Addr,
    /// IPv4 prefix length.
    pub prefix_len4: u8,
    /// IPv6 prefix length.
    pub prefix_len6: u8,
    // Dropped after `Drop::drop` removed the veth.
    ns: Netns,
}

/// Clock ticks per second (/proc times are in ticks).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// (user, system) CPU seconds a process has used so far.
pub fn proc_cpu(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the name: state(0) ... utime(11) stime(12).
    (get(11) / clock_ticks(), get(12) / clock_ticks())
}

/// The direct children of a process.
pub fn child_pids(pid: u32) -> Vec<u32> {
    run(&["pgrep", "-P", &pid.to_string()])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// See [`Testbed::kernel_link`].
pub struct KernelLink {
    name: String,
    /// Root-namespace (kernel) address.
    pub local: Ipv4Addr,
    /// Peer-namespace address.
    pub peer: Ipv4Addr,
}

impl Drop for KernelLink {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.name]);
    }
}

/// Write a per-interface sysctl (absent files, e.g. IPv6 off, are fine).
fn if_sysctl(path: &str, value: &str) {
    let _ = std::fs::write(path, value);
}

impl Testbed {
    /// Create a fresh testbed (needs root: fails with a clear message if not).
    pub fn new() -> Result<Self> {
        let ns = Netns::new()?;
        let tag = &ns.name[3..];
        // Subnet byte from the counter part; overlapping subnets in different
        // namespaces would be harmless anyway (the daemon ends carry no IP).
        let n = u32::from_str_radix(tag.rsplit('x').next().unwrap_or("0"), 36).unwrap_or(0);
        let k = (n % 250) as u8 + 1;
        let tb = Testbed {
            daemon_if: format!("hsd{tag}a"),
            peer_if: format!("hsd{tag}b"),
            peer_ns: ns.name.clone(),
            daemon_ip4: Ipv4Addr::new(198, 18, k, 1),
            peer_ip4: Ipv4Addr::new(198, 18, k, 2),
            daemon_ip6: Ipv6Addr::new(0x2001, 2, 0, k.into(), 0, 0, 0, 1),
            peer_ip6: Ipv6Addr::new(0x2001, 2, 0, k.into(), 0, 0, 0, 2),
            prefix_len4: 24,
            prefix_len6: 64,
            ns,
        };
        // From here on Drop cleans up whatever was created.
        run(&[
            "ip",
            "link",
            "add",
            &tb.daemon_if,
            "type",
            "veth",
            "peer",
            "name",
            &tb.peer_if,
            "netns",
            &tb.peer_ns,
        ])?;
        // Before link up, so the kernel never speaks on the daemon's wire:
        // no IPv6 (no DAD/RS/MLD), never route what arrives, and never answer
        // ARP for the root namespace's addresses.
        let d = &tb.daemon_if;
        if_sysctl(&format!("/proc/sys/net/ipv6/conf/{d}/disable_ipv6"), "1");
        if_sysctl(&format!("/proc/sys/net/ipv4/conf/{d}/forwarding"), "0");
        if_sysctl(&format!("/proc/sys/net/ipv4/conf/{d}/arp_ignore"), "8");
        run(&["ip", "link", "set", d, "up"])?;
        let p = &tb.peer_if;
        tb.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", tb.peer_ip4, tb.prefix_len4),
            "dev",
            p,
        ])?;
        tb.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{}", tb.peer_ip6, tb.prefix_len6),
            "dev",
            p,
            "nodad",
        ])?;
        tb.ns.ip(&["link", "set", p, "up"])?;
        // The peer plays the clients: load runs open 10 000 connections at
        // a time to one address, again and again. Closed ones wait in
        // TIME_WAIT for a minute and the next run's connect() then hunts
        // the port range for a free port (minutes of CPU, a run with no
        // request at all). This namespace's own setting: reuse TIME_WAIT
        // ports for new connections (timestamps make it safe).
        let _ = tb
            .peer_cmd("sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
            .status();
        Ok(tb)
    }

    /// A second veth pair with kernel addresses on both ends (198.19.k.1 in
    /// the root namespace, 198.19.k.2 in the peer's): the kernel's own path
    /// to the peer, for traffic that stays in the kernel (DNS) and for
    /// kernel-side baselines. Removed on drop (and with the namespace).
    pub fn kernel_link(&self) -> Result<KernelLink> {
        let tag = unique_tag();
        let peer_if = format!("hsk{tag}b");
        let k = self.daemon_ip4.octets()[2];
        let link = KernelLink {
            name: format!("hsk{tag}a"),
            local: Ipv4Addr::new(198, 19, k, 1),
            peer: Ipv4Addr::new(198, 19, k, 2),
        };
        run(&[
            "ip",
            "link",
            "add",
            &link.name,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            &self.peer_ns,
        ])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", link.local),
            "dev",
            &link.name,
        ])?;
        run(&["ip", "link", "set", &link.name, "up"])?;
        self.peer_ip(&["addr", "add", &format!("{}/24", link.peer), "dev", &peer_if])?;
        self.peer_ip(&["link", "set", &peer_if, "up"])?;
        Ok(link)
    }

    /// A command that runs `program args` inside the peer namespace.
    pub fn peer_cmd(&self, program: &str, args: &[&str]) -> Command {
        self.ns.cmd(program, args)
    }

    /// Load nftables `rules` (`nft -f` syntax) in the peer namespace; they
    /// go with it.
    pub fn peer_nft(&self, rules: &str) -> Result<()> {
        let mut nft = self
            .peer_cmd("nft", &["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(
            &mut nft.stdin.take().context("nft stdin")?,
            rules.as_bytes(),
        )?;
        ensure!(nft.wait()?.success(), "nft rules in the peer namespace");
        Ok(())
    }

    /// Run `ip -n <peer_ns> args...`; returns its stdout.
    pub fn peer_ip(&self, args: &[&str]) -> Result<String> {
        self.ns.ip(args)
    }

    /// The peer namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Remove namespaces (`hsp*`) and links (`hsd*`) left by earlier runs
    /// whose process is gone. Best effort; never fails.
    pub fn cleanup_stale() {
        let me = std::process::id();
        let stale = |pid: u32| pid != me && !pid_alive(pid);
        if let Ok(out) = run(&["ip", "netns", "list"]) {
            for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
                if tag_pid(name, "hsp").is_some_and(stale) {
                    let _ = run(&["ip", "netns", "del", name]);
                }
            }
        }
        if let Ok(out) = run(&["ip", "-o", "link", "show"]) {
            // "7: hsd123x0a@if6: <...": the name is the second field.
            for line in out.lines() {
                let Some(name) = line.split(": ").nth(1) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or("");
                if tag_pid(name, "hsd").is_some_and(stale) {
                    let _ = run(&["ip", "link", "del", name]);
                }
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace goes next (field).
        let _ = run(&["ip", "link", "del", &self.daemon_if]);
    }
}

/// Kills and reaps a child process on drop (also when a test panics).
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawn `cmd`.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.into(),
        })
    }

    /// The child.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Wait at most `timeout` for the child to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child().try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() >= timeout {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait at most `timeout` for the child to exit successfully.
    pub fn success(&mut self, timeout: Duration) -> Result<()> {
        let st = self.wait(timeout)?;
        if !st.success() {
            bail!("{} failed: {st}", self.name);
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `cond` every 10 ms until it holds; fail after `timeout`, naming
/// `what`. An error from `cond` ends the wait at once.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
