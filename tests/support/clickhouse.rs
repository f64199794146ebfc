//! A ClickHouse engine for the tests: the chDB-backed HTTP front in
//! `tests/support/clickhouse-http/` on a free port, or the server named by
//! `TAILGATE_TEST_CLICKHOUSE_URL`, so the same tests run against a real one.

use super::PATIENCE;
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
};

pub struct ClickHouse {
    child: Option<Child>,
    pub url: String,
    dir: Option<PathBuf>,
}

impl ClickHouse {
    pub fn start() -> Self {
        Self::start_at_priority(0)
    }

    /// Like `start`, with the chDB front at CPU priority `nice`.
    pub fn start_at_priority(nice: i32) -> Self {
        Self::spawn(nice, None)
    }

    /// Like `start`, with one user `name` whose password is `password`
    /// instead of `default` without one, as a server with users configured
    /// refuses everyone else. A server named by URL is used as it is.
    pub fn start_with_user(name: &str, password: &str) -> Self {
        Self::spawn(0, Some(format!("{name}:{password}")))
    }

    fn spawn(nice: i32, user: Option<String>) -> Self {
        if let Ok(url) = std::env::var("TAILGATE_TEST_CLICKHOUSE_URL") {
            return Self {
                child: None,
                url,
                dir: None,
            };
        }
        let dir = std::env::temp_dir().join(super::unique("chdb"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/clickhouse-http/server.py"
        );
        let mut child = super::command("python3", nice)
            .arg(script)
            .arg("--data")
            .arg(&dir)
            .args(user.iter().flat_map(|u| ["--user", u.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "python3 for the ClickHouse test engine (README: the test command installs chdb)",
            );
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(PATIENCE)
            .expect("ClickHouse test engine did not start");
        Self {
            child: Some(child),
            url: format!("http://{addr}"),
            dir: Some(dir),
        }
    }

    /// The chDB front's process ID (`None` for a server named by URL).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether this is the chDB front (which tests can take down and hold).
    pub fn is_test_engine(&self) -> bool {
        self.child.is_some()
    }

    pub async fn try_query(&self, sql: &str) -> Result<String, String> {
        let resp = reqwest::Client::new()
            .post(format!("{}/", self.url))
            .body(sql.to_owned())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if ok { Ok(text) } else { Err(text) }
    }

    /// Sends `sql` with the URL parameters `params` (`database=x`, a setting)
    /// and `headers`, as a client would; returns the HTTP status, the
    /// `X-ClickHouse-Exception-Code` header and the body.
    pub async fn request(
        &self,
        params: &[(&str, &str)],
        headers: &[(&str, &str)],
        sql: &str,
    ) -> (u16, Option<String>, String) {
        let url = reqwest::Url::parse_with_params(&format!("{}/", self.url), params)
            .expect("ClickHouse URL");
        let mut req = reqwest::Client::new().post(url).body(sql.to_owned());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("ClickHouse request");
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("X-ClickHouse-Exception-Code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, code, resp.text().await.expect("ClickHouse answer"))
    }

    /// Runs SQL; panics with ClickHouse's message on error.
    pub async fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n{e}"))
    }

    /// The first column of the first row, as a number.
    pub async fn number(&self, sql: &str) -> f64 {
        let text = self.query(sql).await;
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql} gave {text:?}"))
    }

    /// `table` holds exactly `spans` rows, each span once: nothing lost,
    /// nothing stored twice.
    pub async fn assert_each_span_once(&self, table: &str, spans: f64) {
        let rows = self.number(&format!("SELECT count() FROM {table}")).await;
        let distinct = self
            .number(&format!("SELECT uniqExact(TraceId, SpanId) FROM {table}"))
            .await;
        assert_eq!(
            (rows, distinct),
            (spans, spans),
            "rows, distinct spans in {table}"
        );
    }

    /// Rows of a query as JSON objects.
    pub async fn json_rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSONEachRow"))
            .collect()
    }

    /// Changes the test engine's behaviour: `{"down": true}`, `{"hold_inserts": true}`.
    pub async fn control(&self, change: serde_json::Value) -> serde_json::Value {
        assert!(
            self.is_test_engine(),
            "only the chDB test engine can be controlled"
        );
        reqwest::Client::new()
            .post(format!("{}/__control", self.url))
            .body(change.to_string())
            .send()
            .await
            .expect("control")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("control state"))
            .expect("control state")
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
