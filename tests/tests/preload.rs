//! Real programs under the LD_PRELOAD shim (`hoststack run`): nginx with 1
//! and 4 workers serving kernel curl/wrk in the peer namespace, nginx
//! reload under load, curl and wrk under the shim as clients (uplink and
//! cut-through), iperf3 TCP/UDP both ways, redis, memcached, lighttpd,
//! HAProxy's kernel splicing,
//! and name resolution through the kernel. Responses are compared byte for
//! byte.

use anyhow::{bail, ensure, Context, Result};
use hoststack_tests::daemon::{bin, Daemon, Proc};
use hoststack_tests::nginx::Site;
use hoststack_tests::wrk::WrkRun;
use hoststack_tests::{child_pids, proc_cpu, run, unique_tag, wait_for, Testbed};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn have(prog: &str) -> Result<()> {
    if run(&["sh", "-c", &format!("command -v {prog}")]).is_err() {
        bail!("{prog} is not installed: run scripts/setup.sh (installs nginx, wrk, iperf3, curl, redis, memcached, lighttpd, haproxy)");
    }
    Ok(())
}

/// `hoststack run -- args...` with the daemon's attach settings.
fn shim(d: &Daemon, args: &[&str]) -> Result<Command> {
    let mut c = Command::new(bin("hoststack")?);
    c.arg("run")
        .arg("--strict")
        .arg("--")
        .args(args)
        .envs(d.env());
    Ok(c)
}

/// Run a Python program under the shim; it must succeed and open at least
/// `conns` cut-through connections (so it really used hoststack). Returns
/// its stdout.
fn shim_python(d: &Daemon, py: &str, conns: u64) -> Result<String> {
    let before = d.counter(&["session", "cut_through_opened"])?;
    let out = shim(d, &["python3", "-c", py])?.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "python: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened = d.counter(&["session", "cut_through_opened"])? - before;
    ensure!(
        opened >= conns,
        "{opened} hoststack connections, expected {conns}"
    );
    Ok(text)
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// Fetch `url` with kernel curl in the peer namespace.
fn peer_get(tb: &Testbed, url: &str) -> Result<Vec<u8>> {
    let out = tb
        .peer_cmd("curl", &["-sS", "--max-time", "20", url])
        .output()?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn wait_http(tb: &Testbed, url: &str) -> Result<()> {
    wait_for(&format!("{url} to answer"), T, || {
        Ok(peer_get(tb, url).is_ok())
    })
}

/// Parse wrk's output: (requests, socket errors + non-2xx).
fn wrk_result(out: &str) -> Result<(u64, u64)> {
    let w = WrkRun::parse(out)?;
    Ok((w.requests, w.bad()))
}

/// user + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let (u, s) = proc_cpu(pid);
    u + s
}

/// Graceful nginx stop (SIGQUIT), bounded.
fn quit(mut ng: Proc) -> Result<()> {
    ng.signal(libc::SIGQUIT);
    ng.wait(T)?;
    Ok(())
}

/// GET `url` with curl under the shim; it must go through cut-through.
fn shim_get_cut_through(d: &Daemon, url: &str) -> Result<Vec<u8>> {
    let before = d.counter(&["session", "cut_through_opened"])?;
    let out = shim(d, &["curl", "-sS", "--max-time", "20", url])?.output()?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        d.counter(&["session", "cut_through_opened"])? > before,
        "not cut-through"
    );
    Ok(out.stdout)
}

fn nginx_under_shim(d: &Daemon, site: &Site, conf: &Path) -> Result<Proc> {
    let c = shim(
        d,
        &[
            "nginx",
            "-c",
            &conf.display().to_string(),
            "-p",
            &site.dir.display().to_string(),
        ],
    )?;
    Proc::spawn(c, "nginx")
}

#[test]
fn nginx_with_1_and_4_workers_serves_kernel_curl_and_wrk() -> Result<()> {
    have("nginx")?;
    have("wrk")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    for (i, workers) in [1u32, 4].into_iter().enumerate() {
        let port = 8080 + i;
        let conf = site.conf(
            &format!("w{workers}"),
            &format!("{}:{port}", tb.daemon_ip4),
            workers,
        )?;
        let ng = nginx_under_shim(&d, &site, &conf)?;
        let base = format!("http://{}:{port}", tb.daemon_ip4);
        wait_http(&tb, &format!("{base}/small"))?;
        ensure!(
            peer_get(&tb, &format!("{base}/small"))? == site.small,
            "64 B body differs"
        );
        let big = peer_get(&tb, &format!("{base}/big"))?;
        ensure!(
            sha(&big) == sha(&site.big),
            "10 MiB body differs ({} bytes)",
            big.len()
        );
        let out = tb
            .peer_cmd("wrk", &["-t1", "-c16", "-d2s", &format!("{base}/small")])
            .output()?;
        let (reqs, bad) = wrk_result(&String::from_utf8_lossy(&out.stdout))?;
        ensure!(reqs > 100 && bad == 0, "wrk: {reqs} requests, {bad} errors");
        // Each worker served through hoststack (one app per process).
        let apps = d.ctl("apps")?;
        let n = apps["apps"].as_array().map_or(0, |a| a.len());
        ensure!(
            n > workers as usize,
            "{n} apps attached for {workers} workers: {apps}"
        );
        quit(ng)?;
    }
    ensure!(
        d.counter(&["stack", "passive_opens"])? >= 34,
        "16 wrk connections and 2 curls per run"
    );
    Ok(())
}

#[test]
fn nginx_reload_under_load_loses_no_request() -> Result<()> {
    have("nginx")?;
    have("wrk")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let conf = site.conf("reload", &format!("{}:8090", tb.daemon_ip4), 4)?;
    let ng = nginx_under_shim(&d, &site, &conf)?;
    let url = format!("http://{}:8090/small", tb.daemon_ip4);
    wait_http(&tb, &url)?;
    // A new connection per request: every reload races new connections
    // against the old workers closing their listeners.
    let wrk = tb
        .peer_cmd(
            "wrk",
            &["-t2", "-c32", "-d5s", "-H", "Connection: close", &url],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = || -> Result<i32> {
        Ok(std::fs::read_to_string(site.dir.join("reload.pid"))?
            .trim()
            .parse()?)
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        // SAFETY: kill(2) on nginx's master.
        unsafe { libc::kill(pid()?, libc::SIGHUP) };
    }
    let out = wrk.wait_with_output()?;
    let (reqs, bad) = wrk_result(&String::from_utf8_lossy(&out.stdout))?;
    ensure!(reqs > 500, "only {reqs} requests");
    ensure!(
        bad == 0,
        "{bad} failed requests during reloads: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(peer_get(&tb, &url)? == site.small);
    quit(ng)?;
    Ok(())
}

/// A kernel nginx in the peer namespace.
fn peer_nginx(tb: &Testbed, site: &Site, port: u16) -> Result<Proc> {
    let conf = site.conf("peer", &format!("{}:{port}", tb.peer_ip4), 1)?;
    let c = tb.peer_cmd(
        "nginx",
        &[
            "-c",
            &conf.display().to_string(),
            "-p",
            &site.dir.display().to_string(),
        ],
    );
    let p = Proc::spawn(c, "peer nginx")?;
    wait_http(tb, &format!("http://{}:{port}/small", tb.peer_ip4))?;
    Ok(p)
}

#[test]
fn curl_and_wrk_under_the_shim_over_the_uplink_and_cut_through() -> Result<()> {
    have("nginx")?;
    have("wrk")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let kernel_nginx = peer_nginx(&tb, &site, 8081)?;
    // curl (shim) -> kernel nginx in the peer namespace: active opens.
    let url = format!("http://{}:8081/big", tb.peer_ip4);
    let out = shim(&d, &["curl", "-sS", "--max-time", "20", &url])?.output()?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        sha(&out.stdout) == sha(&site.big),
        "body differs ({} bytes)",
        out.stdout.len()
    );
    ensure!(d.counter(&["stack", "active_opens"])? >= 1);
    // wrk (shim) -> kernel nginx.
    let small = format!("http://{}:8081/small", tb.peer_ip4);
    let out = shim(&d, &["wrk", "-t1", "-c8", "-d2s", &small])?.output()?;
    let (reqs, bad) = wrk_result(&String::from_utf8_lossy(&out.stdout))?;
    ensure!(
        reqs > 100 && bad == 0,
        "wrk under the shim: {reqs} requests, {bad} errors"
    );
    ensure!(d.counter(&["stack", "active_opens"])? >= 9);
    // curl (shim) -> nginx (shim) on the same node: cut-through.
    let conf = site.conf("ct", &format!("{}:8082", tb.daemon_ip4), 1)?;
    let ng = nginx_under_shim(&d, &site, &conf)?;
    wait_http(&tb, &format!("http://{}:8082/small", tb.daemon_ip4))?;
    let body = shim_get_cut_through(&d, &format!("http://{}:8082/big", tb.daemon_ip4))?;
    ensure!(sha(&body) == sha(&site.big), "cut-through body differs");
    quit(ng)?;
    quit(kernel_nginx)?;
    Ok(())
}

fn iperf_bytes(json: &[u8], udp: bool) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(json)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let b = if udp {
        &end["sum"]["bytes"]
    } else {
        &end["sum_received"]["bytes"]
    };
    b.as_u64().context("no byte count in iperf3 output")
}

