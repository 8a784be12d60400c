// Boot: theme, screens, and the stream of updates from the shell.

import { call, on } from "./tauri.js";
import { $, paintAvatar } from "./dom.js";
import { state, changed, mergeItems, isOwn } from "./state.js";
import { loadPrefs, applyTheme } from "./prefs.js";
import { setupAuth } from "./auth.js";
import { setupUnlock, showUnlock } from "./unlock.js";
import { setupRooms, renderRooms } from "./rooms.js";
import { setupChat, openRoom, fileProgress } from "./chat.js";
import { setupSettings, renderProfile, showVerification } from "./settings.js";

const SCREENS = ["unlock", "login", "register", "main", "settings"];

function show(name) {
  for (const screen of SCREENS) $(`screen-${screen}`).hidden = screen !== name;
  document.body.dataset.screen = name;
}

function renderMe() {
  const me = state.me;
  if (!me) return;
  $("me-name").textContent = me.display_name || me.user_id;
  $("me-id").textContent = me.user_id;
  paintAvatar($("me-avatar"), { name: me.display_name, id: me.user_id, colour: me.avatar_colour, avatarUrl: me.avatar_url });
}

/** Desktop notification through the shell (tauri-plugin-notification). */
function notify(title, body, force = false) {
  const prefs = loadPrefs();
  if (!force && !prefs.notify) return;
  call("notify", { title, body: prefs.notifyPreview || force ? body : "New message" }).catch(() => {});
}

/** A live message from someone else in a room not on screen (or the window is hidden). */
function maybeNotify(item) {
  if (isOwn(item) || !["text", "file"].includes(item.content.kind)) return;
  if (document.hasFocus() && state.currentRoom === item.room_id) return;
  const room = state.rooms.get(item.room_id);
  const text = item.content.kind === "file" ? `📄 ${item.content.name}` : item.content.body;
  notify(room?.name ?? item.sender_name ?? "Obmin", text);
}

