//! How a kept trace's body travels through RabbitMQ: an OTLP
//! `ExportTraceServiceRequest`, compressed as the message's AMQP
//! `content_encoding` says. The gateway compresses, the ingester
//! decompresses; both take the names from here.
//!
//! Compression is for the broker's sake: every byte of a persistent message
//! is written to its write-ahead log and again to its segment files, so a
//! smaller body means less disk, fewer log rollovers and less broker CPU.

use serde::{Deserialize, Serialize};
use std::{borrow::Cow, cell::RefCell, io::Read, thread::LocalKey};

/// Largest body accepted after decompression. A kept trace is at most the
/// gateway's `buffer.max_trace_bytes` (8 MiB by default) plus annotations;
/// this only stops a corrupt or hostile message from exhausting memory.
pub const MAX_DECOMPRESSED_BYTES: usize = 256 << 20;

/// zstd's level 1: its fastest standard level, most of the size gain.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The protobuf as it is; no `content_encoding`.
    None,
    /// An LZ4 frame (`content_encoding: lz4`): the default, since it costs
    /// the gateway a quarter of what zstd does for most of its gain.
    #[default]
    Lz4,
    /// A zstd frame (`content_encoding: zstd`): smaller, for a broker whose
    /// disk or network is the limit.
    Zstd,
}

/// Why a message body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("unknown content_encoding {0:?} (known: lz4, zstd, or none)")]
    UnknownEncoding(String),
    #[error("{encoding} body does not decompress: {source}")]
    Corrupt {
        encoding: &'static str,
        source: std::io::Error,
    },
    #[error("body is larger than {0} bytes once decompressed")]
    TooLarge(usize),
}

thread_local! {
    // An LZ4 frame encoder sets up about 150 KB of buffers, which fresh
    // cost page faults (5% of a gateway's CPU, profiled): one per thread,
    // reused. lz4_flex resets its state for each new frame.
    static LZ4: RefCell<Option<lz4_flex::frame::FrameEncoder<Vec<u8>>>> = const { RefCell::new(None) };
    // A zstd context costs a few hundred kilobytes to set up: one per thread, reused.
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static UNZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's context from `cell`, made by `new` on first use.
fn with_context<C>(
    cell: &'static LocalKey<RefCell<Option<C>>>,
    new: impl FnOnce() -> std::io::Result<C>,
    f: impl FnOnce(&mut C) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    cell.with_borrow_mut(|slot| match slot {
        Some(ctx) => f(ctx),
        None => f(slot.insert(new()?)),
    })
}

/// The decompressed size of a body that is one zstd frame recording its
/// size, as the gateway writes them; `None` for anything else.
fn zstd_single_frame_size(body: &[u8]) -> Option<u64> {
    use zstd::zstd_safe;
    let whole = zstd_safe::find_frame_compressed_size(body).ok()? == body.len();
    whole.then(|| zstd_safe::get_frame_content_size(body).ok().flatten())?
}

impl Compression {
    /// The AMQP `content_encoding` naming this compression.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Lz4 => Some("lz4"),
            Self::Zstd => Some("zstd"),
        }
    }

    /// The compression a message's `content_encoding` names. No encoding
    /// (or `identity`) is the plain protobuf, as older gateways sent it.
    pub fn from_content_encoding(encoding: Option<&str>) -> Result<Self, BodyError> {
        match encoding.map(str::trim) {
            None | Some("" | "identity") => Ok(Self::None),
            Some(e) if e.eq_ignore_ascii_case("lz4") => Ok(Self::Lz4),
            Some(e) if e.eq_ignore_ascii_case("zstd") => Ok(Self::Zstd),
            Some(other) => Err(BodyError::UnknownEncoding(other.to_owned())),
        }
    }

    /// Compresses `body`, and says how: should compression fail (it does
    /// not, short of running out of memory), the body goes as it is
    /// rather than not at all.
    pub fn compress(self, body: Vec<u8>) -> (Self, Vec<u8>) {
        match self.compressed(&body) {
            Some(c) => (self, c),
            None => (Self::None, body),
        }
    }

    /// A compressed copy of `body`, leaving `body` to its owner (a buffer
    /// that is used again); `None` when this is `None`, or compression
    /// failed: then `body` goes as it is.
    pub fn compressed(self, body: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::None => None,
            Self::Lz4 => lz4(body).ok(),
            Self::Zstd => with_context(
                &ZSTD,
                || zstd::bulk::Compressor::new(ZSTD_LEVEL),
                |c| c.compress(body),
            )
            .ok(),
        }
    }

    /// The protobuf inside a body compressed this way, at most
    /// [`MAX_DECOMPRESSED_BYTES`]; an uncompressed body is not copied.
    pub fn decompress(self, body: &[u8]) -> Result<Cow<'_, [u8]>, BodyError> {
        self.decompress_at_most(body, MAX_DECOMPRESSED_BYTES)
    }

    fn decompress_at_most(self, body: &[u8], max: usize) -> Result<Cow<'_, [u8]>, BodyError> {
        let corrupt = |source| BodyError::Corrupt {
            encoding: self.content_encoding().unwrap_or("identity"),
            source,
        };
        let out = match self {
            Self::None => Cow::Borrowed(body),
            Self::Lz4 => Cow::Owned(
                read_at_most(lz4_flex::frame::FrameDecoder::new(body), body.len(), max)
                    .map_err(corrupt)?,
            ),
            Self::Zstd => match zstd_single_frame_size(body) {
                // The gateway's bodies: one frame of known size, decompressed
                // in one call with a context kept per thread.
                Some(size) if size > max as u64 => return Err(BodyError::TooLarge(max)),
                Some(size) => Cow::Owned(
                    with_context(&UNZSTD, zstd::bulk::Decompressor::new, |d| {
                        d.decompress(body, size as usize)
                    })
                    .map_err(corrupt)?,
                ),
                // Other producers' streamed frames, or several frames.
                None => {
                    let decoder =
                        zstd::stream::read::Decoder::with_buffer(body).map_err(corrupt)?;
                    Cow::Owned(read_at_most(decoder, body.len(), max).map_err(corrupt)?)
                }
            },
        };
        if out.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        Ok(out)
    }
}