#[test]
fn iperf3_tcp_and_udp_as_client_and_server() -> Result<()> {
    have("iperf3")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let peer = tb.peer_ip4.to_string();
    let me = tb.daemon_ip4.to_string();
    for udp in [false, true] {
        let mut extra: Vec<&str> = vec!["-t", "2", "-J"];
        if udp {
            extra.extend(["-u", "-b", "200M"]);
        }
        // Client under the shim, kernel server in the peer namespace.
        let mut srv = Proc::spawn(
            tb.peer_cmd("iperf3", &["-s", "-1", "-B", &peer, "-p", "5201"]),
            "iperf3 -s",
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let mut args = vec!["iperf3", "-c", &peer, "-p", "5201"];
        args.extend(&extra);
        let out = shim(&d, &args)?.output()?;
        let n = iperf_bytes(&out.stdout, udp)?;
        ensure!(
            n > 1_000_000,
            "iperf3 client (udp={udp}) moved only {n} bytes"
        );
        srv.wait(T)?;
        // Server under the shim, kernel client.
        let mut srv = Proc::spawn(
            shim(&d, &["iperf3", "-s", "-1", "-B", &me, "-p", "5202"])?,
            "iperf3 -s (shim)",
        )?;
        wait_for("iperf3 server under the shim", T, || {
            Ok(d.ctl("sessions")?.to_string().contains(":5202"))
        })?;
        let mut args = vec!["-c", me.as_str(), "-p", "5202"];
        args.extend(&extra);
        let out = tb.peer_cmd("iperf3", &args).output()?;
        let n = iperf_bytes(&out.stdout, udp)?;
        ensure!(
            n > 1_000_000,
            "iperf3 server under the shim (udp={udp}) moved only {n} bytes"
        );
        srv.wait(T)?;
    }
    Ok(())
}

/// `tests/py/kv.py MODE ARGS...` with kernel Python in the peer namespace;
/// it must succeed. Returns its stdout.
fn peer_kv(tb: &Testbed, args: &[&str]) -> Result<String> {
    let kv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/kv.py");
    let mut a = vec![kv.to_str().context("path")?];
    a.extend(args);
    let out = tb.peer_cmd("python3", &a).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "kv.py {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Run redis-benchmark (`-q`); it must succeed and report every test.
fn redis_benchmark(mut c: Command, tests: &[&str]) -> Result<()> {
    let out = c.output()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    ensure!(
        out.status.success() && !text.contains("rror"),
        "redis-benchmark: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in tests {
        let t = t.to_uppercase();
        ensure!(
            text.lines()
                .any(|l| l.starts_with(&format!("{t}: ")) && l.contains("requests per second")),
            "redis-benchmark reported no {t} result: {text}"
        );
    }
    Ok(())
}

/// redis under the shim, as TAS and VPP test their shims: a kernel client
/// in the peer namespace stores 200 values of 1 B to 1 MiB (pipelined) and
/// reads them back byte for byte; redis-benchmark from the peer (50
/// connections, 8-deep pipelines) and under the shim over cut-through each
/// run 20 000 INCRs of one key, and the key holds exactly their sum: no
/// command lost or run twice.
#[test]
fn redis_under_the_shim_keeps_every_value_and_every_command() -> Result<()> {
    have("redis-server")?;
    have("redis-benchmark")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let me = tb.daemon_ip4.to_string();
    let dir = site.dir.display().to_string();
    let _redis = Proc::spawn(
        shim(
            &d,
            &[
                "redis-server",
                "--bind",
                &me,
                "127.0.0.1",
                "--port",
                "16379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                &dir,
            ],
        )?,
        "redis-server",
    )?;
    wait_for("redis under the shim", T, || {
        Ok(d.ctl("sessions")?.to_string().contains(":16379"))
    })?;
    let out = peer_kv(&tb, &["redis", &me, "16379", "200"])?;
    ensure!(out.starts_with("ok redis 200 values"), "{out}");
    let counter = "counter:__rand_int__";
    let bench = ["-p", "16379", "-q", "-n", "20000", "-c", "50"];
    let mut args = vec!["-h", me.as_str()];
    args.extend(bench);
    args.extend(["-P", "8", "-t", "set,get,incr,lpush,lpop"]);
    redis_benchmark(
        tb.peer_cmd("redis-benchmark", &args),
        &["set", "get", "incr", "lpush", "lpop"],
    )?;
    let v = peer_kv(&tb, &["redis-get", &me, "16379", counter])?;
    ensure!(v.trim() == "20000", "after 20000 INCRs the counter is {v}");
    let before = d.counter(&["session", "cut_through_opened"])?;
    let mut args = vec!["redis-benchmark", "-h", "127.0.0.1"];
    args.extend(bench);
    args.extend(["-t", "incr"]);
    redis_benchmark(shim(&d, &args)?, &["incr"])?;
    let opened = d.counter(&["session", "cut_through_opened"])? - before;
    ensure!(
        opened >= 50,
        "{opened} cut-through connections for 50 clients"
    );
    let v = peer_kv(&tb, &["redis-get", &me, "16379", counter])?;
    ensure!(v.trim() == "40000", "after 40000 INCRs the counter is {v}");
    Ok(())
}

/// memcached under the shim with its TCP and UDP ports: a kernel client
/// stores 200 values of 1 B to 512 KiB (pipelined sets), gets them back in
/// one multi-key get byte for byte, and gets a value over UDP (memcached's
/// frame header included); memcached's own counters agree.
#[test]
fn memcached_under_the_shim_answers_over_tcp_and_udp() -> Result<()> {
    have("memcached")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let me = tb.daemon_ip4.to_string();
    let _mc = Proc::spawn(
        shim(
            &d,
            &[
                "memcached",
                "-u",
                "root",
                "-l",
                &me,
                "-p",
                "21211",
                "-U",
                "21211",
                "-t",
                "2",
                "-m",
                "256",
            ],
        )?,
        "memcached",
    )?;
    wait_for("memcached under the shim", T, || {
        let s = d.ctl("sessions")?.to_string();
        Ok(s.matches(":21211").count() >= 2)
    })?;
    let out = peer_kv(&tb, &["memcached", &me, "21211", "200"])?;
    // 200 sets + the UDP key; 200 hits in the multi-get + 1 over UDP.
    ensure!(
        out.starts_with("ok memcached 200 values") && out.contains("cmd_set 201 get_hits 201"),
        "{out}"
    );
    Ok(())
}

/// lighttpd under the shim (it sizes its fd tables by `server.max-fds` and
/// checks every fd against it: fake fd numbers fail there): kernel curl
/// gets a 64 B and a 10 MiB file byte for byte, and wrk with 200
/// connections gets only 200s.
#[test]
fn lighttpd_under_the_shim_serves_curl_and_wrk() -> Result<()> {
    have("lighttpd")?;
    have("wrk")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let me = tb.daemon_ip4;
    let conf = site.dir.join("lighttpd.conf");
    std::fs::write(
        &conf,
        format!(
            "server.document-root = \"{0}/www\"\nserver.bind = \"{me}\"\nserver.port = 18090\n\
             server.errorlog = \"{0}/logs/lighttpd.err\"\nserver.max-fds = 1024\n\
             server.max-connections = 400\nserver.event-handler = \"linux-sysepoll\"\n",
            site.dir.display()
        ),
    )?;
    let _l = Proc::spawn(
        shim(
            &d,
            &["lighttpd", "-D", "-f", conf.to_str().context("path")?],
        )?,
        "lighttpd",
    )?;
    let base = format!("http://{me}:18090");
    wait_http(&tb, &format!("{base}/small"))?;
    ensure!(peer_get(&tb, &format!("{base}/small"))? == site.small);
    ensure!(sha(&peer_get(&tb, &format!("{base}/big"))?) == sha(&site.big));
    let out = tb
        .peer_cmd("wrk", &["-t1", "-c200", "-d2s", &format!("{base}/small")])
        .output()?;
    let (reqs, bad) = wrk_result(&String::from_utf8_lossy(&out.stdout))?;
    ensure!(
        reqs > 1000 && bad == 0,
        "wrk: {reqs} requests, {bad} errors"
    );
    Ok(())
}

/// HAProxy's kernel splicing (`option splice-auto`, `splice-request`,
/// `splice-response`) under the shim, in front of a kernel nginx and a
/// kernel echo server in the peer namespace: splice() between a hoststack
/// socket and a pipe is emulated (it used to reach the placeholder socket:
/// ENOTCONN, and HAProxy cut the response short). A 10 MiB body arrives
/// byte for byte, 200 x 64 KiB echo through a TCP listener, and HAProxy's
/// own counter says the bytes were spliced.
#[test]
fn haproxy_splicing_under_the_shim() -> Result<()> {
    have("haproxy")?;
    have("nginx")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let _nginx = peer_nginx(&tb, &site, 8081)?;
    let peer_py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/peer.py");
    let peer_py = peer_py.to_str().context("path")?;
    let pip = tb.peer_ip4.to_string();
    let mut echo = Proc::spawn(
        tb.peer_cmd("python3", &[peer_py, "echo-server", &pip, "7007"]),
        "peer echo",
    )?;
    echo.expect("listening", T)?;
    let me = tb.daemon_ip4;
    let stats = site.dir.join("haproxy.sock");
    let conf = site.dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 1000\n  stats socket {}\n\
             defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             \x20 option splice-auto\n  option splice-request\n  option splice-response\n\
             frontend web\n  mode http\n  bind {me}:18200\n  default_backend nginx\n\
             backend nginx\n  mode http\n  server n {pip}:8081\n\
             frontend raw\n  mode tcp\n  bind {me}:18201\n  default_backend echo\n\
             backend echo\n  mode tcp\n  server e {pip}:7007\n",
            stats.display()
        ),
    )?;
    let _hap = Proc::spawn(
        shim(
            &d,
            &["haproxy", "-db", "-f", conf.to_str().context("path")?],
        )?,
        "haproxy",
    )?;
    let base = format!("http://{me}:18200");
    wait_http(&tb, &format!("{base}/small"))?;
    ensure!(peer_get(&tb, &format!("{base}/small"))? == site.small);
    ensure!(sha(&peer_get(&tb, &format!("{base}/big"))?) == sha(&site.big));
    let out = tb
        .peer_cmd(
            "python3",
            &[
                peer_py,
                "echo-client",
                &me.to_string(),
                "18201",
                "--count",
                "200",
                "--size",
                "65536",
            ],
        )
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("ok echoed 200 x 65536"),
        "echo through haproxy: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // HAProxy 2.6 spells it "TotalSplicdedBytesOut".
    let info = {
        use std::io::{Read, Write};
        let mut u = std::os::unix::net::UnixStream::connect(&stats)?;
        u.set_read_timeout(Some(T))?;
        u.write_all(b"show info\n")?;
        let mut s = String::new();
        u.read_to_string(&mut s)?;
        s
    };
    let spliced: u64 = info
        .lines()
        .find(|l| l.starts_with("TotalSplic"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no spliced-bytes counter in {info}"))?;
    ensure!(
        spliced >= site.big.len() as u64,
        "HAProxy spliced only {spliced} bytes"
    );
    Ok(())
}

#[test]
fn names_resolve_through_the_kernel_under_the_shim() -> Result<()> {
    have("nginx")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let kernel_nginx = peer_nginx(&tb, &site, 8083)?;
    let link = tb.kernel_link()?;
    let pip = link.peer.to_string();
    let dns_py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/dns.py");
    let mut dns = Proc::spawn(
        tb.peer_cmd(
            "python3",
            &[
                &dns_py.display().to_string(),
                &pip,
                "53",
                &format!("web.test={}", tb.peer_ip4),
            ],
        ),
        "dns",
    )?;
    dns.expect("ready", T)?;
    // A private /etc/resolv.conf and /etc/hosts in a mount namespace.
    let resolv = site.dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {pip}\noptions timeout:2 attempts:2\n"),
    )?;
    let hosts = site.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{} hosts.test\n", tb.peer_ip4),
    )?;
    let hs = bin("hoststack")?;
    for name in ["web.test", "hosts.test"] {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/hosts && exec {} run --strict -- curl -sS --max-time 20 http://{name}:8083/small",
            resolv.display(),
            hosts.display(),
            hs.display()
        );
        let out = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .envs(d.env())
            .output()?;
        ensure!(
            out.status.success(),
            "curl {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.stdout == site.small, "{name}: body differs");
    }
    // The HTTP connections went through hoststack, the DNS query did not.
    ensure!(d.counter(&["stack", "active_opens"])? >= 2);
    quit(kernel_nginx)?;
    Ok(())
}

