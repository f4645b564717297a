//! `hoststackctl`: inspect a running hoststackd.
use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::PathBuf;

/// Show apps, workers, sessions, interfaces and counters of a running
/// hoststackd (queried over ctl.sock in its socket directory).
#[derive(Parser, Debug)]
#[command(name = "hoststackctl", version)]
struct Cli {
    /// What to show.
    #[arg(value_enum, default_value = "all")]
    what: What,
    /// Daemon socket directory.
    #[arg(long, default_value = "/run/hoststack", env = "HOSTSTACK_SOCKET_DIR")]
    socket_dir: PathBuf,
    /// Print raw JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum What {
    All,
    Apps,
    Workers,
    Sessions,
    Interfaces,
    Counters,
}

fn query(dir: &std::path::Path, what: &str) -> Result<Value> {
    let path = dir.join("ctl.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach hoststackd at {} (is it running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(format!("{what}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("reading reply")?;
    serde_json::from_str(&out).context("daemon sent invalid JSON")
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let text = render(&cli)?;
    // A reader that stops early (`| head`) is not an error.
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r.context("writing to stdout")?),
    }
}

/// The whole report as text.
fn render(cli: &Cli) -> Result<String> {
    let mut o = String::new();
    let what = format!("{:?}", cli.what).to_lowercase();
    let v = query(&cli.socket_dir, &what)?;
    if cli.json {
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(o);
    }
    if let Some(apps) = v.get("apps").and_then(|a| a.as_array()) {
        writeln!(o, "APPS")?;
        writeln!(
            o,
            "{:>4} {:<16} {:<10} {:>7} {:>8} {:>12}",
            "id", "name", "namespace", "pid", "workers", "shm"
        )?;
        for a in apps {
            let nw = a["workers"].as_array().map_or(0, |w| w.len());
            writeln!(
                o,
                "{:>4} {:<16} {:<10} {:>7} {:>8} {:>12}",
                s(&a["id"]),
                s(&a["name"]),
                s(&a["namespace"]),
                s(&a["pid"]),
                nw,
                s(&a["shm_bytes"])
            )?;
            if matches!(cli.what, What::Workers | What::All) {
                for w in a["workers"].as_array().into_iter().flatten() {
                    writeln!(
        o,
                        "       worker {:>3}: requests {:>10} events {:>10} wakeups {:>8} backlog {} wake channels {}",
                        s(&w["index"]), s(&w["requests"]), s(&w["events"]), s(&w["wakeups"]), s(&w["backlog"]), s(&w["channels"])
                    )?;
                }
            }
        }
        writeln!(o)?;
    }
    if let Some(ls) = v.get("listeners").and_then(|a| a.as_array()) {
        writeln!(o, "LISTENERS")?;
        for l in ls {
            writeln!(o, "  app {} worker {} {}", s(&l[1]), s(&l[2]), s(&l[3]))?;
        }
        writeln!(o)?;
    }
    if let Some(ss) = v.get("sessions").and_then(|a| a.as_array()) {
        writeln!(o, "SESSIONS ({})", ss.len())?;
        writeln!(
            o,
            "{:>12} {:>4} {:>3} {:<4} {:<11} {:<12} {:<26} {:<26} {:>12} {:>12} {:>15}",
            "handle",
            "app",
            "wk",
            "prot",
            "path",
            "state",
            "local",
            "remote",
            "rx_bytes",
            "tx_bytes",
            "fifo rx/tx"
        )?;
        for x in ss {
            writeln!(
                o,
                "{:>12} {:>4} {:>3} {:<4} {:<11} {:<12} {:<26} {:<26} {:>12} {:>12} {:>7}/{:<7}",
                s(&x["handle"]),
                s(&x["app"]),
                s(&x["worker"]),
                s(&x["proto"]),
                s(&x["path"]),
                s(&x["state"]),
                s(&x["local"]),
                s(&x["remote"]),
                s(&x["rx_bytes"]),
                s(&x["tx_bytes"]),
                s(&x["rx_fifo"]),
                s(&x["tx_fifo"])
            )?;
        }
        writeln!(o)?;
    }
    if let Some(is) = v.get("interfaces").and_then(|a| a.as_array()) {
        writeln!(o, "INTERFACES")?;
        for i in is {
            writeln!(
                o,
                "  {} ({}) mac {} mtu {} ipv4 {} ipv6 {} gw4 {} gw6 {}",
                s(&i["name"]),
                s(&i["kind"]),
                s(&i["mac"]),
                s(&i["mtu"]),
                s(&i["ipv4"]),
                s(&i["ipv6"]),
                s(&i["gateway4"]),
                s(&i["gateway6"])
            )?;
            if let Some(st) = i["stats"].as_object() {
                let kv: Vec<String> = st.iter().map(|(k, v)| format!("{k} {v}")).collect();
                writeln!(o, "    {}", kv.join(", "))?;
            }
        }
        writeln!(o)?;
    }
    if let Some(c) = v.get("counters") {
        writeln!(o, "COUNTERS")?;
        writeln!(o, "{}", serde_json::to_string_pretty(c)?)?;
    }
    Ok(o)
}
