//! Reading recordings back: load a session's chunks from the store (a sealed session's at the
//! versions its manifest pinned) and turn any channel into one asciicast v2 document for
//! `breakglass export` and `breakglass replay`.

use std::collections::{BTreeMap, BTreeSet};

use super::{asciicast, raw, SessionMeta, Stream};
use crate::storage::{key, RecordingStore, StorageError};

/// Why a recording could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("session metadata is not valid: {0}")]
    BadMeta(String),
    #[error("channel {0}: {1}")]
    BadChannel(u32, String),
    #[error("the recording has no channel {0}")]
    NoChannel(u32),
    #[error("the recording has no channels (the session opened none)")]
    Empty,
}

/// How a channel was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Cast,
    Raw,
}

/// One channel's stored bytes, chunks concatenated in order.
#[derive(Debug, Clone)]
pub struct ChannelData {
    pub format: Format,
    pub bytes: Vec<u8>,
    pub chunks: usize,
}

/// A session's recording as found in the store.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Absent when the gateway died before sealing the session.
    pub meta: Option<SessionMeta>,
    pub channels: BTreeMap<u32, ChannelData>,
    /// Channels read only in part ([`Select::max_channel_bytes`]).
    pub cut: BTreeSet<u32>,
}

/// Which parts of a recording [`load_some`] reads. A session can hold gigabytes (`cat
/// /dev/zero` for a minute); what reads it inside the gateway reads only what it needs and
/// a bounded part of that.
#[derive(Debug, Clone, Copy)]
pub struct Select {
    /// Terminal (asciicast) channels.
    pub terminal: bool,
    /// Raw channels that are not PostgreSQL sessions (SSH exec without a pty, subsystems).
    pub other_raw: bool,
    /// At most about this many bytes per channel (whole chunks); the rest is left unread
    /// and the channel is named in [`Loaded::cut`].
    pub max_channel_bytes: usize,
}

impl Select {
    /// Everything (export, replay, verify by hand).
    pub const ALL: Select = Select {
        terminal: true,
        other_raw: true,
        max_channel_bytes: usize::MAX,
    };
}

/// Loads every chunk under a session prefix.
pub async fn load(store: &RecordingStore, prefix: &str) -> Result<Loaded, ExportError> {
    load_some(store, prefix, Select::ALL).await
}

