//! A small key-value table on a stream of its own: one message per
//! subject (`max_messages_per_subject = 1`), read with a direct get,
//! written compare-and-set with `Nats-Expected-Last-Subject-Sequence`.
//! (JetStream's own KV would do; async-nats 0.50 cannot open a bucket on
//! the 2.9 server Debian packages, whose account info it cannot read.)

use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{Config, DirectGetErrorKind, Stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tidegate_events::StoreError;

use crate::topics::failed;

/// A table named `name`: the stream `name`, subjects `{prefix}.{key}`.
#[derive(Clone)]
pub(crate) struct Records {
    js: Context,
    stream: Stream,
    prefix: String,
}

/// A key as a subject token (keys here are names and numbers; a dot
/// would split the token).
fn token(key: &str) -> String {
    key.replace('.', "~")
}

impl Records {
    /// Opens (or makes) table `name`, kept in `replicas` copies.
    pub(crate) async fn open(
        js: &Context,
        name: &str,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let prefix = format!("tgr.{}", token(name));
        let stream_name = name.replace('.', "~");
        let made = js
            .get_or_create_stream(Config {
                name: stream_name.clone(),
                subjects: vec![format!("{prefix}.>")],
                max_messages_per_subject: 1,
                num_replicas: replicas,
                allow_direct: true,
                ..Config::default()
            })
            .await;
        let stream = match made {
            Ok(stream) => stream,
            // Another replica made it between our look and our create.
            Err(e) => js
                .get_stream(&stream_name)
                .await
                .map_err(|_| failed(&format!("open the table {name}"), e))?,
        };
        Ok(Records {
            js: js.clone(),
            stream,
            prefix,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{}", self.prefix, token(key))
    }

    /// `key`'s value and revision, if it has one.
    pub(crate) async fn entry(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject(key))
            .await
        {
            Ok(message) if message.payload.is_empty() => Ok(None),
            Ok(message) => Ok(Some((message.payload, message.sequence))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed("read a record", e)),
        }
    }

    /// Writes `value` if `key` is still at `revision` (`None`: has no
    /// value, or a removed one); its new revision if it was written.
    pub(crate) async fn put(
        &self,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        // To create: a subject with no message (never written, or
        // purged), or an empty value, is as good as none.
        let expected = match revision {
            Some(revision) => revision,
            None => match self
                .stream
                .direct_get_last_for_subject(self.subject(key))
                .await
            {
                Ok(message) if message.payload.is_empty() => message.sequence,
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => 0,
                Err(e) => return Err(failed("read a record", e)),
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let sent = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await
            .map_err(|e| failed("write a record", e))?
            .await;
        match sent {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(failed("write a record", e)),
        }
    }

    /// Removes `key`: its subject is purged, so listing keys stays as
    /// short as the table.
    pub(crate) async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.stream
            .purge()
            .filter(self.subject(key))
            .await
            .map(|_| ())
            .map_err(|e| failed("remove a record", e))
    }

    /// Every key that has a value.
    pub(crate) async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut info = self
            .stream
            .info_with_subjects(format!("{}.>", self.prefix))
            .await
            .map_err(|e| failed("list records", e))?;
        let mut keys = Vec::new();
        while let Some(subject) = info.next().await {
            let (subject, _) = subject.map_err(|e| failed("list records", e))?;
            if let Some(key) = subject.strip_prefix(&format!("{}.", self.prefix)) {
                keys.push(key.replace('~', "."));
            }
        }
        Ok(keys)
    }

    /// Deletes the whole table.
    pub(crate) async fn drop_all(&self) -> Result<(), StoreError> {
        self.stream
            .purge()
            .await
            .map(|_| ())
            .map_err(|e| failed("empty a table", e))
    }
}
