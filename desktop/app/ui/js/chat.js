// The open conversation: timeline with bubbles and receipts, typing indicator, composer,
// file attachments with progress.

import { call } from "./tauri.js";
import { $, el, paintAvatar, formatTime, formatBytes, describePresence } from "./dom.js";
import { state, subscribe, changed, mergeItems, isOwn, nameOf } from "./state.js";
import { loadPrefs } from "./prefs.js";
import { showVerification } from "./settings.js";

const TYPING_IDLE_MS = 4000;
let typingSent = false;
let typingTimer = null;
const readUpTo = new Map(); // room_id -> event id of our last receipt
const moreHistory = new Map(); // room_id -> false once the room's first message is shown
let loadingOlder = false;

function ticks(item) {
  const sendState = item.send_state;
  if (!sendState) return null;
  if (sendState === "Sending") return el("span", { class: "ticks", title: "Sending", "aria-label": "sending" }, "🕓");
  if (sendState === "Read") return el("span", { class: "ticks read", title: "Read", "aria-label": "read" }, "✓✓");
  if (sendState === "Sent") return el("span", { class: "ticks", title: "Delivered", "aria-label": "delivered" }, "✓");
  return el("span", { class: "ticks", title: sendState.Failed?.error ?? "Not sent", "aria-label": "not sent" }, "⚠");
}

function sendStateName(item) {
  const sendState = item.send_state;
  return typeof sendState === "string" ? sendState.toLowerCase() : sendState ? "failed" : "";
}

function fileBody(item) {
  const file = item.content;
  const save = el("button", {
    class: "link", onclick: async () => {
      save.disabled = true;
      try {
        const path = await call("save_file", { attachment: file.attachment, name: file.name });
        save.textContent = `Saved to ${path}`;
      } catch (error) {
        save.textContent = `Could not save: ${error.message}`;
      } finally {
        save.disabled = false;
      }
    },
  }, "Save");
  return el("span", { class: "file-link" }, "📄", el("span", { class: "file-name" }, file.name),
    file.size ? el("small", {}, `(${formatBytes(file.size)})`) : null, save);
}

function itemNode(item, previous) {
  const content = item.content;
  if (content.kind === "membership") {
    const verb = { join: "joined", leave: "left", invite: "was invited", ban: "was banned" }[content.change] ?? content.change;
    return el("li", { class: "notice", dataset: { key: item.key } }, `${nameOf(content.user_id)} ${verb}`);
  }
  if (content.kind === "other") return null;
  const own = isOwn(item);
  const classes = ["msg", own ? "out" : "in", content.kind, sendStateName(item)].filter(Boolean).join(" ");
  const showSender = !own && !state.rooms.get(state.currentRoom)?.dm_peer && previous?.sender !== item.sender;
  const body = content.kind === "file" ? fileBody(item)
    : content.kind === "undecryptable" ? "🔒 Unable to decrypt this message yet." : content.body;
  return el("li", { class: classes, dataset: { key: item.key, status: sendStateName(item) } },
    showSender ? el("span", { class: "sender" }, item.sender_name ?? item.sender) : null,
    el("div", { class: "bubble" }, body),
    el("div", { class: "meta" }, el("time", {}, formatTime(item.timestamp)),
      item.encrypted ? el("span", { title: "End-to-end encrypted", "aria-label": "encrypted" }, "🔒") : null,
      ticks(item)));
}

function renderHeader() {
  const room = state.rooms.get(state.currentRoom);
  if (!room) {
    // A room we just created: the room list catches up a moment later.
    $("chat-title").textContent = "New conversation";
    $("chat-subtitle").textContent = "";
    return;
  }
  const peer = room.dm_peer;
  $("chat-title").textContent = room.name;
  $("chat-subtitle").textContent = peer ? describePresence(peer.presence) || peer.user_id : `${room.member_count} members`;
  paintAvatar($("chat-avatar"), {
    name: room.name, id: peer?.user_id ?? room.room_id, colour: peer?.avatar_colour, avatarUrl: peer?.avatar_url,
  });
  $("chat-encrypted").hidden = !room.encrypted;
  renderTrust(peer?.user_id);
}

