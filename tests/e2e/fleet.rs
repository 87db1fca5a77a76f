//! The real parts of a fleet, started on free loopback ports and stopped when dropped: Redis
//! servers (`redis-server` from Debian's packages; `tests/run.sh` installs it), a Redis
//! Cluster made with `redis-cli --cluster create`, and the counter service.

use crate::{counters_bin, free_port, try_request};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} not ready in 30 s");
}

/// `redis-cli -p PORT ARGS...`, its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (tests/run.sh installs redis-server, which has it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `redis-server` on loopback, without persistence; killed when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port(), false)
    }

    fn start_on(port: u16, cluster: bool) -> Redis {
        let dir =
            std::env::temp_dir().join(format!("apim-edge-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            child: None,
            port,
            dir,
            cluster,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as a crash: SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on its port (empty, unless a cluster node keeps its config).
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP makes a slow Redis for the timeout tests.
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server runs (tests/run.sh installs it)"),
        );
        let port = self.port;
        wait_for("redis-server", || {
            redis_cli(port, &["ping"]).trim() == "PONG"
        });
    }

    /// The keys the server holds.
    pub fn keys(&self) -> Vec<String> {
        redis_cli(self.port, &["--scan"])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` masters (no replicas).
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<Redis> = (0..n).map(|_| Redis::start_on(free_port(), true)).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let port = nodes[0].port;
        wait_for("the cluster", || {
            redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok")
        });
        RedisCluster { nodes }
    }

    /// `--redis-cluster`'s list.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The counter service, `apim-edge-counters`; killed when dropped.
pub struct CounterService {
    child: Option<Child>,
    pub port: u16,
    pub admin: u16,
    args: Vec<String>,
    pub log: PathBuf,
}

impl CounterService {
    /// Serves the counters of the Redis at `redis_url`.
    pub fn start(redis_url: &str) -> CounterService {
        Self::start_with(&["--redis", redis_url])
    }

    /// Serves with these flags (besides `--listen` and `--admin`).
    pub fn start_with(args: &[&str]) -> CounterService {
        let (port, admin) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!(
            "apim-edge-counters-{}-{port}.log",
            std::process::id()
        ));
        let mut s = CounterService {
            child: None,
            port,
            admin,
            args: args.iter().map(|a| a.to_string()).collect(),
            log,
        };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        self.kill();
        let out = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(counters_bin())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--admin", &format!("127.0.0.1:{}", self.admin)])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(out))
            .spawn()
            .expect("apim-edge-counters starts");
        self.child = Some(child);
        let (port, admin) = (self.port, self.admin);
        wait_for("apim-edge-counters", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && try_request(admin, "GET", "/ready", &[]).is_ok_and(|r| r.status == 200)
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().ok()
    }

    /// A metric's value from the admin port (`apim_edge_counters_NAME_total`).
    pub fn metric(&self, name: &str) -> u64 {
        let text = try_request(self.admin, "GET", "/metrics", &[])
            .map(|r| r.body)
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CounterService {
    fn drop(&mut self) {
        self.kill();
    }
}
