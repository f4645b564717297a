//! Launch the real Envoy as an HTTP (and optionally TCP) proxy, under the
//! hoststack shim unless `--kernel`. Writes the config, then execs Envoy,
//! so signals (Ctrl-C, SIGTERM) reach Envoy itself.

use anyhow::{Context, Result};
use clap::Parser;
use envoy_integration::{envoy_args, envoy_bin, static_bootstrap, write_config, Cluster, Listener};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

#[derive(Parser)]
#[command(
    name = "hoststack-envoy",
    about = "Run Envoy as an HTTP/1.1 proxy over hoststack (or the kernel)",
    long_about = "Writes an Envoy config with an HTTP proxy listener (and optionally a TCP proxy \
listener) in front of the --upstream endpoints, then execs `hoststack run -- envoy` \
(Envoy from scripts/setup.sh, or $HOSTSTACK_ENVOY). The attach settings come from the \
environment like for `hoststack run` (HOSTSTACK_SOCKET_DIR, HOSTSTACK_SECRET, ...)."
)]
struct Cli {
    /// Address of the HTTP proxy listener.
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream endpoint(s) (round robin).
    #[arg(long, required = true)]
    upstream: Vec<SocketAddr>,
    /// Also a TCP proxy listener here, to the same upstreams.
    #[arg(long)]
    tcp_listen: Option<SocketAddr>,
    /// Envoy's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Directory for the config and log (default: a new one under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run Envoy on kernel sockets instead of the shim.
    #[arg(long)]
    kernel: bool,
    /// Print the config and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut listeners = vec![Listener::http("ingress", cli.listen, "upstream")];
    if let Some(t) = cli.tcp_listen {
        listeners.push(Listener::tcp("tcp", t, "upstream"));
    }
    let cfg = static_bootstrap(
        cli.admin,
        &listeners,
        &[Cluster::fixed("upstream", &cli.upstream)],
    );
    if cli.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let dir = match cli.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("hoststack-envoy-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let conf = write_config(&dir.join("envoy.json"), &cfg)?;
    let args = envoy_args(&conf, cli.concurrency, &dir.join("envoy.log"));
    let envoy = envoy_bin()?;
    let mut cmd = if cli.kernel {
        Command::new(&envoy)
    } else {
        let me = std::env::current_exe().context("locating hoststack-envoy")?;
        let hs = me.with_file_name("hoststack");
        let mut c = Command::new(&hs);
        c.args(["run", "--"]).arg(&envoy);
        c
    };
    cmd.args(&args);
    eprintln!(
        "hoststack-envoy: config {}, log {}, {} Envoy",
        conf.display(),
        dir.join("envoy.log").display(),
        if cli.kernel { "kernel" } else { "hoststack" }
    );
    let e = cmd.exec();
    Err(e).context("exec")
}
