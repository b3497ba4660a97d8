//! The targets under test as child processes, and what the kernel says they cost (RSS, CPU time).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the clients talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The scripted upstream itself: the baseline.
    Direct,
    /// `target/release/streamgate`.
    Streamgate,
    /// nginx, `proxy_buffering off`, keep-alive upstream.
    Nginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Streamgate => "streamgate",
            Kind::Nginx => "nginx",
        }
    }
}

/// A running target.
pub struct Target {
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// Settings shared by every start.
pub struct Env {
    pub dir: PathBuf,
    pub streamgate: PathBuf,
    pub nginx: Option<PathBuf>,
    /// Prefix for child commands that pins them to a core (`taskset -c 0`), if pinning.
    pub pin: Option<String>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Target {
    /// Starts `kind` in front of `upstream` and waits until it accepts connections.
    pub fn start(kind: Kind, upstream: SocketAddr, env: &Env) -> Result<Self, String> {
        if kind == Kind::Direct {
            return Ok(Self {
                addr: upstream,
                child: None,
            });
        }
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (prog, args): (PathBuf, Vec<String>) = match kind {
            Kind::Streamgate => (
                env.streamgate.clone(),
                vec![
                    "--listen".into(),
                    addr.to_string(),
                    "--upstream".into(),
                    format!("http://{upstream}"),
                    "--max-streams".into(),
                    "20000".into(),
                ],
            ),
            Kind::Nginx => {
                let nginx = env.nginx.clone().ok_or("nginx is not installed")?;
                let conf = env.dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&env.dir, addr, upstream))
                    .map_err(|e| format!("write {}: {e}", conf.display()))?;
                (
                    nginx,
                    vec![
                        "-p".into(),
                        env.dir.display().to_string(),
                        "-e".into(),
                        env.dir.join("nginx-error.log").display().to_string(),
                        "-c".into(),
                        conf.display().to_string(),
                    ],
                )
            }
            Kind::Direct => unreachable!(),
        };
        let log = std::fs::File::create(env.dir.join(format!("{}.log", kind.name())))
            .map_err(|e| format!("log file: {e}"))?;
        let mut cmd = match &env.pin {
            Some(pin) => {
                let mut parts = pin.split_whitespace();
                let mut c = Command::new(parts.next().unwrap());
                c.args(parts).arg(&prog);
                c
            }
            None => Command::new(&prog),
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", prog.display()))?;
        let mut t = Self {
            addr,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(Ok(Some(st))) = t.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "{} exited with {st} (log in {})",
                    kind.name(),
                    env.dir.display()
                ));
            }
            if Instant::now() > deadline {
                t.stop();
                return Err(format!("{} did not listen within 10 s", kind.name()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t)
    }

    /// The target's processes (for nginx: the master and its workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(c) = &self.child else {
            return Vec::new();
        };
        let root = c.id();
        let mut pids = vec![root];
        // `taskset -c 0 prog` execs prog, so the child's pid is the program's. nginx forks workers.
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if parent(pid) == Some(root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Resident memory of the target's processes, bytes.
    pub fn rss(&self) -> u64 {
        self.pids().iter().map(|&p| rss(p)).sum()
    }

    /// CPU time the target's processes have used, ns.
    pub fn cpu_ns(&self) -> u64 {
        self.pids().iter().map(|&p| cpu_ns(p)).sum()
    }

    /// Times the target's threads were scheduled onto a CPU (third field of `schedstat`): each is a
    /// wake-up from sleep or a return after preemption.
    pub fn runs(&self) -> u64 {
        self.pids().iter().map(|&p| runs(p)).sum()
    }

    /// Write system calls the target's processes have made (`syscw` in `/proc/PID/io`; reads made
    /// with `recv` are not counted there, so none are reported).
    pub fn writes(&self) -> u64 {
        self.pids().iter().map(|&p| writes(p)).sum()
    }

    /// Stops the target (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn writes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn rss(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn runs(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// CPU time of the harness's own threads, ns.
pub fn own_cpu_ns() -> u64 {
    cpu_ns(std::process::id())
}

/// Sum of every thread's time on a CPU (schedstat, ns resolution); falls back to utime+stime ticks.
fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    let mut any = false;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                if let Some(ns) = s.split(' ').next().and_then(|v| v.parse::<u64>().ok()) {
                    total += ns;
                    any = true;
                }
            }
        }
    }
    if any {
        return total;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks * 10_000_000
}

fn nginx_conf(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"# The nginx configuration a platform team uses in front of a streaming upstream.
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    upstream up {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"#
    )
}
