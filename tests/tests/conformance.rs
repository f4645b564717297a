//! Socket API conformance of the LD_PRELOAD shim, with the kernel as the
//! oracle.
//!
//! `tests/conformance/*.c` are small C programs, one per topic (epoll,
//! poll/select, non-blocking connect, half-close, resets, dup/fcntl,
//! socket options, fork, threads, UDP, vectored I/O and sendfile, accept
//! errors, IPv6). Each runs a series of sub-cases over 127.0.0.1/::1 and
//! prints one line per observable result: errno names, byte counts, poll
//! flags, yes/no facts, never addresses, ports, fds, pids or timings; where
//! kernels may legitimately differ (a loopback connect may finish at once
//! or later) the line is normalised. Every blocking step is bounded, and a
//! program exits 0 when it ran to the end.
//!
//! Nobody writes the expected output by hand: each program is run twice,
//! first on plain kernel sockets, then as `hoststack run --strict -- PROG`
//! against a real hoststackd. The kernel's stdout is the expected output,
//! and the shim run must print exactly the same lines and also exit 0.
//! (`--strict`: if the shim cannot attach, sockets fail instead of quietly
//! falling back to the kernel, which would make every comparison pass.)
//!
//! All programs run even when some differ; the test then fails once with
//! every difference: a line diff (`-` kernel only, `+` shim only) and the
//! tail of the shim run's stderr. `CONFORMANCE_ONLY=udp,rst` runs only the
//! named programs. To run one program by hand, see
//! `tests/conformance/README.md`.

use anyhow::{bail, ensure, Context, Result};
use hoststack_tests::daemon::{bin, Daemon};
use hoststack_tests::Testbed;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bound on one run of one program (they take well under 5 s on the kernel).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of the shim's stderr shown with a difference.
const STDERR_TAIL: usize = 25;

/// Context lines around each change in a diff.
const CONTEXT: usize = 2;

/// gcc flags for every program (conf.h is found next to the sources).
const CFLAGS: &[&str] = &["-O1", "-Wall", "-Wextra", "-Werror", "-pthread"];

fn source_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// The programs' names (file stems), sorted, restricted by `CONFORMANCE_ONLY`.
fn programs() -> Result<Vec<String>> {
    let dir = source_dir();
    let mut all = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "c") {
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                all.push(stem.to_string());
            }
        }
    }
    all.sort();
    ensure!(!all.is_empty(), "no *.c programs in {}", dir.display());
    let Ok(only) = std::env::var("CONFORMANCE_ONLY") else {
        return Ok(all);
    };
    let wanted: Vec<&str> = only
        .split(',')
        .map(|s| s.trim().trim_end_matches(".c"))
        .filter(|s| !s.is_empty())
        .collect();
    for w in &wanted {
        ensure!(
            all.iter().any(|a| a == w),
            "CONFORMANCE_ONLY names {w:?}, which is not one of {all:?}"
        );
    }
    all.retain(|a| wanted.contains(&a.as_str()));
    Ok(all)
}

/// Compile every program into `out`; fails with gcc's stderr.
fn compile(names: &[String], out: &Path) -> Result<()> {
    let dir = source_dir();
    for n in names {
        let src = dir.join(format!("{n}.c"));
        let res = Command::new("gcc")
            .args(CFLAGS)
            .arg("-o")
            .arg(out.join(n))
            .arg(&src)
            .output()
            .context("running gcc (is it installed?)")?;
        if !res.status.success() {
            bail!(
                "gcc failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&res.stderr)
            );
        }
    }
    Ok(())
}

/// What one bounded run produced.
#[derive(Clone)]
struct Run {
    stdout: String,
    stderr: String,
    /// None: killed after `RUN_TIMEOUT`.
    status: Option<ExitStatus>,
}

impl Run {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn status_text(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => format!("killed after {RUN_TIMEOUT:?} (timed out)"),
        }
    }
}

