//! The RabbitMQ side: declare the queue topology, consume in batches, and
//! acknowledge only what ClickHouse has confirmed.
//!
//! A batch is whatever arrived within `batch.max_wait_secs`, at most
//! `prefetch` messages (the broker sends no more until some are acked, which
//! is what bounds memory and pauses consumption while ClickHouse is down).
//! The batch is inserted, retried with backoff until ClickHouse takes it, and
//! only then acknowledged, with one `multiple` ack.

use crate::{
    config::IngesterConfig,
    metrics::Metrics,
    rows::{event_rows, rows},
    store::{Pending, Store},
};
use futures_util::StreamExt;
use lapin::{
    Channel, Confirmation, Connection, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tailgate_contract::{
    amqp::{confirmed_channel, declare_exchange},
    compression::message_body,
    journey::is_journey_events,
    message::{Sampling, header},
};
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the consumer was cancelled by the broker")]
    Cancelled,
    #[error("the dead-letter exchange did not confirm a message")]
    DeadLetterNotConfirmed,
}

struct Intake {
    _connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn connect(cfg: &IngesterConfig) -> Result<Intake, IntakeError> {
    let r = &cfg.rabbitmq;
    let connection = r.amqp.connect("tailgate-ingester").await?;
    // Confirms: a dead-lettered copy must be stored before the original is acked.
    let channel = confirmed_channel(&connection).await?;
    channel
        .basic_qos(r.prefetch.get(), BasicQosOptions::default())
        .await?;
    declare_exchange(&channel, &r.exchange).await?;
    channel
        .exchange_declare(
            r.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let quorum = |args: &mut FieldTable| {
        args.insert("x-queue-type".into(), text("quorum"));
    };
    let mut dlq_args = FieldTable::default();
    quorum(&mut dlq_args);
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(r.dead_letter_queue.as_str().into(), queue_opts, dlq_args)
        .await?;
    channel
        .queue_bind(
            r.dead_letter_queue.as_str().into(),
            r.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    quorum(&mut args);
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&r.dead_letter_exchange),
    );
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(r.delivery_limit)),
    );
    channel
        .queue_declare(r.queue.as_str().into(), queue_opts, args)
        .await?;
    channel
        .queue_bind(
            r.queue.as_str().into(),
            r.exchange.as_str().into(),
            r.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if !r.journeys_binding_key.is_empty() {
        channel
            .queue_bind(
                r.queue.as_str().into(),
                r.exchange.as_str().into(),
                r.journeys_binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let consumer = channel
        .basic_consume(
            r.queue.as_str().into(),
            "tailgate-ingester".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(Intake {
        _connection: connection,
        channel,
        consumer,
    })
}

/// The message's ID; a message without one is identified by its content,
/// which is stable across redeliveries.
fn message_id(d: &Delivery) -> String {
    match d.properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.to_string(),
        _ => {
            let digest = Sha256::digest(&d.data);
            const_hex::encode(&digest[..16])
        }
    }
}

/// The span rows of one message, and its OTLP bytes: its body decompressed
/// as its `content_encoding` says, then decoded. The error is the reason it
/// is dead-lettered.
fn message_rows(d: &Delivery, id: &str, cfg: &IngesterConfig) -> Result<(Pending, usize), String> {
    let body = message_body(&d.properties, &d.data).map_err(|e| e.to_string())?;
    let mut pending = Pending {
        message_id: id.to_owned(),
        rows: Vec::new(),
        events: Vec::new(),
    };
    if is_journey_events(&d.properties) {
        pending.events = event_rows(&body, id).map_err(|e| e.to_string())?;
    } else {
        pending.rows = rows(&body, id, &Sampling::of(&d.properties), &cfg.retention)
            .map_err(|e| e.to_string())?;
    }
    Ok((pending, body.len()))
}

/// Copies an undecodable message to the dead-letter exchange with the reason
/// in a header, and waits for the broker's confirm.
async fn dead_letter(
    channel: &Channel,
    cfg: &IngesterConfig,
    d: &Delivery,
    reason: &str,
) -> Result<(), IntakeError> {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(header::DEAD_LETTER_REASON.into(), text(reason));
    headers.insert(
        header::ORIGINAL_ROUTING_KEY.into(),
        text(d.routing_key.as_str()),
    );
    let props = d.properties.clone().with_headers(headers);
    let confirm = channel
        .basic_publish(
            cfg.rabbitmq.dead_letter_exchange.as_str().into(),
            d.routing_key.clone(),
            BasicPublishOptions::default(),
            &d.data,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(IntakeError::DeadLetterNotConfirmed),
    }
}

/// Waits for the first message, then gathers more until `max_wait` or a full batch.
async fn next_batch(
    consumer: &mut Consumer,
    max: usize,
    max_wait: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<Delivery>>, IntakeError> {
    let first = tokio::select! {
        d = consumer.next() => d,
        _ = stop.wait_for(|s| *s) => return Ok(None),
    };
    let first = first.ok_or(IntakeError::Cancelled)??;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + max_wait;
    while batch.len() < max {
        tokio::select! {
            d = consumer.next() => batch.push(d.ok_or(IntakeError::Cancelled)??),
            () = tokio::time::sleep_until(deadline) => break,
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    Ok(Some(batch))
}

/// Consumes until `stop` turns true; reconnects to the broker as needed.
pub async fn run(
    cfg: &IngesterConfig,
    store: &Store,
    metrics: &Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = cfg.rabbitmq.backoff.clone();
    while !*stop.borrow() {
        match connect(cfg).await {
            Ok(mut intake) => {
                info!(queue = %cfg.rabbitmq.queue, "consuming");
                metrics.broker_connected.set(1);
                backoff.reset();
                let result = consume(cfg, store, metrics, &mut intake, &mut stop).await;
                metrics.broker_connected.set(0);
                match result {
                    Ok(()) => {
                        // Stopping: unacked prefetched messages go back to the queue.
                        let _ = intake.channel.close(200, "shutting down".into()).await;
                        return;
                    }
                    Err(e) => warn!(error = %e, "lost the broker; reconnecting"),
                }
            }
            Err(e) => warn!(error = %e, "cannot reach the broker"),
        }
        tokio::select! {
            () = backoff.wait() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn consume(
    cfg: &IngesterConfig,
    store: &Store,
    metrics: &Metrics,
    intake: &mut Intake,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), IntakeError> {
    let max = usize::from(cfg.rabbitmq.prefetch.get());
    loop {
        let Some(batch) = next_batch(&mut intake.consumer, max, cfg.max_wait, stop).await? else {
            return Ok(());
        };
        metrics.consumed_messages.inc_by(batch.len() as u64);
        let mut pending = Vec::with_capacity(batch.len());
        let mut bytes = 0u64;
        for d in &batch {
            let id = message_id(d);
            match message_rows(d, &id, cfg) {
                Ok((rows, otlp_bytes)) => {
                    bytes += otlp_bytes as u64;
                    pending.push(rows);
                }
                Err(e) => {
                    error!(message_id = %id, routing_key = %d.routing_key, error = %e, "dead-lettering an undecodable message");
                    dead_letter(&intake.channel, cfg, d, &e).await?;
                    metrics.dead_lettered("undecodable");
                }
            }
        }
        if !store_batch(cfg, store, metrics, &pending, bytes, stop).await {
            // Stopping with ClickHouse still refusing: leave the batch unacked
            // for redelivery rather than lose it.
            return Ok(());
        }
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
            metrics.acked_messages.inc_by(batch.len() as u64);
        }
    }
}

/// Inserts until ClickHouse confirms. Returns false only when stopping and
/// the shutdown grace period is over.
async fn store_batch(
    cfg: &IngesterConfig,
    store: &Store,
    metrics: &Metrics,
    pending: &[Pending],
    bytes: u64,
    stop: &watch::Receiver<bool>,
) -> bool {
    let mut backoff = cfg.clickhouse.backoff.clone();
    let mut stop_deadline: Option<Instant> = None;
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            metrics.insert_retries.inc();
        }
        attempt += 1;
        let started = Instant::now();
        match store.insert(pending).await {
            Ok(stored) => {
                metrics.clickhouse_up.set(1);
                metrics
                    .insert_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.inserted_rows.inc_by(stored.rows as u64);
                metrics.inserted_events.inc_by(stored.events as u64);
                metrics.inserted_bytes.inc_by(bytes);
                metrics.duplicate_messages.inc_by(stored.duplicates as u64);
                #[allow(clippy::cast_precision_loss)]
                {
                    metrics.batch_rows.observe(stored.rows as f64);
                    metrics.batch_messages.observe(pending.len() as f64);
                }
                return true;
            }
            Err(e) => {
                metrics.clickhouse_up.set(0);
                metrics.insert_failures.inc();
                warn!(error = %e, attempt, messages = pending.len(), "insert failed; nothing acknowledged, retrying");
            }
        }
        if *stop.borrow() {
            let deadline =
                *stop_deadline.get_or_insert_with(|| Instant::now() + cfg.shutdown_grace);
            if Instant::now() >= deadline {
                return false;
            }
        }
        backoff.wait().await;
    }
}
