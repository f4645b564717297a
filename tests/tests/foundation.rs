//! End-to-end tests of the foundation: a real hoststackd on one end of a
//! veth, kernel peers in a network namespace on the other, native apps
//! (the session-api examples) attached to the daemon.

use anyhow::{ensure, Context, Result};
use hoststack_tests::daemon::{peer_py, Daemon, Proc};
use hoststack_tests::{wait_for, Testbed};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn peer(tb: &Testbed, args: &[&str], name: &str) -> Result<Proc> {
    let py = peer_py().display().to_string();
    let mut all = vec![py.as_str()];
    all.extend_from_slice(args);
    Proc::spawn(tb.peer_cmd("python3", &all), name)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn kernel_client_talks_to_native_echo_server_v4_v6_and_udp() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "0.0.0.0:7000", "--udp"],
        "listening",
    )?;
    let ip4 = tb.daemon_ip4.to_string();
    let mut c = peer(
        &tb,
        &[
            "echo-client",
            &ip4,
            "7000",
            "--count",
            "200",
            "--size",
            "1000",
        ],
        "peer echo v4",
    )?;
    c.expect("ok echoed 200", T)?;
    c.success(T)?;
    let mut u = peer(
        &tb,
        &[
            "udp-echo-client",
            &ip4,
            "7000",
            "--count",
            "50",
            "--size",
            "512",
        ],
        "peer udp",
    )?;
    u.expect("ok udp echoed 50", T)?;
    // IPv6 listener: the v4-any listener does not cover v6, listen separately.
    let mut srv6 = {
        let mut c = d.app_cmd("examples/echo_server")?;
        c.args(["--listen", "[::]:7006"]);
        Proc::spawn(c, "echo_server v6")?
    };
    srv6.expect("listening", T)?;
    let ip6 = tb.daemon_ip6.to_string();
    let mut c6 = peer(
        &tb,
        &["echo-client", &ip6, "7006", "--count", "20", "--size", "64"],
        "peer echo v6",
    )?;
    c6.expect("ok echoed 20", T)?;
    // hoststackctl shows the sessions' endpoints while they exist.
    let v = d.ctl("all")?;
    ensure!(
        v["apps"].as_array().is_some_and(|a| a.len() == 2),
        "two apps attached: {v}"
    );
    Ok(())
}

#[test]
fn native_client_talks_to_kernel_server() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip4 = tb.peer_ip4.to_string();
    let mut s = peer(
        &tb,
        &["echo-server", &ip4, "7001", "--count", "1"],
        "peer echo server",
    )?;
    s.expect("listening", T)?;
    let mut c = d.app_cmd("examples/echo_client")?;
    c.args([
        "--connect",
        &format!("{ip4}:7001"),
        "--count",
        "500",
        "--size",
        "64",
    ]);
    let mut c = Proc::spawn(c, "echo_client")?;
    c.expect("ok 500 messages", T)?;
    c.success(T)?;
    s.success(T)?;
    // A closed port answers RST: connect is refused promptly.
    let mut c = d.app_cmd("examples/echo_client")?;
    c.args(["--connect", &format!("{ip4}:7999"), "--count", "1"]);
    let t0 = Instant::now();
    let st = c.output()?;
    ensure!(!st.status.success(), "connect to a closed port must fail");
    ensure!(
        t0.elapsed() < Duration::from_secs(5),
        "refusal must be prompt"
    );
    ensure!(
        String::from_utf8_lossy(&st.stderr).contains("refused"),
        "expected ECONNREFUSED, got {:?}",
        String::from_utf8_lossy(&st.stderr)
    );
    Ok(())
}

const BIG: u64 = 256 << 20;