#[test]
fn nginx_listening_on_ipv4_and_ipv6_wildcards_serves_both() -> Result<()> {
    // Debian's default site: `listen 80; listen [::]:80;` (nginx sets
    // IPV6_V6ONLY on the second). Before, the daemon saw two wildcards on
    // one port and nginx failed to start with EADDRINUSE.
    have("nginx")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let conf = site.conf_listens("dual", &["8097", "[::]:8097"], 1)?;
    let ng = nginx_under_shim(&d, &site, &conf)?;
    let want = std::fs::read(site.dir.join("www/small"))?;
    let v4 = format!("http://{}:8097/small", tb.daemon_ip4);
    wait_http(&tb, &v4).with_context(|| {
        let log = std::fs::read_to_string(site.dir.join("logs/dual.err"));
        format!("nginx's error log: {}", log.unwrap_or_default())
    })?;
    ensure!(peer_get(&tb, &v4)? == want, "IPv4 over the uplink");
    let v6 = format!("http://[{}]:8097/small", tb.daemon_ip6);
    ensure!(peer_get(&tb, &v6)? == want, "IPv6 over the uplink");
    // Bulk over IPv6 goes out in TSO super-frames (the daemon supplies the
    // segment size smoltcp does not pass on for IPv6): every byte arrives.
    let big = peer_get(&tb, &format!("http://[{}]:8097/big", tb.daemon_ip6))?;
    ensure!(
        sha(&big) == sha(&site.big),
        "10 MiB over IPv6 differs ({} bytes)",
        big.len()
    );
    for url in ["http://127.0.0.1:8097/small", "http://[::1]:8097/small"] {
        ensure!(shim_get_cut_through(&d, url)? == want, "{url}");
    }
    quit(ng)?;
    Ok(())
}

/// A UDP server under the shim with an IPv4 and a v6-only IPv6 socket on
/// `port` (DNS servers, QUIC): for `rounds` rounds it waits for datagrams
/// and answers each with `reply`, a Python expression of the datagram `m`
/// and `tag` (b'v4:' or b'v6:', the socket it came in on).
fn dual_stack_udp_server(d: &Daemon, port: u16, rounds: usize, reply: &str) -> Result<Proc> {
    let server = format!(
        "import select, socket\n\
         a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(('0.0.0.0', {port}))\n\
         b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); b.bind(('::', {port}))\n\
         print('ready', flush=True)\n\
         for _ in range({rounds}):\n\
         \x20   r, _, _ = select.select([a, b], [], [], 20)\n\
         \x20   for s in r:\n\
         \x20       m, src = s.recvfrom(65536)\n\
         \x20       tag = b'v4:' if s is a else b'v6:'\n\
         \x20       s.sendto({reply}, src)\n"
    );
    let mut srv = Proc::spawn(shim(d, &["python3", "-c", &server])?, "udp server")?;
    srv.expect("ready", T)?;
    Ok(srv)
}

