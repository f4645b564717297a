//! Echo server over hoststack: TCP (many connections, one worker, event
//! driven) and optionally UDP on the same port.
//!
//! `echo_server --listen 0.0.0.0:7000 [--udp]`
use clap::Parser;
use session_api::client::{App, AttachConfig, Error, Notify, SessionId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
    listen: SocketAddr,
    /// Also echo UDP datagrams on the same address.
    #[arg(long)]
    udp: bool,
    /// Exit after serving this many TCP connections (0 = never).
    #[arg(long, default_value_t = 0)]
    max_conns: u64,
}

struct Conn {
    pending: Vec<u8>,
    done: usize,
}

fn service(
    w: &mut session_api::client::Worker,
    s: SessionId,
    c: &mut Conn,
    buf: &mut [u8],
) -> Result<bool, Error> {
    loop {
        while c.done < c.pending.len() {
            match w.write(s, &c.pending[c.done..], Some(Duration::ZERO)) {
                Ok(n) => c.done += n,
                Err(Error::WouldBlock) => return Ok(true),
                Err(e) => return Err(e),
            }
        }
        c.pending.clear();
        c.done = 0;
        match w.read(s, buf, Some(Duration::ZERO)) {
            Ok(0) => return Ok(false),
            Ok(n) => c.pending.extend_from_slice(&buf[..n]),
            Err(Error::WouldBlock) => return Ok(true),
            Err(e) => return Err(e),
        }
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
    let app = App::attach(&AttachConfig::from_env("echo_server"))?;
    let mut w = app.worker()?;
    let l = w.listen(a.listen)?;
    let udp = if a.udp {
        Some(w.udp_bind(a.listen)?)
    } else {
        None
    };
    println!("listening on {}", a.listen);
    let mut conns: HashMap<SessionId, Conn> = HashMap::new();
    let mut notes = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut served = 0u64;
    loop {
        notes.clear();
        w.poll_events(&mut notes, Some(Duration::from_secs(1)))?;
        for n in notes.drain(..) {
            match n {
                Notify::Accept(_) => loop {
                    match w.accept(l, Some(Duration::ZERO)) {
                        Ok(s) => {
                            conns.insert(
                                s,
                                Conn {
                                    pending: Vec::new(),
                                    done: 0,
                                },
                            );
                            // Data may have arrived before we looked.
                            let c = conns.get_mut(&s).expect("inserted");
                            if !matches!(service(&mut w, s, c, &mut buf), Ok(true)) {
                                conns.remove(&s);
                                let _ = w.close(s);
                                served += 1;
                            }
                        }
                        Err(Error::WouldBlock) => break,
                        Err(e) => return Err(e.into()),
                    }
                },
                Notify::Readable(s) | Notify::Writable(s) if Some(s) == udp => {
                    while let Ok((k, from)) = w.recv_from(s, &mut buf, Some(Duration::ZERO)) {
                        let data = buf[..k].to_vec();
                        let _ = w.send_to(s, &data, from, Some(Duration::from_secs(1)));
                    }
                }
                Notify::Readable(s) | Notify::Writable(s) => {
                    let Some(c) = conns.get_mut(&s) else { continue };
                    match service(&mut w, s, c, &mut buf) {
                        Ok(true) => {}
                        Ok(false) | Err(_) => {
                            conns.remove(&s);
                            let _ = w.close(s);
                            served += 1;
                        }
                    }
                }
                Notify::Connected(_) => {}
            }
        }
        if a.max_conns > 0 && served >= a.max_conns && conns.is_empty() {
            println!("served {served} connections");
            return Ok(());
        }
    }
}
