//! The RabbitMQ side of the publisher: one connection, one channel in
//! publisher-confirm mode, reconnecting with backoff.
//!
//! Only an `ack` without a return settles a message. A `nack` or a return
//! (`mandatory` and no queue bound) is an error, counted and retried after a
//! backoff; a failed publish, a lost connection or a missing confirm puts the
//! unconfirmed messages back and reconnects.

use super::{OutMessage, Outbox};
use crate::{config, metrics::Metrics};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::time::{Instant, sleep, timeout};
use tracing::{info, warn};

/// Why the publisher gave up its connection. Every kind is retried: nothing
/// in the outbox is ever dropped for a broker problem.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to the broker: {0}")]
    Connect(lapin::Error),
    #[error("connecting to the broker timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("cannot set up the channel or exchange: {0}")]
    Setup(lapin::Error),
    #[error("publish failed: {0}")]
    Publish(lapin::Error),
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker did not put the channel in confirm mode")]
    ConfirmsNotEnabled,
    #[error("the connection to the broker was lost")]
    ConnectionLost,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Runs until aborted: keeps a confirmed channel open and drains the outbox into it.
pub async fn run(cfg: config::Rabbitmq, outbox: Arc<Outbox>, metrics: Arc<Metrics>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match connect(&cfg).await {
            Ok((connection, channel)) => {
                info!(exchange = %cfg.exchange, "connected to the broker");
                metrics.broker_connected.set(1);
                backoff = FIRST_BACKOFF;
                let err = pump(&cfg, &channel, &outbox, &metrics).await;
                metrics.broker_connected.set(0);
                metrics.broker_connection_error();
                warn!(error = %err, unconfirmed = outbox.messages(), "broker connection lost; reconnecting");
                // Best effort: the connection is usually dead already.
                let _ = timeout(
                    Duration::from_secs(1),
                    connection.close(0, "reconnecting".into()),
                )
                .await;
            }
            Err(err) => {
                metrics.broker_connection_error();
                warn!(error = %err, retry_in = ?backoff, unconfirmed = outbox.messages(), "broker unavailable");
            }
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

async fn connect(cfg: &config::Rabbitmq) -> Result<(Connection, Channel), PublishError> {
    let props = ConnectionProperties::default().with_connection_name("tailgate-gateway".into());
    let connection = timeout(cfg.confirm_timeout, Connection::connect(&cfg.url, props))
        .await
        .map_err(|_| PublishError::ConnectTimeout(cfg.confirm_timeout))?
        .map_err(PublishError::Connect)?;
    let channel = connection
        .create_channel()
        .await
        .map_err(PublishError::Setup)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(PublishError::Setup)?;
    channel
        .exchange_declare(
            cfg.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(PublishError::Setup)?;
    Ok((connection, channel))
}

fn properties(msg: &OutMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert("trace_id".into(), text(&msg.trace_id.to_hex()));
    headers.insert("sampling_rule".into(), text(&msg.rule));
    headers.insert(
        "adjusted_count".into(),
        AMQPValue::Double(msg.adjusted_count),
    );
    headers.insert(
        "span_count".into(),
        AMQPValue::LongLongInt(i64::try_from(msg.span_count).unwrap_or(i64::MAX)),
    );
    headers.insert("root_service".into(), text(&msg.root_service));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type(ShortString::from("application/x-protobuf"))
        .with_delivery_mode(2) // persistent
        .with_message_id(ShortString::from(msg.id.as_str()))
        .with_timestamp(now)
        .with_headers(headers)
}

/// Publishes batches until the connection fails.
async fn pump(
    cfg: &config::Rabbitmq,
    channel: &Channel,
    outbox: &Outbox,
    metrics: &Metrics,
) -> PublishError {
    let mut retry_backoff = FIRST_BACKOFF;
    loop {
        let batch = tokio::select! {
            batch = outbox.take(cfg.max_in_flight.get()) => batch,
            // Notice a dead connection while idle, so readiness is honest.
            () = sleep(Duration::from_secs(1)) => {
                if channel.status().connected() { continue } else { return PublishError::ConnectionLost }
            }
        };
        let mut retry = Vec::new();
        let mut failure = None;
        let mut pending = Vec::with_capacity(batch.len());
        for msg in batch {
            if failure.is_some() {
                retry.push(msg);
                continue;
            }
            let published = channel
                .basic_publish(
                    cfg.exchange.as_str().into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &msg.body,
                    properties(&msg),
                )
                .await;
            match published {
                Ok(confirm) => pending.push((msg, confirm)),
                Err(e) => {
                    metrics.publish_outcome("failed");
                    failure = Some(PublishError::Publish(e));
                    retry.push(msg);
                }
            }
        }
        let mut rejected = false;
        for (msg, confirm) in pending {
            match timeout(cfg.confirm_timeout, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {
                    metrics.confirmed(
                        msg.span_count,
                        Instant::now()
                            .saturating_duration_since(msg.received_at)
                            .as_secs_f64(),
                    );
                    outbox.settle(&msg);
                }
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    metrics.publish_outcome("returned");
                    warn!(routing_key = %msg.routing_key, exchange = %cfg.exchange, "message returned: no queue is bound for it; retrying");
                    rejected = true;
                    retry.push(msg);
                }
                Ok(Ok(Confirmation::Nack(_))) => {
                    metrics.publish_outcome("nack");
                    warn!(message_id = %msg.id, "broker nacked a message; retrying");
                    rejected = true;
                    retry.push(msg);
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    failure.get_or_insert(PublishError::ConfirmsNotEnabled);
                    retry.push(msg);
                }
                Ok(Err(e)) => {
                    metrics.publish_outcome("failed");
                    failure.get_or_insert(PublishError::Publish(e));
                    retry.push(msg);
                }
                Err(_) => {
                    metrics.publish_outcome("failed");
                    failure.get_or_insert(PublishError::ConfirmTimeout(cfg.confirm_timeout));
                    retry.push(msg);
                }
            }
        }
        outbox.requeue(retry);
        if let Some(failure) = failure {
            return failure;
        }
        if rejected {
            sleep(retry_backoff).await;
            retry_backoff = (retry_backoff * 2).min(cfg.max_backoff);
        } else {
            retry_backoff = FIRST_BACKOFF;
        }
    }
}