#[test]
fn udp_sockets_for_ipv4_and_v6_only_ipv6_share_a_port_and_each_gets_its_own() -> Result<()> {
    // A server with one UDP socket per family (DNS servers, QUIC): the
    // IPv6 one has IPV6_V6ONLY. Before, the daemon kept one UDP socket
    // per port and the second bind failed with EADDRINUSE.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let port = 20000 + (std::process::id() % 2000) as u16;
    let mut srv = dual_stack_udp_server(&d, port, 2, "tag + m")?;
    let client = |fam: &str, addr: String, msg: &str| -> Result<String> {
        let code = format!(
            "import socket\n\
             s = socket.socket(socket.{fam}, socket.SOCK_DGRAM); s.settimeout(10)\n\
             s.sendto(b'{msg}', ('{addr}', {port}))\n\
             print(s.recvfrom(100)[0].decode())\n"
        );
        let out = tb.peer_cmd("python3", &["-c", &code]).output()?;
        ensure!(
            out.status.success(),
            "{fam} client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let r4 = client("AF_INET", tb.daemon_ip4.to_string(), "four")?;
    let r6 = client("AF_INET6", tb.daemon_ip6.to_string(), "six")?;
    ensure!(r4 == "v4:four", "IPv4 datagram answered as {r4:?}");
    ensure!(r6 == "v6:six", "IPv6 datagram answered as {r6:?}");
    srv.success(T)?;
    Ok(())
}

#[test]
fn udp_datagrams_larger_than_the_link_mtu_go_both_ways_in_fragments() -> Result<()> {
    // DNS with EDNS, NFS, SIP: a datagram larger than the MTU travels in
    // IP fragments. Before, the daemon dropped such a datagram without a
    // word either way (sendto() returned its length, nothing arrived).
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let port = 22000 + (std::process::id() % 2000) as u16;
    let sizes = [1473, 4000, 20000, 60000];
    let mut srv = dual_stack_udp_server(&d, port, 2 * sizes.len(), "m[::-1]")?;
    for (fam, addr) in [
        ("AF_INET", tb.daemon_ip4.to_string()),
        ("AF_INET6", tb.daemon_ip6.to_string()),
    ] {
        let code = format!(
            "import socket\n\
             s = socket.socket(socket.{fam}, socket.SOCK_DGRAM); s.settimeout(10)\n\
             for n in {sizes:?}:\n\
             \x20   m = bytes(i % 251 for i in range(n))\n\
             \x20   s.sendto(m, ('{addr}', {port}))\n\
             \x20   r = s.recvfrom(65536)[0]\n\
             \x20   print(n, len(r), r == m[::-1])\n"
        );
        let out = tb.peer_cmd("python3", &["-c", &code]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{fam} client: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: String = sizes.iter().map(|n| format!("{n} {n} True\n")).collect();
        ensure!(text == want, "{fam}: got {text:?}, want {want:?}");
    }
    srv.success(T)?;
    // Both families arrived in fragments and were put back together here.
    let reassembled = d.counter(&["stack", "frag", "reassembled"])?;
    ensure!(reassembled >= 6, "{reassembled} datagrams reassembled");
    Ok(())
}

#[test]
fn udp_to_the_daemons_own_address_reaches_the_app_bound_there() -> Result<()> {
    // Two apps on one node speaking UDP over the node's address (a QUIC
    // client and server, a local DNS forwarder). Before, smoltcp asked
    // the wire who had its own address and the datagram never left.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let port = 24000 + (std::process::id() % 2000) as u16;
    let mut srv = dual_stack_udp_server(&d, port, 4, "tag + m[::-1]")?;
    for (fam, addr, tag) in [
        ("AF_INET", tb.daemon_ip4.to_string(), "v4:"),
        ("AF_INET6", tb.daemon_ip6.to_string(), "v6:"),
    ] {
        let code = format!(
            "import socket\n\
             s = socket.socket(socket.{fam}, socket.SOCK_DGRAM); s.settimeout(10)\n\
             for n in (5, 60000):\n\
             \x20   m = bytes(i % 251 for i in range(n))\n\
             \x20   s.sendto(m, ('{addr}', {port}))\n\
             \x20   r, src = s.recvfrom(65536)\n\
             \x20   print(n, r == b'{tag}' + m[::-1], src[1])\n"
        );
        let mut cli = Proc::spawn(shim(&d, &["python3", "-c", &code])?, "udp client")?;
        for n in [5, 60000] {
            let line = cli.expect(&format!("{n} "), T)?;
            ensure!(
                line.trim() == format!("{n} True {port}"),
                "{fam}: {line:?} (want the reversed datagram from port {port})"
            );
        }
        cli.success(T)?;
    }
    srv.success(T)?;
    let local = d.counter(&["stack", "udp_local"])?;
    ensure!(local >= 8, "{local} datagrams delivered locally");
    Ok(())
}

#[test]
fn connects_fail_fast_on_icmp_errors_and_unanswered_neighbours() -> Result<()> {
    // As with the kernel: an ICMP error quoting our SYN fails connect() at
    // once with its errno, and a first hop that never answers ARP fails it
    // with EHOSTUNREACH after about 3 s. Before, each waited for the
    // 20 s connect timeout and got ETIMEDOUT.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let rules = "table inet hs_reject {\n\
                 chain input {\n\
                 type filter hook input priority 0;\n\
                 tcp dport 81 reject with icmp type host-unreachable\n\
                 tcp dport 82 reject with icmp type net-unreachable\n\
                 tcp dport 83 reject with icmp type port-unreachable\n\
                 }\n}\n";
    tb.peer_nft(rules)?;
    let o = tb.daemon_ip4.octets();
    let nobody = format!("{}.{}.{}.77", o[0], o[1], o[2]);
    let peer = tb.peer_ip4.to_string();
    let code = format!(
        "import socket, time\n\
         for host, port in [('{peer}', 81), ('{peer}', 82), ('{peer}', 83), ('{nobody}', 80)]:\n\
         \x20   s = socket.socket(); s.settimeout(30); t = time.time()\n\
         \x20   try:\n\
         \x20       s.connect((host, port)); print(port, 'connected', flush=True)\n\
         \x20   except OSError as e:\n\
         \x20       print(port, e.errno, round(time.time() - t, 1), flush=True)\n"
    );
    let mut p = Proc::spawn(shim(&d, &["python3", "-c", &code])?, "connects")?;
    for (port, errno, within) in [
        (81, libc::EHOSTUNREACH, 2.0),
        (82, libc::ENETUNREACH, 2.0),
        (83, libc::ECONNREFUSED, 2.0),
        (80, libc::EHOSTUNREACH, 10.0),
    ] {
        let line = p.expect(&format!("{port} "), Duration::from_secs(40))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            f.len() == 3 && f[1] == errno.to_string(),
            "port {port}: {line:?}, want errno {errno}"
        );
        let secs: f64 = f[2].parse()?;
        ensure!(secs <= within, "port {port}: failed after {secs} s");
    }
    p.success(T)?;
    ensure!(d.counter(&["stack", "icmp_connect_errors"])? == 3);
    Ok(())
}

#[test]
fn keepalive_and_user_timeout_drop_silent_peers_with_etimedout() -> Result<()> {
    // Python under the shim sets Linux's keepalive options (1 s idle, 1 s
    // between probes, 2 probes) and TCP_USER_TIMEOUT (1.5 s); then the peer
    // namespace silently drops everything for one port. As on Linux, the
    // keepalive connection fails with ETIMEDOUT about 3 s after the peer
    // last spoke, the one with unacknowledged data 1.5 s after the send,
    // and a keepalive connection to a live port stays up. Before, the
    // options were remembered without effect and both waited for ever.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let server = "import socket, threading\n\
                  def echo(c):\n\
                  \x20   while True:\n\
                  \x20       d = c.recv(100)\n\
                  \x20       if not d: break\n\
                  \x20       c.sendall(d)\n\
                  def serve(port):\n\
                  \x20   l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  \x20   l.bind(('0.0.0.0', port)); l.listen()\n\
                  \x20   while True:\n\
                  \x20       c, _ = l.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()\n\
                  threading.Thread(target=serve, args=(7951,), daemon=True).start()\n\
                  print('listening', flush=True)\n\
                  serve(7950)\n";
    let mut srv = Proc::spawn(tb.peer_cmd("python3", &["-c", server]), "echo peer")?;
    srv.expect("listening", T)?;
    let flag = std::env::temp_dir().join(format!("hs-ka-{}", unique_tag()));
    let peer = tb.peer_ip4.to_string();
    let code = format!(
        "import socket, time, os\n\
         S, T = socket.SOL_SOCKET, socket.IPPROTO_TCP\n\
         def conn(port, ka):\n\
         \x20   s = socket.create_connection(('{peer}', port), timeout=10)\n\
         \x20   if ka:\n\
         \x20       s.setsockopt(S, socket.SO_KEEPALIVE, 1); s.setsockopt(T, socket.TCP_KEEPIDLE, 1)\n\
         \x20       s.setsockopt(T, socket.TCP_KEEPINTVL, 1); s.setsockopt(T, socket.TCP_KEEPCNT, 2)\n\
         \x20   return s\n\
         live, ka, ut = conn(7950, True), conn(7951, True), conn(7951, False)\n\
         ut.setsockopt(T, socket.TCP_USER_TIMEOUT, 1500)\n\
         print('opts', ka.getsockopt(T, socket.TCP_KEEPCNT), ut.getsockopt(T, socket.TCP_USER_TIMEOUT), flush=True)\n\
         while not os.path.exists('{flag}'): time.sleep(0.02)\n\
         t = time.time(); ut.send(b'lost')\n\
         for s, name in [(ut, 'user_timeout'), (ka, 'keepalive')]:\n\
         \x20   s.settimeout(20)\n\
         \x20   try:\n\
         \x20       s.recv(10); print(name, 'no error', flush=True)\n\
         \x20   except OSError as e:\n\
         \x20       print(name, e.errno, round(time.time() - t, 1), flush=True)\n\
         try:\n\
         \x20   live.send(b'ping'); print('live', live.recv(10).decode(), flush=True)\n\
         except OSError as e:\n\
         \x20   print('live', e.errno, round(time.time() - t, 1), flush=True)\n",
        flag = flag.display()
    );
    let mut p = Proc::spawn(shim(&d, &["python3", "-c", &code])?, "keepalive client")?;
    let line = p.expect("opts", T)?;
    ensure!(line.trim() == "opts 2 1500", "options read back: {line:?}");
    // From now on the peer hears nothing on port 7951.
    let rules = "table inet hs_silent {\n chain input {\n type filter hook input priority 0;\n \
                 tcp dport 7951 drop\n }\n}\n";
    tb.peer_nft(rules)?;
    std::fs::write(&flag, b"go")?;
    for (name, within) in [("user_timeout", 1.0..3.0), ("keepalive", 0.0..4.5)] {
        let line = p.expect(name, T)?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            f.len() == 3 && f[1] == libc::ETIMEDOUT.to_string(),
            "{name}: {line:?}, want ETIMEDOUT"
        );
        let secs: f64 = f[2].parse()?;
        ensure!(within.contains(&secs), "{name}: failed after {secs} s");
    }
    let line = p.expect("live", T)?;
    ensure!(
        line.trim() == "live ping",
        "the live connection: {line:?}; counters {}",
        d.ctl("counters")?
    );
    p.success(T)?;
    let _ = std::fs::remove_file(&flag);
    ensure!(d.counter(&["stack", "tcp_timeouts"])? == 2);
    Ok(())
}