/// Loads the chunks under a session prefix that `select` asks for.
pub async fn load_some(
    store: &RecordingStore,
    prefix: &str,
    select: Select,
) -> Result<Loaded, ExportError> {
    let meta = match store.get(&key::session_end(prefix)).await {
        Ok(b) => Some(
            serde_json::from_slice::<SessionMeta>(&b)
                .map_err(|e| ExportError::BadMeta(e.to_string()))?,
        ),
        Err(StorageError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // A sealed session is read from its manifest, each object at the version it pinned: a
    // newer version put over a locked original (S3) is not what the gateway wrote, and an
    // object the manifest does not list is not part of the recording. An unsealed one is read
    // from what the store lists.
    let objects: Vec<(String, Option<String>)> = match &meta {
        Some(m) => m
            .objects
            .iter()
            .map(|o| (o.key.clone(), o.version.clone()))
            .collect(),
        None => store
            .list(prefix)
            .await?
            .into_iter()
            .map(|o| (o.key, None))
            .collect(),
    };
    let mut channels: BTreeMap<u32, ChannelData> = BTreeMap::new();
    // Channels looked at and not wanted (their first chunk said what they are).
    let mut skipped: BTreeSet<u32> = BTreeSet::new();
    let mut cut: BTreeSet<u32> = BTreeSet::new();
    for (obj_key, version) in objects {
        let Some(rest) = obj_key
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let Some((chdir, file)) = rest.split_once('/') else {
            continue;
        };
        let Some(ch) = chdir.strip_prefix("ch").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let (format, compressed) = if file.ends_with(".cast") {
            (Format::Cast, false)
        } else if file.ends_with(".raw.lz4") {
            (Format::Raw, true)
        } else if file.ends_with(".raw") {
            (Format::Raw, false)
        } else {
            continue;
        };
        if skipped.contains(&ch) || (format == Format::Cast && !select.terminal) {
            continue;
        }
        if channels
            .get(&ch)
            .is_some_and(|d| d.bytes.len() >= select.max_channel_bytes)
        {
            cut.insert(ch);
            continue;
        }
        let stored = match store.get_version(&obj_key, version.as_deref()).await {
            Ok(b) => b,
            // A deleted chunk: export what is left; `verify` reports the deletion.
            Err(StorageError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let bytes = if compressed {
            // The writer's own bound (see `raw::MAX_CHUNK_PLAIN`): nothing it wrote is larger.
            raw::decompress(&stored, raw::MAX_CHUNK_PLAIN as u64)
                .map_err(|e| ExportError::BadChannel(ch, format!("{obj_key}: {e}")))?
        } else {
            stored.to_vec()
        };
        let entry = channels.entry(ch).or_insert(ChannelData {
            format,
            bytes: Vec::new(),
            chunks: 0,
        });
        entry.bytes.extend_from_slice(&bytes);
        entry.chunks += 1;
        // The first chunk holds the raw header that says whether this is PostgreSQL.
        if entry.chunks == 1 && format == Format::Raw && !select.other_raw && !is_postgres(entry) {
            channels.remove(&ch);
            skipped.insert(ch);
        }
    }
    Ok(Loaded {
        meta,
        channels,
        cut,
    })
}

impl Loaded {
    /// The requested channel, or by default the first with a pty, else the first.
    pub fn pick(&self, requested: Option<u32>) -> Result<(u32, &ChannelData), ExportError> {
        if let Some(ch) = requested {
            return self
                .channels
                .get(&ch)
                .map(|d| (ch, d))
                .ok_or(ExportError::NoChannel(ch));
        }
        self.channels
            .iter()
            .find(|(_, d)| d.format == Format::Cast)
            .or_else(|| self.channels.iter().next())
            .map(|(k, d)| (*k, d))
            .ok_or(ExportError::Empty)
    }
}

/// Whether a channel holds a PostgreSQL session (protocol frames rather than a terminal).
pub fn is_postgres(data: &ChannelData) -> bool {
    data.format == Format::Raw
        && raw::decode(&data.bytes)
            .map(|d| matches!(d.header.kind, super::ChannelKind::Postgres { .. }))
            .unwrap_or(false)
}

/// Turns one channel into an asciicast v2 document.
pub fn to_asciicast(ch: u32, data: &ChannelData) -> Result<String, ExportError> {
    match data.format {
        Format::Cast => {
            let text = String::from_utf8(data.bytes.clone())
                .map_err(|e| ExportError::BadChannel(ch, format!("not UTF-8: {e}")))?;
            // Validate before handing it out.
            asciicast::parse(&text).map_err(|e| ExportError::BadChannel(ch, e.to_string()))?;
            Ok(text)
        }
        Format::Raw => {
            let d =
                raw::decode(&data.bytes).map_err(|e| ExportError::BadChannel(ch, e.to_string()))?;
            let header = asciicast::Header {
                width: 80,
                height: 24,
                timestamp: 0,
                command: match &d.header.kind {
                    super::ChannelKind::Exec { command } => Some(command.clone()),
                    super::ChannelKind::Subsystem { name } => Some(format!("subsystem:{name}")),
                    super::ChannelKind::Postgres { database, role } => {
                        Some(format!("postgres:{role}@{database}"))
                    }
                    super::ChannelKind::Shell => None,
                },
                title: Some(format!(
                    "session {} channel {ch} (no pty)",
                    d.header.session_id
                )),
                env: BTreeMap::new(),
                extra: Some(
                    serde_json::json!({ "source_format": "breakglass-raw-v1", "channel": ch }),
                ),
            };
            let mut out = asciicast::encode_header(&header);
            let mut o = asciicast::Utf8Carry::default();
            let mut i = asciicast::Utf8Carry::default();
            let mut last = 0.0;
            for f in &d.frames {
                let t = f.time_us as f64 / 1e6;
                last = t;
                let (kind, text) = match f.stream {
                    Stream::In => (asciicast::EventKind::Input, i.push(&f.data)),
                    Stream::Out | Stream::Err => (asciicast::EventKind::Output, o.push(&f.data)),
                };
                if !text.is_empty() {
                    out.extend_from_slice(&asciicast::encode_event(t, kind, &text));
                }
            }
            for (kind, rest) in [
                (asciicast::EventKind::Output, o.finish()),
                (asciicast::EventKind::Input, i.finish()),
            ] {
                if !rest.is_empty() {
                    out.extend_from_slice(&asciicast::encode_event(last, kind, &rest));
                }
            }
            String::from_utf8(out).map_err(|e| ExportError::BadChannel(ch, e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::raw::{encode_frame, encode_header, RawHeader};
    use crate::record::ChannelKind;

    fn raw_chunk(kind: Option<ChannelKind>, frames: usize) -> bytes::Bytes {
        let mut b = match kind {
            Some(kind) => encode_header(&RawHeader {
                session_id: "s-1".into(),
                channel: 0,
                kind,
            }),
            None => Vec::new(),
        };
        for i in 0..frames {
            encode_frame(
                &mut b,
                Stream::In,
                std::time::Duration::from_millis(i as u64),
                &crate::pg::wire::message(b'Q', b"SELECT 1\0"),
            );
        }
        b.into()
    }

    #[tokio::test]
    async fn a_selective_load_reads_only_what_it_asks_for_and_says_what_it_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RecordingStore::local(dir.path()).expect("store");
        let p = "sessions/2026/12/04/s-1";
        let pg = ChannelKind::Postgres {
            database: "d".into(),
            role: "r".into(),
        };
        let exec = ChannelKind::Exec {
            command: "cat /dev/zero".into(),
        };
        for (k, b) in [
            (
                format!("{p}/ch0000/00000001.cast"),
                bytes::Bytes::from_static(b"{}\n"),
            ),
            (format!("{p}/ch0001/00000001.raw"), raw_chunk(Some(pg), 10)),
            (format!("{p}/ch0001/00000002.raw"), raw_chunk(None, 10)),
            (format!("{p}/ch0002/00000001.raw"), raw_chunk(Some(exec), 3)),
            (format!("{p}/ch0002/00000002.raw"), raw_chunk(None, 3)),
        ] {
            store.put_new(&k, b).await.expect("put");
        }
        let all = load(&store, p).await.expect("load");
        assert_eq!(all.channels.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(all.channels[&1].chunks, 2);
        assert!(all.cut.is_empty());

        let some = load_some(
            &store,
            p,
            Select {
                terminal: false,
                other_raw: false,
                max_channel_bytes: 1,
            },
        )
        .await
        .expect("load");
        assert_eq!(some.channels.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(
            some.channels[&1].chunks, 1,
            "the second chunk is past the cap"
        );
        assert_eq!(some.cut.iter().copied().collect::<Vec<_>>(), [1]);
        assert!(is_postgres(&some.channels[&1]));
    }
}