#[test]
fn bulk_256mib_each_way_over_the_uplink() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    // Kernel → native.
    let file = std::env::temp_dir().join(format!("hs-bulk-{}", std::process::id()));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(BIG >> 20) {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&buf)?;
        }
    }
    let _cleanup = scopeguard(file.clone());
    let mut r = d.spawn_app(
        "examples/throughput",
        &["recv", "--listen", "0.0.0.0:9000", "--reply"],
        "listening",
    )?;
    let ip4 = tb.daemon_ip4.to_string();
    let f = file.display().to_string();
    let mut s = peer(&tb, &["send-file", &ip4, "9000", "--file", &f], "peer send")?;
    let sent = s.expect("sent sha256=", T)?;
    let got = r.expect("received bytes=", T)?;
    ensure!(
        field(&got, "bytes") == Some(BIG.to_string().as_str()),
        "byte count: {got}"
    );
    ensure!(
        field(&sent, "sha256") == field(&got, "sha256"),
        "sha mismatch: {sent} vs {got}"
    );
    r.success(T)?;
    eprintln!("kernel->native: {got}");
    // The peer's 64 KiB GSO packets came whole: small frames through the
    // mapped ring, the big ones (truncated there) from the socket queue.
    let v = d.ctl("interfaces")?;
    let st = &v["interfaces"][0]["stats"];
    ensure!(st["rx_truncated"] == 0, "truncated frames: {st}");
    ensure!(st["rx_dropped"] == 0, "dropped frames: {st}");
    ensure!(
        st["rx_ring_frames"].as_u64() > Some(0) && st["rx_syscalls"].as_u64() > Some(0),
        "expected ring frames and copied big frames: {st}"
    );
    ensure!(
        st["rx_bytes"].as_u64().unwrap_or(0) / st["rx_frames"].as_u64().unwrap_or(1).max(1) > 1514,
        "no super-frames arrived (the peer's GSO packets were cut): {st}"
    );
    // Native → kernel.
    let pip = tb.peer_ip4.to_string();
    let mut k = peer(&tb, &["recv-hash", &pip, "9001"], "peer recv")?;
    k.expect("listening", T)?;
    let mut c = d.app_cmd("examples/throughput")?;
    c.args([
        "send",
        "--connect",
        &format!("{pip}:9001"),
        "--bytes",
        &BIG.to_string(),
    ]);
    let mut snd = Proc::spawn(c, "throughput send")?;
    let sent = snd.expect("sent bytes=", T)?;
    let got = k.expect("received bytes=", T)?;
    ensure!(
        field(&got, "bytes") == Some(BIG.to_string().as_str()),
        "byte count: {got}"
    );
    ensure!(
        field(&sent, "sha256") == field(&got, "sha256"),
        "sha mismatch: {sent} vs {got}"
    );
    eprintln!("native->kernel: {sent}");
    Ok(())
}

struct Rm(std::path::PathBuf);
impl Drop for Rm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
fn scopeguard(p: std::path::PathBuf) -> Rm {
    Rm(p)
}

#[test]
fn bulk_256mib_each_way_through_cut_through() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    for (dir, port) in [("a->b", 9100), ("b->a", 9101)] {
        let mut r = d.spawn_app(
            "examples/throughput",
            &["recv", "--listen", &format!("127.0.0.1:{port}")],
            "listening",
        )?;
        let mut c = d.app_cmd("examples/throughput")?;
        c.args([
            "send",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--bytes",
            &BIG.to_string(),
        ]);
        let mut s = Proc::spawn(c, "ct send")?;
        let sent = s.expect("sent bytes=", T)?;
        let got = r.expect("received bytes=", T)?;
        ensure!(
            field(&sent, "sha256") == field(&got, "sha256"),
            "{dir}: {sent} vs {got}"
        );
        ensure!(
            field(&got, "bytes") == Some(BIG.to_string().as_str()),
            "{dir}: {got}"
        );
        eprintln!("cut-through {dir}: {sent}");
    }
    // The daemon never touched the data: no flows were created.
    ensure!(d.counter(&["stack", "active_opens"])? == 0);
    ensure!(d.counter(&["session", "cut_through_opened"])? == 2);
    Ok(())
}

