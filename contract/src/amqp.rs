//! The broker connection, as both processes open it, and the exchange
//! declaration both sides make.
//!
//! The gateway publishes to the exchange and the ingester binds its queue
//! to it; each declares it the same way, so either may start first.

use crate::config::Problems;
use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
    uri::AMQPUri,
};
use std::{fmt, str::FromStr};

/// Where the broker is and who to be there: one type for the gateway (a
/// publisher) and the ingester (a consumer). The one place a connection is
/// opened, so that TLS settings, when they come, apply to both.
///
/// The default is RabbitMQ's out of the box: `amqp://guest:guest@localhost:5672/%2f`.
#[derive(Clone, Default)]
pub struct AmqpConfig {
    uri: AMQPUri,
}

impl AmqpConfig {
    /// Checks an `amqp://user:password@host:port/vhost` URL (the vhost
    /// URL-encoded: `%2f` is `/`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri = AMQPUri::from_str(url)?;
        Ok(Self { uri })
    }

    /// The broker from `rabbitmq.url`, or from the file `rabbitmq.url_file`
    /// names when it is set; a problem otherwise. A URL read from a file
    /// is a secret: its problem does not quote it.
    pub fn checked(p: &mut Problems, url: &str, url_file: &str) -> Self {
        match p.secret_file("rabbitmq.url_file", url_file) {
            Some(secret) => Self::parse(secret.expose()).unwrap_or_else(|_| {
                p.add(
                    "rabbitmq.url_file",
                    format!("{url_file} does not hold a valid AMQP URL"),
                );
                Self::default()
            }),
            None if !url_file.is_empty() => Self::default(),
            None => p
                .check("rabbitmq.url", Self::parse(url))
                .unwrap_or_default(),
        }
    }

    /// Opens a connection that names itself `name` in the broker's UI.
    pub async fn connect(&self, name: &str) -> Result<Connection, lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        Connection::connect_uri(self.uri.clone(), props).await
    }
}

/// The URL without its password, for logs and `--check-config`.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = &self.uri.scheme;
        let a = &self.uri.authority;
        let password = if a.userinfo.password.is_empty() {
            ""
        } else {
            ":<redacted>"
        };
        write!(
            f,
            "\"{scheme}://{}{password}@{}:{}/{}\"",
            a.userinfo.username,
            a.host,
            a.port,
            self.uri.vhost.replace('/', "%2f")
        )
    }
}

/// A channel in publisher-confirm mode: every publish is answered by the
/// broker with an ack (stored) or a nack (refused).
pub async fn confirmed_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The kept traces' exchange: a durable topic exchange.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The password never shows in what is printed; the rest does.
    #[test]
    fn debug_hides_the_password() {
        let c = AmqpConfig::parse("amqp://tailgate:s3cret@rabbit:5672/%2f").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown, "\"amqp://tailgate:<redacted>@rabbit:5672/%2f\"");
    }

    /// `rabbitmq.url_file` wins over `rabbitmq.url`, without its trailing
    /// line break; a missing file or one that holds no AMQP URL is a
    /// problem of that key that names the file and never quotes it.
    #[test]
    fn the_url_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("tailgate-url-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("url");
        std::fs::write(&good, "amqp://tg:s3cret@rabbit:5672/%2f\n").unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, "http://tg:s3cret@rabbit\n").unwrap();
        let path = |p: &std::path::Path| p.display().to_string();

        let mut p = Problems::default();
        let c = AmqpConfig::checked(&mut p, "amqp://guest:guest@localhost/%2f", &path(&good));
        assert_eq!(format!("{p:?}"), "Problems([])");
        assert_eq!(format!("{c:?}"), "\"amqp://tg:<redacted>@rabbit:5672/%2f\"");

        for file in [bad, dir.join("missing")] {
            let mut p = Problems::default();
            AmqpConfig::checked(&mut p, "amqp://guest:guest@localhost/%2f", &path(&file));
            let problems = format!("{p:?}");
            assert!(problems.contains("rabbitmq.url_file"), "{problems}");
            assert!(problems.contains(&path(&file)), "{problems}");
            assert!(!problems.contains("s3cret"), "{problems}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A URL that is not an AMQP URL is refused with the reason.
    #[test]
    fn bad_urls_are_refused() {
        assert!(AmqpConfig::parse("http://rabbit").is_err());
        assert!(AmqpConfig::parse("amqp://rabbit:notaport/").is_err());
    }
}
