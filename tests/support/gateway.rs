//! `tailgate` child processes (gateway, ingester) on loopback ports picked
//! by the OS, found through the "ready" line they log.

use super::PATIENCE;
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

/// A running `tailgate` process.
pub struct Tailgate {
    child: Option<Child>,
    /// The gateway's internal (peer) address, as it advertises it.
    pub peer: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// Reads standard error into `logs`; ends when the process has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The gateway role.
pub type Gateway = Tailgate;

fn field(line: &serde_json::Value, name: &str) -> Option<SocketAddr> {
    line.get("fields")?.get(name)?.as_str()?.parse().ok()
}

const UNUSED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

impl Tailgate {
    /// Starts a gateway whose ports are all chosen by the OS, publishing to
    /// `exchange` at `amqp_url`; `env` adds `TAILGATE_*` overrides.
    pub fn start(amqp_url: &str, exchange: &str, env: &[(&str, &str)]) -> Self {
        let base = [
            ("TAILGATE_RECEIVER__GRPC_LISTEN", "127.0.0.1:0"),
            ("TAILGATE_RECEIVER__HTTP_LISTEN", "127.0.0.1:0"),
            ("TAILGATE_CLUSTER__LISTEN", "127.0.0.1:0"),
            ("TAILGATE_RABBITMQ__URL", amqp_url),
            ("TAILGATE_RABBITMQ__EXCHANGE", exchange),
            ("TAILGATE_RABBITMQ__MAX_BACKOFF_SECS", "1"),
            ("TAILGATE_BUFFER__DECISION_WAIT_SECS", "0.2"),
        ];
        Self::spawn(&["gateway"], "tailgate gateway ready", &base, env, 0)
    }

    /// Starts an ingester; `env` names its queue, database and so on.
    pub fn ingester(env: &[(&str, &str)]) -> Self {
        Self::ingester_at_priority(env, 0)
    }

    /// Like `ingester`, at CPU priority `nice`.
    pub fn ingester_at_priority(env: &[(&str, &str)], nice: i32) -> Self {
        let base = [
            ("TAILGATE_RABBITMQ__MAX_BACKOFF_SECS", "1"),
            ("TAILGATE_CLICKHOUSE__MAX_BACKOFF_SECS", "1"),
        ];
        Self::spawn(&["ingester"], "tailgate ingester ready", &base, env, nice)
    }

    /// Runs `tailgate <args>` to completion with `env`; returns its output.
    pub fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailgate"));
        cmd.args(args).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run tailgate")
    }

    fn spawn(
        args: &[&str],
        ready_message: &'static str,
        base: &[(&str, &str)],
        env: &[(&str, &str)],
        nice: i32,
    ) -> Self {
        let mut cmd = super::command(env!("CARGO_BIN_EXE_tailgate"), nice);
        cmd.args(args)
            .env("TAILGATE_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("TAILGATE_ADMIN__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in base.iter().chain(env) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start tailgate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                        let msg = json.get("fields").and_then(|f| f.get("message"));
                        if msg.and_then(|m| m.as_str()) == Some(ready_message) {
                            let peer = json["fields"]["peer"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned();
                            let _ = ready_tx.send((
                                field(&json, "grpc"),
                                field(&json, "http"),
                                field(&json, "admin"),
                                peer,
                            ));
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            })
        };
        let ready = ready_rx.recv_timeout(PATIENCE);
        let Ok((grpc, http, Some(admin), peer)) = ready else {
            let _ = child.kill();
            panic!(
                "tailgate {args:?} did not become ready: {:?}\n{}",
                ready,
                logs.lock().unwrap().join("\n")
            );
        };
        let (grpc, http) = (grpc.unwrap_or(UNUSED), http.unwrap_or(UNUSED));
        Self {
            child: Some(child),
            peer,
            grpc,
            http,
            admin,
            logs,
            reader: Some(reader),
        }
    }

    /// The process ID, for its CPU time and memory in /proc.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics body")
    }

    /// Sum of every series of `name` whose labels contain all of `labels`
    /// (`name{…}` lines; 0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_metric(&self.metrics().await, name, labels)
    }

    /// Reads `read` every 20 ms until `done` holds for what it returns;
    /// fails with `what` and the node's logs after `PATIENCE`.
    pub async fn poll<T: std::fmt::Debug>(
        &self,
        what: &str,
        read: impl AsyncFn() -> T,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = read().await;
            if done(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: stayed at {value:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/metrics` until `name` reaches at least `want`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        let what = format!("{name}{labels:?}, wanted {want} or more");
        self.poll(
            &what,
            async || self.metric(name, labels).await,
            |v| *v >= want,
        )
        .await
    }

    /// Polls `/metrics` until `name` is exactly `want` (for gauges that fall).
    pub async fn wait_metric_eq(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let what = format!("{name}{labels:?}, wanted {want}");
        self.poll(
            &what,
            async || self.metric(name, labels).await,
            |v| *v == want,
        )
        .await;
    }

    /// Waits until the process has logged a line containing `needle` (its
    /// standard error is read by a thread of its own, so a line can trail
    /// the metric that counts what it reports).
    pub async fn wait_log(&self, needle: &str) {
        self.poll(
            &format!("a log line with {needle:?}"),
            async || self.logs().contains(needle),
            |found| *found,
        )
        .await;
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        self.poll(
            "/readyz, wanted 200",
            async || self.ready_status().await,
            |s| *s == 200,
        )
        .await;
    }

    /// `GET /readyz` status code.
    pub async fn ready_status(&self) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .expect("readyz")
            .status()
            .as_u16()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_with_logs().0
    }

    /// Sends SIGTERM, waits for the process to exit, and returns its logs too.
    pub fn terminate_with_logs(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), "TERM");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("tailgate did not exit after SIGTERM\n{}", self.logs()))
            .expect("wait");
        // The last lines may still be in the pipe: read it to its end.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.logs())
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("running").id(), signal);
    }

    /// SIGKILL: the process dies at once, whatever it was doing.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
    }
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `name{labels}` summed over several nodes (each scraped once).
pub async fn metric_sum(nodes: &[&Tailgate], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for node in nodes {
        total += node.metric(name, labels).await;
    }
    total
}

pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

impl Drop for Tailgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `spans` field of the first JSON log line whose message starts with
/// `message`; panics with the logs when there is none.
pub fn logged_spans(logs: &str, message: &str) -> f64 {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .and_then(|l| l["fields"]["spans"].as_f64())
        .unwrap_or_else(|| panic!("no {message:?} line with a span count in the logs:\n{logs}"))
}