function showConnection(connection) {
  state.connection = connection;
  const banner = $("connection-banner");
  if (!connection || connection === "Online" || !state.me) {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  if (connection === "Offline") {
    banner.textContent = "Offline. Messages you write are sent when the connection is back.";
  } else {
    const seconds = Math.ceil((connection.Reconnecting?.retry_in_ms ?? 0) / 1000);
    banner.textContent = `Connection lost. Reconnecting${seconds > 1 ? ` in ${seconds} s` : ""}…`;
  }
}

async function reloadRooms() {
  try {
    const rooms = await call("rooms");
    state.rooms = new Map(rooms.map((room) => [room.room_id, room]));
    changed({ kind: "rooms" });
  } catch (error) {
    console.error("rooms", error);
  }
}

/** Applies one of the core's Updates (obmin_client::Update, serialised by serde). */
function applyUpdate(update) {
  switch (update.type) {
    case "rooms_changed":
      reloadRooms();
      break;
    case "timeline": {
      const item = update.item;
      const known = (state.timelines.get(item.room_id) ?? []).some((other) => other.key === item.key);
      if (state.timelines.has(item.room_id)) {
        mergeItems(item.room_id, [item]);
        changed({ kind: "timeline", room_id: item.room_id });
      }
      if (!known) maybeNotify(item);
      break;
    }
    case "typing":
      state.typing.set(update.room_id, update.user_ids);
      changed({ kind: "typing", room_id: update.room_id });
      break;
    case "presence":
      for (const room of state.rooms.values()) {
        if (room.dm_peer?.user_id === update.user_id) room.dm_peer.presence = update.presence;
      }
      changed({ kind: "presence" });
      break;
    case "profile":
      if (update.user.user_id === state.me?.user_id) {
        Object.assign(state.me, {
          display_name: update.user.display_name,
          avatar_colour: update.user.avatar_colour,
          avatar_url: update.user.avatar_url,
        });
        renderMe();
        changed({ kind: "me" });
      }
      for (const room of state.rooms.values()) {
        if (room.dm_peer?.user_id === update.user.user_id) room.dm_peer = update.user;
      }
      changed({ kind: "rooms" });
      break;
    case "connection":
      showConnection(update.state);
      break;
    case "file_progress":
      fileProgress(update);
      break;
    case "verification":
      if (showVerification(update.verification) === "Requested") {
        notify("Verification request", `${update.verification.other_user} wants to verify a device.`, true);
      }
      break;
    case "logged_out":
      resetToLogin("You have been signed out.");
      break;
    case "error":
      console.warn("core:", update.message);
      break;
    default:
      console.debug("unhandled update", update);
  }
}

function resetToLogin(reason) {
  state.me = null;
  state.rooms.clear();
  state.timelines.clear();
  state.currentRoom = null;
  $("chat-view").hidden = true;
  $("chat-empty").hidden = false;
  // A new sign-in may need the passphrase first (e.g. after a session whose keys were in a
  // key file of an earlier version).
  gate(reason);
}

function showLogin(reason) {
  show("login");
  $("login-error").textContent = reason ?? "";
  $("login-username").focus();
}

/** Errors that mean the encryption keys cannot be opened yet: back to the unlock screen. */
const KEY_ERRORS = ["locked", "keyring_unavailable", "keyring", "wrong_passphrase"];

/**
 * Before anything else, the encryption keys: a passphrase to choose or to enter when no OS
 * keyring is used; then the saved session, or the sign-in screen.
 */
async function gate(reason) {
  let key;
  try {
    key = await call("key_state");
  } catch (error) {
    showUnlock(show, { state: "keyring" }, error.message);
    return;
  }
  if (key.state === "keyring_unavailable") {
    showUnlock(show, key, "This device's encryption keys are locked in the system keyring (GNOME Keyring or " +
      "KWallet), which is not available now. Start Obmin in your desktop session, or sign out to start " +
      "afresh with a passphrase (messages only this device could read are lost).");
    return;
  }
  if (key.state !== "ready") {
    showUnlock(show, key, reason);
    return;
  }
  let me = null;
  try {
    me = await call("restore_session");
  } catch (error) {
    if (KEY_ERRORS.includes(error.kind)) {
      showUnlock(show, { state: "keyring" }, error.message);
      return;
    }
    console.warn("restore_session", error);
  }
  if (me) enterMain(me);
  else showLogin(reason);
}

async function enterMain(me) {
  state.me = me;
  renderMe();
  renderProfile();
  show("main");
  // Rooms and messages already in the local cache show at once, even offline.
  await reloadRooms();
  renderRooms();
  showConnection(state.connection);
  $("room-search").focus();
}

/** Online while the window has focus; Unavailable after a few minutes in the background. */
const AWAY_AFTER_MS = 3 * 60 * 1000;
let awayTimer = null;
function trackPresence() {
  const set = (presence) => state.me && call("set_presence", { presence }).catch(() => {});
  window.addEventListener("focus", () => {
    clearTimeout(awayTimer);
    set("Online");
  });
  window.addEventListener("blur", () => {
    clearTimeout(awayTimer);
    awayTimer = setTimeout(() => set("Unavailable"), AWAY_AFTER_MS);
  });
}

async function boot() {
  applyTheme(loadPrefs().theme);
  setupAuth({ show, onSession: enterMain });
  setupUnlock({
    onUnlocked: () => gate(),
    onLogout: async () => {
      try { await call("logout"); } catch (error) { console.warn("logout", error); } finally { resetToLogin(); }
    },
  });
  setupRooms({ onOpenRoom: openRoom });
  setupChat();
  setupSettings({
    onBack: () => { show("main"); $("open-settings").focus(); },
    onLogout: async () => {
      try { await call("logout"); } finally { resetToLogin(); }
    },
    notify,
  });
  $("open-settings").addEventListener("click", () => {
    renderProfile();
    show("settings");
    $("tab-profile").focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.dataset.screen === "settings") {
      show("main");
      $("open-settings").focus();
    }
  });

  trackPresence();
  await on("update", applyUpdate);
  await gate();
}

boot();
