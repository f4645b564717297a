//! Bulk transfer over hoststack, checked with SHA-256.
//!
//! `throughput send --connect ADDR --bytes N` sends a deterministic stream;
//! `throughput recv --listen ADDR [--read-delay-us D]` accepts one connection,
//! reads to EOF (optionally slowly) and prints `bytes=N sha256=HEX gbps=X`.
//! Both sides print the SHA-256 of what they sent/received.
use clap::{Parser, Subcommand};
use session_api::client::{App, AttachConfig};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect and send.
    Send {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1 << 28)]
        bytes: u64,
        /// Send a constant buffer and skip hashing (measure the stack, not
        /// the checksum).
        #[arg(long)]
        no_hash: bool,
    },
    /// Listen, accept one connection and receive to EOF.
    Recv {
        #[arg(long)]
        listen: SocketAddr,
        /// Sleep this long after each read (a slow reader).
        #[arg(long, default_value_t = 0)]
        read_delay_us: u64,
        /// Bytes per read call.
        #[arg(long, default_value_t = 256 * 1024)]
        read_size: usize,
        /// Also echo a one-line summary back to the sender before closing.
        #[arg(long)]
        reply: bool,
    },
}

/// The deterministic stream: byte i = (i * 7 + i / 4096) mod 251.
pub fn pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = ((x * 7 + x / 4096) % 251) as u8;
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let app = App::attach(&AttachConfig::from_env("throughput"))?;
    let mut w = app.worker()?;
    match a.cmd {
        Cmd::Send {
            connect,
            bytes,
            no_hash,
        } => {
            let s = w.connect(connect, Some(Duration::from_secs(10)))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let t0 = Instant::now();
            let mut off = 0u64;
            while off < bytes {
                let n = ((bytes - off) as usize).min(buf.len());
                if !no_hash {
                    pattern(off, &mut buf[..n]);
                    h.update(&buf[..n]);
                }
                w.write_all(s, &buf[..n], Some(Duration::from_secs(60)))?;
                off += n as u64;
            }
            w.shutdown(s, session_api::msg::Shut::Write)?;
            // Wait for the peer to finish (EOF) so all bytes were delivered.
            let mut tail = [0u8; 256];
            while w.read(s, &mut tail, Some(Duration::from_secs(60)))? > 0 {}
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "sent bytes={off} sha256={} gbps={:.3}",
                if no_hash {
                    "-".to_string()
                } else {
                    format!("{:x}", h.finalize())
                },
                off as f64 * 8.0 / secs / 1e9
            );
            w.close(s)?;
        }
        Cmd::Recv {
            listen,
            read_delay_us,
            read_size,
            reply,
        } => {
            let l = w.listen(listen)?;
            println!("listening on {listen}");
            let s = w.accept(l, Some(Duration::from_secs(60)))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; read_size.clamp(1, 1 << 24)];
            let mut total = 0u64;
            let t0 = Instant::now();
            loop {
                let n = w.read(s, &mut buf, Some(Duration::from_secs(60)))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
                if read_delay_us > 0 {
                    std::thread::sleep(Duration::from_micros(read_delay_us));
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let line = format!(
                "received bytes={total} sha256={:x} gbps={:.3}",
                h.finalize(),
                total as f64 * 8.0 / secs / 1e9
            );
            println!("{line}");
            if reply {
                w.write_all(
                    s,
                    format!("{line}\n").as_bytes(),
                    Some(Duration::from_secs(10)),
                )?;
            }
            w.close(s)?;
        }
    }
    Ok(())
}
