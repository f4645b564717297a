//! Echo client over hoststack: sends `--count` messages of `--size` bytes,
//! one at a time (ping-pong), checks every echo and prints round-trip
//! latency percentiles.
//!
//! `echo_client --connect 198.18.0.2:7000 --count 1000 --size 64`
use clap::Parser;
use session_api::client::{App, AttachConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Server address.
    #[arg(long)]
    connect: SocketAddr,
    /// Messages to send.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Use UDP instead of TCP.
    #[arg(long)]
    udp: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let app = App::attach(&AttachConfig::from_env("echo_client"))?;
    let mut w = app.worker()?;
    let t = Some(Duration::from_secs(10));
    let mut lat = Vec::with_capacity(a.count);
    let mut buf = vec![0u8; a.size.max(1)];
    if a.udp {
        let s = w.udp_connect(a.connect)?;
        for i in 0..a.count {
            let msg: Vec<u8> = (0..a.size).map(|j| (i + j) as u8).collect();
            let t0 = Instant::now();
            w.send_to(s, &msg, None, t)?;
            let (n, _) = w.recv_from(s, &mut buf, t)?;
            lat.push(t0.elapsed());
            if buf[..n] != msg[..] {
                return Err(format!("datagram {i}: echo mismatch").into());
            }
        }
    } else {
        let s = w.connect(a.connect, t)?;
        w.set_nodelay(s, true)?;
        for i in 0..a.count {
            let msg: Vec<u8> = (0..a.size).map(|j| (i + j) as u8).collect();
            let t0 = Instant::now();
            w.write_all(s, &msg, t)?;
            let mut got = 0;
            while got < a.size {
                let n = w.read(s, &mut buf[got..], t)?;
                if n == 0 {
                    return Err("server closed early".into());
                }
                got += n;
            }
            lat.push(t0.elapsed());
            if buf[..a.size] != msg[..] {
                return Err(format!("message {i}: echo mismatch").into());
            }
        }
        w.close(s)?;
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!(
        "ok {} messages of {} B: rtt p50 {:.1} us p99 {:.1} us",
        a.count,
        a.size,
        p(0.5),
        p(0.99)
    );
    Ok(())
}