#[test]
fn connected_udp_hears_port_unreachable_as_econnrefused() -> Result<()> {
    // As on Linux: a connected UDP socket whose datagram meets a closed
    // port (the peer's ICMP port unreachable, or nobody bound at one of the
    // daemon's own addresses) fails its next call once with ECONNREFUSED,
    // and getsockopt(SO_ERROR) reports and clears it. An unconnected
    // socket, and a "soft" ICMP error (host unreachable), change nothing.
    // Before, every one of these calls waited for its timeout.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let rules =
        "table inet hs_udp_reject {\n chain input {\n type filter hook input priority 0;\n \
                 udp dport 7963 reject with icmp type host-unreachable\n }\n}\n";
    tb.peer_nft(rules)?;
    let (peer, me) = (tb.peer_ip4.to_string(), tb.daemon_ip4.to_string());
    let code = format!(
        "import socket, time\n\
         def udp(host, port):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)\n\
         \x20   if port: s.connect((host, port))\n\
         \x20   return s\n\
         def recv(name, s):\n\
         \x20   try:\n\
         \x20       s.recv(10); print(name, 'data', flush=True)\n\
         \x20   except socket.timeout:\n\
         \x20       print(name, 'timeout', flush=True)\n\
         \x20   except OSError as e:\n\
         \x20       print(name, e.errno, flush=True)\n\
         s = udp('{peer}', 7961); s.send(b'x'); recv('peer', s)\n\
         s.send(b'again'); print('peer again sent', flush=True)\n\
         s = udp('{me}', 7962); s.send(b'x'); recv('local', s)\n\
         s = udp('{peer}', 0); s.sendto(b'x', ('{peer}', 7961)); recv('unconnected', s)\n\
         s = udp('{peer}', 7963); s.send(b'x'); recv('soft', s)\n\
         s = udp('{peer}', 7961); s.send(b'x'); time.sleep(0.5)\n\
         print('so_error', s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)\n"
    );
    let mut p = Proc::spawn(shim(&d, &["python3", "-c", &code])?, "udp client")?;
    let refused = libc::ECONNREFUSED.to_string();
    for (name, want) in [
        ("peer ", refused.clone()),
        ("peer again", "sent".into()),
        ("local", refused.clone()),
        ("unconnected", "timeout".into()),
        ("soft", "timeout".into()),
        ("so_error", format!("{refused} 0")),
    ] {
        let line = p.expect(name, T)?;
        ensure!(
            line.trim().ends_with(&format!(" {want}")),
            "{name}: {line:?}, want {want}"
        );
    }
    p.success(T)?;
    // The first socket's two datagrams and the last one's: the host
    // unreachable was not taken, nor the one to the unconnected socket.
    ensure!(d.counter(&["stack", "udp_icmp_errors"])? == 3);
    Ok(())
}

#[test]
fn a_server_on_port_0_knows_its_port_before_listening() -> Result<()> {
    // Python's socketserver binds port 0 and stores getsockname() as
    // `server_address` before listen(); programs then announce
    // `server_address[1]`. Before, the shim reported port 0 until listen().
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip = tb.daemon_ip4.to_string();
    let server = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'port zero ok')\n\
         s = http.server.HTTPServer(('{ip}', 0), H)\n\
         print('port', s.server_address[1], flush=True)\n\
         s.handle_request()\n"
    );
    let mut srv = Proc::spawn(shim(&d, &["python3", "-c", &server])?, "port 0 server")?;
    let line = srv.expect("port", T)?;
    let port: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    ensure!(port != 0, "announced {line:?}");
    let body = peer_get(&tb, &format!("http://{ip}:{port}/"))?;
    ensure!(
        body == b"port zero ok",
        "got {:?}",
        String::from_utf8_lossy(&body)
    );
    srv.success(T)?;
    Ok(())
}

#[test]
fn a_loopback_listener_under_the_shim_serves_kernel_and_shim_clients() -> Result<()> {
    have("nginx")?;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let port = 18000 + (std::process::id() % 2000) as u16;
    let conf = site.conf("lo", &format!("127.0.0.1:{port}"), 2)?;
    let ng = nginx_under_shim(&d, &site, &conf)?;
    let url = format!("http://127.0.0.1:{port}/small");
    // A kernel client on this host (health checks, admin endpoints): the
    // listener's kernel side.
    let kernel_get = || -> Result<Vec<u8>> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &url])
            .output()?;
        ensure!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    };
    wait_for("nginx on loopback", T, || Ok(kernel_get().is_ok()))?;
    for _ in 0..20 {
        ensure!(kernel_get()? == site.small, "kernel client: body differs");
    }
    // A client under the shim: cut-through.
    ensure!(
        shim_get_cut_through(&d, &url)? == site.small,
        "shim client: body differs"
    );
    quit(ng)?;
    Ok(())
}

/// A test program from `tests/c/`, compiled with gcc; removed on drop.
struct CProgram(PathBuf);

impl CProgram {
    fn build(name: &str) -> Result<CProgram> {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("c/{name}.c"));
        let exe = std::env::temp_dir().join(format!("hs-{name}-{}", unique_tag()));
        run(&[
            "gcc",
            "-O1",
            "-Wall",
            "-Werror",
            "-o",
            &exe.display().to_string(),
            &src.display().to_string(),
        ])?;
        Ok(CProgram(exe))
    }
}

