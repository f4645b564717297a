//! Start a real `hoststackd` on a [`Testbed`](crate::Testbed) and run the
//! project's example programs against it.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static N: AtomicU32 = AtomicU32::new(0);

/// Directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/, binaries (the bench
    // harness) in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary (`hoststackd`) or example (`examples/echo_server`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --release --workspace --lib --bins --examples` (scripts/test.sh does)",
            p.display()
        );
    }
    Ok(p)
}

/// Path of the kernel-side peer script.
pub fn peer_py() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/peer.py")
}

/// A running daemon; killed and cleaned up on drop.
pub struct Daemon {
    /// The process.
    pub child: Option<Child>,
    /// Its socket directory.
    pub dir: PathBuf,
    /// Namespace secret.
    pub secret: String,
    log: PathBuf,
    /// The flags it was started with (for [`Daemon::restart`]).
    args: Vec<String>,
}

impl Daemon {
    /// Start `hoststackd` on the testbed's daemon interface with
    /// `extra` flags; waits until its control socket answers.
    pub fn start(tb: &crate::Testbed, extra: &[&str]) -> Result<Self> {
        let ip4 = format!("{}/{}", tb.daemon_ip4, tb.prefix_len4);
        let ip6 = format!("{}/{}", tb.daemon_ip6, tb.prefix_len6);
        let mut args = vec![
            "--interface",
            tb.daemon_if.as_str(),
            "--ipv4",
            &ip4,
            "--ipv6",
            &ip6,
        ];
        args.extend_from_slice(extra);
        Self::start_args(&args)
    }

    /// Start `hoststackd` with exactly these uplink/tuning flags (the socket
    /// directory and namespace secret are added).
    pub fn start_args(args: &[&str]) -> Result<Self> {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("hs-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let secret = format!(
            "s{}-{n}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        );
        let log = dir.join("daemon.log");
        let mut d = Daemon {
            child: None,
            dir,
            secret,
            log,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        d.spawn()?;
        Ok(d)
    }

    /// Start a new hoststackd in this one's place (same flags, socket
    /// directory and secret), killing this one first if it still runs.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(bin("hoststackd")?);
        cmd.args(&self.args)
            .arg("--socket-dir")
            .arg(&self.dir)
            .arg("--namespace")
            .arg(format!("default={}", self.secret))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            );
        self.child = Some(cmd.spawn().context("spawning hoststackd")?);
        let d = self;
        let t0 = Instant::now();
        loop {
            if d.dir.join("ctl.sock").exists() && d.ctl("counters").is_ok() {
                return Ok(());
            }
            if let Some(c) = d.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("hoststackd exited with {st}: {}", d.log_text());
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("hoststackd did not come up: {}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Environment for apps attaching to this daemon.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "HOSTSTACK_SOCKET_DIR".into(),
                self.dir.display().to_string(),
            ),
            ("HOSTSTACK_SECRET".into(), self.secret.clone()),
            ("HOSTSTACK_NAMESPACE".into(), "default".into()),
        ]
    }

    /// Attach config for in-process clients.
    pub fn attach_config(&self, name: &str) -> session_api::client::AttachConfig {
        session_api::client::AttachConfig {
            socket_dir: self.dir.clone(),
            namespace: "default".into(),
            secret: self.secret.clone(),
            name: name.into(),
        }
    }

    /// A command for a workspace binary/example with the attach env set.
    pub fn app_cmd(&self, name: &str) -> Result<Command> {
        let mut c = Command::new(bin(name)?);
        c.envs(self.env());
        Ok(c)
    }

    /// Spawn a workspace binary/example attached to this daemon and wait
    /// for its `ready` line on stdout.
    pub fn spawn_app(&self, name: &str, args: &[&str], ready: &str) -> Result<Proc> {
        let mut c = self.app_cmd(name)?;
        c.args(args);
        let mut p = Proc::spawn(c, name)?;
        p.expect(ready, Duration::from_secs(60))?;
        Ok(p)
    }

    /// Query the control socket (what: all|apps|sessions|interfaces|counters).
    pub fn ctl(&self, what: &str) -> Result<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.join("ctl.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{what}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(serde_json::from_str(&out)?)
    }

    /// A counter from `ctl counters`.
    pub fn counter(&self, path: &[&str]) -> Result<u64> {
        let mut v = self.ctl("counters")?["counters"].clone();
        for p in path {
            v = v[*p].clone();
        }
        v.as_u64()
            .with_context(|| format!("counter {path:?} missing"))
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kill with a signal now.
    pub fn kill(&mut self, sig: i32) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- hoststackd log ---\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A spawned process whose stdout lines can be awaited; killed on drop.
pub struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Everything read so far.
    pub seen: Vec<String>,
    name: String,
}

impl Proc {
    /// Spawn with stdout captured (stderr inherited so failures show), in
    /// its own process group, so that dropping it also kills what it
    /// started (nginx's workers outlive a killed master otherwise).
    pub fn spawn(cmd: Command, name: &str) -> Result<Self> {
        Self::spawn_inner(cmd, name, Stdio::null())
    }

    /// [`Proc::spawn`] with a pipe to its stdin.
    pub fn spawn_with_stdin(cmd: Command, name: &str) -> Result<(Self, std::process::ChildStdin)> {
        let mut p = Self::spawn_inner(cmd, name, Stdio::piped())?;
        let stdin = p.child.stdin.take().context("stdin")?;
        Ok((p, stdin))
    }

    fn spawn_inner(mut cmd: Command, name: &str, stdin: Stdio) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.stdout(Stdio::piped()).stdin(stdin).process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines: rx,
            seen: Vec::new(),
            name: name.into(),
        })
    }

    /// Wait for a stdout line containing `pat`; returns it.
    pub fn expect(&mut self, pat: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(pat) {
                        return Ok(l);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!(
                    "{}: exited without a line with {pat:?}; saw {:?}",
                    self.name,
                    self.seen
                ),
                Err(_) => bail!(
                    "{}: no line with {pat:?} within {timeout:?}; saw {:?}",
                    self.name,
                    self.seen
                ),
            }
        }
    }

    /// Wait for exit; error if it does not finish in time.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                // Collect the remaining output.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                    self.seen.push(l);
                }
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; saw {:?}",
                    self.name,
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for a successful exit.
    pub fn success(&mut self, timeout: Duration) -> Result<()> {
        let st = self.wait(timeout)?;
        if !st.success() {
            bail!("{} failed with {st}; output {:?}", self.name, self.seen);
        }
        Ok(())
    }

    /// Pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this Proc created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