/// The OTLP protobuf of a delivered message: its body decompressed as its
/// AMQP `content_encoding` says. What the ingester, the tests and the demo
/// consumer all read.
pub fn message_body<'a>(
    properties: &lapin::BasicProperties,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, BodyError> {
    let encoding = properties.content_encoding().as_ref().map(|e| e.as_str());
    Compression::from_content_encoding(encoding)?.decompress(body)
}

/// Reads to the end, but stops one byte past `max`: enough to tell a body
/// at the limit from one beyond it.
fn read_at_most(r: impl Read, size_hint: usize, max: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size_hint.saturating_mul(4).min(max));
    r.take(max as u64 + 1).read_to_end(&mut out)?;
    Ok(out)
}

fn lz4(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    if body.is_empty() {
        // A reused encoder opens a frame only when data comes (it would
        // write an empty frame's end alone): an empty body gets its own.
        let enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        return enc.finish().map_err(std::io::Error::other);
    }
    let result = with_context(
        &LZ4,
        || Ok(lz4_flex::frame::FrameEncoder::new(Vec::new())),
        |enc| {
            *enc.get_mut() = Vec::with_capacity(body.len() / 2);
            enc.write_all(body)?;
            enc.try_finish().map_err(std::io::Error::other)?;
            Ok(std::mem::take(enc.get_mut()))
        },
    );
    if result.is_err() {
        // A failed frame may leave the encoder mid-frame: start afresh.
        LZ4.with_borrow_mut(|slot| *slot = None);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| format!("span-{}-order-{:06} ", i % 10, i / 10).into_bytes())
            .collect()
    }

    /// The reused LZ4 encoder writes each body as a frame of its own: every
    /// one decompresses alone, to itself, whatever came before on the thread.
    #[test]
    fn lz4_frames_are_independent() {
        let bodies: Vec<Vec<u8>> = vec![body(), b"short".to_vec(), Vec::new(), body()];
        let packed: Vec<Vec<u8>> = bodies
            .iter()
            .map(|b| Compression::Lz4.compressed(b).unwrap())
            .collect();
        for (b, p) in bodies.iter().zip(&packed) {
            assert_eq!(&*Compression::Lz4.decompress(p).unwrap(), b.as_slice());
        }
        assert_eq!(packed[0], packed[3], "the same body, the same frame");
    }

    /// Each compression round-trips, shrinks a repetitive body, and names
    /// itself in a `content_encoding` that reads back as the same compression.
    #[test]
    fn round_trips_through_its_content_encoding() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let (used, packed) = c.compress(body());
            assert_eq!(used, c);
            if c != Compression::None {
                assert!(packed.len() * 3 < body().len(), "{c:?}: {}", packed.len());
            }
            let read = Compression::from_content_encoding(c.content_encoding()).unwrap();
            assert_eq!(read, c);
            assert_eq!(read.decompress(&packed).unwrap(), body());
        }
    }

    /// A delivery's body is read as its properties' `content_encoding` says:
    /// compressed, plain (without a copy), or refused for an unknown name.
    #[test]
    fn message_body_follows_the_delivery_properties() {
        use lapin::{BasicProperties, types::ShortString};
        let (_, packed) = Compression::Lz4.compress(body());
        let lz4 = BasicProperties::default().with_content_encoding(ShortString::from("lz4"));
        assert_eq!(message_body(&lz4, &packed).unwrap(), body());
        let plain = body();
        let read = message_body(&BasicProperties::default(), &plain).unwrap();
        assert!(matches!(read, Cow::Borrowed(b) if b == plain.as_slice()));
        let gzip = BasicProperties::default().with_content_encoding(ShortString::from("gzip"));
        assert!(matches!(
            message_body(&gzip, &plain),
            Err(BodyError::UnknownEncoding(e)) if e == "gzip"
        ));
    }

    /// Messages without an encoding, or `identity`, are plain protobuf;
    /// names are matched without regard to case.
    #[test]
    fn reads_encodings_as_senders_write_them() {
        assert_eq!(
            Compression::from_content_encoding(None).unwrap(),
            Compression::None
        );
        assert_eq!(
            Compression::from_content_encoding(Some("identity")).unwrap(),
            Compression::None
        );
        assert_eq!(
            Compression::from_content_encoding(Some("ZSTD")).unwrap(),
            Compression::Zstd
        );
        let err = Compression::from_content_encoding(Some("gzip")).unwrap_err();
        assert!(err.to_string().contains("\"gzip\""), "{err}");
    }

    /// A body that is not what its encoding says is an error naming the
    /// encoding, never a panic or an empty body.
    #[test]
    fn corrupt_bodies_are_errors() {
        for c in [Compression::Lz4, Compression::Zstd] {
            let err = c.decompress(b"not compressed at all").unwrap_err();
            let name = c.content_encoding().unwrap();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    /// A small body that decompresses beyond the limit is refused; one
    /// exactly at the limit is not. That holds for zstd frames that record
    /// their size (the gateway's) and for streamed ones that do not.
    #[test]
    fn decompression_is_bounded() {
        let max = 1 << 20;
        let streamed = |n: usize| zstd::stream::encode_all(&vec![0u8; n][..], 1).unwrap();
        assert_eq!(zstd_single_frame_size(&streamed(max)), None);
        // How each case packs `n` zero bytes.
        type Pack = fn(usize) -> Vec<u8>;
        let cases: [(Compression, Pack); 4] = [
            (Compression::None, |n| vec![0u8; n]),
            (Compression::Lz4, |n| {
                Compression::Lz4.compress(vec![0u8; n]).1
            }),
            (Compression::Zstd, |n| {
                Compression::Zstd.compress(vec![0u8; n]).1
            }),
            (Compression::Zstd, streamed),
        ];
        for (c, pack) in cases {
            assert_eq!(c.decompress_at_most(&pack(max), max).unwrap().len(), max);
            assert!(matches!(
                c.decompress_at_most(&pack(max + 1), max),
                Err(BodyError::TooLarge(m)) if m == max
            ));
        }
    }

    /// Bodies from other zstd producers read too: streamed frames without
    /// a recorded size, and several frames one after another.
    #[test]
    fn reads_any_zstd_frames() {
        let mut two = zstd::stream::encode_all(&b"first "[..], 3).unwrap();
        two.extend(Compression::Zstd.compress(b"second".to_vec()).1);
        assert_eq!(
            &*Compression::Zstd.decompress(&two).unwrap(),
            b"first second"
        );
    }
}
