//! A private nginx site for tests and benchmarks: a document root with
//! known bodies and config files, removed on drop.

use crate::{run, unique_tag};
use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

/// A document root (`www/small`: 64 B, `www/big`: 10 MiB) and its configs.
pub struct Site {
    /// Root directory (configs, logs, `www/`).
    pub dir: PathBuf,
    /// Body of `/small`.
    pub small: Vec<u8>,
    /// Body of `/big`.
    pub big: Vec<u8>,
}

impl Site {
    /// Create a site whose `/small` is 64 bytes of `a..z` starting at `first`.
    pub fn new() -> Result<Site> {
        Site::with_small(b'a')
    }

    /// Like [`Site::new`] with a different `/small` body, so two sites can
    /// be told apart by what they serve.
    pub fn with_small(first: u8) -> Result<Site> {
        let dir = std::env::temp_dir().join(format!("hs-nginx-{}", unique_tag()));
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let small: Vec<u8> = (0..64)
            .map(|i| b'a' + (first - b'a' + i as u8) % 26)
            .collect();
        let mut big = vec![0u8; 10 << 20];
        let mut x = 0x12345678u32 ^ first as u32;
        for b in big.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        std::fs::write(dir.join("www/small"), &small)?;
        std::fs::write(dir.join("www/big"), &big)?;
        // nginx workers run as nobody: the tree must be readable.
        run(&["chmod", "-R", "a+rX", &dir.display().to_string()])?;
        Ok(Site { dir, small, big })
    }

    /// Write `<name>.conf` for `listen` with `workers` worker processes.
    pub fn conf(&self, name: &str, listen: &str, workers: u32) -> Result<PathBuf> {
        self.conf_listens(name, &[listen], workers)
    }

    /// Like [`Site::conf`] with several listen addresses. The settings are
    /// Debian's stock `nginx.conf` ones (`sendfile on; tcp_nopush on`: the
    /// kernel sends header and body in one segment); `/plain/...` serves
    /// the same files with `sendfile off` (nginx's built-in default: `pread`
    /// into a buffer, then `writev`).
    pub fn conf_listens(&self, name: &str, listens: &[&str], workers: u32) -> Result<PathBuf> {
        let d = self.dir.display();
        let listen: String = listens
            .iter()
            .map(|l| format!("listen {l} backlog=4096; "))
            .collect();
        let conf = format!(
            "worker_processes {workers};\ndaemon off;\nerror_log {d}/logs/{name}.err warn;\n\
             pid {d}/{name}.pid;\nevents {{ worker_connections 16384; }}\n\
             worker_rlimit_nofile 40000;\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000000;\n\
             keepalive_timeout 300s; open_file_cache max=64;\n\
             server {{ {listen}root {d}/www;\n\
             location /plain/ {{ sendfile off; alias {d}/www/; }} }} }}\n"
        );
        let p = self.dir.join(format!("{name}.conf"));
        std::fs::write(&p, conf)?;
        Ok(p)
    }

    /// The arguments that run nginx in the foreground with `conf`.
    pub fn args(&self, conf: &std::path::Path) -> Vec<String> {
        vec![
            "nginx".into(),
            "-c".into(),
            conf.display().to_string(),
            "-p".into(),
            self.dir.display().to_string(),
        ]
    }

    /// `nginx -c conf -p dir` as a kernel command.
    pub fn kernel_cmd(&self, conf: &std::path::Path) -> Command {
        let a = self.args(conf);
        let mut c = Command::new(&a[0]);
        c.args(&a[1..]);
        c
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
