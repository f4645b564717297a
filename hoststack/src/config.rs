//! Daemon configuration: a TOML file, overridden by command-line flags.
//!
//! Every key, its default and meaning (also printed by `hoststackd --help`):
//!
//! ```toml
//! [uplink]
//! kind = "af-packet"        # "af-packet" (a named interface, e.g. a veth end) or "tap"
//! interface = "veth0"       # interface name (must carry no kernel IP address)
//! mac = "02:00:00:00:00:01" # our MAC; default: the interface's (af-packet) or random (tap)
//! ipv4 = "198.18.0.1/24"    # daemon-owned IPv4 address/prefix
//! ipv6 = "2001:2::1/64"     # daemon-owned IPv6 address/prefix (link-local is added automatically)
//! gateway4 = "198.18.0.254" # IPv4 default gateway (the daemon's, not the kernel's)
//! gateway6 = "2001:2::fe"   # IPv6 default gateway
//! offload = true            # AF_PACKET: hand the kernel 64 KiB TCP super-frames (TSO) and TCP checksums
//! rx_ring_mb = 64           # AF_PACKET: receive ring (PACKET_RX_RING, kernel memory, 2 KiB per frame); 0 = recvmmsg
//!
//! [daemon]
//! socket_dir = "/run/hoststack" # attach sockets <dir>/<namespace>.sock and ctl.sock
//! busy_poll = false             # spin instead of sleeping in epoll (benchmarks only)
//! poll_spin_us = 50             # adaptive: keep polling this long after work before sleeping
//! yield_after_wake = true       # sched_yield after waking apps, so they run their batch before the daemon sleeps
//! rx_batch = 64                 # frames read per uplink batch
//!
//! [tcp]
//! rx_buffer = 262144        # smoltcp receive buffer per connection (bytes)
//! tx_buffer = 262144        # smoltcp send buffer per connection (bytes)
//! rx_buffer_max = 4194304    # receive buffer while the budget below lasts
//! rx_large_budget_mb = 512   # MiB of rx_buffer_max buffers at once
//! connect_timeout_ms = 20000
//! ack_delay_ms = 10         # delayed ACK: a reply sent within this time carries the ACK (0 = ACK at once)
//! ack_delay_max_ms = 100    # ... stretched up to this while the app takes longer to answer (= ack_delay_ms: fixed)
//! timestamps = true         # answer the peer's TCP timestamps (PAWS; lets Linux clients reuse TIME-WAIT ports)
//! loss_recovery = true      # retransmit early on probe timeouts and partial ACKs (smoltcp waits >= 1 s)
//! user_timeout_secs = 900   # drop a connection whose peer is silent this long with data unacknowledged (0 = never)
//!
//! [session]
//! fifo_size = 262144        # each rx/tx FIFO, power of two
//! ct_fifo_size = 1048576    # each cut-through FIFO, power of two
//! segment_size = 1073741824 # per-app segment (virtual; pages are touched on use)
//! ct_segment_size = 268435456 # per app-pair cut-through segment
//! max_sessions_per_app = 16384
//! max_flows = 65536
//!
//! [[namespace]]             # one attach socket per namespace
//! name = "default"
//! secret = "change-me"
//! ```

use crate::uplink::UplinkKind;
use serde::Deserialize;
use std::path::PathBuf;

/// Whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The network side.
    pub uplink: UplinkConfig,
    /// Process-level settings.
    pub daemon: DaemonConfig,
    /// TCP tunables.
    pub tcp: TcpConfig,
    /// Session-layer tunables.
    pub session: SessionCfg,
    /// App namespaces.
    #[serde(rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

/// `[uplink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Device kind.
    pub kind: UplinkKind,
    /// Interface name.
    pub interface: String,
    /// MAC override.
    pub mac: Option<String>,
    /// IPv4 address with prefix.
    pub ipv4: Option<String>,
    /// IPv6 address with prefix.
    pub ipv6: Option<String>,
    /// IPv4 gateway.
    pub gateway4: Option<String>,
    /// IPv6 gateway.
    pub gateway6: Option<String>,
    /// TCP segmentation/checksum offload to the kernel (AF_PACKET).
    pub offload: bool,
    /// Size of the memory-mapped receive ring in MiB (AF_PACKET); 0 =
    /// `recvmmsg`.
    pub rx_ring_mb: usize,
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Where the sockets live.
    pub socket_dir: PathBuf,
    /// Busy-poll instead of epoll sleep.
    pub busy_poll: bool,
    /// Adaptive polling: after work, poll this many microseconds before
    /// sleeping (0 = sleep as soon as idle).
    pub poll_spin_us: u64,
    /// After a pass that woke app threads, `sched_yield` once before
    /// deciding to sleep: on a CPU shared with the apps they run their
    /// batch now and their requests are found without a wake-up; on a CPU
    /// of its own the daemon just goes on.
    pub yield_after_wake: bool,
    /// Frames per receive batch.
    pub rx_batch: usize,
}

