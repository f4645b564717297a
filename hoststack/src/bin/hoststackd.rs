//! `hoststackd`: the hoststack node daemon.
use anyhow::{Context, Result};
use clap::Parser;
use hoststack::config::{Config, NamespaceConfig};
use hoststack::uplink::UplinkKind;
use std::path::PathBuf;

const KEYS: &str = "\
CONFIG FILE (TOML; every key optional unless noted, flags override the file):
  [uplink]
    kind = \"af-packet\"         af-packet (named interface, e.g. a veth end) | tap
    interface = \"veth0\"        required; must carry no kernel IP address
    mac = \"02:00:00:00:00:01\"  default: the interface's MAC (af-packet) / random (tap)
    ipv4 = \"198.18.0.1/24\"     daemon-owned IPv4 address/prefix
    ipv6 = \"2001:2::1/64\"      daemon-owned IPv6 address/prefix (+ EUI-64 link-local)
    gateway4 / gateway6        default gateways used by the daemon (not the kernel's)
    offload = true             AF_PACKET: TCP segmentation + checksum offload (virtio-net headers)
    rx_ring_mb = 64            AF_PACKET: receive ring (PACKET_RX_RING) in MiB of kernel memory; 0 = recvmmsg
  [daemon]
    socket_dir = \"/run/hoststack\"  attach sockets <dir>/<namespace>.sock, ctl.sock
    busy_poll = false          spin instead of sleeping (benchmarks)
    poll_spin_us = 50          adaptive: after work keep polling this long, then sleep (0 = off)
    yield_after_wake = true    sched_yield after waking apps (they run their batch first)
    rx_batch = 64              frames per uplink receive batch (1..=1024)
  [tcp]
    rx_buffer = 262144         smoltcp receive buffer per connection
    tx_buffer = 262144         smoltcp send buffer per connection
    rx_buffer_max = 4194304    receive buffer (window) a connection gets while rx_large_budget_mb
                               lasts; smoltcp cannot grow a window later (<= rx_buffer: off)
    rx_large_budget_mb = 512   MiB of rx_buffer_max buffers lent at once (lazily backed)
    connect_timeout_ms = 20000 active open gives up after this (ETIMEDOUT)
    ack_delay_ms = 10          delayed ACK: a reply within this time carries the ACK (0 = at once)
    ack_delay_max_ms = 100     per connection stretched up to this when the app answers later
    timestamps = true          answer the peer's TCP timestamps (PAWS, TIME-WAIT port reuse)
    loss_recovery = true       retransmit early on probe timeouts / partial ACKs (smoltcp alone waits >= 1 s)
    user_timeout_secs = 900    drop a connection whose peer stays silent this long with data unacknowledged
                               (ETIMEDOUT; apps override it with TCP_USER_TIMEOUT or keepalive; 0 = never)
  [session]
    fifo_size = 262144         rx and tx FIFO per session (power of two)
    ct_fifo_size = 1048576     each FIFO of a cut-through session (power of two)
    segment_size = 1073741824  per-app shared segment (virtual; touched on use)
    ct_segment_size = 268435456 per app-pair cut-through segment
    max_sessions_per_app = 16384
    max_flows = 65536
  [[namespace]]                one attach socket per namespace (repeatable)
    name = \"default\"
    secret = \"...\"             apps must present it (env HOSTSTACK_SECRET on the app side)
If no namespace is configured, \"default\" is served with the secret from the
daemon's HOSTSTACK_SECRET environment variable (empty if unset).

LOGGING: RUST_LOG or --log (e.g. info, hoststack=debug).";

/// Userspace TCP/UDP host stack daemon: owns an uplink, terminates TCP/UDP
/// with smoltcp and serves apps through shared-memory FIFOs.
#[derive(Parser, Debug)]
#[command(name = "hoststackd", version, after_help = KEYS)]
struct Cli {
    /// TOML configuration file.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Uplink kind (overrides uplink.kind).
    #[arg(long, value_enum)]
    uplink: Option<UplinkKind>,
    /// Interface name (overrides uplink.interface).
    #[arg(short, long)]
    interface: Option<String>,
    /// MAC address (overrides uplink.mac).
    #[arg(long)]
    mac: Option<String>,
    /// IPv4 address/prefix (overrides uplink.ipv4).
    #[arg(long)]
    ipv4: Option<String>,
    /// IPv6 address/prefix (overrides uplink.ipv6).
    #[arg(long)]
    ipv6: Option<String>,
    /// IPv4 default gateway (overrides uplink.gateway4).
    #[arg(long)]
    gateway4: Option<String>,
    /// IPv6 default gateway (overrides uplink.gateway6).
    #[arg(long)]
    gateway6: Option<String>,
    /// AF_PACKET receive ring size in MiB, 0 = recvmmsg (overrides uplink.rx_ring_mb).
    #[arg(long)]
    rx_ring_mb: Option<usize>,
    /// Socket directory (overrides daemon.socket_dir).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Busy-poll instead of sleeping (overrides daemon.busy_poll).
    #[arg(long)]
    busy_poll: bool,
    /// Adaptive polling window in microseconds (overrides daemon.poll_spin_us).
    #[arg(long)]
    poll_spin_us: Option<u64>,
    /// sched_yield after waking apps: true or false (overrides daemon.yield_after_wake).
    #[arg(long, value_name = "BOOL")]
    yield_after_wake: Option<bool>,
    /// FIFO size in bytes (overrides session.fifo_size).
    #[arg(long)]
    fifo_size: Option<u32>,
    /// Delayed-ACK timer in milliseconds, 0 = ACK at once (overrides tcp.ack_delay_ms).
    #[arg(long)]
    ack_delay_ms: Option<u64>,
    /// Longest delayed ACK when the app answers slowly; at or below
    /// --ack-delay-ms the delay is fixed (overrides tcp.ack_delay_max_ms).
    #[arg(long)]
    ack_delay_max_ms: Option<u64>,
    /// Answer the peer's TCP timestamps: true or false (overrides tcp.timestamps).
    #[arg(long, value_name = "BOOL")]
    tcp_timestamps: Option<bool>,
    /// Early retransmission on probe timeouts and partial ACKs: true or
    /// false (overrides tcp.loss_recovery).
    #[arg(long, value_name = "BOOL")]
    tcp_loss_recovery: Option<bool>,
    /// Drop a connection whose peer stays silent this long while data waits
    /// to be acknowledged, in seconds; 0 = never (overrides
    /// tcp.user_timeout_secs).
    #[arg(long, value_name = "SECS")]
    tcp_user_timeout_secs: Option<u64>,
    /// Receive buffer for connections while the budget lasts, in bytes
    /// (overrides tcp.rx_buffer_max; at or below tcp.rx_buffer: off).
    #[arg(long, value_name = "BYTES")]
    tcp_rx_buffer_max: Option<usize>,
    /// Add an app namespace NAME=SECRET (repeatable; adds to the file's).
    #[arg(long = "namespace", value_name = "NAME=SECRET")]
    namespaces: Vec<String>,
    /// Log filter (overrides RUST_LOG), e.g. "info" or "hoststack=debug".
    #[arg(long)]
    log: Option<String>,
}

fn main() -> Result<()> {
    hoststack::sys::tune_malloc();
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(k) = cli.uplink {
        cfg.uplink.kind = k;
    }
    if let Some(v) = cli.interface {
        cfg.uplink.interface = v;
    }
    if cli.mac.is_some() {
        cfg.uplink.mac = cli.mac;
    }
    if cli.ipv4.is_some() {
        cfg.uplink.ipv4 = cli.ipv4;
    }
    if cli.ipv6.is_some() {
        cfg.uplink.ipv6 = cli.ipv6;
    }
    if cli.gateway4.is_some() {
        cfg.uplink.gateway4 = cli.gateway4;
    }
    if cli.gateway6.is_some() {
        cfg.uplink.gateway6 = cli.gateway6;
    }
    if let Some(mb) = cli.rx_ring_mb {
        cfg.uplink.rx_ring_mb = mb;
    }
    if let Some(d) = cli.socket_dir {
        cfg.daemon.socket_dir = d;
    }
    if cli.busy_poll {
        cfg.daemon.busy_poll = true;
    }
    if let Some(y) = cli.yield_after_wake {
        cfg.daemon.yield_after_wake = y;
    }
    if let Some(us) = cli.poll_spin_us {
        cfg.daemon.poll_spin_us = us;
    }
    if let Some(f) = cli.fifo_size {
        cfg.session.fifo_size = f;
    }
    if let Some(ms) = cli.ack_delay_ms {
        cfg.tcp.ack_delay_ms = ms;
    }
    if let Some(ms) = cli.ack_delay_max_ms {
        cfg.tcp.ack_delay_max_ms = ms;
    }
    if let Some(on) = cli.tcp_loss_recovery {
        cfg.tcp.loss_recovery = on;
    }
    if let Some(s) = cli.tcp_user_timeout_secs {
        cfg.tcp.user_timeout_secs = s;
    }
    if let Some(n) = cli.tcp_rx_buffer_max {
        cfg.tcp.rx_buffer_max = n;
    }
    if let Some(on) = cli.tcp_timestamps {
        cfg.tcp.timestamps = on;
    }
    for ns in &cli.namespaces {
        let (name, secret) = ns
            .split_once('=')
            .with_context(|| format!("--namespace {ns:?}: expected NAME=SECRET"))?;
        cfg.namespaces.push(NamespaceConfig {
            name: name.into(),
            secret: secret.into(),
        });
    }
    hoststack::daemon::preflight(&cfg)?;
    let mut d = hoststack::daemon::Daemon::new(cfg)?;
    d.run()
}
