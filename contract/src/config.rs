//! Configuration files, the same way for every Tailgate process.
//!
//! - The YAML file is deserialized into a process's `Raw*` type: unknown
//!   keys are errors, and every key has a default, so no file is needed.
//! - `TAILGATE_<SECTION>__<KEY>` environment variables are laid over it.
//! - One pass of checks ([`Validate`]) turns it into the runtime type with
//!   checked types. It reports every problem at once, each with where its
//!   key was set: `file:line:column`, or the environment variable. Values
//!   out of range are refused, never clamped.

use crate::{backoff::Backoff, listen::ConnectionLimits};
use serde::{Deserialize, Serialize, de::DeserializeOwned, de::IgnoredAny};
use serde_saphyr::Spanned;
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    marker::PhantomData,
    net::SocketAddr,
    num::NonZeroUsize,
    path::Path,
    time::Duration,
};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TAILGATE_";
/// Separates the section from the key in an override: `TAILGATE_BUFFER__MAX_BUFFER_BYTES`.
const ENV_SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{0}")]
    Invalid(Invalid),
}

/// Where each `section.key` got its value, if not from its default.
#[derive(Debug, Clone, Default)]
pub struct Origins(HashMap<String, String>);

impl Origins {
    fn of(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The position of every `section: key:` value in the file.
    fn in_file(path: &str, text: &str) -> Self {
        type Sections = BTreeMap<String, Option<BTreeMap<String, Spanned<IgnoredAny>>>>;
        let mut origins = HashMap::new();
        // The typed parse already succeeded; this one only adds positions.
        if let Ok(Some(sections)) = serde_saphyr::from_str::<Option<Sections>>(text) {
            for (section, keys) in sections {
                for (key, value) in keys.into_iter().flatten() {
                    let at = value.referenced;
                    origins.insert(
                        format!("{section}.{key}"),
                        format!("{path}:{}:{}", at.line(), at.column()),
                    );
                }
            }
        }
        Self(origins)
    }
}

/// A raw configuration with where its values came from.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub raw: T,
    pub origins: Origins,
}

impl<T: Validate> Loaded<T> {
    /// Checks every value; the error lists every problem, located.
    pub fn validate(&self) -> Result<T::Valid, ConfigError> {
        self.raw.validate_at(&self.origins)
    }
}

/// Loading for any configuration file of Tailgate.
pub trait ConfigFile: Serialize + DeserializeOwned + Default {
    /// Reads `path` (or the defaults when `None`) and applies the overrides
    /// in `env`, which is `std::env::vars()` in production.
    fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded<Self>, ConfigError> {
        let (raw, mut origins) = match path {
            None => (Self::default(), Origins::default()),
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let raw = Self::from_yaml(&text).map_err(|message| ConfigError::Parse {
                    path: shown.clone(),
                    message,
                })?;
                (raw, Origins::in_file(&shown, &text))
            }
        };
        let (raw, set) = raw.overridden(env)?;
        for (key, var) in set {
            origins.0.insert(key, format!("environment variable {var}"));
        }
        Ok(Loaded { raw, origins })
    }

    /// Parses YAML; the error names the line and column.
    fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Lays `TAILGATE_<SECTION>__<KEY>=value` variables over the file.
    fn with_env_overrides(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        self.overridden(env).map(|(raw, _)| raw)
    }

    /// The same, and which `section.key` each variable set.
    ///
    /// A value is read as the type the key already has, so
    /// `TAILGATE_RABBITMQ__EXCHANGE=123` stays a string; other `TAILGATE_*`
    /// variables (without `__`) are not configuration.
    fn overridden(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<(String, String)>), ConfigError> {
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
            .collect();
        if overrides.is_empty() {
            return Ok((self, Vec::new()));
        }
        overrides.sort();
        let env_err = |var: &str, message: String| ConfigError::Env {
            var: var.to_owned(),
            message,
        };
        let mut tree = serde_json::to_value(&self).map_err(|e| env_err("*", e.to_string()))?;
        let mut set = Vec::with_capacity(overrides.len());
        for (var, value) in &overrides {
            let path = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let Some((section, key)) = path.split_once(ENV_SEPARATOR) else {
                continue;
            };
            let slot = tree
                .get_mut(section)
                .and_then(|s| s.get_mut(key))
                .ok_or_else(|| env_err(var, format!("no configuration key {section}.{key}")))?;
            *slot = match slot {
                serde_json::Value::String(_) => serde_json::Value::String(value.clone()),
                // An unset optional key: a number or boolean if it reads as one, else text.
                serde_json::Value::Null => serde_json::from_str(value)
                    .unwrap_or_else(|_| serde_json::Value::String(value.clone())),
                _ => serde_json::from_str(value)
                    .map_err(|e| env_err(var, format!("cannot read {value:?}: {e}")))?,
            };
            set.push((format!("{section}.{key}"), var.clone()));
        }
        let raw = serde_json::from_value(tree).map_err(|e| env_err("TAILGATE_*", e.to_string()))?;
        Ok((raw, set))
    }
}

