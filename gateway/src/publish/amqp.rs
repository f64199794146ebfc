//! The RabbitMQ side of the publisher: one connection, one channel in
//! publisher-confirm mode, reconnecting with backoff.
//!
//! Only an `ack` without a return settles a message. A `nack` or a return
//! (`mandatory` and no queue bound) is an error, counted and retried after a
//! backoff; a failed publish, a lost connection or a missing confirm puts the
//! unconfirmed messages back and reconnects.

use super::{Content, OutMessage, Outbox};
use crate::{config, metrics::Metrics};
use futures_util::future::join_all;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    options::BasicPublishOptions,
};
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tailgate_contract::{
    amqp::{confirmed_channel, declare_exchange},
    journey,
    message::{self, Annotations},
};
use tokio::time::{Instant, sleep, timeout, timeout_at};
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

/// Runs until aborted: keeps a confirmed channel open and drains the outbox into it.
pub async fn run(cfg: config::Rabbitmq, outbox: Arc<Outbox>, metrics: Arc<Metrics>) {
    let mut backoff = cfg.backoff.clone();
    loop {
        match connect(&cfg).await {
            Ok((connection, channel)) => {
                info!(exchange = %cfg.exchange, "connected to the broker");
                metrics.publish.connected(true);
                backoff.reset();
                let err = pump(&cfg, &channel, &outbox, &metrics).await;
                metrics.publish.connected(false);
                metrics.publish.connection_error();
                warn!(error = %err, unconfirmed = outbox.messages(), "broker connection lost; reconnecting");
                // Best effort: the connection is usually dead already.
                let _ = timeout(
                    Duration::from_secs(1),
                    connection.close(0, "reconnecting".into()),
                )
                .await;
            }
            Err(err) => {
                metrics.publish.connection_error();
                warn!(error = %err, unconfirmed = outbox.messages(), "broker unavailable");
            }
        }
        backoff.wait().await;
    }
}

async fn connect(cfg: &config::Rabbitmq) -> Result<(Connection, Channel), PublishError> {
    let connection = timeout(cfg.confirm_timeout, cfg.amqp.connect("tailgate-gateway"))
        .await
        .map_err(|_| PublishError::ConnectTimeout(cfg.confirm_timeout))?
        .map_err(PublishError::Connect)?;
    let channel = confirmed_channel(&connection)
        .await
        .map_err(PublishError::Setup)?;
    declare_exchange(&channel, &cfg.exchange)
        .await
        .map_err(PublishError::Setup)?;
    Ok((connection, channel))
}

fn properties(msg: &OutMessage) -> BasicProperties {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match &msg.content {
        Content::Trace {
            trace_id,
            rule,
            adjusted_count,
            root_service,
        } => {
            let annotations = Annotations {
                trace_id: &trace_id.to_hex(),
                rule,
                adjusted_count: *adjusted_count,
                span_count: msg.span_count,
                root_service,
            };
            message::properties(&msg.id, &annotations, msg.compression, now)
        }
        Content::JourneyEvents { journey, events } => {
            journey::properties(&msg.id, journey, *events, msg.compression, now)
        }
    }
}

/// A published message waiting for its confirm.
struct InFlight {
    msg: OutMessage,
    confirm: PublisherConfirm,
    published_at: Instant,
    deadline: Instant,
}

/// How the broker answered one message.
enum Answer {
    Confirmed,
    /// Nacked or returned: retried after a backoff.
    Rejected,
    /// The channel is no good: reconnect.
    Failed(PublishError),
}

