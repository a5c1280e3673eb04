//! The record format shared by the wire and the log.
//!
//! A record is encoded once, by the producer, and then travels as an opaque
//! [`Bytes`] slice: from the publish frame into the log and from the log into
//! delivery frames. The router only parses what it needs (the key, for
//! partitioning) and never re-encodes a record.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! key_len: u32 (0xFFFF_FFFF = no key) | key
//! header_count: u16 | { name_len: u16 | name (UTF-8) | value_len: u32 | value }*
//! payload: the remaining bytes
//! ```

use bytes::{BufMut, Bytes};

use super::error::DecodeError;

const NO_KEY: u32 = u32::MAX;

/// An owned record to publish: optional key, headers and payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Records with the same key land in the same partition, in order.
    pub key: Option<Bytes>,
    /// Application headers, name to value. Names repeat at the producer's choice.
    pub headers: Vec<(String, Bytes)>,
    /// The message body.
    pub payload: Bytes,
}

impl Record {
    /// A record with only a payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Record {
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the priority (0-9) queue subscribers see it with.
    pub fn with_priority(self, priority: u8) -> Self {
        self.with_header(super::headers::PRIORITY, priority.to_string())
    }

    /// Delays queue delivery by `delay` from the time the router appends it.
    pub fn with_delay(self, delay: std::time::Duration) -> Self {
        self.with_header(super::headers::DELAY_MS, delay.as_millis().to_string())
    }

    /// Holds queue delivery until `at_ms` (ms since the Unix epoch).
    pub fn with_deliver_at(self, at_ms: u64) -> Self {
        self.with_header(super::headers::DELIVER_AT, at_ms.to_string())
    }

    /// Expires the record `ttl` after it is appended: queues never deliver it after that.
    pub fn with_ttl(self, ttl: std::time::Duration) -> Self {
        self.with_header(super::headers::TTL_MS, ttl.as_millis().to_string())
    }

    /// Sets the producer's message id, deduplicated within the topic's window.
    pub fn with_message_id(self, id: impl Into<Bytes>) -> Self {
        self.with_header(super::headers::MESSAGE_ID, id)
    }

    /// The producer's message id, if the record carries one.
    pub fn message_id(&self) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(n, _)| n == super::headers::MESSAGE_ID)
            .map(|(_, v)| v)
    }

    /// The encoded length of this record, without any outer length prefix.
    pub fn encoded_len(&self) -> usize {
        4 + self.key.as_ref().map_or(0, |k| k.len())
            + 2
            + self
                .headers
                .iter()
                .map(|(n, v)| 2 + n.len() + 4 + v.len())
                .sum::<usize>()
            + self.payload.len()
    }

    /// Appends the encoded record to `buf`.
    ///
    /// # Panics
    /// If a header name is longer than 65,535 bytes or there are more than
    /// 65,535 headers; [`Record::check`] reports both as errors first.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match &self.key {
            Some(k) => {
                buf.put_u32(k.len() as u32);
                buf.put_slice(k);
            }
            None => buf.put_u32(NO_KEY),
        }
        buf.put_u16(self.headers.len() as u16);
        for (name, value) in &self.headers {
            buf.put_u16(name.len() as u16);
            buf.put_slice(name.as_bytes());
            buf.put_u32(value.len() as u32);
            buf.put_slice(value);
        }
        buf.put_slice(&self.payload);
    }

    /// Checks the limits that the encoding itself imposes.
    pub fn check(&self) -> Result<(), DecodeError> {
        if self.headers.len() > u16::MAX as usize {
            return Err(DecodeError::InvalidValue("header count"));
        }
        if self
            .headers
            .iter()
            .any(|(n, _)| n.len() > u16::MAX as usize)
        {
            return Err(DecodeError::InvalidValue("header name length"));
        }
        if self
            .key
            .as_ref()
            .is_some_and(|k| k.len() >= NO_KEY as usize)
        {
            return Err(DecodeError::InvalidValue("key length"));
        }
        Ok(())
    }

    /// Encodes into a fresh [`RawRecord`].
    pub fn to_raw(&self) -> RawRecord {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        RawRecord(Bytes::from(buf))
    }
}

/// An encoded record, validated, shared without copying.
#[derive(Clone, PartialEq, Eq)]
pub struct RawRecord(Bytes);

impl std::fmt::Debug for RawRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRecord")
            .field("key", &self.key())
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("payload", &self.payload())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Byte ranges of a record's fields, found in one pass.
struct Layout {
    key: Option<(usize, usize)>,
    headers_start: usize,
    header_count: u16,
    payload_start: usize,
}

