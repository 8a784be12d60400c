// The sidebar: conversations with presence and last seen, invitations, search for rooms
// and people, and the new-conversation dialog.

import { call } from "./tauri.js";
import { $, el, paintAvatar, formatTime, describePresence } from "./dom.js";
import { state, subscribe, isOwn, nameOf } from "./state.js";

let openRoom = () => {};
let peopleQuery = 0;

/** One line of preview text for a timeline item. */
export function previewOf(item) {
  if (!item) return "";
  const content = item.content;
  const text = content.kind === "text" ? content.body
    : content.kind === "file" ? `📄 ${content.name}`
      : content.kind === "undecryptable" ? "🔒 Encrypted message" : "";
  return isOwn(item) && text ? `You: ${text}` : text;
}

function roomItem(room) {
  const peer = room.dm_peer;
  const avatar = paintAvatar(el("span", { class: "avatar", "aria-hidden": "true" }), {
    name: room.name, id: peer?.user_id ?? room.room_id, colour: peer?.avatar_colour,
    avatarUrl: peer?.avatar_url, presence: peer?.presence.presence,
  });
  const status = peer ? describePresence(peer.presence) : "";
  const preview = previewOf(room.last_message) || status;
  const label = [room.name, status, room.unread ? `${room.unread} unread` : ""].filter(Boolean).join(", ");
  const button = el("button", {
    class: "room-item", "aria-label": label, dataset: { roomId: room.room_id },
    "aria-current": state.currentRoom === room.room_id ? "true" : "false",
    onclick: () => openRoom(room.room_id),
  },
  avatar,
  el("span", { class: "room-name" }, room.name),
  el("span", { class: "room-meta" }, formatTime(room.last_message?.timestamp)),
  el("span", { class: "room-preview" }, preview),
  el("span", { class: "room-meta" }, room.unread ? el("span", { class: "unread" }, room.unread) : ""));
  return el("li", {}, button);
}

function inviteItem(room) {
  const accept = el("button", { class: "primary", onclick: () => respond(room, true) }, "Accept");
  const decline = el("button", { onclick: () => respond(room, false) }, "Decline");
  return el("li", { class: "invite" },
    el("div", { class: "room-item" },
      paintAvatar(el("span", { class: "avatar", "aria-hidden": "true" }), { name: room.name, id: room.room_id }),
      el("span", { class: "room-name" }, room.name),
      el("span"),
      el("span", { class: "room-preview" }, room.inviter ? `Invited by ${nameOf(room.inviter)}` : "Invitation")),
    el("div", { class: "invite-actions", role: "group", "aria-label": `Invitation to ${room.name}` }, accept, decline));
}

async function respond(room, accept) {
  try {
    await call(accept ? "join_room" : "leave_room", { roomId: room.room_id });
    if (accept) openRoom(room.room_id);
  } catch (error) {
    $("invite-list").append(el("li", { class: "form-error", role: "alert" }, error.message));
  }
}

function matches(room, query) {
  return !query || room.name.toLowerCase().includes(query)
    || (room.dm_peer?.user_id ?? "").toLowerCase().includes(query);
}

export function renderRooms() {
  const query = $("room-search").value.trim().toLowerCase();
  const rooms = [...state.rooms.values()];
  const joined = rooms.filter((r) => r.membership === "Joined" && matches(r, query))
    .sort((a, b) => (b.last_message?.timestamp ?? 0) - (a.last_message?.timestamp ?? 0));
  const invites = rooms.filter((r) => r.membership === "Invited");
  $("room-list").replaceChildren(...joined.map(roomItem));
  $("invite-list").replaceChildren(...invites.map(inviteItem));
  $("invites").hidden = invites.length === 0;
}

async function searchPeople() {
  const term = $("room-search").value.trim();
  const query = ++peopleQuery;
  if (term.length < 2) {
    $("people-results").hidden = true;
    return;
  }
  try {
    const people = await call("search_users", { term });
    if (query !== peopleQuery) return; // a newer search is on its way
    const mine = state.me?.user_id;
    const items = people.filter((p) => p.user_id !== mine).map((person) => el("li", {},
      el("button", {
        class: "room-item", onclick: () => startDirect(person.user_id),
        "aria-label": `Message ${person.display_name ?? person.user_id}`,
      },
      paintAvatar(el("span", { class: "avatar", "aria-hidden": "true" }),
        { name: person.display_name, id: person.user_id, avatarUrl: person.avatar_url }),
      el("span", { class: "room-name" }, person.display_name ?? person.user_id),
      el("span"),
      el("span", { class: "room-preview" }, person.user_id))));
    $("people-list").replaceChildren(...items);
    $("people-results").hidden = items.length === 0;
  } catch {
    $("people-results").hidden = true;
  }
}

async function startDirect(userId) {
  const existing = [...state.rooms.values()].find((r) => r.dm_peer?.user_id === userId && r.membership === "Joined");
  if (existing) return openRoom(existing.room_id);
  const roomId = await call("create_direct", { userId });
  $("room-search").value = "";
  renderRooms();
  $("people-results").hidden = true;
  openRoom(roomId);
}

/** Up/Down move between conversations, like a list should. */
function arrowKeys(event) {
  if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
  const items = [...document.querySelectorAll(".sidebar button.room-item")];
  const index = items.indexOf(document.activeElement);
  if (index < 0) return;
  event.preventDefault();
  items[Math.max(0, Math.min(items.length - 1, index + (event.key === "ArrowDown" ? 1 : -1)))].focus();
}

function setupNewChat() {
  const dialog = $("new-chat-dialog");
  const nameRow = [$("new-chat-name-label"), $("new-chat-name")];
  const syncKind = () => {
    const group = dialog.querySelector("input[name=kind]:checked").value === "group";
    nameRow.forEach((node) => { node.hidden = !group; });
  };
  dialog.querySelectorAll("input[name=kind]").forEach((radio) => radio.addEventListener("change", syncKind));
  $("new-chat").addEventListener("click", () => {
    $("new-chat-form").reset();
    $("new-chat-error").textContent = "";
    syncKind();
    dialog.showModal();
    $("new-chat-users").focus();
  });
  $("new-chat-cancel").addEventListener("click", () => dialog.close());
  $("new-chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const users = $("new-chat-users").value.split(/[,\s]+/).map((u) => u.trim()).filter(Boolean);
    const group = dialog.querySelector("input[name=kind]:checked").value === "group";
    if (users.length === 0 || users.some((u) => !/^@[^:]+:.+$/.test(u))) {
      $("new-chat-error").textContent = "Enter user ids like @alice:localhost.";
      return;
    }
    if (!group && users.length !== 1) {
      $("new-chat-error").textContent = "A direct message is with one person; choose Group for more.";
      return;
    }
    try {
      const roomId = group
        ? await call("create_group", { name: $("new-chat-name").value.trim() || null, userIds: users })
        : await call("create_direct", { userId: users[0] });
      dialog.close();
      openRoom(roomId);
    } catch (error) {
      $("new-chat-error").textContent = error.message;
    }
  });
}

export function setupRooms({ onOpenRoom }) {
  openRoom = onOpenRoom;
  let timer = null;
  $("room-search").addEventListener("input", () => {
    renderRooms();
    clearTimeout(timer);
    timer = setTimeout(searchPeople, 250);
  });
  document.querySelector(".sidebar").addEventListener("keydown", arrowKeys);
  setupNewChat();
  subscribe((what) => {
    if (["rooms", "presence", "current"].includes(what.kind)) renderRooms();
  });
}
