//! The ids each topic saw within the dedup window, kept in memory as
//! NATS JetStream keeps its duplicate window: a new id costs no lookup and
//! no index entry (an index on ids cost the store a third of its appends
//! per second). The map holds a hash of topic and id and the event's
//! position; a hit is confirmed against the stored event, so a hash
//! collision never makes a new event a duplicate. It is rebuilt from the
//! topics' newest events when the store opens, so the window survives a
//! restart. Its size follows the rate of appends times the window.

use std::collections::{HashMap, VecDeque};

use rusqlite::{params, Connection};

use super::{sql, unsql};

/// Recently seen ids; see the module documentation.
#[derive(Debug, Default)]
pub(super) struct Recent {
    /// The window, in milliseconds.
    window: u64,
    /// Hash of topic and id → the position of the event that had it.
    first: HashMap<u64, u64>,
    /// Further positions of a hash already in `first` (collisions).
    more: HashMap<u64, Vec<u64>>,
    /// (appended at, hash, position), oldest first, for expiry.
    order: VecDeque<(u64, u64, u64)>,
}

impl Recent {
    /// An empty window of `window` milliseconds, filled from the newest
    /// events of every topic in `conn` appended after `now - window`.
    pub(super) fn load(conn: &Connection, window: u64, now: u64) -> rusqlite::Result<Self> {
        let mut recent = Recent {
            window,
            ..Recent::default()
        };
        let since = now.saturating_sub(window);
        let topics: Vec<String> = conn
            .prepare("SELECT name FROM topics")?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut newest = conn.prepare(&format!(
            "SELECT position, id, appended_at FROM events WHERE {} ORDER BY seq DESC",
            super::in_topic("?1", ">", "0")
        ))?;
        let mut found = Vec::new();
        for topic in &topics {
            let rows = newest.query_map(params![topic], |row| {
                Ok((
                    unsql(row.get(0)?),
                    row.get::<_, String>(1)?,
                    unsql(row.get(2)?),
                ))
            })?;
            for row in rows {
                let (position, id, appended_at) = row?;
                if appended_at <= since {
                    break;
                }
                found.push((appended_at, hash(topic, &id), position));
            }
        }
        found.sort_unstable();
        for (appended_at, hash, position) in found {
            recent.insert(hash, position, appended_at);
        }
        Ok(recent)
    }

    /// The positions whose events may have had this hash's id.
    pub(super) fn candidates(&self, hash: u64) -> Vec<u64> {
        let mut out: Vec<u64> = self.first.get(&hash).copied().into_iter().collect();
        if let Some(more) = self.more.get(&hash) {
            out.extend(more);
        }
        out
    }

    /// Notes the id of the event at `position`, appended at `at`.
    pub(super) fn insert(&mut self, hash: u64, position: u64, at: u64) {
        match self.first.entry(hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(position);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(hash).or_default().push(position);
            }
        }
        self.order.push_back((at, hash, position));
    }

    /// Forgets the id noted for `position` (an append rolled back).
    pub(super) fn remove(&mut self, hash: u64, position: u64) {
        if let Some(more) = self.more.get_mut(&hash) {
            if let Some(i) = more.iter().position(|&p| p == position) {
                more.swap_remove(i);
                if more.is_empty() {
                    self.more.remove(&hash);
                }
                return;
            }
        }
        if self.first.get(&hash) == Some(&position) {
            match self.more.get_mut(&hash).and_then(Vec::pop) {
                Some(next) => {
                    self.first.insert(hash, next);
                    if self.more.get(&hash).is_some_and(Vec::is_empty) {
                        self.more.remove(&hash);
                    }
                }
                None => {
                    self.first.remove(&hash);
                }
            }
        }
        // Its `order` entry finds nothing to remove when it expires.
    }

    /// Forgets the ids appended at or before `now - window`.
    pub(super) fn expire(&mut self, now: u64) {
        let since = now.saturating_sub(self.window);
        while let Some(&(at, hash, position)) = self.order.front() {
            if at > since {
                break;
            }
            self.order.pop_front();
            self.remove(hash, position);
        }
    }
}

/// FNV-1a of the topic, a separator and the id.
pub(super) fn hash(topic: &str, id: &str) -> u64 {
    let step = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    let h = topic.bytes().fold(0xcbf2_9ce4_8422_2325, step);
    id.bytes().fold(step(h, 0xff), step)
}

/// The id and version of the event at `position` in `topic`, if it is
/// still there.
pub(super) fn stored(
    conn: &Connection,
    topic: &str,
    position: u64,
) -> rusqlite::Result<Option<(String, Option<u64>)>> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(&format!(
        "SELECT id, version FROM events WHERE seq = {}",
        super::seq_sql("?1", "?2")
    ))?
    .query_row(params![topic, sql(position)], |row| {
        Ok((row.get(0)?, row.get::<_, Option<i64>>(1)?.map(unsql)))
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collisions_keep_every_position_and_expiry_forgets_the_old() {
        let mut recent = Recent {
            window: 100,
            ..Recent::default()
        };
        recent.insert(7, 1, 10);
        recent.insert(7, 2, 20);
        recent.insert(8, 3, 30);
        assert_eq!(recent.candidates(7), [1, 2]);
        recent.remove(7, 1);
        assert_eq!(recent.candidates(7), [2]);
        recent.expire(125);
        assert_eq!(
            recent.candidates(7),
            Vec::<u64>::new(),
            "appended at 20: past the window at 125"
        );
        assert_eq!(recent.candidates(8), [3]);
        assert_ne!(hash("a", "bc"), hash("ab", "c"));
    }
}
