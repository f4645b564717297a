//! Shim settings, read once from the environment (set by `hoststack run`).
//!
//! | variable | meaning |
//! |---|---|
//! | `HOSTSTACK_SOCKET_DIR`, `HOSTSTACK_NAMESPACE`, `HOSTSTACK_SECRET` | where and how to attach |
//! | `HOSTSTACK_KERNEL_PORTS` | comma list of ports whose sockets stay in the kernel (always includes 53) |
//! | `HOSTSTACK_KERNEL_PREFIXES` | comma list of `addr/len` prefixes reached through the kernel |
//! | `HOSTSTACK_STRICT` | `1`: no kernel fallback when the daemon is unreachable: socket() fails with ENETDOWN |
//! | `HOSTSTACK_PRELOAD_LOG` | `off`, `warn` (default) or `debug` |

use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone)]
pub struct Prefix {
    pub net: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn parse(s: &str) -> Option<Prefix> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let net: IpAddr = a.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse().ok().filter(|&l: &u8| l <= max)?,
            None => max,
        };
        Some(Prefix { net, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub kernel_ports: Vec<u16>,
    pub kernel_prefixes: Vec<Prefix>,
    pub strict: bool,
    pub log: u8,
}

pub const LOG_WARN: u8 = 1;
pub const LOG_DEBUG: u8 = 2;

impl Config {
    pub fn from_env() -> Config {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self::parse(
            &var("HOSTSTACK_KERNEL_PORTS"),
            &var("HOSTSTACK_KERNEL_PREFIXES"),
            &var("HOSTSTACK_STRICT"),
            &var("HOSTSTACK_PRELOAD_LOG"),
        )
    }

    pub fn parse(ports: &str, prefixes: &str, strict: &str, log: &str) -> Config {
        let mut kernel_ports = vec![53];
        let mut bad = Vec::new();
        for p in ports.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(p) if p != 0 => kernel_ports.push(p),
                _ => bad.push(p.to_string()),
            }
        }
        let mut kernel_prefixes = Vec::new();
        for p in prefixes.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match Prefix::parse(p) {
                Some(x) => kernel_prefixes.push(x),
                None => bad.push(p.to_string()),
            }
        }
        let log = match log {
            "off" | "0" => 0,
            "debug" => LOG_DEBUG,
            _ => LOG_WARN,
        };
        if !bad.is_empty() && log > 0 {
            crate::sys::stderr(&format!(
                "hoststack preload: ignoring bad HOSTSTACK_KERNEL_PORTS/PREFIXES entries: {}\n",
                bad.join(", ")
            ));
        }
        Config {
            kernel_ports,
            kernel_prefixes,
            strict: matches!(strict, "1" | "true" | "yes"),
            log,
        }
    }

    /// Must traffic to/from `a` stay on kernel sockets?
    pub fn kernel_only(&self, a: SocketAddr) -> bool {
        self.kernel_ports.contains(&a.port())
            || self.kernel_prefixes.iter().any(|p| p.contains(a.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_prefixes() {
        let c = Config::parse("8080, x, 0", "10.0.0.0/8,fd00::/8,192.0.2.7", "", "off");
        assert_eq!(c.kernel_ports, vec![53, 8080]);
        assert!(c.kernel_only("10.1.2.3:80".parse().unwrap()));
        assert!(!c.kernel_only("11.1.2.3:80".parse().unwrap()));
        assert!(c.kernel_only("[fd00::1]:80".parse().unwrap()));
        assert!(c.kernel_only("192.0.2.7:1".parse().unwrap()));
        assert!(!c.kernel_only("192.0.2.8:1".parse().unwrap()));
        assert!(c.kernel_only("198.18.0.1:53".parse().unwrap()));
        assert!(!c.strict);
        assert!(Config::parse("", "", "1", "off").strict);
        assert!(Prefix::parse("1.2.3.4/33").is_none());
        assert!(Prefix::parse("0.0.0.0/0")
            .unwrap()
            .contains("9.9.9.9".parse().unwrap()));
    }
}
