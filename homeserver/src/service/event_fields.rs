//! A filter's `event_fields`: the events of a sync carry only the fields the client listed
//! (dot-separated paths such as `content.body`; `\.` is a dot inside a field name).
//! Bots ask for little to keep their syncs small.

use ruma::{api::client::sync::sync_events::v3, serde::Raw};
use serde_json::{Map, Value as JsonValue};

/// The parts of a dotted path, with `\.` kept as a dot inside a part.
fn path_parts(path: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'.') => {
                chars.next();
                parts.last_mut().expect("one part at least").push('.');
            }
            '.' => parts.push(String::new()),
            c => parts.last_mut().expect("one part at least").push(c),
        }
    }
    parts
}

/// Copies the value at `parts` of `from` (if there) into `into`, creating the objects on the way.
fn copy_path(from: &Map<String, JsonValue>, into: &mut Map<String, JsonValue>, parts: &[String]) {
    let Some((first, rest)) = parts.split_first() else { return };
    let Some(value) = from.get(first) else { return };
    if rest.is_empty() {
        into.insert(first.clone(), value.clone());
        return;
    }
    let Some(inner) = value.as_object() else { return };
    let entry = into.entry(first.clone()).or_insert_with(|| JsonValue::Object(Map::new()));
    if let Some(target) = entry.as_object_mut() {
        copy_path(inner, target, rest);
    }
}

/// `event` with only the listed fields.
pub fn only_fields(event: &JsonValue, fields: &[String]) -> JsonValue {
    let Some(object) = event.as_object() else { return event.clone() };
    let mut out = Map::new();
    for field in fields {
        copy_path(object, &mut out, &path_parts(field));
    }
    JsonValue::Object(out)
}

fn filter_raw<T>(events: &mut [Raw<T>], fields: &[String]) {
    for event in events {
        let Ok(value) = serde_json::from_str::<JsonValue>(event.json().get()) else { continue };
        if let Ok(json) = serde_json::value::to_raw_value(&only_fields(&value, fields)) {
            *event = Raw::from_json(json);
        }
    }
}

fn filter_state(state: &mut v3::State, fields: &[String]) {
    match state {
        v3::State::Before(events) | v3::State::After(events) => filter_raw(&mut events.events, fields),
        _ => {}
    }
}

/// Applies `event_fields` to the room events of a sync answer (timelines and state of joined
/// and left rooms), as Synapse does.
pub fn apply_to_sync(response: &mut v3::Response, fields: &[String]) {
    for room in response.rooms.join.values_mut() {
        filter_raw(&mut room.timeline.events, fields);
        filter_state(&mut room.state, fields);
    }
    for room in response.rooms.leave.values_mut() {
        filter_raw(&mut room.timeline.events, fields);
        filter_state(&mut room.state, fields);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_the_listed_fields_remain() {
        let event = json!({
            "type": "m.room.message", "sender": "@a:x", "event_id": "$e",
            "content": {"body": "hi", "msgtype": "m.text", "a.b": 1},
            "unsigned": {"age": 5}
        });
        let fields = ["type".to_owned(), "content.body".to_owned(), "content.a\\.b".to_owned(), "nope.x".to_owned()];
        assert_eq!(
            only_fields(&event, &fields),
            json!({"type": "m.room.message", "content": {"body": "hi", "a.b": 1}})
        );
        assert_eq!(only_fields(&event, &[]), json!({}));
        // A path through something that is not an object takes nothing from it.
        assert_eq!(only_fields(&event, &["type.x".to_owned()]), json!({}));
    }
}
