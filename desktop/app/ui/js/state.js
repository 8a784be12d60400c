// The frontend's copy of what the shell has told it, and who wants to hear about changes.
// The client core (obmin-client) is the source of truth; this is a cache for rendering.
// Shapes are the core's types as serde serialises them (desktop/core/src/types.rs).

export const state = {
  me: null,               // the shell's Me: session info + our profile
  rooms: new Map(),       // room_id -> RoomSummary
  timelines: new Map(),   // room_id -> TimelineItem[] (oldest first)
  typing: new Map(),      // room_id -> user ids typing
  currentRoom: null,
  connection: null,       // the core's ConnectionState, once it has reported one
};

const listeners = new Set();

export function subscribe(listener) {
  listeners.add(listener);
}

/** Tells every listener what changed: { kind, room_id? }. */
export function changed(what) {
  for (const listener of listeners) listener(what);
}

export function isOwn(item) {
  return item.sender === state.me?.user_id;
}

/** How far a message of ours has got: a late echo must not move ✓✓ back to ✓. */
function progressOf(sendState) {
  return { Sending: 0, Sent: 1, Read: 2 }[sendState] ?? 1;
}

/** Inserts or replaces timeline items by their stable `key`. */
export function mergeItems(roomId, items) {
  const list = state.timelines.get(roomId) ?? [];
  for (const item of items) {
    const index = list.findIndex((other) => other.key === item.key);
    if (index < 0) {
      list.push(item);
      continue;
    }
    const old = list[index];
    const regressed = old.send_state && item.send_state && progressOf(item.send_state) < progressOf(old.send_state);
    list[index] = regressed ? { ...item, send_state: old.send_state, event_id: old.event_id ?? item.event_id } : item;
  }
  list.sort((a, b) => a.timestamp - b.timestamp);
  state.timelines.set(roomId, list);
}

/** Display name of a user as far as we know it. */
export function nameOf(userId) {
  if (userId === state.me?.user_id) return state.me.display_name || userId;
  for (const room of state.rooms.values()) {
    if (room.dm_peer?.user_id === userId) return room.dm_peer.display_name || userId;
  }
  return userId;
}