/** Whether we verified the direct chat's peer (all their devices): a badge, else a button. */
async function renderTrust(peerId) {
  const verify = $("chat-verify");
  const badge = $("chat-verified");
  if (!peerId) {
    verify.hidden = badge.hidden = true;
    return;
  }
  verify.setAttribute("aria-label", `Verify ${nameOf(peerId)} by comparing emoji`);
  try {
    const verified = await call("user_verified", { userId: peerId });
    if (state.rooms.get(state.currentRoom)?.dm_peer?.user_id !== peerId) return; // moved on meanwhile
    badge.hidden = !verified;
    verify.hidden = verified;
    badge.title = verified ? `You verified ${nameOf(peerId)}'s devices` : "";
  } catch {
    verify.hidden = false;
    badge.hidden = true;
  }
}

async function verifyPeer() {
  const peerId = state.rooms.get(state.currentRoom)?.dm_peer?.user_id;
  if (!peerId) return;
  try {
    await call("verify_user", { userId: peerId });
  } catch (error) {
    showVerification({ id: "", other_user: peerId, status: { Cancelled: { reason: error.message } } });
  }
}

function renderTimeline() {
  const list = $("timeline");
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const items = state.timelines.get(state.currentRoom) ?? [];
  const hadFocus = document.activeElement?.id === "load-older";
  list.replaceChildren(historyNode(), ...items.map((item, i) => itemNode(item, items[i - 1])).filter(Boolean));
  if (hadFocus) ($("load-older") ?? list).focus();
  if (nearBottom) list.scrollTop = list.scrollHeight;
  markRead();
}

/** The top of the timeline: a button for older messages (scrolling up presses it too). */
function historyNode() {
  if (moreHistory.get(state.currentRoom) === false) {
    return el("li", { class: "history" }, "This is the start of the conversation.");
  }
  return el("li", { class: "history" }, el("button", {
    type: "button", id: "load-older", class: "link", "aria-busy": String(loadingOlder), onclick: loadOlder,
  }, loadingOlder ? "Loading older messages…" : "Load older messages"));
}

async function loadOlder() {
  const roomId = state.currentRoom;
  if (!roomId || loadingOlder || moreHistory.get(roomId) === false) return;
  loadingOlder = true;
  const list = $("timeline");
  const button = $("load-older");
  if (button) button.textContent = "Loading older messages…";
  const fromBottom = list.scrollHeight - list.scrollTop;
  try {
    const have = (state.timelines.get(roomId) ?? []).length;
    const { items, more } = await call("load_older", { roomId, have });
    mergeItems(roomId, items);
    moreHistory.set(roomId, more);
  } catch (error) {
    console.warn("older history:", error.message);
  } finally {
    loadingOlder = false;
  }
  if (state.currentRoom !== roomId) return;
  renderTimeline();
  // The message that was at the top stays where it was.
  list.scrollTop = list.scrollHeight - fromBottom;
}

function renderTyping() {
  const names = (state.typing.get(state.currentRoom) ?? []).filter((id) => id !== state.me?.user_id).map(nameOf);
  $("typing-indicator").textContent = names.length === 0 ? ""
    : names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
}

/** Sends a read receipt for the newest message when the window shows it. */
function markRead() {
  const items = state.timelines.get(state.currentRoom) ?? [];
  const last = [...items].reverse().find((item) => !isOwn(item) && item.event_id);
  if (!last || !document.hasFocus() || readUpTo.get(state.currentRoom) === last.event_id) return;
  readUpTo.set(state.currentRoom, last.event_id);
  // Receipts off: a private receipt (m.read.private) keeps our unread counts and other
  // devices right without telling the sender.
  call("mark_read", { roomId: state.currentRoom, private: !loadPrefs().readReceipts }).catch(() => {});
}