/// Run `cmd` in its own process group with stdout/stderr in files (so
/// forked children cannot keep a pipe open); on timeout, or once it has
/// exited, the whole group is killed.
fn run_bounded(mut cmd: Command, work: &Path, tag: &str) -> Result<Run> {
    let out_path = work.join(format!("{tag}.stdout"));
    let err_path = work.join(format!("{tag}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let pgid = child.id() as i32;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if t0.elapsed() > RUN_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: kill(2) on the process group this function created; the
    // leader's pid stays reserved while any member of its group lives.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if status.is_none() {
        let _ = child.wait();
    }
    Ok(Run {
        stdout: String::from_utf8_lossy(&std::fs::read(&out_path)?).into_owned(),
        stderr: String::from_utf8_lossy(&std::fs::read(&err_path)?).into_owned(),
        status,
    })
}

/// A line diff of `expected` (kernel) against `got` (shim): `-` lines only
/// the kernel printed, `+` lines only the shim printed, `CONTEXT` lines of
/// context, `...` for skipped runs of equal lines.
fn line_diff(expected: &str, got: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    // lcs[i][j]: length of the longest common subsequence of a[i..], b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, x) in a.iter().enumerate().rev() {
        for (j, y) in b.iter().enumerate().rev() {
            lcs[i][j] = if x == y {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    let changed: Vec<bool> = ops.iter().map(|(k, _)| *k != ' ').collect();
    let mut out = String::new();
    let mut last: Option<usize> = None;
    for (k, (kind, line)) in ops.iter().enumerate() {
        let lo = k.saturating_sub(CONTEXT);
        let hi = (k + CONTEXT + 1).min(ops.len());
        if !changed[lo..hi].iter().any(|&c| c) {
            continue;
        }
        if last.map_or(k > 0, |l| l + 1 != k) {
            out.push_str("      ...\n");
        }
        let _ = writeln!(out, "    {kind} {line}");
        last = Some(k);
    }
    if last.is_some_and(|l| l + 1 < ops.len()) {
        out.push_str("      ...\n");
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        let _ = writeln!(out, "    ({start} earlier lines)");
    }
    for l in &lines[start..] {
        let _ = writeln!(out, "    {l}");
    }
    out
}

/// Known gaps (tests/conformance/KNOWN_GAPS): `program: label` ignores the
/// result lines with that label (the text before the first `:`) in both
/// runs; `program: *` ignores the program's output and exit status (the
/// kernel run must still pass). Each entry is a documented limitation.
fn known_gaps() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(source_dir().join("KNOWN_GAPS"))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(": "))
        .map(|(p, l)| (p.trim().to_string(), l.trim().to_string()))
        .collect())
}

fn drop_known(out: &str, labels: &[&str]) -> String {
    out.lines()
        .filter(|l| {
            let label = l.split(':').next().unwrap_or("");
            !labels.contains(&label)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Compare one program's two runs; None if they agree.
fn compare(name: &str, kernel: &Run, shim: &Run) -> Option<String> {
    let gaps = known_gaps().unwrap_or_default();
    let labels: Vec<&str> = gaps
        .iter()
        .filter(|(p, _)| p == name)
        .map(|(_, l)| l.as_str())
        .collect();
    let whole = labels.contains(&"*");
    let kernel = &Run {
        stdout: drop_known(&kernel.stdout, &labels),
        ..kernel.clone()
    };
    let shim = &Run {
        stdout: if whole {
            kernel.stdout.clone()
        } else {
            drop_known(&shim.stdout, &labels)
        },
        status: if whole { kernel.status } else { shim.status },
        ..shim.clone()
    };
    let mut report = String::new();
    if !kernel.ok() {
        // A bug in the suite (or the machine), not in the shim.
        let _ = writeln!(
            report,
            "  the KERNEL run failed ({}): fix the program\n  stderr:\n{}",
            kernel.status_text(),
            tail(&kernel.stderr, STDERR_TAIL)
        );
    }
    if !shim.ok() {
        let _ = writeln!(report, "  shim run: {}", shim.status_text());
    }
    if kernel.stdout != shim.stdout {
        let _ = writeln!(
            report,
            "  stdout differs (- kernel, + shim):\n{}",
            line_diff(&kernel.stdout, &shim.stdout)
        );
    }
    if report.is_empty() {
        return None;
    }
    let _ = writeln!(
        report,
        "  shim stderr (tail):\n{}",
        tail(&shim.stderr, STDERR_TAIL)
    );
    Some(format!("== {name}\n{report}"))
}

#[test]
fn conformance_suite_matches_the_kernel() -> Result<()> {
    let names = programs()?;
    let work = std::env::temp_dir().join(format!("hs-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    compile(&names, &work)?;
    let launcher = bin("hoststack")?;

    let tb = Testbed::new()?;
    let mut d = Daemon::start(&tb, &[])?;
    let mut failures = Vec::new();
    for name in &names {
        let prog = work.join(name);
        let mut plain = Command::new(&prog);
        plain.current_dir(&work).env_remove("LD_PRELOAD");
        let kernel = run_bounded(plain, &work, &format!("{name}.kernel"))?;

        let mut shimmed = Command::new(&launcher);
        shimmed
            .args(["run", "--strict", "--"])
            .arg(&prog)
            .current_dir(&work)
            .env_remove("LD_PRELOAD")
            .envs(d.env());
        let shim = run_bounded(shimmed, &work, &format!("{name}.shim"))?;

        let verdict = compare(name, &kernel, &shim);
        eprintln!(
            "conformance: {name}: {} ({} lines)",
            if verdict.is_some() { "DIFFERS" } else { "ok" },
            kernel.stdout.lines().count()
        );
        failures.extend(verdict);
        if !d.alive() {
            failures.push(format!(
                "== hoststackd died during {name}; the remaining programs were not run\n  \
                 daemon log (tail):\n{}",
                tail(&d.log_text(), 40)
            ));
            break;
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} conformance programs differ from the kernel (outputs kept in {}):\n\n{}",
        failures.len(),
        names.len(),
        work.display(),
        failures.join("\n")
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