#[test]
fn a_thousand_concurrent_connections_and_a_slow_reader() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "0.0.0.0:7100"],
        "listening",
    )?;
    let ip4 = tb.daemon_ip4.to_string();
    let mut m = peer(&tb, &["many", &ip4, "7100", "--count", "1000"], "peer many")?;
    m.expect("ok 1000 concurrent", T)?;
    ensure!(d.counter(&["stack", "passive_opens"])? >= 1000);

    // Slow reader: 16 MiB into a reader that takes 16 KiB per ms. The
    // window closes, nothing is lost, the daemon's memory stays bounded.
    let file = std::env::temp_dir().join(format!("hs-slow-{}", std::process::id()));
    std::fs::write(
        &file,
        (0..16u32 << 20)
            .map(|i| (i * 31 / 7) as u8)
            .collect::<Vec<u8>>(),
    )?;
    let _g = scopeguard(file.clone());
    let mut r = d.spawn_app(
        "examples/throughput",
        &[
            "recv",
            "--listen",
            "0.0.0.0:7101",
            "--read-delay-us",
            "1000",
            "--read-size",
            "16384",
        ],
        "listening",
    )?;
    let f = file.display().to_string();
    let mut s = peer(&tb, &["send-file", &ip4, "7101", "--file", &f], "peer send")?;
    let sent = s.expect("sent sha256=", Duration::from_secs(120))?;
    let got = r.expect("received bytes=", Duration::from_secs(120))?;
    ensure!(
        field(&sent, "sha256") == field(&got, "sha256"),
        "{sent} vs {got}"
    );
    ensure!(field(&got, "bytes") == Some((16u64 << 20).to_string().as_str()));
    Ok(())
}