function setTyping(typing) {
  if (!loadPrefs().typing && typing) return;
  if (typing === typingSent) return;
  typingSent = typing;
  call("set_typing", { roomId: state.currentRoom, typing }).catch(() => {});
}

/** Errors show under the composer, never as a modal dialog that blocks the window. */
function showError(text) {
  $("composer-error").textContent = text;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { $("composer-error").textContent = ""; }, 8000);
}

async function send() {
  const input = $("composer-input");
  const body = input.value.trim();
  if (!body || !state.currentRoom) return;
  input.value = "";
  clearTimeout(typingTimer);
  setTyping(false);
  try {
    // The core queues it at once (status "Sending") and retries from its outbox; show the
    // echo now, the Timeline updates move it to ✓ and ✓✓.
    const item = await call("send_text", { roomId: state.currentRoom, body });
    mergeItems(item.room_id, [item]);
    changed({ kind: "timeline", room_id: item.room_id });
  } catch (error) {
    input.value = body;
    showError(`Could not send: ${error.message}`);
  }
  input.focus();
}

async function attach(file) {
  if (!file || !state.currentRoom) return;
  $("upload-label").textContent = `Uploading ${file.name}`;
  $("upload-bar").value = 0;
  $("upload-progress").hidden = false;
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    // Raw bytes, not JSON: Tauri passes a Uint8Array body through unchanged. The call
    // returns when the upload is done and the message queued; progress arrives meanwhile.
    const item = await call("send_file", bytes, {
      headers: {
        "x-room-id": encodeURIComponent(state.currentRoom),
        "x-file-name": encodeURIComponent(file.name),
      },
    });
    mergeItems(item.room_id, [item]);
    changed({ kind: "timeline", room_id: item.room_id });
    $("upload-progress").hidden = true;
  } catch (error) {
    $("upload-progress").hidden = true;
    showError(`Could not send ${file.name}: ${error.message}`);
  }
}

/** The core's Update::FileProgress: { key, progress: { done, total } }. */
export function fileProgress({ progress }) {
  if (progress.total > 0) {
    $("upload-progress").hidden = false;
    $("upload-bar").value = Math.round((progress.done / progress.total) * 100);
  }
  if (progress.done >= progress.total) {
    setTimeout(() => { $("upload-progress").hidden = true; }, 600);
  }
}

export async function openRoom(roomId) {
  if (state.currentRoom && state.currentRoom !== roomId) setTyping(false);
  state.currentRoom = roomId;
  $("chat-empty").hidden = true;
  $("chat-view").hidden = false;
  renderHeader();
  try {
    const items = await call("timeline", { roomId });
    state.timelines.set(roomId, []);
    mergeItems(roomId, items);
  } catch (error) {
    console.error("timeline", error);
  }
  changed({ kind: "current" });
  renderTimeline();
  renderTyping();
  $("timeline").scrollTop = $("timeline").scrollHeight;
  $("composer-input").focus();
}

export function setupChat() {
  const input = $("composer-input");
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      send();
    }
  });
  input.addEventListener("input", () => {
    setTyping(input.value.length > 0);
    clearTimeout(typingTimer);
    typingTimer = setTimeout(() => setTyping(false), TYPING_IDLE_MS);
  });
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", () => {
    const file = $("file-input").files[0];
    $("file-input").value = "";
    attach(file);
  });
  window.addEventListener("focus", markRead);
  $("chat-verify").addEventListener("click", verifyPeer);
  $("timeline").addEventListener("scroll", () => {
    if ($("timeline").scrollTop < 40) loadOlder();
  });

  subscribe((what) => {
    if (!state.currentRoom) return;
    if (what.kind === "timeline" && what.room_id === state.currentRoom) renderTimeline();
    if (what.kind === "typing" && what.room_id === state.currentRoom) renderTyping();
    if (what.kind === "rooms" || what.kind === "presence" || what.kind === "trust") renderHeader();
  });
}