/// Publishes until the connection fails. Up to `max_in_flight` messages are
/// unconfirmed at a time, and the next is published as soon as one settles:
/// a message never waits for a whole earlier batch to be confirmed (the
/// broker confirms persistent messages only after its next disk sync).
async fn pump(
    cfg: &config::Rabbitmq,
    channel: &Channel,
    outbox: &Outbox,
    metrics: &Metrics,
) -> PublishError {
    let max = cfg.max_in_flight.get();
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(max);
    // Nacked or returned messages, held until what was published after them settles.
    let mut rejected: Vec<OutMessage> = Vec::new();
    // What a failed publish left unsent.
    let mut unpublished: Vec<OutMessage> = Vec::new();
    let mut retry_backoff = cfg.backoff.clone();
    loop {
        let room = max - in_flight.len();
        let failure = tokio::select! {
            // Confirms come in publishing order; the oldest is due first.
            (answer, msg) = oldest_answer(&mut in_flight, cfg, metrics), if !in_flight.is_empty() => {
                match answer {
                    Answer::Confirmed => {
                        outbox.settle(&msg);
                        None
                    }
                    Answer::Rejected => {
                        rejected.push(msg);
                        None
                    }
                    Answer::Failed(err) => {
                        rejected.push(msg);
                        Some(err)
                    }
                }
            }
            batch = outbox.take(room), if room > 0 && rejected.is_empty() => {
                publish(cfg, channel, batch, &mut in_flight, metrics)
                    .await
                    .err()
                    .map(|(err, rest)| {
                        unpublished = rest;
                        err
                    })
            }
            // Notice a dead connection while idle, so readiness is honest.
            () = sleep(Duration::from_secs(1)), if in_flight.is_empty() => {
                (!channel.status().connected()).then_some(PublishError::ConnectionLost)
            }
        };
        if let Some(failure) = failure {
            // Unconfirmed messages go back in publishing order; they are
            // published again, under the same message IDs, after reconnecting.
            rejected.extend(in_flight.drain(..).map(|f| f.msg));
            rejected.append(&mut unpublished);
            outbox.requeue(rejected);
            return failure;
        }
        if !rejected.is_empty() && in_flight.is_empty() {
            outbox.requeue(std::mem::take(&mut rejected));
            retry_backoff.wait().await;
        } else if rejected.is_empty() && in_flight.is_empty() {
            retry_backoff.reset();
        }
    }
}

/// Publishes a batch. Every message is handed to the connection before any
/// is waited for: lapin's publish resolves once its I/O thread has written
/// the frames, and waiting for that one message at a time costs a thread
/// hand-off each, which under load held kept traces in the outbox. On
/// failure, returns the error and the messages that were not sent.
async fn publish(
    cfg: &config::Rabbitmq,
    channel: &Channel,
    batch: Vec<OutMessage>,
    in_flight: &mut VecDeque<InFlight>,
    metrics: &Metrics,
) -> Result<(), (PublishError, Vec<OutMessage>)> {
    let sent = join_all(batch.iter().map(|msg| {
        channel.basic_publish(
            cfg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &msg.body,
            properties(msg),
        )
    }))
    .await;
    let published_at = Instant::now();
    let mut failure = None;
    let mut unsent = Vec::new();
    for (msg, result) in batch.into_iter().zip(sent) {
        match result {
            Ok(confirm) => in_flight.push_back(InFlight {
                msg,
                confirm,
                published_at,
                deadline: published_at + cfg.confirm_timeout,
            }),
            Err(e) => {
                metrics.publish.outcome("failed");
                failure.get_or_insert(PublishError::Publish(e));
                unsent.push(msg);
            }
        }
    }
    match failure {
        Some(err) => Err((err, unsent)),
        None => Ok(()),
    }
}

/// Waits for the oldest in-flight message's confirm and takes it out.
async fn oldest_answer(
    in_flight: &mut VecDeque<InFlight>,
    cfg: &config::Rabbitmq,
    metrics: &Metrics,
) -> (Answer, OutMessage) {
    let Some(front) = in_flight.front_mut() else {
        return std::future::pending().await;
    };
    let result = timeout_at(front.deadline, &mut front.confirm).await;
    let answer = match result {
        Ok(Ok(Confirmation::Ack(None))) => {
            let now = Instant::now();
            metrics.publish.confirmed(
                front.msg.span_count,
                front.msg.body.len(),
                now.saturating_duration_since(front.msg.received_at)
                    .as_secs_f64(),
                now.saturating_duration_since(front.published_at)
                    .as_secs_f64(),
            );
            if let Content::JourneyEvents { journey, events } = &front.msg.content {
                metrics.journeys.published(journey, *events as u64);
            }
            Answer::Confirmed
        }
        Ok(Ok(Confirmation::Ack(Some(_)))) => {
            metrics.publish.outcome("returned");
            warn!(routing_key = %front.msg.routing_key, exchange = %cfg.exchange, "message returned: no queue is bound for it; retrying");
            Answer::Rejected
        }
        Ok(Ok(Confirmation::Nack(_))) => {
            metrics.publish.outcome("nack");
            warn!(message_id = %front.msg.id, "broker nacked a message; retrying");
            Answer::Rejected
        }
        Ok(Ok(Confirmation::NotRequested)) => Answer::Failed(PublishError::ConfirmsNotEnabled),
        Ok(Err(e)) => {
            metrics.publish.outcome("failed");
            Answer::Failed(PublishError::Publish(e))
        }
        Err(_) => {
            metrics.publish.outcome("failed");
            Answer::Failed(PublishError::ConfirmTimeout(cfg.confirm_timeout))
        }
    };
    let msg = in_flight.pop_front().map(|f| f.msg);
    match msg {
        Some(msg) => (answer, msg),
        None => std::future::pending().await,
    }
}
