//! The real Envoy 1.40, unmodified, under the hoststack shim: an HTTP/1.1
//! proxy with 1 and 2 workers in front of nginx under the shim on the same
//! node (cut-through), in front of nginx in the peer namespace (uplink), a
//! TCP proxy listener, the admin endpoint, a STRICT_DNS cluster resolved
//! through the kernel, a hot reload of LDS/CDS files under load, and a hot
//! restart (a new Envoy takes the listener over) under load.
//! Clients are kernel curl/wrk in the peer namespace; bodies are compared
//! byte for byte and Envoy's own stats against the request counts.

use anyhow::{bail, ensure, Context, Result};
use envoy_integration::{
    dynamic_bootstrap, envoy_args, hot_restart_args, log_tail, shim_command, static_bootstrap,
    write_config, write_resources, Cluster, Discovery, Envoy, Listener,
};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use hoststack_tests::nginx::Site;
use hoststack_tests::wrk::WrkRun;
use hoststack_tests::{run, unique_tag, wait_for, Testbed};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn need_programs() -> Result<()> {
    envoy_integration::envoy_bin()?;
    if run(&[
        "sh",
        "-c",
        "command -v nginx && command -v wrk && command -v curl",
    ])
    .is_err()
    {
        bail!("nginx, wrk and curl are needed: run scripts/setup.sh");
    }
    Ok(())
}

/// A scratch directory for configs and logs.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let d = std::env::temp_dir().join(format!("hs-envoy-{}", unique_tag()));
        std::fs::create_dir_all(&d)?;
        Ok(Scratch(d))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port for an admin endpoint (admin listeners on loopback
/// also listen on a kernel placeholder under the shim, so the port must be
/// free in the kernel too).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn nginx_under_shim(d: &Daemon, site: &Site, listen: &str) -> Result<Proc> {
    let conf = site.conf(&format!("ng{}", unique_tag()), listen, 1)?;
    let mut c = Command::new(bin("hoststack")?);
    c.args(["run", "--strict", "--"])
        .args(site.args(&conf))
        .envs(d.env());
    Proc::spawn(c, "nginx")
}

/// Kernel nginx in the peer namespace on `port`, answering.
fn peer_nginx(tb: &Testbed, site: &Site, port: u16) -> Result<Proc> {
    let conf = site.conf("peer", &format!("{}:{port}", tb.peer_ip4), 1)?;
    let args = site.args(&conf);
    let args: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let p = Proc::spawn(tb.peer_cmd("nginx", &args), "peer nginx")?;
    wait_http(tb, &format!("http://{}:{port}/small", tb.peer_ip4))?;
    Ok(p)
}

fn start_envoy(d: &Daemon, dir: &Scratch, cfg: &serde_json::Value, workers: u32) -> Result<Envoy> {
    let admin: SocketAddr = cfg["admin"]["address"]["socket_address"]["address"]
        .as_str()
        .zip(cfg["admin"]["address"]["socket_address"]["port_value"].as_u64())
        .map(|(a, p)| format!("{a}:{p}"))
        .context("admin address")?
        .parse()?;
    let tag = unique_tag();
    let conf = write_config(&dir.path(&format!("envoy-{tag}.json")), cfg)?;
    let log = dir.path(&format!("envoy-{tag}.log"));
    Envoy::spawn(
        shim_command(d, &envoy_args(&conf, workers, &log))?,
        admin,
        &log,
    )
}

/// GET with kernel curl in the peer namespace: (status, body).
fn peer_get(tb: &Testbed, url: &str) -> Result<(u16, Vec<u8>)> {
    let out = tb
        .peer_cmd(
            "curl",
            &["-sS", "--max-time", "20", "-w", "\n%{http_code}", url],
        )
        .output()?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = out.stdout;
    let nl = s.iter().rposition(|&b| b == b'\n').context("no status")?;
    let code = std::str::from_utf8(&s[nl + 1..])?.trim().parse()?;
    Ok((code, s[..nl].to_vec()))
}

fn wait_http(tb: &Testbed, url: &str) -> Result<()> {
    wait_for(&format!("{url} to answer 200"), T, || {
        Ok(matches!(peer_get(tb, url), Ok((200, _))))
    })
}

/// wrk from the peer namespace.
fn wrk(tb: &Testbed, url: &str, conns: u32, secs: u32) -> Result<WrkRun> {
    let out = tb
        .peer_cmd(
            "wrk",
            &[
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--timeout",
                "5s",
                url,
            ],
        )
        .output()?;
    WrkRun::parse(&String::from_utf8_lossy(&out.stdout))
}