/// `[tcp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// smoltcp receive buffer.
    pub rx_buffer: usize,
    /// smoltcp send buffer.
    pub tx_buffer: usize,
    /// Receive buffer (window) for connections while the larger buffers
    /// lent stay within `rx_large_budget_mb`; the rest get `rx_buffer`.
    /// smoltcp cannot grow a connection's window later, and a window of
    /// 256 KiB starves a fast sender as soon as a segment is lost.
    /// At or below `rx_buffer`: every connection gets `rx_buffer`.
    pub rx_buffer_max: usize,
    /// MiB of `rx_buffer_max` buffers lent at once, at most (only pages a
    /// connection's data has passed through are resident).
    pub rx_large_budget_mb: usize,
    /// Active open timeout.
    pub connect_timeout_ms: u64,
    /// Delayed-ACK timer: a reply within this time carries the ACK, so a
    /// request/response exchange costs one frame each way (0 = ACK at once).
    /// More than one full segment unacknowledged is ACKed immediately.
    pub ack_delay_ms: u64,
    /// Per connection, the delay follows the app's answer time up to this
    /// (a loaded server answers later than `ack_delay_ms`; without it each
    /// request would cost a pure ACK first). At or below `ack_delay_ms`:
    /// fixed delay. Keep it well below the peers' minimum retransmission
    /// timeout (200 ms on Linux).
    pub ack_delay_max_ms: u64,
    /// Answer a peer's TCP timestamp option (RFC 7323), like Linux's
    /// default `net.ipv4.tcp_timestamps = 1`. Peers use it for PAWS, and a
    /// Linux client reuses a port it holds in TIME-WAIT for a new
    /// connection to us only if the old one had timestamps: turned off, a
    /// client opening many short connections runs out of ports.
    pub timestamps: bool,
    /// Loss recovery smoltcp lacks: retransmit the first unacknowledged
    /// segment after a probe timeout (2 x RTT, at least 2 ms) without
    /// progress, and at once on a partial ACK while recovering, instead of
    /// waiting for smoltcp's retransmission timer (at least 1 s).
    pub loss_recovery: bool,
    /// Drop a connection (ETIMEDOUT) whose peer stays silent this long
    /// while data waits to be acknowledged, like Linux after
    /// `tcp_retries2` (about 15 minutes): a vanished peer must not hold a
    /// connection's buffers for ever. An app's `TCP_USER_TIMEOUT` or
    /// keepalive replaces it per socket. 0 = never.
    pub user_timeout_secs: u64,
}

/// `[session]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionCfg {
    /// FIFO capacity.
    pub fifo_size: u32,
    /// Cut-through FIFO capacity.
    pub ct_fifo_size: u32,
    /// App segment size.
    pub segment_size: usize,
    /// Cut-through segment size.
    pub ct_segment_size: usize,
    /// Session cap per app.
    pub max_sessions_per_app: usize,
    /// Flow cap.
    pub max_flows: usize,
}

/// `[[namespace]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Name (socket file name).
    pub name: String,
    /// Secret apps must present.
    pub secret: String,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            kind: UplinkKind::AfPacket,
            interface: String::new(),
            mac: None,
            ipv4: None,
            ipv6: None,
            gateway4: None,
            gateway6: None,
            offload: true,
            rx_ring_mb: 64,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket_dir: PathBuf::from("/run/hoststack"),
            busy_poll: false,
            poll_spin_us: 50,
            yield_after_wake: true,
            rx_batch: 64,
        }
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            rx_buffer_max: 4 << 20,
            rx_large_budget_mb: 512,
            connect_timeout_ms: 20_000,
            ack_delay_ms: 10,
            ack_delay_max_ms: 100,
            timestamps: true,
            loss_recovery: true,
            user_timeout_secs: 900,
        }
    }
}

