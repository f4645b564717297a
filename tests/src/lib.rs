//! Test support: a private network testbed and helpers to run a real
//! `hoststackd` and apps against kernel peers.
//!
//! [`Testbed::new`] creates a veth pair: the daemon's end stays in the root
//! namespace with no IP address and IPv6 disabled (the daemon owns the
//! addresses); the peer end moves into a fresh network namespace with
//! 198.18.k.2/24 and 2001:2:0:k::2/64 and no default route. Everything is
//! removed on drop, also when a test panics; [`Testbed::cleanup_stale`]
//! removes leftovers of killed runs.

pub mod daemon;

use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

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
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Testbed {
    /// Create a fresh testbed (needs root).
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the network tests need root (network namespaces, veth, AF_PACKET); run scripts/test.sh as root");
        }
        Self::cleanup_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Names: hsd<pid>x<n>a / hsd<pid>x<n>b (≤ 15 chars), netns hsp<pid>x<n>.
        let tag = format!("{}x{n}", pid % 1_000_000);
        let k = (n % 250) as u8 + 1;
        let tb = Testbed {
            daemon_if: format!("hsd{tag}a"),
            peer_if: format!("hsd{tag}b"),
            peer_ns: format!("hsp{tag}"),
            daemon_ip4: Ipv4Addr::new(198, 18, k, 1),
            peer_ip4: Ipv4Addr::new(198, 18, k, 2),
            daemon_ip6: format!("2001:2:0:{k:x}::1").parse()?,
            peer_ip6: format!("2001:2:0:{k:x}::2").parse()?,
            prefix_len4: 24,
            prefix_len6: 64,
        };
        // From here on Drop cleans up whatever was created.
        run(&["ip", "netns", "add", &tb.peer_ns])?;
        run(&["ip", "link", "add", &tb.daemon_if, "type", "veth", "peer", "name", &tb.peer_if])?;
        run(&["ip", "link", "set", &tb.peer_if, "netns", &tb.peer_ns])?;
        let _ = run(&["sysctl", "-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", tb.daemon_if)]);
        run(&["ip", "link", "set", &tb.daemon_if, "up"])?;
        let ns = tb.peer_ns.clone();
        let inns = |a: &[&str]| {
            let mut v = vec!["ip", "-n", ns.as_str()];
            v.extend_from_slice(a);
            run(&v)
        };
        inns(&["link", "set", "lo", "up"])?;
        inns(&["addr", "add", &format!("{}/24", tb.peer_ip4), "dev", &tb.peer_if])?;
        inns(&["addr", "add", &format!("{}/64", tb.peer_ip6), "dev", &tb.peer_if, "nodad"])?;
        inns(&["link", "set", &tb.peer_if, "up"])?;
        Ok(tb)
    }

    /// A command that runs `program args` inside the peer namespace.
    pub fn peer_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.peer_ns, program]).args(args);
        c
    }

    /// Remove namespaces and links left by earlier runs whose process died.
    pub fn cleanup_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("hsp") else { continue };
            let Some((pid, _)) = rest.split_once('x') else { continue };
            let Ok(pid) = pid.parse::<u32>() else { continue };
            // Names carry pid % 1e6; only remove when no such process exists.
            if pid != std::process::id() % 1_000_000 && !pid_alive(pid) {
                let _ = run(&["ip", "netns", "del", name]);
                let _ = run(&["ip", "link", "del", &format!("hsd{rest}a")]);
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.daemon_if]);
        let _ = run(&["ip", "netns", "del", &self.peer_ns]);
    }
}