#[test]
fn workers_listening_on_one_address_share_connections() -> Result<()> {
    use session_api::client::{App, Error};
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let app = App::attach(&d.attach_config("reuseport"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for _ in 0..2 {
        let app = app.clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        threads.push(std::thread::spawn(move || -> Result<u32> {
            let mut w = app.worker()?;
            let l = w.listen("0.0.0.0:7700".parse()?)?;
            ready.send(())?;
            let mut served = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = match w.accept(l, Some(Duration::from_millis(100))) {
                    Ok(s) => s,
                    Err(Error::TimedOut) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut b = [0u8; 64];
                loop {
                    let n = w.read(s, &mut b, Some(T))?;
                    if n == 0 {
                        break;
                    }
                    w.write_all(s, &b[..n], Some(T))?;
                }
                w.close(s)?;
                served += 1;
            }
            Ok(served)
        }));
    }
    ready_rx.recv_timeout(T)?;
    ready_rx.recv_timeout(T)?;
    let ip4 = tb.daemon_ip4.to_string();
    for _ in 0..20 {
        let mut c = peer(
            &tb,
            &["echo-client", &ip4, "7700", "--count", "3", "--size", "10"],
            "peer",
        )?;
        c.expect("ok echoed 3", T)?;
        c.success(T)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let counts: Vec<u32> = threads
        .into_iter()
        .map(|t| t.join().expect("worker thread"))
        .collect::<Result<_>>()?;
    eprintln!("connections per worker: {counts:?}");
    ensure!(
        counts.iter().sum::<u32>() == 20,
        "all 20 served: {counts:?}"
    );
    ensure!(
        counts.iter().all(|c| *c >= 5),
        "connections must be spread: {counts:?}"
    );
    Ok(())
}

#[test]
fn tap_uplink_serves_a_kernel_peer() -> Result<()> {
    // The daemon creates the TAP; its kernel side then moves into a peer
    // namespace (the tap fd keeps working) and gets the peer's address.
    let ns = hoststack_tests::Netns::new()?;
    let tap = format!("hst{}", hoststack_tests::unique_tag());
    let d = Daemon::start_args(&[
        "--uplink",
        "tap",
        "--interface",
        &tap,
        "--ipv4",
        "198.18.200.1/24",
    ])?;
    hoststack_tests::run(&["ip", "link", "set", &tap, "netns", &ns.name])?;
    ns.ip(&["addr", "add", "198.18.200.2/24", "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "0.0.0.0:7800", "--udp"],
        "listening",
    )?;
    let py = peer_py().display().to_string();
    let mut c = Proc::spawn(
        ns.cmd(
            "python3",
            &[
                &py,
                "echo-client",
                "198.18.200.1",
                "7800",
                "--count",
                "100",
                "--size",
                "3000",
            ],
        ),
        "peer echo over tap",
    )?;
    c.expect("ok echoed 100", T)?;
    let mut u = Proc::spawn(
        ns.cmd(
            "python3",
            &[
                &py,
                "udp-echo-client",
                "198.18.200.1",
                "7800",
                "--count",
                "20",
                "--size",
                "100",
            ],
        ),
        "peer udp over tap",
    )?;
    u.expect("ok udp echoed 20", T)?;
    ensure!(d.counter(&["stack", "rx_bad_checksum"])? == 0);
    Ok(())
}

#[test]
fn keepalive_probes_an_idle_connection() -> Result<()> {
    use session_api::client::App;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip4 = tb.peer_ip4.to_string();
    let mut s = peer(
        &tb,
        &["echo-server", &ip4, "7900", "--count", "2"],
        "peer echo server",
    )?;
    s.expect("listening", T)?;
    let app = App::attach(&d.attach_config("keepalive"))?;
    let mut w = app.worker()?;
    let addr: std::net::SocketAddr = format!("{ip4}:7900").parse()?;
    let mut idle_frames = |keepalive: Option<Duration>| -> Result<u64> {
        let c = w.connect(addr, Some(T))?;
        w.set_keepalive(c, keepalive.map(|d| (d, d, 9)))?;
        std::thread::sleep(Duration::from_millis(100));
        let before = d.counter(&["stack", "tx_frames"])?;
        std::thread::sleep(Duration::from_millis(600));
        let sent = d.counter(&["stack", "tx_frames"])? - before;
        w.close(c)?;
        Ok(sent)
    };
    let without = idle_frames(None)?;
    let with = idle_frames(Some(Duration::from_millis(50)))?;
    eprintln!("idle 600 ms: {without} frames without keepalive, {with} with 50 ms keepalive");
    ensure!(
        with >= without + 5,
        "keepalive must probe: {with} vs {without}"
    );
    Ok(())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

#[test]
fn idle_daemon_sleeps() -> Result<()> {
    use session_api::client::App;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let pid = d.child.as_ref().map(|c| c.id()).expect("daemon pid");
    // An attached app with a listener and a connection, all idle.
    let app = App::attach(&d.attach_config("idle"))?;
    let mut w = app.worker()?;
    let l = w.listen("0.0.0.0:8100".parse()?)?;
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "127.0.0.1:8101"],
        "listening",
    )?;
    let s = w.connect("127.0.0.1:8101".parse()?, Some(T))?;
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid)? - t0;
    eprintln!("idle daemon used {used} ticks in 2 s");
    // 10 ticks = 100 ms = 5% of one core; an idle epoll sleeper uses ~0.
    ensure!(used <= 10, "idle daemon burned {used} ticks in 2 s");
    w.close(s)?;
    w.unlisten(l)?;
    Ok(())
}

#[test]
fn icmp_echo_and_routing_through_the_daemons_gateway() -> Result<()> {
    let tb = Testbed::new()?;
    // A "remote" network behind the peer: 198.19.77.1 on the peer's lo,
    // reachable for the daemon only through its own default gateway.
    tb.netns()
        .ip(&["addr", "add", "198.19.77.1/32", "dev", "lo"])?;
    let gw = tb.peer_ip4.to_string();
    let d = Daemon::start(&tb, &["--gateway4", &gw])?;
    let ip4 = tb.daemon_ip4.to_string();
    let mut p = peer(&tb, &["ping", &ip4, "0", "--count", "3"], "peer ping")?;
    p.expect("ok 3 echo replies", T)?;
    let mut s = peer(
        &tb,
        &["echo-server", "198.19.77.1", "7950", "--count", "1"],
        "remote server",
    )?;
    s.expect("listening", T)?;
    let mut c = d.app_cmd("examples/echo_client")?;
    c.args(["--connect", "198.19.77.1:7950", "--count", "50"]);
    let mut c = Proc::spawn(c, "echo_client via gateway")?;
    c.expect("ok 50 messages", T)?;
    Ok(())
}

#[test]
fn abort_addresses_nodelay_and_an_external_epoll_loop() -> Result<()> {
    use session_api::client::{App, Notify};
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let ip4 = tb.peer_ip4.to_string();
    let py = peer_py().display().to_string();
    let app = App::attach(&d.attach_config("api"))?;
    let mut w = app.worker()?;

    // Abort: the kernel peer holding the connection sees a RST.
    let l = w.listen("0.0.0.0:7960".parse()?)?;
    let dip = tb.daemon_ip4.to_string();
    let mut h = Proc::spawn(
        tb.peer_cmd("python3", &[&py, "hold", &dip, "7960", "--wait", "10"]),
        "hold",
    )?;
    h.expect("connected", T)?;
    let s = w.accept(l, Some(T))?;
    // Endpoints as the kernel peer sees them, reversed.
    ensure!(w.local_addr(s)? == Some(format!("{dip}:7960").parse()?));
    let peer_addr = w.peer_addr(s)?.expect("peer address");
    ensure!(peer_addr.ip().to_string() == ip4, "peer {peer_addr}");
    let mut b = [0u8; 5];
    let n = w.read(s, &mut b, Some(T))?;
    ensure!(&b[..n] == b"hello");
    w.set_nodelay(s, true)?;
    w.abort(s)?;
    let line = h.expect("after", T)?;
    ensure!(
        line.starts_with("reset after"),
        "abort must send RST: {line}"
    );

    // External epoll: block in our own epoll on the worker's fds.
    // SAFETY: plain epoll syscalls on fds we own for the test's duration.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ensure!(ep >= 0);
    for fd in w.wait_fds() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: valid epoll fd, target fd and event struct.
        ensure!(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } == 0);
    }
    let mut c = Proc::spawn(
        tb.peer_cmd(
            "python3",
            &[
                &py,
                "echo-client",
                &dip,
                "7960",
                "--count",
                "1",
                "--size",
                "8",
            ],
        ),
        "client",
    )?;
    let t0 = std::time::Instant::now();
    let mut accepted = None;
    let mut notes = Vec::new();
    while accepted.is_none() && t0.elapsed() < T {
        if w.prepare_external_wait() {
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: buffer of 4 events.
            let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 5000) };
            ensure!(n > 0, "the worker's eventfd must wake our epoll");
        }
        notes.clear();
        w.poll_events(&mut notes, Some(Duration::ZERO))?;
        if notes.iter().any(|n| matches!(n, Notify::Accept(_))) {
            accepted = Some(w.accept(l, Some(Duration::ZERO))?);
        }
    }
    // SAFETY: closing the epoll fd we created.
    unsafe { libc::close(ep) };
    let s = accepted.context("no accept through the external epoll")?;
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        got += w.read(s, &mut b[got..], Some(T))?;
    }
    w.write_all(s, &b, Some(T))?;
    ensure!(
        w.read(s, &mut b, Some(T))? == 0,
        "EOF after the client's shutdown"
    );
    w.close(s)?;
    c.expect("ok echoed 1", T)?;
    Ok(())
}