impl Default for SessionCfg {
    fn default() -> Self {
        SessionCfg {
            fifo_size: 256 * 1024,
            ct_fifo_size: 1 << 20,
            segment_size: 1 << 30,
            ct_segment_size: 256 << 20,
            max_sessions_per_app: 16384,
            max_flows: 65536,
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File unreadable.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML invalid.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// A value is out of its domain.
    #[error("invalid value for {key}: {why}")]
    Value {
        /// Key.
        key: &'static str,
        /// Why.
        why: String,
    },
}

impl Config {
    /// Load from a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Check values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let v = |key, why: &str| {
            Err(ConfigError::Value {
                key,
                why: why.to_string(),
            })
        };
        if self.uplink.interface.is_empty() {
            return v("uplink.interface", "an interface name is required");
        }
        if self.uplink.ipv4.is_none() && self.uplink.ipv6.is_none() {
            return v("uplink.ipv4", "at least one of ipv4/ipv6 is required");
        }
        let f = self.session.fifo_size;
        if !f.is_power_of_two() || !(4096..=(1 << 28)).contains(&f) {
            return v(
                "session.fifo_size",
                "must be a power of two between 4096 and 2^28",
            );
        }
        if self.session.segment_size < 4 << 20 {
            return v("session.segment_size", "must be at least 4 MiB");
        }
        if self.session.ct_segment_size < 1 << 20 {
            return v("session.ct_segment_size", "must be at least 1 MiB");
        }
        if self.tcp.rx_buffer < 1024 || self.tcp.tx_buffer < 1024 {
            return v("tcp.rx_buffer", "buffers must be at least 1024 bytes");
        }
        // smoltcp's window scale tops out at 2^30 bytes; keep far below.
        if self.tcp.rx_buffer > 64 << 20 || self.tcp.tx_buffer > 64 << 20 {
            return v("tcp.rx_buffer", "buffers must be at most 64 MiB");
        }
        if self.tcp.rx_buffer_max > 64 << 20 {
            return v("tcp.rx_buffer_max", "must be at most 64 MiB");
        }
        if self.tcp.rx_large_budget_mb > 1 << 20 {
            return v("tcp.rx_large_budget_mb", "must be at most 1048576 (1 TiB)");
        }
        if self.tcp.ack_delay_ms > 500 {
            // RFC 1122 4.2.3.2: an ACK must not be delayed more than 0.5 s.
            return v("tcp.ack_delay_ms", "must be at most 500 (RFC 1122)");
        }
        if self.tcp.ack_delay_max_ms > 500 {
            return v("tcp.ack_delay_max_ms", "must be at most 500 (RFC 1122)");
        }
        if self.uplink.rx_ring_mb > 4096 {
            return v("uplink.rx_ring_mb", "must be at most 4096 (0 = no ring)");
        }
        if self.daemon.poll_spin_us > 1_000_000 {
            return v("daemon.poll_spin_us", "must be at most 1000000");
        }
        if self.daemon.rx_batch == 0 || self.daemon.rx_batch > 1024 {
            return v("daemon.rx_batch", "must be 1..=1024");
        }
        for n in &self.namespaces {
            if n.name.is_empty()
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return v("namespace.name", "must be non-empty [A-Za-z0-9_-]");
            }
        }
        Ok(())
    }
}

/// Parse "a:b:c:d:e:f".
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || ConfigError::Value {
        key: "uplink.mac",
        why: format!("{s:?} is not a MAC address"),
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if m[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses() {
        let c: Config = toml::from_str(
            r#"
            [uplink]
            kind = "tap"
            interface = "tap0"
            ipv4 = "198.18.0.1/24"
            [daemon]
            busy_poll = true
            [session]
            fifo_size = 65536
            [[namespace]]
            name = "default"
            secret = "x"
            "#,
        )
        .unwrap();
        assert!(c.daemon.busy_poll);
        assert_eq!(c.namespaces.len(), 1);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("[uplink]\nnope = 1").is_err());
        let mut c = Config::default();
        c.uplink.interface = "x".into();
        c.uplink.ipv4 = Some("198.18.0.1/24".into());
        c.validate().unwrap();
        c.tcp.ack_delay_ms = 501;
        assert!(c.validate().is_err());
        c.tcp.ack_delay_ms = 0;
        c.tcp.ack_delay_max_ms = 501;
        assert!(c.validate().is_err());
        c.tcp.ack_delay_max_ms = 100;
        c.tcp.rx_buffer_max = 128 << 20;
        assert!(c.validate().is_err());
        c.tcp.rx_buffer_max = 0;
        c.validate().unwrap();
        c.session.fifo_size = 1000;
        assert!(c.validate().is_err());
        assert!(parse_mac("01:00:00:00:00:00").is_err());
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap()[5], 10);
    }
}
