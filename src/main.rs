//! The `tailgate` command: one binary for the gateway, the ingester and the
//! rules tools, over the libraries that do the work.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::{path::PathBuf, process::ExitCode};
use tailgate_contract::config::ConfigFile;
use tailgate_gateway::{config::RawConfig, node, tools};
use tailgate_ingester::{config::RawIngesterConfig, node as ingester};
use tracing_subscriber::EnvFilter;

// Every buffered span is a few dozen small allocations, freed later on
// another thread; glibc's malloc spent about half the gateway's CPU on
// that (and on re-zeroing pages it returned to the kernel). See
// docs/performance-log.md ("Allocator") for the before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "tailgate", version, about = "Tail-sampling trace gateway")]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "TAILGATE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a gateway node: receive OTLP, buffer whole traces, publish kept ones to RabbitMQ.
    Gateway {
        /// YAML configuration file; every key can be overridden by TAILGATE_<SECTION>__<KEY>.
        #[arg(long, env = "TAILGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Validate the configuration (and the rules file it names), print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Run the ingester: kept traces from RabbitMQ into ClickHouse.
    Ingester {
        /// YAML configuration file; every key can be overridden by TAILGATE_<SECTION>__<KEY>.
        #[arg(long, env = "TAILGATE_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
        #[command(subcommand)]
        command: Option<IngesterCommand>,
    },
    /// Work with a sampling rules file.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Look up a journey (e.g. an order) by its key, or list the stuck ones,
    /// from an ingester that runs the stuck-journey finder.
    Journey {
        /// The journey's name in the rules file, e.g. `order`.
        journey: String,
        /// The journey's key, e.g. an order ID.
        #[arg(required_unless_present = "stuck", conflicts_with = "stuck")]
        key: Option<String>,
        /// List the stuck journeys instead, oldest first.
        #[arg(long)]
        stuck: bool,
        /// The ingester's admin address.
        #[arg(
            long,
            env = "TAILGATE_JOURNEYS_URL",
            default_value = "http://127.0.0.1:8889"
        )]
        url: String,
        /// Print the JSON the ingester answered, not text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum IngesterCommand {
    /// Create or update the ClickHouse schema (database, tables, views, TTLs), then exit.
    Migrate,
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// Validate a rules file: print every error with file:line:column, exit non-zero on any.
    Check { file: PathBuf },
    /// Decide the traces of an OTLP/JSON file with a rules file, and print each decision.
    Test {
        file: PathBuf,
        /// OTLP/JSON: one ExportTraceServiceRequest, or a list of them.
        #[arg(long)]
        traces: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        // Without a SIGTERM handler, Ctrl-C still stops the node cleanly.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Operators read this: the cause chain, no backtrace.
            eprintln!("error: {e:#}");
            // A shutdown that lost acknowledged spans has a code of its own,
            // so that supervisors and alerts can tell it from a failure to start.
            match e.downcast_ref::<node::NodeError>() {
                Some(node::NodeError::Lost { .. }) => ExitCode::from(3),
                _ => ExitCode::from(2),
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gateway {
            config,
            check_config,
        } => {
            let raw = RawConfig::load(config.as_deref(), std::env::vars())?;
            let cfg = raw.validate()?;
            if check_config {
                if let Some(rules) = &cfg.rules.file {
                    println!("{}", tools::check(rules)?);
                }
                println!("configuration is valid");
                println!("{cfg:#?}");
                return Ok(());
            }
            init_logging(cli.log_format);
            node::run(cfg, shutdown_signal())
                .await
                .context("gateway node failed")
        }
        Command::Ingester {
            config,
            check_config,
            command,
        } => {
            let raw = RawIngesterConfig::load(config.as_deref(), std::env::vars())?;
            let cfg = raw.validate()?;
            if check_config {
                println!("configuration is valid");
                println!("{cfg:#?}");
                return Ok(());
            }
            init_logging(cli.log_format);
            match command {
                Some(IngesterCommand::Migrate) => ingester::migrate(&cfg).await?,
                None => ingester::run(cfg, shutdown_signal()).await?,
            }
            Ok(())
        }
        Command::Journey {
            journey,
            key,
            stuck,
            url,
            json,
        } => {
            print!(
                "{}",
                journey_lookup(&url, &journey, key.as_deref(), stuck, json).await?
            );
            Ok(())
        }
        Command::Rules { command } => match command {
            RulesCommand::Check { file } => {
                println!("{}", tools::check(&file)?);
                Ok(())
            }
            RulesCommand::Test { file, traces } => {
                print!("{}", tools::test(&file, &traces)?);
                Ok(())
            }
        },
    }
}

/// `tailgate journey`: asks the ingester's admin port and prints the answer.
async fn journey_lookup(
    url: &str,
    journey: &str,
    key: Option<&str>,
    stuck: bool,
    json: bool,
) -> anyhow::Result<String> {
    use tailgate_ingester::journeys::{Stuck, Timeline, render_stuck, render_timeline};
    let base = url.trim_end_matches('/');
    let mut target = reqwest::Url::parse(base).with_context(|| format!("--url {url:?}"))?;
    match (stuck, key) {
        (true, _) => {
            target.set_path("/journeys/stuck");
            target.query_pairs_mut().append_pair("journey", journey);
        }
        (false, Some(key)) => {
            target
                .path_segments_mut()
                .map_err(|()| anyhow::anyhow!("--url {url:?} cannot have a path"))?
                .extend(["journeys", journey, key]);
        }
        (false, None) => anyhow::bail!("give a key, or --stuck"),
    }
    let response = reqwest::get(target.clone())
        .await
        .with_context(|| format!("cannot reach the ingester at {base}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{target}: {status}: {}", body.trim());
    }
    if json {
        return Ok(format!("{body}\n"));
    }
    Ok(if stuck {
        render_stuck(&serde_json::from_str::<Vec<Stuck>>(&body).context("the ingester's answer")?)
    } else {
        render_timeline(&serde_json::from_str::<Timeline>(&body).context("the ingester's answer")?)
    })
}