impl<T: Serialize + DeserializeOwned + Default> ConfigFile for T {}

/// A raw configuration (or one section of it) that checks itself into its
/// runtime type.
pub trait Validate {
    type Valid;

    /// Checks every value, adding each problem to `problems`. Where a
    /// value is refused, a stand-in takes its place so the checks go on;
    /// the result is used only when there was no problem at all.
    fn check(&self, problems: &mut Problems) -> Self::Valid;

    /// Checks, and reports every problem without locations.
    fn validate(&self) -> Result<Self::Valid, ConfigError> {
        self.validate_at(&Origins::default())
    }

    /// Checks, and reports every problem with where its key was set.
    fn validate_at(&self, origins: &Origins) -> Result<Self::Valid, ConfigError> {
        let mut problems = Problems::default();
        let valid = self.check(&mut problems);
        if problems.0.is_empty() {
            Ok(valid)
        } else {
            Err(ConfigError::Invalid(Invalid::new(problems, origins)))
        }
    }
}

/// What one pass of checks found wrong: `section.key` and why.
#[derive(Debug, Default)]
pub struct Problems(Vec<(&'static str, String)>);

impl Problems {
    pub fn add(&mut self, key: &'static str, message: impl Into<String>) {
        self.0.push((key, message.into()));
    }

    /// `Ok`'s value, or `None` with the error as `key`'s problem.
    pub fn check<T, E: fmt::Display>(&mut self, key: &'static str, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.add(key, e.to_string())).ok()
    }

    /// The secret in the file at `path` (a mounted Kubernetes Secret, say),
    /// without its trailing line break; `None` when `path` is empty, or
    /// with `key`'s problem when the file cannot be read. The problem names
    /// the file, never its content.
    pub fn secret_file(&mut self, key: &'static str, path: &str) -> Option<Secret> {
        if path.is_empty() {
            return None;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => Some(Secret::new(text.trim_end_matches(['\n', '\r']))),
            Err(e) => {
                self.add(key, format!("cannot read {path}: {e}"));
                None
            }
        }
    }

    /// A duration in seconds, zero or more.
    pub fn secs(&mut self, key: &'static str, value: f64) -> Duration {
        Duration::try_from_secs_f64(value).unwrap_or_else(|_| {
            self.add(
                key,
                format!("must be a non-negative number of seconds, got {value}"),
            );
            Duration::ZERO
        })
    }

    /// A duration in seconds, at least `min`.
    pub fn secs_at_least(&mut self, key: &'static str, value: f64, min: Duration) -> Duration {
        match Duration::try_from_secs_f64(value) {
            Ok(d) if d >= min => d,
            _ => {
                let min_secs = min.as_secs_f64();
                self.add(key, format!("must be at least {min_secs} s, got {value}"));
                min
            }
        }
    }

    /// Whole seconds, at least `min`.
    pub fn whole_secs_at_least(&mut self, key: &'static str, value: u64, min: u64) -> Duration {
        if value < min {
            self.add(key, format!("must be at least {min}, got {value}"));
        }
        Duration::from_secs(value.max(min))
    }

    /// A retry loop's backoff: from [`Backoff::FIRST`] up to `max_secs`,
    /// which must be at least one second.
    pub fn backoff(&mut self, key: &'static str, max_secs: u64) -> Backoff {
        let max = self.whole_secs_at_least(key, max_secs, 1);
        self.check(key, Backoff::try_new(Backoff::FIRST, max))
            .unwrap_or_default()
    }

    pub fn nonzero(&mut self, key: &'static str, value: usize) -> NonZeroUsize {
        NonZeroUsize::new(value).unwrap_or_else(|| {
            self.add(key, "must be greater than 0");
            NonZeroUsize::MIN
        })
    }

    pub fn addr(&mut self, key: &'static str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|e| {
            self.add(key, format!("{value:?} is not an address:port ({e})"));
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }
}

/// Every problem of a configuration, one per line, each with where its
/// key was set.
#[derive(Debug)]
pub struct Invalid(Vec<String>);

impl Invalid {
    fn new(problems: Problems, origins: &Origins) -> Self {
        Self(
            problems
                .0
                .into_iter()
                .map(|(key, message)| match origins.of(key) {
                    Some(origin) => format!("{origin}: {key}: {message}"),
                    None => format!("{key}: {message}"),
                })
                .collect(),
        )
    }

    /// Each problem, as printed.
    pub fn problems(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => f.write_str(one),
            many => {
                write!(f, "{} problems in the configuration:", many.len())?;
                many.iter().try_for_each(|p| write!(f, "\n  {p}"))
            }
        }
    }
}

impl std::error::Error for Invalid {}

/// A password or token: shown as `<redacted>` wherever the configuration is
/// printed or logged; only [`Secret::expose`] gives the value, to the client
/// that sends it.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

/// A process's own default admin port, for [`RawAdmin`].
pub trait DefaultPort {
    const PORT: u16;
}

/// The admin section, defaulting to the port `P` names.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct RawAdmin<P: DefaultPort> {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: String,
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A new connection's first bytes, a request's headers, and an idle
    /// keep-alive connection's next request must come within this.
    pub header_read_timeout_secs: f64,
    #[serde(skip)]
    port: PhantomData<fn() -> P>,
}

