//! `hoststack`: the user-facing launcher.
//!
//! `hoststack run [OPTIONS] -- CMD ARGS...` runs an unmodified program with
//! its INET sockets served by hoststackd (like `onload CMD`): it sets
//! LD_PRELOAD to libvcl_preload.so and the attach settings, then execs CMD.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hoststack",
    version,
    about = "Run unmodified programs over the hoststack userspace TCP/UDP stack",
    long_about = "Run unmodified programs over the hoststack userspace TCP/UDP stack.\n\n\
    `hoststack run -- nginx -g 'daemon off;'` starts nginx with libvcl_preload.so preloaded: its \
    AF_INET/AF_INET6 TCP and UDP sockets are served by hoststackd through shared memory; every \
    other descriptor (files, pipes, AF_UNIX, netlink, DNS on port 53, and the ports/prefixes \
    listed with --kernel-ports/--kernel-prefixes) stays in the kernel. If the daemon cannot be \
    reached the program runs on kernel sockets with one warning, unless --strict is given."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD with its sockets on hoststack.
    Run(RunArgs),
}

#[derive(Parser)]
struct RunArgs {
    /// hoststackd's socket directory (holds <namespace>.sock).
    #[arg(long, env = "HOSTSTACK_SOCKET_DIR", default_value = "/run/hoststack")]
    socket_dir: PathBuf,
    /// App namespace to attach to.
    #[arg(long, env = "HOSTSTACK_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The namespace's secret.
    #[arg(
        long,
        env = "HOSTSTACK_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    secret: String,
    /// Extra ports whose sockets stay in the kernel (53 always does), comma separated.
    #[arg(long, env = "HOSTSTACK_KERNEL_PORTS", default_value = "")]
    kernel_ports: String,
    /// Address prefixes reached through the kernel, e.g. 10.0.0.0/8,fd00::/8.
    #[arg(long, env = "HOSTSTACK_KERNEL_PREFIXES", default_value = "")]
    kernel_prefixes: String,
    /// Fail socket() with ENETDOWN instead of falling back to kernel sockets
    /// when hoststackd is unreachable.
    #[arg(long, env = "HOSTSTACK_STRICT")]
    strict: bool,
    /// Shim log level on stderr: off, warn, debug.
    #[arg(long, env = "HOSTSTACK_PRELOAD_LOG", default_value = "warn")]
    log: String,
    /// Path of libvcl_preload.so (default: next to this executable).
    #[arg(long, env = "HOSTSTACK_PRELOAD")]
    preload: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

fn preload_path(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating the hoststack executable")?
            .with_file_name("libvcl_preload.so"),
    };
    if !p.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p vcl-preload` or pass --preload",
            p.display()
        );
    }
    Ok(std::fs::canonicalize(&p)?)
}

fn run(a: RunArgs) -> Result<()> {
    let lib = preload_path(a.preload)?;
    if !["off", "0", "warn", "debug"].contains(&a.log.as_str()) {
        bail!("--log must be off, warn or debug, not {:?}", a.log);
    }
    let sock = a.socket_dir.join(format!("{}.sock", a.namespace));
    if !sock.exists() && a.log != "off" {
        eprintln!(
            "hoststack: warning: {} does not exist (is hoststackd running?); {}",
            sock.display(),
            if a.strict {
                "--strict: INET sockets will fail"
            } else {
                "the program will use kernel sockets"
            }
        );
    }
    let mut preload = lib.display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD") {
        if !old.is_empty() {
            preload = format!("{preload}:{old}");
        }
    }
    let mut c = std::process::Command::new(&a.cmd[0]);
    c.args(&a.cmd[1..])
        .env("LD_PRELOAD", preload)
        .env("HOSTSTACK_SOCKET_DIR", &a.socket_dir)
        .env("HOSTSTACK_NAMESPACE", &a.namespace)
        .env("HOSTSTACK_SECRET", &a.secret)
        .env("HOSTSTACK_KERNEL_PORTS", &a.kernel_ports)
        .env("HOSTSTACK_KERNEL_PREFIXES", &a.kernel_prefixes)
        .env("HOSTSTACK_STRICT", if a.strict { "1" } else { "0" })
        .env("HOSTSTACK_PRELOAD_LOG", &a.log);
    let e = c.exec();
    bail!("cannot run {}: {e}", a.cmd[0])
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
    };
    if let Err(e) = r {
        eprintln!("hoststack: error: {e:#}");
        std::process::exit(127);
    }
}
