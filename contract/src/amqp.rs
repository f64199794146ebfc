//! The broker connection, as both processes open it, and the exchange
//! declaration both sides make.
//!
//! The gateway publishes to the exchange and the ingester binds its queue
//! to it; each declares it the same way, so either may start first.

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

    /// A URL that is not an AMQP URL is refused with the reason.
    #[test]
    fn bad_urls_are_refused() {
        assert!(AmqpConfig::parse("http://rabbit").is_err());
        assert!(AmqpConfig::parse("amqp://rabbit:notaport/").is_err());
    }
}
