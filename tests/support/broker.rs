//! A queue of the test's own on the real broker, and a TCP proxy in front
//! of the broker that the test can switch off and on.

use super::{PATIENCE, amqp_url, unique};
use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties, Consumer,
    options::{BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, trace::v1::Span,
};
use prost::Message;
use std::net::SocketAddr;
use tailgate_contract::{
    amqp::declare_exchange,
    compression::message_body,
    message::{ALL_TRACES, header},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A message the gateway published.
#[derive(Debug)]
pub struct Received {
    pub routing_key: String,
    pub message_id: String,
    pub content_type: String,
    /// The AMQP `content_encoding`: how the body was compressed.
    pub content_encoding: Option<String>,
    pub persistent: bool,
    pub headers: FieldTable,
    pub request: ExportTraceServiceRequest,
}

impl Received {
    pub fn header(&self, key: &str) -> Option<String> {
        self.headers.inner().get(key).map(|v| match v {
            AMQPValue::LongString(s) => s.to_string(),
            AMQPValue::LongLongInt(n) => n.to_string(),
            AMQPValue::Double(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }

    pub fn spans(&self) -> Vec<&Span> {
        self.request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect()
    }

    pub fn trace_id(&self) -> String {
        self.header(header::TRACE_ID).expect("trace_id header")
    }
}

/// An exchange and a queue bound to it with `traces.#`, both unique to one test.
pub struct TestQueue {
    _connection: Connection,
    channel: lapin::Channel,
    pub exchange: String,
    consumer: Option<Consumer>,
}

impl TestQueue {
    pub async fn new(tag: &str) -> Self {
        let mut q = Self::declare(tag, FieldTable::default()).await;
        q.bind().await;
        q.consume().await;
        q
    }

    /// The exchange and a queue that holds one message and makes the broker
    /// nack the next (`reject-publish`), not yet bound (so messages are
    /// returned as unroutable) and not yet consumed.
    pub async fn unbound_single_slot(tag: &str) -> Self {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        Self::declare(tag, args).await
    }

    async fn declare(tag: &str, queue_args: FieldTable) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ (see README: the test command starts it)");
        let channel = connection.create_channel().await.expect("channel");
        let exchange = unique(tag);
        declare_exchange(&channel, &exchange)
            .await
            .expect("declare exchange");
        channel
            .queue_declare(
                format!("{exchange}.q").as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                queue_args,
            )
            .await
            .expect("declare queue");
        Self {
            _connection: connection,
            channel,
            exchange,
            consumer: None,
        }
    }

    /// Binds the queue to the exchange with `traces.#`.
    pub async fn bind(&mut self) {
        self.channel
            .queue_bind(
                format!("{}.q", self.exchange).as_str().into(),
                self.exchange.as_str().into(),
                ALL_TRACES.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// Starts consuming the queue, for [`TestQueue::next`].
    pub async fn consume(&mut self) {
        let consumer = self
            .channel
            .basic_consume(
                format!("{}.q", self.exchange).as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        self.consumer = Some(consumer);
    }

    /// The next message, or `None` after `PATIENCE`.
    pub async fn next(&mut self) -> Option<Received> {
        let consumer = self.consumer.as_mut().expect("TestQueue::consume first");
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .ok()??
            .expect("delivery");
        let props = &delivery.properties;
        let body = message_body(props, &delivery.data)
            .expect("message body decompresses as its content_encoding says");
        Some(Received {
            routing_key: delivery.routing_key.to_string(),
            message_id: props
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            content_type: props
                .content_type()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            content_encoding: props.content_encoding().as_ref().map(|e| e.to_string()),
            persistent: *props.delivery_mode() == Some(2),
            headers: props.headers().clone().unwrap_or_default(),
            request: ExportTraceServiceRequest::decode(&*body)
                .expect("message body is an OTLP ExportTraceServiceRequest"),
        })
    }

    /// Exactly `n` messages; panics if they do not all come.
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next().await {
                Some(m) => out.push(m),
                None => panic!("got {} of {n} messages", out.len()),
            }
        }
        out
    }

    /// Publishes raw bytes to the test's exchange, with `content_encoding`
    /// if given, as another (or a misbehaving) producer would.
    pub async fn publish_raw(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
        content_encoding: Option<&str>,
    ) {
        let mut props = lapin::BasicProperties::default()
            .with_message_id(message_id.into())
            .with_delivery_mode(2);
        if let Some(encoding) = content_encoding {
            props = props.with_content_encoding(encoding.into());
        }
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
    }

    /// Publishes a journey events batch as a gateway does (its `type`
    /// property marks it), under `message_id`.
    pub async fn publish_journey_events(&self, journey: &str, body: &[u8], message_id: &str) {
        let props = tailgate_contract::journey::properties(
            message_id,
            journey,
            1,
            tailgate_contract::compression::Compression::None,
            0,
        );
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                tailgate_contract::journey::routing_key(journey)
                    .as_str()
                    .into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
    }

    /// The next message of another queue (polled: `basic_get`), or `None` after `PATIENCE`.
    pub async fn get_from(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = self
                .channel
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic_get");
            if got.is_some() || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Deletes queues and exchanges other processes declared for this test.
    /// Removes the test's exchange (the queue goes with the connection).
    pub async fn delete(self) {
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// Deletes queues and exchanges of a finished run, over a connection of its own.
pub async fn delete(queues: &[&str], exchanges: &[&str]) {
    let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for queue in queues {
        let _ = channel
            .queue_delete(
                (*queue).into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    for exchange in exchanges {
        let _ = channel
            .exchange_delete((*exchange).into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// A TCP proxy to the broker. Switched off, it refuses new connections and
/// cuts the open ones, as a broker outage or a network partition would.
pub struct Proxy {
    pub addr: SocketAddr,
    on: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, on: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (tx, rx) = watch::channel(on);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !*rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut off = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = off.wait_for(|on| !*on) => {}
                    }
                });
            }
        });
        Self { addr, on: tx }
    }

    pub fn set(&self, on: bool) {
        self.on.send_replace(on);
    }

    /// The AMQP URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}