impl<P: DefaultPort> Default for RawAdmin<P> {
    fn default() -> Self {
        Self {
            listen: format!("0.0.0.0:{}", P::PORT),
            max_connections: 64,
            header_read_timeout_secs: 10.0,
            port: PhantomData,
        }
    }
}

impl<P: DefaultPort> Clone for RawAdmin<P> {
    fn clone(&self) -> Self {
        Self {
            listen: self.listen.clone(),
            max_connections: self.max_connections,
            header_read_timeout_secs: self.header_read_timeout_secs,
            port: PhantomData,
        }
    }
}

impl<P: DefaultPort> fmt::Debug for RawAdmin<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawAdmin")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout_secs", &self.header_read_timeout_secs)
            .finish()
    }
}

/// The admin port, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub limits: ConnectionLimits,
}

impl<P: DefaultPort> Validate for RawAdmin<P> {
    type Valid = Admin;

    fn check(&self, p: &mut Problems) -> Admin {
        Admin {
            listen: p.addr("admin.listen", &self.listen),
            limits: ConnectionLimits {
                max_connections: p
                    .nonzero("admin.max_connections", self.max_connections)
                    .get(),
                header_read_timeout: p.secs_at_least(
                    "admin.header_read_timeout_secs",
                    self.header_read_timeout_secs,
                    Duration::from_millis(100),
                ),
                // Scrapers and probes: the OTLP ports' keep-alive defaults.
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(20),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// After SIGTERM: how long the process may take to finish what it holds.
    pub grace_secs: u64,
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self { grace_secs: 25 }
    }
}

impl Validate for RawShutdown {
    type Valid = Duration;

    fn check(&self, _: &mut Problems) -> Duration {
        Duration::from_secs(self.grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Port9999 {}
    impl DefaultPort for Port9999 {
        const PORT: u16 = 9999;
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Raw {
        admin: RawAdmin<Port9999>,
        limits: Limits,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        wait_secs: f64,
        bytes: usize,
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                wait_secs: 1.0,
                bytes: 10,
            }
        }
    }

    impl Validate for Raw {
        type Valid = (SocketAddr, Duration, NonZeroUsize);

        fn check(&self, p: &mut Problems) -> Self::Valid {
            (
                self.admin.check(p).listen,
                p.secs("limits.wait_secs", self.limits.wait_secs),
                p.nonzero("limits.bytes", self.limits.bytes),
            )
        }
    }

    fn write(text: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    /// A tiny temporary file for the tests below.
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "tailgate-config-{}-{}.yaml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                Self(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    /// Every problem is reported at once, each at the line and column of
    /// its value in the file, or naming the variable that set it.
    #[test]
    fn every_problem_is_reported_where_it_was_set() {
        let file = write("admin:\n  listen: nowhere\nlimits:\n  wait_secs: -1\n");
        let env = [("TAILGATE_LIMITS__BYTES".to_owned(), "0".to_owned())];
        let err = Raw::load(Some(&file.0), env)
            .unwrap()
            .validate()
            .unwrap_err();
        let ConfigError::Invalid(invalid) = err else {
            panic!("{err}")
        };
        let shown = file.0.display();
        assert_eq!(invalid.problems().len(), 3, "{invalid}");
        assert!(
            invalid.problems()[0].starts_with(&format!("{shown}:2:11: admin.listen: ")),
            "{invalid}"
        );
        assert!(
            invalid.problems()[1].starts_with(&format!("{shown}:4:14: limits.wait_secs: ")),
            "{invalid}"
        );
        assert_eq!(
            invalid.problems()[2],
            "environment variable TAILGATE_LIMITS__BYTES: limits.bytes: must be greater than 0"
        );
        assert!(invalid.to_string().starts_with("3 problems"), "{invalid}");
    }

    /// A secret prints as `<redacted>` (or as empty, when it is).
    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "<redacted>");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(Secret::new("hunter2").expose(), "hunter2");
    }

    /// Without a file, defaults apply and problems name only their key.
    #[test]
    fn defaults_and_unlocated_problems() {
        let (addr, wait, bytes) = Raw::default().validate().unwrap();
        assert_eq!(addr.port(), 9999);
        assert_eq!((wait.as_secs(), bytes.get()), (1, 10));
        let mut raw = Raw::default();
        raw.limits.bytes = 0;
        let err = raw.validate().unwrap_err().to_string();
        assert_eq!(err, "limits.bytes: must be greater than 0");
    }
}