impl Drop for CProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn listen_with_a_negative_backlog_queues_like_linux() -> Result<()> {
    // Envoy calls listen(fd, -1): Linux reads that as SOMAXCONN. 64
    // connections arriving before the first accept must all be queued, none
    // of their SYNs dropped.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let exe = CProgram::build("backlog_echo")?;
    let exe_s = exe.0.display().to_string();
    let ip = tb.daemon_ip4.to_string();
    let mut srv = Proc::spawn(shim(&d, &[&exe_s, &ip, "7400", "64"])?, "backlog_echo")?;
    srv.expect("listening", T)?;
    let py = hoststack_tests::daemon::peer_py().display().to_string();
    let out = tb
        .peer_cmd("python3", &[&py, "many", &ip, "7400", "--count", "64"])
        .output()?;
    ensure!(
        out.status.success(),
        "peer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.expect("echoed 64", T)?;
    ensure!(
        d.counter(&["stack", "syn_backlog_drops"])? == 0,
        "SYNs dropped: the backlog was not SOMAXCONN"
    );
    Ok(())
}

#[test]
fn kernel_fds_are_reported_while_hoststack_sockets_stay_ready() -> Result<()> {
    // The shim skips the kernel half of an epoll set on most waits while
    // hoststack sockets keep it busy (one syscall saved per wait); a ready
    // kernel fd must still come out within the bound (8 waits or 1 ms).
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let exe = CProgram::build("epoll_fair")?;
    let exe_s = exe.0.display().to_string();
    let waits = |out: std::process::Output| -> Result<u32> {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "epoll_fair: {text}");
        text.trim()
            .strip_prefix("pipe after ")
            .and_then(|t| t.strip_suffix(" waits"))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("epoll_fair said {text:?}"))
    };
    let kernel = waits(Command::new(&exe.0).output()?)?;
    let before = d.counter(&["session", "cut_through_opened"])?;
    let shimmed = waits(shim(&d, &[&exe_s])?.output()?)?;
    ensure!(kernel == 1, "kernel: {kernel} waits");
    ensure!(
        d.counter(&["session", "cut_through_opened"])? > before,
        "the socket was not a hoststack connection"
    );
    ensure!(shimmed <= 8, "pipe reported after {shimmed} waits");
    Ok(())
}

#[test]
fn accepted_fds_are_cheap_dups_and_survive_the_app_closing_the_template() -> Result<()> {
    // An accepted hoststack connection's kernel fd is a dup of one
    // unconnected socket (no kernel TCP socket per connection). An app that
    // closes descriptors it does not know (closefrom) and reuses the number
    // must not get its own socket duplicated as a placeholder.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let py = "import os, socket, stat\n\
              l = socket.socket(); l.bind(('127.0.0.1', 7610)); l.listen(8)\n\
              def pair():\n\
              \x20   c = socket.create_connection(('127.0.0.1', 7610)); a, _ = l.accept(); return c, a\n\
              c1, a1 = pair(); c2, a2 = pair()\n\
              s1, s2 = os.fstat(a1.fileno()), os.fstat(a2.fileno())\n\
              print('socket', stat.S_ISSOCK(s1.st_mode), 'shared', s1.st_ino == s2.st_ino)\n\
              mine = {l.fileno(), c1.fileno(), c2.fileno(), a1.fileno(), a2.fileno()}\n\
              closed = 0\n\
              for n in sorted(int(x) for x in os.listdir('/proc/self/fd')):\n\
              \x20   if n < 3 or n in mine: continue\n\
              \x20   try: fam = socket.socket(fileno=os.dup(n))\n\
              \x20   except OSError: continue\n\
              \x20   f = fam.family; fam.close()\n\
              \x20   if f in (socket.AF_INET, socket.AF_INET6): os.close(n); closed += 1\n\
              decoy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); decoy.bind(('127.0.0.1', 0))\n\
              port = decoy.getsockname()[1]\n\
              c3, a3 = pair()\n\
              s3 = os.fstat(a3.fileno())\n\
              print('closed', closed, 'decoy_dup', s3.st_ino == os.fstat(decoy.fileno()).st_ino)\n\
              a1.close()\n\
              for c, a in ((c2, a2), (c3, a3)):\n\
              \x20   c.sendall(b'ping'); a.sendall(a.recv(4).upper()); print(c.recv(4).decode())\n\
              print('decoy', decoy.getsockname()[1] == port)\n";
    let text = shim_python(&d, py, 3)?;
    ensure!(
        text == "socket True shared True\nclosed 1 decoy_dup False\nPING\nPING\ndecoy True\n",
        "{text}"
    );
    Ok(())
}

#[test]
fn when_the_daemon_dies_nginx_does_not_spin_and_serves_again_once_it_is_back() -> Result<()> {
    have("nginx")?;
    have("wrk")?;
    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let site = Site::new()?;
    let conf = site.conf("dies", &format!("{}:8096", tb.daemon_ip4), 1)?;
    let ng = nginx_under_shim(&d, &site, &conf)?;
    let url = format!("http://{}:8096/small", tb.daemon_ip4);
    wait_http(&tb, &url)?;
    let master = ng.pid();
    let worker = *child_pids(master).first().context("no nginx worker")?;
    d.kill(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    // The worker's epoll set held the daemon's fds: they hang up forever,
    // which must not turn epoll_wait into a busy loop.
    let before = cpu_secs(worker);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_secs(worker) - before;
    ensure!(
        used < 0.2,
        "nginx worker used {used:.2} s of CPU in 2 s with the daemon gone"
    );
    // A new daemon in the old one's place: the same nginx processes attach
    // again, listen again, and serve (VPP's apps never notice a restart).
    d.restart()?;
    wait_http(&tb, &url)?;
    ensure!(
        peer_get(&tb, &url)? == site.small,
        "wrong body after the restart"
    );
    let out = tb
        .peer_cmd("wrk", &["-t1", "-c16", "-d1s", &url])
        .output()?;
    let (reqs, bad) = wrk_result(&String::from_utf8_lossy(&out.stdout))?;
    ensure!(
        reqs > 100 && bad == 0,
        "wrk after the restart: {reqs} requests, {bad} errors"
    );
    ensure!(
        child_pids(master).first() == Some(&worker),
        "the nginx worker was replaced"
    );
    let apps = d.ctl("apps")?.to_string();
    ensure!(
        apps.contains(&format!("[{worker}]")),
        "nginx's worker is not attached: {apps}"
    );
    quit(ng)?;
    Ok(())
}

/// After a daemon restart an app's bound UDP socket is bound again (a
/// peer's datagram reaches it and the answer goes back) and a connection
/// that lived in the dead daemon fails with ECONNRESET, in a process that
/// was not waiting on hoststack at all while the daemon was gone.
#[test]
fn after_a_daemon_restart_udp_is_bound_again_and_old_connections_reset() -> Result<()> {
    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let ip = tb.daemon_ip4.to_string();
    let pip = tb.peer_ip4.to_string();
    let peer_py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/peer.py");
    let mut echo = Proc::spawn(
        tb.peer_cmd(
            "python3",
            &[
                peer_py.to_str().context("path")?,
                "echo-server",
                &pip,
                "7601",
            ],
        ),
        "peer echo",
    )?;
    echo.expect("listening", T)?;
    let app = format!(
        "import socket, sys\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.bind(('{ip}', 7600))\n\
         c = socket.create_connection(('{pip}', 7601), timeout=10)\n\
         c.sendall(b'x'); assert c.recv(1) == b'x'\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         try:\n\
         \x20   c.sendall(b'y'); print('conn got', c.recv(1), flush=True)\n\
         except OSError as e:\n\
         \x20   print('conn errno', e.errno, flush=True)\n\
         u.settimeout(20)\n\
         d, a = u.recvfrom(100)\n\
         u.sendto(d.upper(), a)\n\
         print('udp answered', flush=True)\n"
    );
    let (mut p, mut stdin) = Proc::spawn_with_stdin(shim(&d, &["python3", "-c", &app])?, "app")?;
    p.expect("ready", T)?;
    d.kill(libc::SIGKILL);
    d.restart()?;
    use std::io::Write;
    stdin.write_all(b"go\n")?;
    let line = p.expect("conn", T)?;
    ensure!(
        line == format!("conn errno {}", libc::ECONNRESET),
        "the connection from before the restart: {line}"
    );
    let client = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.2)\n\
         t = time.time()\n\
         while time.time() - t < 15:\n\
         \x20   s.sendto(b'hello', ('{ip}', 7600))\n\
         \x20   try:\n\
         \x20       print(s.recvfrom(100)[0].decode(), flush=True); break\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n"
    );
    let out = tb.peer_cmd("python3", &["-c", &client]).output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "HELLO",
        "UDP after the restart: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    p.expect("udp answered", T)?;
    Ok(())
}