#[test]
fn hoststackctl_shows_sessions_and_counters() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "0.0.0.0:7970"],
        "listening",
    )?;
    let dip = tb.daemon_ip4.to_string();
    let py = peer_py().display().to_string();
    let mut h = Proc::spawn(
        tb.peer_cmd("python3", &[&py, "hold", &dip, "7970", "--wait", "5"]),
        "hold",
    )?;
    h.expect("connected", T)?;
    let ctl = hoststack_tests::daemon::bin("hoststackctl")?;
    let sessions = || -> Result<String> {
        let out = std::process::Command::new(&ctl)
            .args(["--socket-dir", &d.dir.display().to_string(), "sessions"])
            .output()?;
        ensure!(
            out.status.success(),
            "hoststackctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The peer's connect() returns before the daemon has processed the
    // final ACK of the handshake: poll until the session is established.
    let mut text = String::new();
    wait_for("an ESTABLISHED session in hoststackctl", T, || {
        text = sessions()?;
        Ok(text.contains("ESTABLISHED"))
    })?;
    ensure!(text.contains(&format!("{dip}:7970")), "{text}");
    ensure!(text.contains("0.0.0.0:7970"), "listener shown: {text}");
    let out = std::process::Command::new(&ctl)
        .args([
            "--socket-dir",
            &d.dir.display().to_string(),
            "counters",
            "--json",
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["counters"]["stack"]["passive_opens"].as_u64() == Some(1),
        "{v}"
    );
    // A reader that goes away early (`| head`) is not an error.
    let out = std::process::Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!(
                "{} --socket-dir {} all | true",
                ctl.display(),
                d.dir.display()
            ),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "hoststackctl | true: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A daemon that is not there: a clear error, not a hang.
    let out = std::process::Command::new(&ctl)
        .args(["--socket-dir", "/nonexistent"])
        .output()?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("is it running"));
    Ok(())
}

#[test]
fn daemon_reads_a_toml_config_and_rejects_bad_ones() -> Result<()> {
    let tb = Testbed::new()?;
    let dir = std::env::temp_dir().join(format!("hs-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _g = scopeguard(dir.join("x"));
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[uplink]\nkind = \"af-packet\"\noffload = false\ninterface = \"{}\"\nipv4 = \"{}/24\"\n\
             [daemon]\npoll_spin_us = 0\n[session]\nfifo_size = 65536\n",
            tb.daemon_if, tb.daemon_ip4
        ),
    )?;
    let d = Daemon::start_args(&["--config", &good.display().to_string()])?;
    let v = d.ctl("interfaces")?;
    ensure!(v["interfaces"][0]["name"] == tb.daemon_if.as_str(), "{v}");
    let _srv = d.spawn_app(
        "examples/echo_server",
        &["--listen", "0.0.0.0:8200"],
        "listening",
    )?;
    let ip4 = tb.daemon_ip4.to_string();
    let mut c = peer(&tb, &["echo-client", &ip4, "8200", "--count", "10"], "peer")?;
    c.expect("ok echoed 10", T)?;
    let sess = d.ctl("sessions")?;
    drop(d);
    ensure!(sess["sessions"].as_array().is_some(), "{sess}");
    // Bad configs: a clear message and a non-zero exit, never a panic.
    let bin = hoststack_tests::daemon::bin("hoststackd")?;
    for (text, want) in [
        ("[uplink]\nnope = 1\n", "unknown field"),
        (
            "[uplink]\ninterface = \"x\"\nipv4 = \"198.18.0.1/24\"\n[session]\nfifo_size = 1000\n",
            "fifo_size",
        ),
        (
            "[uplink]\ninterface = \"hs-no-such-if\"\nipv4 = \"198.18.0.1/24\"\n",
            "not found",
        ),
        (
            "[uplink]\ninterface = \"x\"\nipv4 = \"not-an-ip\"\n",
            "uplink.ipv4",
        ),
    ] {
        let p = dir.join("bad.toml");
        std::fs::write(&p, text)?;
        let out = std::process::Command::new(&bin)
            .args([
                "--config",
                &p.display().to_string(),
                "--socket-dir",
                &dir.display().to_string(),
            ])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{text:?} accepted");
        ensure!(err.contains(want), "{text:?}: expected {want:?} in {err}");
        ensure!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_worker_forgets_events_of_sessions_it_closed_and_keeps_early_fins() -> Result<()> {
    // A FIN that arrives before accept() must reach the app; one that
    // arrives for a session the app already closed is stale. Before, the
    // stale ones were remembered too, one map entry per such close for the
    // life of the worker.
    use session_api::client::App;
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let app = App::attach(&d.attach_config("early"))?;
    let mut srv = app.worker()?;
    let mut cli = app.worker()?;
    let addr: std::net::SocketAddr = "127.0.0.1:7970".parse()?;
    let l = srv.listen(addr)?;
    const N: usize = 20;
    for _ in 0..N {
        let c = cli.connect(addr, Some(T))?;
        let s = srv.accept(l, Some(T))?;
        cli.close(c)?;
        // The daemon queues the FIN for `s`; close it before reading that.
        std::thread::sleep(Duration::from_millis(20));
        srv.close(s)?;
    }
    let mut notes = Vec::new();
    std::thread::sleep(Duration::from_millis(100));
    srv.poll_events(&mut notes, Some(Duration::ZERO))?;
    let st = srv.stats();
    ensure!(
        st.unopened == 0 && st.early_state == 0,
        "after {N} closes: {st:?}"
    );

    // A FIN ahead of accept() is kept: read() sees the end of the stream.
    let c = cli.connect(addr, Some(T))?;
    cli.write_all(c, b"bye", Some(T))?;
    cli.close(c)?;
    std::thread::sleep(Duration::from_millis(100));
    srv.poll_events(&mut notes, Some(Duration::ZERO))?;
    let st = srv.stats();
    ensure!(st.unopened == 1 && st.early_state == 1, "{st:?}");
    let s = srv.accept(l, Some(T))?;
    let mut b = [0u8; 8];
    let n = srv.read(s, &mut b, Some(T))?;
    ensure!(&b[..n] == b"bye", "read {:?}", &b[..n]);
    ensure!(srv.read(s, &mut b, Some(T))? == 0, "no end of stream");
    let st = srv.stats();
    ensure!(st.unopened == 0 && st.early_state == 0, "{st:?}");
    Ok(())
}

#[test]
fn a_client_may_reuse_its_time_wait_port_for_a_new_connection() -> Result<()> {
    // A Linux client that closed first holds the port in TIME-WAIT; it may
    // connect from it again only if the old connection carried TCP
    // timestamps (PAWS protects the new one). Without them, a client that
    // opens many short connections to us runs out of ports: back-to-back
    // 10 000-connection benchmark runs stalled wrk inside connect().
    for (flags, want) in [
        (&[][..], "reused"),
        (
            &["--tcp-timestamps", "false"][..],
            "Cannot assign requested address",
        ),
    ] {
        let tb = Testbed::new()?;
        let d = Daemon::start(&tb, flags)?;
        let _srv = d.spawn_app(
            "examples/echo_server",
            &["--listen", "0.0.0.0:7010"],
            "listening",
        )?;
        let client = format!(
            "import socket, time\n\
             try:\n\
             \x20   for i in range(3):\n\
             \x20       s = socket.socket()\n\
             \x20       s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             \x20       s.bind(('{peer}', 40123))\n\
             \x20       s.connect(('{daemon}', 7010))\n\
             \x20       s.sendall(b'ping %d' % i)\n\
             \x20       assert s.recv(64) == b'ping %d' % i\n\
             \x20       s.close()\n\
             \x20       time.sleep(0.3)\n\
             \x20   print('reused', flush=True)\n\
             except OSError as e:\n\
             \x20   print(e, flush=True)\n",
            peer = tb.peer_ip4,
            daemon = tb.daemon_ip4
        );
        let out = tb.peer_cmd("python3", &["-c", &client]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains(want),
            "daemon flags {flags:?}: want {want:?}, got {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn what_a_reply_creates_after_the_app_gave_up_waiting_is_given_back() -> Result<()> {
    // A call that times out waiting for a stalled daemon must not leave the
    // listener, session or bind reservation the late reply creates with
    // the worker for its whole life (nor the reply in its map).
    use session_api::client::{App, Error as ApiError};
    use session_api::msg::BIND_RESERVE;
    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let app = App::attach(&d.attach_config("late"))?;
    let mut w = app.worker()?;
    w.set_reply_timeout(Duration::from_millis(200));
    let ip = std::net::IpAddr::V4(tb.daemon_ip4);
    let tcp = std::net::SocketAddr::new(ip, 7971);
    let held = std::net::SocketAddr::new(ip, 7972);
    let udp = std::net::SocketAddr::new(ip, 7973);
    let timed_out = |r: std::result::Result<(), ApiError>, what: &str| -> Result<()> {
        match r {
            Err(ApiError::TimedOut) => Ok(()),
            other => anyhow::bail!("{what} with the daemon stopped: {other:?}"),
        }
    };
    d.kill(libc::SIGSTOP);
    let r = (|| -> Result<()> {
        timed_out(w.listen_with(tcp, 16, 0).map(|_| ()), "listen")?;
        timed_out(w.bind_reserve(held, BIND_RESERVE).map(|_| ()), "bind")?;
        timed_out(w.udp_bind(udp).map(|_| ()), "UDP bind")?;
        ensure!(w.stats().late_replies == 3, "{:?}", w.stats());
        Ok(())
    })();
    d.kill(libc::SIGCONT);
    r?;
    let mut notes = Vec::new();
    wait_for("the late replies", T, || {
        w.poll_events(&mut notes, Some(Duration::from_millis(20)))?;
        Ok(w.stats().late_replies == 0)
    })?;
    // Each address is free again: the exclusive uses below would fail with
    // EADDRINUSE if the late listener, reservation or socket still held it.
    w.set_reply_timeout(Duration::from_secs(10));
    let mut other = app.worker()?;
    wait_for("the addresses to be given back", T, || {
        Ok(other.bind_check(tcp, 0).is_ok()
            && other.bind_check(held, 0).is_ok()
            && other.udp_bind(udp).map(|s| other.close(s)).is_ok())
    })?;
    let st = w.stats();
    ensure!(st.unopened == 0 && st.late_replies == 0, "{st:?}");
    Ok(())
}
