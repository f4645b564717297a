//! Faults and bad input: killed apps, a killed daemon, hostile apps that
//! scribble over their shared memory, bad attach messages.

use anyhow::{bail, ensure, Context, Result};
use hoststack_tests::daemon::{peer_py, Daemon, Proc};
use hoststack_tests::Testbed;
use session_api::client::{App, Error};
use session_api::mq::MqProducer;
use session_api::msg::{Proto, Request};
use session_api::proto::{AppCtrl, DaemonCtrl};
use session_api::shm::{recv_with_fds, send_with_fds, EventFd, ShmRegion};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn echo_server(d: &Daemon, port: u16) -> Result<Proc> {
    d.spawn_app(
        "examples/echo_server",
        &["--listen", &format!("0.0.0.0:{port}")],
        "listening",
    )
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out waiting for {what}")
}

#[test]
fn killed_app_resets_its_connections_over_the_uplink() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let srv = echo_server(&d, 7200)?;
    let py = peer_py().display().to_string();
    let ip = tb.daemon_ip4.to_string();
    let mut h = Proc::spawn(
        tb.peer_cmd("python3", &[&py, "hold", &ip, "7200", "--wait", "10"]),
        "hold",
    )?;
    h.expect("connected", T)?;
    std::thread::sleep(Duration::from_millis(200));
    srv.signal(libc::SIGKILL);
    let l = h.expect("after", T)?;
    ensure!(
        l.starts_with("reset after"),
        "peer must see a RST, got {l:?}"
    );
    wait_for("sessions freed", T, || {
        Ok(d.counter(&["sessions"])? == 0 && d.counter(&["apps"])? == 0)
    })?;
    Ok(())
}

#[test]
fn two_hundred_kill_cycles_return_memory_to_baseline() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let app = App::attach(&d.attach_config("tester"))?;
    let mut w = app.worker()?;
    let mut baseline = 0;
    for i in 0..200 {
        let srv = echo_server(&d, 7300)?;
        // A cut-through session with data in flight, then SIGKILL.
        let s = w.connect("127.0.0.1:7300".parse()?, Some(T))?;
        w.write_all(s, b"ping", Some(T))?;
        let mut b = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            got += w.read(s, &mut b[got..], Some(T))?;
        }
        ensure!(&b == b"ping");
        srv.signal(libc::SIGKILL);
        // The survivor sees the reset promptly.
        let t0 = Instant::now();
        match w.read(s, &mut b, Some(Duration::from_secs(5))) {
            Err(Error::Errno(libc::ECONNRESET)) | Ok(0) => {}
            other => bail!("cycle {i}: expected reset/EOF, got {other:?}"),
        }
        ensure!(t0.elapsed() < Duration::from_secs(3));
        w.close(s)?;
        drop(srv);
        wait_for("app removed", T, || Ok(d.counter(&["apps"])? == 1))?;
        if i == 19 {
            baseline = d.counter(&["rss_bytes"])?;
        }
    }
    wait_for("sessions freed", T, || Ok(d.counter(&["sessions"])? == 0))?;
    // The survivor unmaps the pair segments of dead peers (own segment +
    // at most the latest pair segment, whose announcement may still be
    // pending).
    app.process_control()?;
    ensure!(
        app.segment_count() <= 2,
        "survivor still maps {} segments",
        app.segment_count()
    );
    let rss = d.counter(&["rss_bytes"])?;
    eprintln!("daemon rss after 20 cycles {baseline}, after 200 cycles {rss}");
    ensure!(
        rss <= baseline + (8 << 20),
        "daemon memory grew from {baseline} to {rss} over 180 kill cycles"
    );
    Ok(())
}

#[test]
fn killed_daemon_unblocks_apps_promptly() -> Result<()> {
    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let mut r = d.spawn_app(
        "examples/throughput",
        &["recv", "--listen", "0.0.0.0:7400"],
        "listening",
    )?;
    // And an in-process worker blocked in read on a cut-through session.
    let app = App::attach(&d.attach_config("blocked"))?;
    let mut w = app.worker()?;
    let _srv = echo_server(&d, 7401)?;
    let s = w.connect("127.0.0.1:7401".parse()?, Some(T))?;
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 16];
        let t0 = Instant::now();
        let r = w.read(s, &mut b, None);
        (r.map_err(|e| e.to_string()), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    d.kill(libc::SIGKILL);
    let st = r
        .wait(Duration::from_secs(5))
        .context("app blocked in accept must return")?;
    ensure!(!st.success(), "accept must fail when the daemon dies");
    let (res, took) = reader.join().expect("reader thread");
    ensure!(res.is_err(), "read must fail when the daemon dies: {res:?}");
    ensure!(took < Duration::from_secs(5), "read took {took:?}");
    Ok(())
}

/// `recv_with_fds` on a blocking-or-not socket, waiting up to 5 s.
fn recv_wait(
    fd: std::os::fd::BorrowedFd,
    buf: &mut [u8],
) -> Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    let t0 = Instant::now();
    loop {
        match recv_with_fds(fd, buf, 4) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && t0.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return Ok(r?),
        }
    }
}

/// Attach by hand (no client library) so the test holds the raw segment.
struct Raw {
    ctrl: std::os::fd::OwnedFd,
    seg: ShmRegion,
    req: MqProducer,
    wake: EventFd,
}