/// A listener's close frees its address before close() returns, as in the
/// kernel, so another process may bind it at once (Envoy's hot restart
/// hands its admin port over so, and failed now and then while the
/// daemon learned of closes asynchronously). With the daemon stopped,
/// close() therefore waits for it (at most 1 s), and once the daemon runs
/// again the address is free.
#[test]
fn a_closed_listeners_address_is_free_when_close_returns() -> Result<()> {
    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let ip = tb.daemon_ip4.to_string();
    let listener = format!(
        "import socket, sys\n\
         s = socket.socket()\n\
         s.bind(('{ip}', 7700)); s.listen(8)\n\
         print('listening', flush=True)\n\
         sys.stdin.readline()\n\
         s.close()\n\
         print('closed', flush=True)\n\
         sys.stdin.readline()\n"
    );
    let (mut a, mut a_in) =
        Proc::spawn_with_stdin(shim(&d, &["python3", "-c", &listener])?, "listener")?;
    a.expect("listening", T)?;
    use std::io::Write;
    d.kill(libc::SIGSTOP);
    a_in.write_all(b"close\n")?;
    let early = a.expect("closed", Duration::from_millis(300));
    d.kill(libc::SIGCONT);
    ensure!(
        early.is_err(),
        "close() returned while the daemon, which holds the address, was stopped"
    );
    a.expect("closed", T)?;
    let other = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.bind(('{ip}', 7700)); s.listen(8)\n\
         print('bound', flush=True)\n"
    );
    let out = shim(&d, &["python3", "-c", &other])?.output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("bound"),
        "another process could not listen on the closed address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    a_in.write_all(b"exit\n")?;
    a.success(T)?;
    Ok(())
}