/// wrk with `conns` connections for `secs` s from the peer namespace, in a
/// thread (load while the test changes Envoy): its output.
fn wrk_in_background(
    tb: &Testbed,
    url: &str,
    conns: u32,
    secs: u32,
) -> std::thread::JoinHandle<Result<String>> {
    let peer_ns = tb.peer_ns.clone();
    let url = url.to_string();
    std::thread::spawn(move || -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &peer_ns,
                "wrk",
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--timeout",
                "5s",
                &url,
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// The load of [`wrk_in_background`] across a change of Envoy: Envoy
/// closes drained connections after the drain time (1 s), and a request
/// wrk sent on one just then fails with a read error before wrk reconnects.
/// Envoy on kernel sockets does the same (measured: exactly one read error
/// per connection), so up to one per connection is expected; nothing else
/// is, and more than 1000 requests must have passed.
fn load_survived(load: std::thread::JoinHandle<Result<String>>, conns: u64) -> Result<WrkRun> {
    let text = load
        .join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    let w = WrkRun::parse(&text)?;
    ensure!(
        w.errors[0] == 0 && w.errors[2] == 0 && w.errors[3] == 0 && w.non_2xx == 0,
        "errors under load:\n{text}"
    );
    ensure!(
        w.errors[1] <= conns,
        "more than one read error per connection:\n{text}"
    );
    ensure!(w.requests > 1000, "only {} requests under load", w.requests);
    Ok(w)
}

/// `n` sequential GETs of `/small` must all return the site's body.
fn gets_match(tb: &Testbed, url: &str, body: &[u8], n: usize) -> Result<()> {
    for i in 0..n {
        let (code, got) = peer_get(tb, url)?;
        ensure!(code == 200, "GET {i} of {url}: status {code}");
        ensure!(got == body, "GET {i} of {url}: body differs");
    }
    Ok(())
}

#[test]
fn http_proxy_with_1_and_2_workers_to_nginx_over_cut_through() -> Result<()> {
    need_programs()?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let dir = Scratch::new()?;
    let _ng = nginx_under_shim(&d, &site, "127.0.0.1:8181")?;
    for workers in [1u32, 2] {
        let listen: SocketAddr = format!("{}:{}", tb.daemon_ip4, 10000 + workers).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let cfg = static_bootstrap(
            admin,
            &[Listener::http("ingress", listen, "nginx")],
            &[Cluster::fixed("nginx", &["127.0.0.1:8181".parse()?])],
        );
        let envoy = start_envoy(&d, &dir, &cfg, workers)?;
        // Admin endpoint: server info, the cluster's endpoint, readiness.
        let info = envoy_integration::admin_get(admin, "/server_info")?;
        let info: serde_json::Value = serde_json::from_str(&info)?;
        ensure!(info["state"] == "LIVE", "server_info: {info}");
        ensure!(
            info["command_line_options"]["concurrency"] == workers,
            "concurrency: {}",
            info["command_line_options"]
        );
        let clusters = envoy_integration::admin_get(admin, "/clusters")?;
        ensure!(
            clusters.contains("nginx::127.0.0.1:8181::"),
            "clusters: {clusters}"
        );
        let url = format!("http://{listen}/small");
        wait_http(&tb, &url)?;
        let ct0 = d.counter(&["session", "cut_through_opened"])?;
        let rq0 = envoy.stat("http.ingress.downstream_rq_2xx")?;
        let up0 = envoy.stat("cluster.nginx.upstream_rq_2xx")?;
        gets_match(&tb, &url, &site.small, 20)?;
        let (code, big) = peer_get(&tb, &format!("http://{listen}/big"))?;
        ensure!(code == 200 && big == site.big, "10 MiB body differs");
        // Envoy's counters agree with what curl saw, exactly.
        ensure!(envoy.stat("http.ingress.downstream_rq_2xx")? - rq0 == 21);
        ensure!(envoy.stat("cluster.nginx.upstream_rq_2xx")? - up0 == 21);
        ensure!(
            d.counter(&["session", "cut_through_opened"])? > ct0
                || envoy.stat("cluster.nginx.upstream_cx_total")? >= 1,
            "Envoy -> nginx did not go through hoststack"
        );
        // Under load: wrk's completed requests against Envoy's count (Envoy
        // may also count responses still in flight when wrk stopped).
        let rq1 = envoy.stat("http.ingress.downstream_rq_2xx")?;
        let w = wrk(&tb, &url, 16, 2)?;
        let n = w.requests;
        ensure!(w.bad() == 0, "errors under load ({workers} workers): {w:?}");
        ensure!(n > 1000, "only {n} requests in 2 s");
        let counted = envoy.stat("http.ingress.downstream_rq_2xx")? - rq1;
        ensure!(
            counted >= n && counted <= n + 16,
            "Envoy counted {counted}, wrk completed {n}"
        );
        ensure!(envoy.stat("http.ingress.downstream_rq_5xx")? == 0);
        envoy.stop()?;
    }
    // Every upstream connection was cut-through (nginx is on this node).
    ensure!(d.counter(&["session", "cut_through_opened"])? >= 2);
    Ok(())
}

#[test]
fn http_and_tcp_proxy_to_nginx_in_the_peer_namespace() -> Result<()> {
    need_programs()?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::with_small(b'k')?;
    let dir = Scratch::new()?;
    let _peer = peer_nginx(&tb, &site, 8083)?;
    let http: SocketAddr = format!("{}:10080", tb.daemon_ip4).parse()?;
    let tcp: SocketAddr = format!("{}:10081", tb.daemon_ip4).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let up: SocketAddr = format!("{}:8083", tb.peer_ip4).parse()?;
    let cfg = static_bootstrap(
        admin,
        &[
            Listener::http("ingress", http, "peer"),
            Listener::tcp("tcp", tcp, "peer"),
        ],
        &[Cluster::fixed("peer", &[up])],
    );
    let envoy = start_envoy(&d, &dir, &cfg, 1)?;
    let opens0 = d.counter(&["stack", "active_opens"])?;
    wait_http(&tb, &format!("http://{http}/small"))?;
    gets_match(&tb, &format!("http://{http}/small"), &site.small, 10)?;
    let (code, big) = peer_get(&tb, &format!("http://{tcp}/big"))?;
    ensure!(
        code == 200 && big == site.big,
        "TCP proxy: 10 MiB body differs"
    );
    gets_match(&tb, &format!("http://{tcp}/small"), &site.small, 5)?;
    // The upstream connections were opened by hoststack's TCP (uplink).
    ensure!(d.counter(&["stack", "active_opens"])? > opens0);
    ensure!(envoy.stat("tcp.tcp.downstream_cx_total")? == 6);
    ensure!(envoy.stat("cluster.peer.upstream_cx_connect_fail")? == 0);
    let w = wrk(&tb, &format!("http://{http}/small"), 8, 2)?;
    ensure!(
        w.bad() == 0 && w.requests > 500,
        "wrk through Envoy to the peer: {w:?}"
    );
    envoy.stop()?;
    Ok(())
}

#[test]
fn strict_dns_cluster_resolves_through_the_kernel() -> Result<()> {
    need_programs()?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::with_small(b'q')?;
    let dir = Scratch::new()?;
    let _peer = peer_nginx(&tb, &site, 8084)?;
    // The name server sits on the kernel link: DNS never touches hoststack.
    let link = tb.kernel_link()?;
    let dns_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/py/dns.py");
    let mut dns = Proc::spawn(
        tb.peer_cmd(
            "python3",
            &[
                &dns_py.display().to_string(),
                &link.peer.to_string(),
                "53",
                &format!("web.test={}", tb.peer_ip4),
            ],
        ),
        "dns",
    )?;
    dns.expect("ready", T)?;
    let http: SocketAddr = format!("{}:10082", tb.daemon_ip4).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let web = Cluster {
        name: "web".into(),
        discovery: Discovery::StrictDns {
            host: "web.test".into(),
            port: 8084,
            resolver: format!("{}:53", link.peer).parse()?,
        },
    };
    let cfg = static_bootstrap(admin, &[Listener::http("ingress", http, "web")], &[web]);
    let envoy = start_envoy(&d, &dir, &cfg, 1)?;
    dns.expect("query web.test type 1", T)?;
    wait_http(&tb, &format!("http://{http}/small"))?;
    gets_match(&tb, &format!("http://{http}/small"), &site.small, 5)?;
    let clusters = envoy_integration::admin_get(admin, "/clusters")?;
    ensure!(
        clusters.contains(&format!("web::{}:8084::", tb.peer_ip4)),
        "resolved endpoint not in /clusters: {clusters}"
    );
    ensure!(envoy.stat("cluster.web.update_success")? >= 1);
    ensure!(envoy.stat("cluster.web.upstream_rq_2xx")? == 5 + 1);
    // Re-resolution keeps going through the kernel (every 5 s by default).
    dns.expect("query web.test type 1", T)?;
    envoy.stop()?;
    Ok(())
}

#[test]
fn hot_reload_of_lds_and_cds_files_under_load_keeps_serving() -> Result<()> {
    need_programs()?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let (a, b) = (Site::with_small(b'a')?, Site::with_small(b'n')?);
    let dir = Scratch::new()?;
    let _nga = nginx_under_shim(&d, &a, "127.0.0.1:8191")?;
    let _ngb = nginx_under_shim(&d, &b, "127.0.0.1:8192")?;
    let http: SocketAddr = format!("{}:10090", tb.daemon_ip4).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (lds, cds) = (dir.path("lds.json"), dir.path("cds.json"));
    let ca = Cluster::fixed("a", &["127.0.0.1:8191".parse()?]);
    let cb = Cluster::fixed("b", &["127.0.0.1:8192".parse()?]);
    write_resources(&cds, &[ca.to_json()])?;
    write_resources(&lds, &[Listener::http("ingress", http, "a").to_json()])?;
    let envoy = start_envoy(&d, &dir, &dynamic_bootstrap(admin, &lds, &cds), 2)?;
    let url = format!("http://{http}/small");
    wait_http(&tb, &url)?;
    gets_match(&tb, &url, &a.small, 3)?;
    let (lds0, cds0) = (
        envoy.stat("listener_manager.lds.update_success")?,
        envoy.stat("cluster_manager.cds.update_success")?,
    );
    // Load for 6 s; reload the clusters, then the route, in the middle.
    let load = wrk_in_background(&tb, &url, 8, 6);
    std::thread::sleep(Duration::from_secs(2));
    write_resources(&cds, &[ca.to_json(), cb.to_json()])?;
    wait_for("CDS reload", T, || {
        Ok(envoy.stat("cluster_manager.cds.update_success")? > cds0)
    })?;
    write_resources(&lds, &[Listener::http("ingress", http, "b").to_json()])?;
    wait_for("LDS reload", T, || {
        Ok(envoy.stat("listener_manager.lds.update_success")? > lds0)
    })?;
    load_survived(load, 8)?;
    // The new route serves the other site; both clusters carried traffic.
    wait_for("the new route", T, || {
        Ok(peer_get(&tb, &url).map(|r| r.1 == b.small).unwrap_or(false))
    })?;
    gets_match(&tb, &url, &b.small, 3)?;
    ensure!(envoy.stat("cluster.a.upstream_rq_2xx")? > 0);
    ensure!(envoy.stat("cluster.b.upstream_rq_2xx")? > 0);
    ensure!(envoy.stat("http.ingress.downstream_rq_5xx")? == 0);
    envoy.stop()?;
    Ok(())
}

/// Envoy's hot restart under the shim, under load: the new Envoy (epoch 1)
/// gets the listener from the old one over a UNIX socket (SCM_RIGHTS) and
/// must serve it after the old one exits. The passed descriptor is the
/// old Envoy's placeholder; the shim finds the listener's address on it
/// and joins the daemon's listener there (before: the new Envoy listened
/// on a bare kernel socket and every request after the handover failed).
#[test]
fn hot_restart_hands_the_listener_to_the_new_envoy_under_load() -> Result<()> {
    need_programs()?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::with_small(b'h')?;
    let dir = Scratch::new()?;
    let _peer = peer_nginx(&tb, &site, 8085)?;
    let http: SocketAddr = format!("{}:10095", tb.daemon_ip4).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let up: SocketAddr = format!("{}:8085", tb.peer_ip4).parse()?;
    let cfg = static_bootstrap(
        admin,
        &[Listener::http("ingress", http, "peer")],
        &[Cluster::fixed("peer", &[up])],
    );
    let conf = write_config(&dir.path("hot.json"), &cfg)?;
    // Shared memory and sockets are named after the base id: one per test
    // process.
    let base_id = 1000 + std::process::id() % 50_000;
    let spawn = |epoch: u32| -> Result<Envoy> {
        let log = dir.path(&format!("hot-{epoch}.log"));
        Envoy::spawn(
            shim_command(&d, &hot_restart_args(&conf, 1, &log, epoch, base_id))?,
            admin,
            &log,
        )
    };
    let mut old = spawn(0)?;
    let url = format!("http://{http}/small");
    wait_http(&tb, &url)?;
    let load = wrk_in_background(&tb, &url, 8, 6);
    std::thread::sleep(Duration::from_millis(1500));
    let new = spawn(1)?;
    let logs = || {
        format!(
            "epoch 0 log:\n{}\nepoch 1 log:\n{}",
            log_tail(&dir.path("hot-0.log")),
            log_tail(&dir.path("hot-1.log"))
        )
    };
    let st = old
        .wait_exit(T)
        .with_context(|| format!("the old Envoy did not hand over; {}", logs()))?;
    ensure!(st.success(), "the old Envoy exited with {st}; {}", logs());
    // The old Envoy closes its connections when it drains.
    load_survived(load, 8)?;
    // The old one is gone: the new one serves the listener alone.
    gets_match(&tb, &url, &site.small, 5)?;
    let apps = d.ctl("apps")?.to_string();
    ensure!(
        !apps.contains(&format!("[{}]", old.pid())),
        "the old Envoy is still attached: {apps}"
    );
    ensure!(new.stat("http.ingress.downstream_rq_2xx")? >= 5);
    new.stop()?;
    Ok(())
}