fn raw_attach(d: &Daemon) -> Result<Raw> {
    let ctrl = session_api::sys::seqpacket_connect(&d.dir.join("default.sock"))?;
    let m = AppCtrl::Attach {
        namespace: "default".into(),
        secret: d.secret.clone(),
        name: "hostile".into(),
        pid: std::process::id(),
    };
    send_with_fds(ctrl.as_fd(), &m.encode(), &[])?;
    let mut buf = vec![0u8; 4096];
    let (n, mut fds) = recv_wait(ctrl.as_fd(), &mut buf)?;
    let DaemonCtrl::AttachOk { size, .. } = DaemonCtrl::decode(&buf[..n])? else {
        bail!("attach refused")
    };
    let seg = ShmRegion::map_fd(fds.remove(0), size as usize)?;
    send_with_fds(ctrl.as_fd(), &AppCtrl::AddWorker.encode(), &[])?;
    let (n, mut fds) = recv_wait(ctrl.as_fd(), &mut buf)?;
    let DaemonCtrl::WorkerOk {
        req_off, req_slots, ..
    } = DaemonCtrl::decode(&buf[..n])?
    else {
        bail!("no worker")
    };
    let wake = EventFd::from_fd(fds.remove(0));
    // SAFETY: the daemon placed the queue inside the segment we mapped.
    let req = unsafe { MqProducer::new(seg.as_ptr().add(req_off as usize), req_slots) };
    Ok(Raw {
        ctrl,
        seg,
        req,
        wake,
    })
}

#[test]
fn hostile_app_scribbling_shared_memory_hurts_only_itself() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    let _srv = echo_server(&d, 7500)?;
    let py = peer_py().display().to_string();
    let ip = tb.daemon_ip4.to_string();
    for round in 0..20u64 {
        let mut raw = raw_attach(&d)?;
        // Open real sessions so the daemon has FIFOs in our segment.
        for (i, req) in [
            Request::Connect {
                req_id: 1,
                proto: Proto::Tcp,
                remote: "127.0.0.1:7500".parse()?,
                local: None,
            },
            Request::Connect {
                req_id: 2,
                proto: Proto::Tcp,
                remote: format!("{}:7", tb.peer_ip4).parse()?,
                local: None,
            },
            Request::Listen {
                req_id: 3,
                proto: Proto::Udp,
                local: "0.0.0.0:0".parse()?,
                backlog: 0,
                flags: 0,
            },
        ]
        .iter()
        .enumerate()
        {
            let _ = raw.req.try_send(&req.encode());
            let _ = i;
        }
        raw.wake.notify();
        std::thread::sleep(Duration::from_millis(20));
        // Now scribble: random bytes over the whole segment past its
        // header, several times, poking the daemon each time.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round;
        for _ in 0..5 {
            let len = raw.seg.len();
            // SAFETY: writing inside our own mapping of the segment.
            let p = unsafe { std::slice::from_raw_parts_mut(raw.seg.as_ptr(), len.min(8 << 20)) };
            for b in p.iter_mut().skip(64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            raw.wake.notify();
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(raw.ctrl);
    }
    // The daemon is alive and still serves a well-behaved app and a peer.
    let mut c = Proc::spawn(
        tb.peer_cmd(
            "python3",
            &[
                &py,
                "echo-client",
                &ip,
                "7500",
                "--count",
                "50",
                "--size",
                "300",
            ],
        ),
        "peer echo",
    )?;
    c.expect("ok echoed 50", T)?;
    let v = d.ctl("counters")?;
    eprintln!("after hostile rounds: {}", v["counters"]["session"]);
    wait_for("hostile apps gone", T, || Ok(d.counter(&["apps"])? == 1))?;
    Ok(())
}

#[test]
fn bad_attach_input_gets_clear_errors() -> Result<()> {
    let tb = Testbed::new()?;
    let d = Daemon::start(&tb, &[])?;
    // Wrong secret.
    let mut cfg = d.attach_config("intruder");
    cfg.secret = "wrong".into();
    match App::attach(&cfg) {
        Err(Error::Refused { errno, message }) => {
            ensure!(errno == libc::EACCES, "errno {errno}");
            ensure!(message.contains("secret"), "{message}");
        }
        Err(e) => bail!("unexpected error {e}"),
        Ok(_) => bail!("wrong secret accepted"),
    }
    // Unknown namespace socket: a clear connect error.
    let mut cfg = d.attach_config("x");
    cfg.namespace = "nope".into();
    ensure!(matches!(App::attach(&cfg), Err(Error::Io(_))));
    // Wrong ABI version and garbage.
    let path = d.dir.join("default.sock");
    let mut v = AppCtrl::Attach {
        namespace: "default".into(),
        secret: d.secret.clone(),
        name: "old".into(),
        pid: 1,
    }
    .encode();
    v[4] = 99;
    for (msg, want) in [
        (v, libc::EPROTONOSUPPORT),
        (b"garbage!garbage!".to_vec(), libc::EPROTO),
        (vec![0u8; 3], libc::EPROTO),
    ] {
        let s = session_api::sys::seqpacket_connect(&path)?;
        send_with_fds(s.as_fd(), &msg, &[])?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = recv_wait(s.as_fd(), &mut buf)?;
        match DaemonCtrl::decode(&buf[..n])? {
            DaemonCtrl::Error { errno, message } => {
                ensure!(errno == want, "errno {errno} for {message}");
            }
            other => bail!("expected an error, got {other:?}"),
        }
    }
    // An attached app sending a malformed control message is disconnected.
    let raw = raw_attach(&d)?;
    send_with_fds(raw.ctrl.as_fd(), b"\x48\x53\x54\x4bjunk", &[])?;
    wait_for("bad app dropped", T, || Ok(d.counter(&["apps"])? == 0))?;
    // And the daemon still works.
    let app = App::attach(&d.attach_config("fine"))?;
    let mut w = app.worker()?;
    let l = w.listen("0.0.0.0:7600".parse()?)?;
    w.unlisten(l)?;
    Ok(())
}