#[test]
fn a_forking_server_hands_accepted_connections_to_its_children() -> Result<()> {
    // The inetd / ForkingTCPServer pattern: the parent accepts, forks, the
    // child serves the connection and the parent closes its copy.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip = tb.daemon_ip4.to_string();
    let server = format!(
        "import socketserver, sys\n\
         class H(socketserver.StreamRequestHandler):\n\
         \x20   def handle(self):\n\
         \x20       while True:\n\
         \x20           line = self.rfile.readline()\n\
         \x20           if not line: break\n\
         \x20           self.wfile.write(line.upper())\n\
         s = socketserver.ForkingTCPServer(('{ip}', 7500), H)\n\
         print('listening', flush=True)\n\
         s.timeout = 20\n\
         for _ in range(3): s.handle_request()\n"
    );
    let mut srv = Proc::spawn(shim(&d, &["python3", "-c", &server])?, "forking server")?;
    srv.expect("listening", T)?;
    for i in 0..3 {
        let client = format!(
            "import socket\n\
             s = socket.create_connection(('{ip}', 7500), timeout=20)\n\
             f = s.makefile('rwb')\n\
             for j in range(50):\n\
             \x20   f.write(b'conn {i} line %d\\n' % j); f.flush()\n\
             \x20   assert f.readline() == (b'CONN {i} LINE %d\\n' % j), j\n\
             print('ok', flush=True)\n"
        );
        let out = tb.peer_cmd("python3", &["-c", &client]).output()?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains("ok"),
            "client {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    srv.success(T)?;
    Ok(())
}

#[test]
fn a_connection_closed_after_its_fork_child_is_gone_ends_at_once() -> Result<()> {
    // The parent forked while a connection was open (a helper that exits,
    // or execs another program) and closes the connection afterwards. No
    // child can take it over any more, so the peer must see the end of the
    // stream at once; before, every such close sent its FIN 2 s late. A
    // child that is still running the parent's program could adopt the
    // connection: then the close still waits for it.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip = tb.daemon_ip4.to_string();
    let server = format!(
        "import os, socket, time\n\
         l = socket.socket(); l.bind(('{ip}', 7510)); l.listen(8)\n\
         print('listening', flush=True)\n\
         for mode in ('exit', 'exec', 'alive'):\n\
         \x20   c, _ = l.accept()\n\
         \x20   assert c.recv(16) == b'hi'\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       if mode == 'exit': os._exit(0)\n\
         \x20       if mode == 'exec': os.execv('/bin/sleep', ['sleep', '4'])\n\
         \x20       time.sleep(4); os._exit(0)\n\
         \x20   if mode == 'exit': os.waitpid(pid, 0)\n\
         \x20   else: time.sleep(0.5)\n\
         \x20   c.sendall(b'bye'); c.close()\n\
         \x20   if mode != 'exit': os.waitpid(pid, 0)\n"
    );
    let mut srv = Proc::spawn(shim(&d, &["python3", "-c", &server])?, "forked server")?;
    srv.expect("listening", T)?;
    let client = format!(
        "import socket, time\n\
         for mode in ('exit', 'exec', 'alive'):\n\
         \x20   s = socket.create_connection(('{ip}', 7510), timeout=20)\n\
         \x20   s.sendall(b'hi')\n\
         \x20   got = b''\n\
         \x20   while not got.endswith(b'bye'):\n\
         \x20       d = s.recv(16); assert d, got; got += d\n\
         \x20   t = time.time()\n\
         \x20   assert s.recv(16) == b''\n\
         \x20   print(mode, '%.3f' % (time.time() - t), flush=True)\n"
    );
    let out = tb.peer_cmd("python3", &["-c", &client]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "client: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secs = |mode: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(mode)?.trim().parse().ok())
            .with_context(|| format!("no {mode} line in {text:?}"))
    };
    ensure!(secs("exit ")? < 0.5, "child exited, FIN late: {text}");
    ensure!(secs("exec ")? < 0.5, "child exec'd, FIN late: {text}");
    ensure!(
        secs("alive ")? > 1.0,
        "a live child lost its chance: {text}"
    );
    srv.success(T)?;
    Ok(())
}

#[test]
fn a_thread_idle_in_its_own_epoll_set_sleeps_through_other_threads_traffic() -> Result<()> {
    // Envoy's shape: the main thread waits in its own epoll set on a
    // listener that gets no connection (the admin port) while a worker
    // thread serves traffic in another set. Each set has its own wake
    // channel, so daemon events for the worker's connections must not wake
    // the idle thread (before: one wake-up per event batch, thousands here).
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    const ROUNDS: usize = 2000;
    let py = format!(
        "import select, socket, threading\n\
         def lsock(port):\n\
         \x20   l = socket.socket(); l.bind(('127.0.0.1', port)); l.listen(8); return l\n\
         idle, srv = lsock(7630), lsock(7631)\n\
         stop, tid, ready = False, {{}}, threading.Event()\n\
         def idle_thread():\n\
         \x20   tid['idle'] = threading.get_native_id()\n\
         \x20   ep = select.epoll(); ep.register(idle.fileno(), select.EPOLLIN)\n\
         \x20   ready.set()\n\
         \x20   while not stop: assert not ep.poll(0.25)\n\
         def switches():\n\
         \x20   for line in open('/proc/self/task/%d/status' % tid['idle']):\n\
         \x20       if line.startswith('voluntary_ctxt_switches'): return int(line.split()[1])\n\
         def echo(conn):\n\
         \x20   ep = select.epoll(); conn.setblocking(False); ep.register(conn.fileno(), select.EPOLLIN)\n\
         \x20   while True:\n\
         \x20       ep.poll(5)\n\
         \x20       b = conn.recv(4096)\n\
         \x20       if not b: return\n\
         \x20       conn.sendall(b.upper())\n\
         t = threading.Thread(target=idle_thread); t.start(); ready.wait()\n\
         c = socket.create_connection(('127.0.0.1', 7631)); a, _ = srv.accept()\n\
         e = threading.Thread(target=echo, args=(a,)); e.start()\n\
         ep = select.epoll(); c.setblocking(False); ep.register(c.fileno(), select.EPOLLIN)\n\
         before, ok = switches(), 0\n\
         for i in range({ROUNDS}):\n\
         \x20   msg = b'ping %05d' % i; c.sendall(msg); got = b''\n\
         \x20   while len(got) < len(msg):\n\
         \x20       assert ep.poll(5), 'no echo'\n\
         \x20       got += c.recv(64)\n\
         \x20   ok += got == msg.upper()\n\
         woke = switches() - before\n\
         c.close(); e.join(); stop = True; t.join()\n\
         print('echoed', ok, 'idle woke', woke)\n"
    );
    let text = shim_python(&d, &py, 1)?;
    let nums: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [echoed, woke] = nums[..] else {
        bail!("python said {text:?}");
    };
    ensure!(echoed == ROUNDS as u64, "{text}");
    // Its own 250 ms timeouts (and the GIL) wake it a few times; one
    // wake-up per event would be thousands.
    ensure!(
        woke < ROUNDS as u64 / 20,
        "the idle thread woke {woke} times during {ROUNDS} round trips"
    );
    Ok(())
}

#[test]
fn the_daemon_yields_after_waking_apps_unless_told_not_to() -> Result<()> {
    // After a pass that woke app threads the daemon yields the CPU once,
    // so apps sharing its CPU run their batch before it decides to sleep
    // (`daemon.yield_after_wake`, on by default).
    // A reader blocked until another thread writes: the daemon relays the
    // writer's notification and wakes the reader.
    let py = "import socket, threading, time\n\
              l = socket.socket(); l.bind(('127.0.0.1', 7640)); l.listen(8)\n\
              c = socket.create_connection(('127.0.0.1', 7640)); a, _ = l.accept()\n\
              def late(): time.sleep(0.005); c.sendall(b'ping')\n\
              for i in range(40):\n\
              \x20   t = threading.Thread(target=late); t.start()\n\
              \x20   assert a.recv(4) == b'ping'; t.join()\n\
              print('ok')\n";
    let mut seen = Vec::new();
    for args in [&[][..], &["--yield-after-wake", "false"][..]] {
        let tb = Testbed::new()?;
        let d = Daemon::start(&tb, args)?;
        let text = shim_python(&d, py, 1)?;
        ensure!(text == "ok\n", "python said {text:?}");
        seen.push(d.counter(&["yields"])?);
    }
    ensure!(
        seen[0] >= 20 && seen[1] == 0,
        "yields with the default / with false: {seen:?}"
    );
    Ok(())
}

#[test]
fn more_epoll_sets_than_wake_channels_all_still_report_their_sockets() -> Result<()> {
    // 63 wake channels per process: the 64th epoll set and beyond fall
    // back to waking on every event; a socket in several sets names no
    // channel. Every set must still report data, sets closed give their
    // channels back, and new sets work again.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    // A writer thread sends to one socket at a time, so each wait blocks
    // (on its set's channel, or on the worker's eventfd past the limit).
    let py = "import select, socket, threading, time\n\
              l = socket.socket(); l.bind(('127.0.0.1', 7650)); l.listen(128)\n\
              pairs = []\n\
              for i in range(70):\n\
              \x20   c = socket.create_connection(('127.0.0.1', 7650)); a, _ = l.accept(); pairs.append((c, a))\n\
              def sets(n):\n\
              \x20   eps = []\n\
              \x20   for i in range(n):\n\
              \x20       ep = select.epoll(); ep.register(pairs[i][1].fileno(), select.EPOLLIN)\n\
              \x20       if i % 10 == 0: ep.register(pairs[69][1].fileno(), select.EPOLLIN)\n\
              \x20       eps.append(ep)\n\
              \x20   return eps\n\
              def check(eps, tag):\n\
              \x20   def send():\n\
              \x20       for i in range(len(eps)): time.sleep(0.002); pairs[i][0].sendall(tag)\n\
              \x20   t = threading.Thread(target=send); t.start(); ok = 0\n\
              \x20   for i, ep in enumerate(eps):\n\
              \x20       ok += pairs[i][1].fileno() in [fd for fd, _ in ep.poll(5)]\n\
              \x20       assert pairs[i][1].recv(16) == tag\n\
              \x20   t.join(); return ok\n\
              eps = sets(69)\n\
              first = check(eps, b'one')\n\
              print('first', first, flush=True); sys.stdin.readline()\n\
              for ep in eps: ep.close()\n\
              eps = sets(40); second = check(eps, b'two')\n\
              print('second', second, flush=True); sys.stdin.readline()\n";
    let channels = || -> Result<u64> {
        let v = d.ctl("workers")?;
        let apps = v["apps"].as_array().context("no apps")?;
        apps.iter()
            .flat_map(|a| a["workers"].as_array().into_iter().flatten())
            .map(|w| w["channels"].as_u64().context("no channel count"))
            .sum()
    };
    let py = py.replace("import select", "import sys, select");
    let (mut p, mut stdin) =
        Proc::spawn_with_stdin(shim(&d, &["python3", "-c", &py])?, "epoll sets")?;
    ensure!(
        p.expect("first ", T)?.contains("first 69"),
        "not every set reported"
    );
    ensure!(channels()? == 63, "channels with 69 sets: {}", channels()?);
    use std::io::Write as _;
    stdin.write_all(b"\n")?;
    ensure!(
        p.expect("second ", T)?.contains("second 40"),
        "not every set reported"
    );
    ensure!(channels()? == 40, "channels with 40 sets: {}", channels()?);
    stdin.write_all(b"\n")?;
    p.success(T)?;
    Ok(())
}

#[test]
fn a_subprocess_started_with_vfork_leaves_the_parents_sockets_alone() -> Result<()> {
    // Python's subprocess (like posix_spawn) uses vfork: the child shares
    // the parent's memory until it execs and first closes every fd above 2
    // (close_range). The shim must not take that for the parent closing
    // its sockets and epoll sets.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let py = "import select, socket, subprocess\n\
              l = socket.socket(); l.bind(('127.0.0.1', 7660)); l.listen(8)\n\
              c = socket.create_connection(('127.0.0.1', 7660)); a, _ = l.accept()\n\
              ep = select.epoll(); ep.register(a.fileno(), select.EPOLLIN)\n\
              for i in range(3):\n\
              \x20   out = subprocess.run(['echo', 'child %d' % i], capture_output=True).stdout\n\
              \x20   c.sendall(b'ping %d' % i); assert ep.poll(5), 'no event'\n\
              \x20   a.sendall(a.recv(16).upper()); print(out.decode().strip(), c.recv(16).decode())\n";
    let text = shim_python(&d, py, 1)?;
    ensure!(
        text == "child 0 PING 0\nchild 1 PING 1\nchild 2 PING 2\n",
        "{text}"
    );
    Ok(())
}

#[test]
fn an_app_that_closes_every_fd_it_does_not_know_keeps_working() -> Result<()> {
    // Daemons and sandboxes close every descriptor they did not open
    // (a close() loop, closefrom, close_range); the shim's own descriptors
    // (daemon socket, eventfds, segments) must survive that, never be
    // reused under the app (an eventfd write would land in the app's file),
    // and dup2 onto one must fail instead of breaking the shim.
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let py = "import ctypes, errno, os, select, socket, tempfile\n\
              libc = ctypes.CDLL(None, use_errno=True)\n\
              l = socket.socket(); l.bind(('127.0.0.1', 7662)); l.listen(8)\n\
              c = socket.create_connection(('127.0.0.1', 7662)); a, _ = l.accept()\n\
              ep = select.epoll(); ep.register(a.fileno(), select.EPOLLIN)\n\
              keep = sorted({l.fileno(), c.fileno(), a.fileno(), ep.fileno()})\n\
              own = [int(f) for f in os.listdir('/proc/self/fd') if int(f) > 2 and int(f) not in keep]\n\
              assert own, 'the shim holds no descriptors?'\n\
              for fd in range(3, keep[-1]):\n\
              \x20   if fd not in keep:\n\
              \x20       try: os.close(fd)\n\
              \x20       except OSError: pass\n\
              os.closerange(keep[-1] + 1, 1 << 16)\n\
              assert libc.closefrom is not None; libc.closefrom(keep[-1] + 1)\n\
              f = tempfile.TemporaryFile(); f.write(b'app data'); f.flush()\n\
              busy = 0\n\
              for fd in (fd for fd in own if fd != f.fileno()):\n\
              \x20   try:\n\
              \x20       os.fstat(fd)\n\
              \x20       try: os.dup2(f.fileno(), fd); print('dup2 onto', fd, 'worked')\n\
              \x20       except OSError as e: assert e.errno == errno.EBUSY, e; busy += 1\n\
              \x20   except OSError: pass\n\
              for i in range(3):\n\
              \x20   c.sendall(b'ping %d' % i); assert ep.poll(5), 'no event'\n\
              \x20   a.sendall(a.recv(16).upper()); print(c.recv(16).decode())\n\
              c2 = socket.create_connection(('127.0.0.1', 7662)); a2, _ = l.accept()\n\
              c2.sendall(b'second'); print(a2.recv(16).decode())\n\
              f.seek(0); print(f.read().decode(), busy > 0)\n";
    let text = shim_python(&d, py, 2)?;
    ensure!(
        text == "PING 0\nPING 1\nPING 2\nsecond\napp data True\n",
        "{text}"
    );
    Ok(())
}
