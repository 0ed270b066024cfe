//! Topics and keys as stream names and subjects.

use base64::Engine as _;

/// The stream of `topic`: `TG_` and the topic, a `.` written `~` (topic
/// names are letters, digits, `-`, `_` and `.`; stream names take no dot).
pub(crate) fn stream(topic: &str) -> String {
    format!("TG_{}", topic.replace('.', "~"))
}

/// The topic of a stream made by [`stream`], if it is one.
pub(crate) fn topic_of(stream: &str) -> Option<String> {
    stream.strip_prefix("TG_").map(|t| t.replace('~', "."))
}

/// The subject token of `topic` (a dot would split it).
fn token(topic: &str) -> String {
    topic.replace('.', "~")
}

/// Every subject of `topic`'s stream.
pub(crate) fn all_subjects(topic: &str) -> String {
    format!("tg.{}.>", token(topic))
}

/// The subject of `topic`'s first message (see the topics' writer).
pub(crate) fn genesis(topic: &str) -> String {
    format!("tg.{}.g", token(topic))
}

/// The subject of an append to `topic`, with or without a key.
pub(crate) fn subject(topic: &str, key: Option<&str>) -> String {
    match key {
        None => format!("tg.{}.e", token(topic)),
        Some(key) => format!(
            "tg.{}.k.{}",
            token(topic),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_keys_become_names_and_subject_tokens() {
        assert_eq!(stream("content.dead"), "TG_content~dead");
        assert_eq!(all_subjects("content.dead"), "tg.content~dead.>");
        assert_eq!(subject("orders", None), "tg.orders.e");
        // Any key, even one with dots, spaces and wildcards, is one token.
        let subject = subject("orders", Some("a.b c*>"));
        assert_eq!(subject.split('.').count(), 4, "{subject}");
        let token = subject.rsplit('.').next().unwrap();
        assert!(!token.contains([' ', '*', '>']), "{subject}");
    }
}