fn layout(buf: &[u8]) -> Result<Layout, DecodeError> {
    let mut c = Cursor { buf, pos: 0 };
    let key_len = c.u32("record key length")?;
    let key = if key_len == NO_KEY {
        None
    } else {
        let start = c.pos;
        c.take(key_len as usize, "record key")?;
        Some((start, c.pos))
    };
    let header_count = c.u16("record header count")?;
    let headers_start = c.pos;
    for _ in 0..header_count {
        let n = c.u16("header name length")? as usize;
        let name = c.take(n, "header name")?;
        if std::str::from_utf8(name).is_err() {
            return Err(DecodeError::InvalidUtf8("header name"));
        }
        let v = c.u32("header value length")? as usize;
        c.take(v, "header value")?;
    }
    Ok(Layout {
        key,
        headers_start,
        header_count,
        payload_start: c.pos,
    })
}

/// The key of an encoded record, without copying (`None`: no key, or
/// malformed).
pub fn key_of(buf: &[u8]) -> Option<&[u8]> {
    let mut c = Cursor { buf, pos: 0 };
    let n = c.u32("").ok()?;
    if n == NO_KEY {
        return None;
    }
    c.take(n as usize, "").ok()
}

/// Calls `f` with each header of an encoded record, without copying.
/// Stops at the first malformed field (stored records are validated).
pub(crate) fn for_each_header<'a>(buf: &'a [u8], mut f: impl FnMut(&'a str, &'a [u8])) {
    let mut c = Cursor { buf, pos: 0 };
    let Ok(key_len) = c.u32("") else { return };
    if key_len != NO_KEY && c.take(key_len as usize, "").is_err() {
        return;
    }
    let Ok(count) = c.u16("") else { return };
    for _ in 0..count {
        let Ok(n) = c.u16("") else { return };
        let Ok(name) = c.take(n as usize, "") else {
            return;
        };
        let Ok(v) = c.u32("") else { return };
        let Ok(value) = c.take(v as usize, "") else {
            return;
        };
        f(std::str::from_utf8(name).unwrap_or_default(), value);
    }
}

impl RawRecord {
    /// Validates `bytes` as an encoded record and wraps it without copying.
    pub fn new(bytes: Bytes) -> Result<Self, DecodeError> {
        layout(&bytes)?;
        Ok(RawRecord(bytes))
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The encoded length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the encoding is empty (never for a valid record).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn layout(&self) -> Layout {
        // Validated at construction, so this cannot fail.
        layout(&self.0).expect("RawRecord is validated on construction")
    }

    /// The key, if any, as a slice of the shared buffer.
    pub fn key(&self) -> Option<Bytes> {
        self.layout().key.map(|(s, e)| self.0.slice(s..e))
    }

    /// The key as a borrowed slice (no reference count traffic).
    pub fn key_bytes(&self) -> Option<&[u8]> {
        self.layout().key.map(|(s, e)| &self.0[s..e])
    }

    /// Iterates over headers in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Bytes)> + '_ {
        let l = self.layout();
        let mut c = Cursor {
            buf: &self.0,
            pos: l.headers_start,
        };
        (0..l.header_count).map(move |_| {
            let n = c.u16("").unwrap_or(0) as usize;
            let name = c.take(n, "").unwrap_or_default();
            let v = c.u32("").unwrap_or(0) as usize;
            let start = c.pos;
            let _ = c.take(v, "");
            (
                std::str::from_utf8(name).unwrap_or_default(),
                self.0.slice(start..start + v),
            )
        })
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<Bytes> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The payload, as a slice of the shared buffer.
    pub fn payload(&self) -> Bytes {
        self.0.slice(self.layout().payload_start..)
    }

    /// Decodes into an owned [`Record`] (copies header names only).
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key(),
            headers: self.headers().map(|(n, v)| (n.to_string(), v)).collect(),
            payload: self.payload(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record_strategy() -> impl Strategy<Value = Record> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(
                (
                    "[a-z-]{0,12}",
                    proptest::collection::vec(any::<u8>(), 0..20),
                ),
                0..5,
            ),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(|(key, headers, payload)| Record {
                key: key.map(Bytes::from),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n, Bytes::from(v)))
                    .collect(),
                payload: Bytes::from(payload),
            })
    }

    proptest! {
        #[test]
        fn record_roundtrips(r in record_strategy()) {
            let raw = r.to_raw();
            prop_assert_eq!(raw.len(), r.encoded_len());
            let back = RawRecord::new(raw.as_bytes().clone()).unwrap();
            prop_assert_eq!(back.to_record(), r);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(raw) = RawRecord::new(Bytes::from(bytes)) {
                let _ = raw.to_record();
            }
        }
    }

    #[test]
    fn header_lookup_finds_first_match() {
        let raw = Record::new("p")
            .with_header("a", "1")
            .with_header("a", "2")
            .to_raw();
        assert_eq!(raw.header("a").unwrap(), Bytes::from("1"));
        assert_eq!(raw.header("b"), None);
        assert_eq!(raw.key(), None);
    }
}
