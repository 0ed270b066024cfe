//! Consumer groups on SQLite: each group's cursor in `subscriptions`, and
//! the events it has taken from its topic but not finished in `pending`
//! (how often each was delivered, when it may be delivered again, and the
//! lease of the delivery under way). All of it runs in the writer's
//! transactions, so a lease, an ack and a move to the dead-letter topic
//! are each all or nothing.

use std::collections::HashSet;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Transaction};

use super::{apply, event, in_topic, last_position, seq_sql, sql, unsql, Group, COLUMNS};
use crate::event::{Event, ExpectedVersion, NewEvent};
use crate::store::{Append, StoreError};
use crate::subscription::{
    ack_id, parse_ack_id, Delivery, Ordering, Seek, Start, SubscriptionConfig,
};

/// Events a group holds pending at most, beyond what is in flight: its
/// cursor moves on only as these are finished.
const PENDING_AHEAD: u64 = 256;

/// Topic rows one refill looks at, at most (type filters skip some).
const SCAN: u64 = 1024;

/// Creates or updates the group of `config`.
pub(super) fn subscribe(
    tx: &Transaction<'_>,
    group: &mut Group,
    config: SubscriptionConfig,
) -> rusqlite::Result<Result<(), StoreError>> {
    let topic: Option<String> = tx
        .prepare_cached("SELECT topic FROM subscriptions WHERE name = ?1")?
        .query_row(params![config.name], |row| row.get(0))
        .optional()?;
    match topic {
        Some(topic) if topic != config.topic => {
            return Ok(Err(StoreError(format!(
                "subscription `{}` follows topic `{topic}`, not `{}`",
                config.name, config.topic
            ))))
        }
        Some(_) => {}
        None => {
            let cursor = match config.start {
                Start::Earliest => 0,
                Start::Latest => last_position(tx, group, &config.topic)?,
            };
            tx.prepare_cached(
                "INSERT INTO subscriptions (name, topic, cursor) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![config.name, config.topic, sql(cursor)])?;
        }
    }
    Arc::make_mut(&mut group.subscriptions).insert(config.name.clone(), Arc::new(config));
    Ok(Ok(()))
}

/// The settings of group `name`, or the error of asking for an unknown one.
fn config(group: &Group, name: &str) -> Result<Arc<SubscriptionConfig>, StoreError> {
    group
        .subscriptions
        .get(name)
        .cloned()
        .ok_or_else(|| StoreError(format!("there is no subscription named `{name}`")))
}

/// One pending event of a group.
struct Pending {
    position: u64,
    key: Option<String>,
    deliveries: u32,
    available_at: u64,
    leased_until: Option<u64>,
}

/// Up to `max` deliveries for a member of group `name`.
pub(super) fn fetch(
    tx: &Transaction<'_>,
    group: &mut Group,
    name: &str,
    max: usize,
) -> rusqlite::Result<Result<Vec<Delivery>, StoreError>> {
    let config = match config(group, name) {
        Ok(config) => config,
        Err(e) => return Ok(Err(e)),
    };
    refill(tx, &config)?;
    let now = group.now;
    let pending: Vec<Pending> = tx
        .prepare_cached(
            "SELECT position, key, deliveries, available_at, leased_until FROM pending \
             WHERE subscription = ?1 ORDER BY position",
        )?
        .query_map(params![name], |row| {
            Ok(Pending {
                position: unsql(row.get(0)?),
                key: row.get(1)?,
                deliveries: u32::try_from(row.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                available_at: unsql(row.get(3)?),
                leased_until: row.get::<_, Option<i64>>(4)?.map(unsql),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let leased = |p: &Pending| p.leased_until.is_some_and(|until| until > now);
    let in_flight = pending.iter().filter(|p| leased(p)).count();
    let room = (config.max_in_flight as usize)
        .saturating_sub(in_flight)
        .min(max);
    // With key ordering, a key's first pending event holds back the rest.
    let mut held: HashSet<&str> = HashSet::new();
    if config.ordering == Ordering::Key {
        held.extend(
            pending
                .iter()
                .filter(|p| leased(p))
                .filter_map(|p| p.key.as_deref()),
        );
    }
    let mut chosen = Vec::new();
    for p in &pending {
        if chosen.len() == room {
            break;
        }
        if config.ordering == Ordering::Key {
            if let Some(key) = p.key.as_deref() {
                if !held.insert(key) {
                    continue;
                }
            }
        }
        let due = match p.leased_until {
            Some(until) if until > now => false,
            Some(until) => {
                let wait = u64::try_from(config.backoff.after(p.deliveries).as_millis())
                    .unwrap_or(u64::MAX);
                until.saturating_add(wait) <= now && p.available_at <= now
            }
            None => p.available_at <= now,
        };
        if due {
            chosen.push(p);
        }
    }
    let lease = u64::try_from(config.ack_wait.as_millis()).unwrap_or(u64::MAX);
    let mut deliveries = Vec::with_capacity(chosen.len());
    for p in chosen {
        let Some(event) = stored_event(tx, &config.topic, p.position)? else {
            // Gone from the topic (retention): nothing left to deliver.
            forget(tx, name, p.position)?;
            continue;
        };
        if p.deliveries >= config.max_deliveries {
            to_dead_letters(tx, group, &config, event, "max_deliveries")?;
            continue;
        }
        let delivery = p.deliveries + 1;
        tx.prepare_cached(
            "UPDATE pending SET deliveries = ?3, leased_until = ?4 \
             WHERE subscription = ?1 AND position = ?2",
        )?
        .execute(params![
            name,
            sql(p.position),
            i64::from(delivery),
            sql(now.saturating_add(lease))
        ])?;
        deliveries.push(Delivery {
            ack_id: ack_id(p.position, delivery),
            delivery,
            event,
        });
    }
    Ok(Ok(deliveries))
}

/// Takes the group's next events from its topic into `pending`, as far as
/// its window allows, and moves its cursor past them.
fn refill(tx: &Transaction<'_>, config: &SubscriptionConfig) -> rusqlite::Result<()> {
    let (cursor, held): (i64, i64) = tx
        .prepare_cached(
            "SELECT cursor, (SELECT COUNT(*) FROM pending WHERE subscription = ?1) \
             FROM subscriptions WHERE name = ?1",
        )?
        .query_row(params![config.name], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let window = u64::from(config.max_in_flight) + PENDING_AHEAD;
    let mut room = window.saturating_sub(unsql(held));
    if room == 0 {
        return Ok(());
    }
    let mut next = tx.prepare_cached(&format!(
        "SELECT position, key, type FROM events WHERE {} ORDER BY seq LIMIT ?3",
        in_topic("?1", ">", "?2")
    ))?;
    let rows = next.query_map(params![config.topic, cursor, sql(SCAN)], |row| {
        Ok((
            unsql(row.get(0)?),
            row.get::<_, Option<String>>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut moved_to = None;
    let mut add = tx.prepare_cached(
        "INSERT INTO pending (subscription, position, key, deliveries, available_at) \
         VALUES (?1, ?2, ?3, 0, 0)",
    )?;
    for row in rows {
        let (position, key, ty) = row?;
        if config.wants(&ty) {
            add.execute(params![config.name, sql(position), key])?;
            room -= 1;
        }
        moved_to = Some(position);
        if room == 0 {
            break;
        }
    }
    if let Some(position) = moved_to {
        tx.prepare_cached("UPDATE subscriptions SET cursor = ?2 WHERE name = ?1")?
            .execute(params![config.name, sql(position)])?;
    }
    Ok(())
}

fn stored_event(
    tx: &Transaction<'_>,
    topic: &str,
    position: u64,
) -> rusqlite::Result<Option<Event>> {
    tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM events WHERE seq = {}",
        seq_sql("?1", "?2")
    ))?
    .query_row(params![topic, sql(position)], event)
    .optional()
}

fn forget(tx: &Transaction<'_>, name: &str, position: u64) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM pending WHERE subscription = ?1 AND position = ?2")?
        .execute(params![name, sql(position)])?;
    Ok(())
}

/// Appends `event` to the group's dead-letter topic, with why and whose,
/// and takes it off the group's pending events.
fn to_dead_letters(
    tx: &Transaction<'_>,
    group: &mut Group,
    config: &SubscriptionConfig,
    event: Event,
    reason: &str,
) -> rusqlite::Result<()> {
    forget(tx, &config.name, event.position)?;
    let mut extensions = event.extensions;
    extensions.insert("deadletterreason".into(), reason.into());
    extensions.insert("deadlettersubscription".into(), config.name.clone());
    extensions.insert("deadletterposition".into(), event.position.to_string());
    let letter = NewEvent {
        id: event.id,
        source: event.source,
        ty: event.ty,
        time: Some(event.time),
        datacontenttype: event.datacontenttype,
        data: event.data,
        extensions,
    };
    let append = Append {
        topic: config.dead_letter_topic(),
        key: event.key,
        expected: ExpectedVersion::Any,
        events: vec![letter],
    };
    // Refused only as a duplicate of a letter already there.
    apply(tx, &append, group).map(drop)
}

/// The position of the delivery `ack_id` of group `name` while its lease
/// holds.
fn leased(
    tx: &Transaction<'_>,
    group: &Group,
    name: &str,
    ack_id: &str,
) -> rusqlite::Result<Option<u64>> {
    let Some((position, delivery)) = parse_ack_id(ack_id) else {
        return Ok(None);
    };
    let lease = tx
        .prepare_cached(
            "SELECT deliveries, leased_until FROM pending WHERE subscription = ?1 AND position = ?2",
        )?
        .query_row(params![name, sql(position)], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?))
        })
        .optional()?;
    Ok(match lease {
        Some((deliveries, Some(until)))
            if deliveries == i64::from(delivery) && unsql(until) > group.now =>
        {
            Some(position)
        }
        _ => None,
    })
}

/// Acks each of `ack_ids` whose lease holds.
pub(super) fn ack(
    tx: &Transaction<'_>,
    group: &mut Group,
    name: &str,
    ack_ids: &[String],
) -> rusqlite::Result<Result<Vec<bool>, StoreError>> {
    if let Err(e) = config(group, name) {
        return Ok(Err(e));
    }
    let mut acked = Vec::with_capacity(ack_ids.len());
    for ack_id in ack_ids {
        let position = leased(tx, group, name, ack_id)?;
        if let Some(position) = position {
            forget(tx, name, position)?;
        }
        acked.push(position.is_some());
    }
    // Room in flight: members held back by max_in_flight or a key may go on.
    group.wake |= acked.contains(&true);
    Ok(Ok(acked))
}

/// What becomes of a leased delivery.
pub(super) enum Settle {
    /// Delivered again after this many milliseconds (else the backoff).
    Nack(Option<u64>),
    /// Delivered again after this many milliseconds, this delivery not
    /// counted.
    Release(u64),
    /// Leased for another `ack_wait`.
    Extend,
    /// Sent to the dead-letter topic with this reason.
    DeadLetter(String),
}

/// Settles the delivery `ack_id` of group `name` as `how`, if its lease holds.
pub(super) fn settle(
    tx: &Transaction<'_>,
    group: &mut Group,
    name: &str,
    ack_id: &str,
    how: Settle,
) -> rusqlite::Result<Result<bool, StoreError>> {
    let config = match config(group, name) {
        Ok(config) => config,
        Err(e) => return Ok(Err(e)),
    };
    let Some(position) = leased(tx, group, name, ack_id)? else {
        return Ok(Ok(false));
    };
    let now = group.now;
    // A nack or a dead letter gives the event up; an extension keeps it.
    let frees = !matches!(how, Settle::Extend);
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    match how {
        Settle::Nack(delay) => {
            let deliveries = parse_ack_id(ack_id).map_or(1, |(_, d)| d);
            let wait = delay.unwrap_or_else(|| millis(config.backoff.after(deliveries)));
            tx.prepare_cached(
                "UPDATE pending SET leased_until = NULL, available_at = ?3 \
                 WHERE subscription = ?1 AND position = ?2",
            )?
            .execute(params![name, sql(position), sql(now.saturating_add(wait))])?;
        }
        Settle::Release(delay) => {
            tx.prepare_cached(
                "UPDATE pending SET leased_until = NULL, available_at = ?3, \
                 deliveries = MAX(deliveries - 1, 0) WHERE subscription = ?1 AND position = ?2",
            )?
            .execute(params![name, sql(position), sql(now.saturating_add(delay))])?;
        }
        Settle::Extend => {
            tx.prepare_cached(
                "UPDATE pending SET leased_until = ?3 WHERE subscription = ?1 AND position = ?2",
            )?
            .execute(params![
                name,
                sql(position),
                sql(now.saturating_add(millis(config.ack_wait)))
            ])?;
        }
        Settle::DeadLetter(reason) => {
            if let Some(event) = stored_event(tx, &config.topic, position)? {
                to_dead_letters(tx, group, &config, event, &reason)?;
            } else {
                forget(tx, name, position)?;
            }
        }
    }
    group.wake |= frees;
    Ok(Ok(true))
}

/// Puts up to `limit` letters of `dead_letters` after its redrive cursor
/// back in their groups' pending events; the count.
pub(super) fn redrive(
    tx: &Transaction<'_>,
    group: &mut Group,
    dead_letters: &str,
    limit: usize,
) -> rusqlite::Result<u64> {
    let cursor = tx
        .prepare_cached("SELECT cursor FROM redrives WHERE topic = ?1")?
        .query_row(params![dead_letters], |row| row.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0);
    let letters: Vec<Event> = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM events WHERE {} ORDER BY seq LIMIT ?3",
            in_topic("?1", ">", "?2")
        ))?
        .query_map(params![dead_letters, cursor, sql(limit as u64)], event)?
        .collect::<rusqlite::Result<_>>()?;
    let mut back = 0;
    let mut put_back = tx.prepare_cached(
        "INSERT INTO pending (subscription, position, key, deliveries, available_at) \
         SELECT ?1, ?2, ?3, 0, ?4 WHERE EXISTS (SELECT 1 FROM subscriptions WHERE name = ?1) \
         ON CONFLICT (subscription, position) DO UPDATE \
         SET deliveries = 0, available_at = excluded.available_at, leased_until = NULL",
    )?;
    for letter in &letters {
        let ext = &letter.extensions;
        let (Some(name), Some(position)) = (
            ext.get("deadlettersubscription"),
            ext.get("deadletterposition")
                .and_then(|p| p.parse::<u64>().ok()),
        ) else {
            continue;
        };
        back += put_back.execute(params![name, sql(position), letter.key, sql(group.now)])? as u64;
    }
    if let Some(last) = letters.last() {
        tx.prepare_cached(
            "INSERT INTO redrives (topic, cursor) VALUES (?1, ?2) \
             ON CONFLICT (topic) DO UPDATE SET cursor = excluded.cursor",
        )?
        .execute(params![dead_letters, sql(last.position)])?;
    }
    group.wake |= back > 0;
    Ok(back)
}

/// Moves group `name`'s cursor; its pending events are forgotten.
pub(super) fn seek(
    tx: &Transaction<'_>,
    group: &mut Group,
    name: &str,
    to: Seek,
) -> rusqlite::Result<Result<(), StoreError>> {
    let config = match config(group, name) {
        Ok(config) => config,
        Err(e) => return Ok(Err(e)),
    };
    let cursor = match to {
        Seek::Earliest => 0,
        Seek::Latest => last_position(tx, group, &config.topic)?,
        Seek::Position(position) => position.saturating_sub(1),
    };
    tx.prepare_cached("DELETE FROM pending WHERE subscription = ?1")?
        .execute(params![name])?;
    tx.prepare_cached("UPDATE subscriptions SET cursor = ?2 WHERE name = ?1")?
        .execute(params![name, sql(cursor)])?;
    group.wake = true;
    Ok(Ok(()))
}

/// How long until one of group `name`'s pending events comes due (a lease
/// runs out and its backoff passes, a nack's delay ends); `None` when none
/// waits on time. Events due now but held back (max_in_flight, a key in
/// flight) wait on an ack, which wakes consumers.
pub(super) fn next_due(
    tx: &Transaction<'_>,
    group: &mut Group,
    name: &str,
) -> rusqlite::Result<Result<Option<u64>, StoreError>> {
    let config = match config(group, name) {
        Ok(config) => config,
        Err(e) => return Ok(Err(e)),
    };
    let now = group.now;
    let mut next: Option<u64> = None;
    let mut rows = tx.prepare_cached(
        "SELECT deliveries, available_at, leased_until FROM pending WHERE subscription = ?1",
    )?;
    let rows = rows.query_map(params![name], |row| {
        Ok((
            u32::try_from(row.get::<_, i64>(0)?).unwrap_or(u32::MAX),
            unsql(row.get(1)?),
            row.get::<_, Option<i64>>(2)?.map(unsql),
        ))
    })?;
    for row in rows {
        let (deliveries, available_at, leased_until) = row?;
        let due = match leased_until {
            Some(until) => {
                let wait =
                    u64::try_from(config.backoff.after(deliveries).as_millis()).unwrap_or(u64::MAX);
                until.saturating_add(wait).max(available_at)
            }
            None => available_at,
        };
        if due > now {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
    }
    Ok(Ok(next.map(|due| due - now)))
}
