// Settings: profile, appearance, notifications, privacy and security (devices and emoji
// verification).

import { call } from "./tauri.js";
import { $, el, paintAvatar, buildColourPicker, pickedColour, formatTime } from "./dom.js";
import { state, subscribe, changed, nameOf } from "./state.js";
import { loadPrefs, savePrefs, applyTheme } from "./prefs.js";

let verification = null; // the core's Verification on screen

function selectTab(tab) {
  document.querySelectorAll(".settings-nav [role=tab]").forEach((other) => {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  });
  if (tab.id === "tab-security") {
    loadDevices();
    loadSecurity();
  }
}

/** Cross-signing and key backup as the core reports them. */
async function loadSecurity() {
  try {
    const s = await call("security_status");
    $("cross-signing-status").textContent = s.cross_signing_keys_here
      ? `Cross-signing is set up on this device${s.device_cross_signed ? "; this device is signed ✓" : ""}.`
      : s.cross_signing_published
        ? "Cross-signing was set up on another device. Verify this device from there to trust it."
        : "Cross-signing is not set up.";
    $("cross-signing-form").hidden = s.cross_signing_published;
    $("backup-status").textContent = s.backup_version
      ? `Your room keys are backed up (backup version ${s.backup_version}).`
      : s.server_backup_version
        ? `There is a key backup (version ${s.server_backup_version}); restore from it to back up here too.`
        : "Key backup is off.";
  } catch (error) {
    $("backup-status").textContent = `Could not read the security status: ${error.message}`;
  }
}

async function setUpCrossSigning(event) {
  event.preventDefault();
  const password = $("cross-signing-password");
  try {
    await call("set_up_cross_signing", { password: password.value || null });
    password.value = "";
  } catch (error) {
    $("cross-signing-status").textContent = `Could not set up cross-signing: ${error.message}`;
    return;
  }
  loadSecurity();
}

async function createBackup(event) {
  event.preventDefault();
  const passphrase = $("backup-passphrase");
  const message = $("backup-message");
  message.textContent = "Starting the backup…";
  try {
    const key = await call("enable_key_backup", { passphrase: passphrase.value || null });
    passphrase.value = "";
    message.textContent = "";
    $("recovery-key").textContent = key;
    $("recovery-key-box").hidden = false;
    $("recovery-key").focus();
  } catch (error) {
    message.textContent = `Could not start the backup: ${error.message}`;
  }
  loadSecurity();
}

/** The recovery key is shown once: gone from the page when the user says it is saved. */
function hideRecoveryKey() {
  $("recovery-key").textContent = "";
  $("recovery-key-box").hidden = true;
  $("backup-create").focus();
}

async function restoreBackup(event) {
  event.preventDefault();
  const secret = $("backup-secret");
  const message = $("backup-message");
  message.textContent = "Restoring…";
  try {
    const count = await call("restore_key_backup", { secret: secret.value });
    secret.value = "";
    message.textContent = `Restored ${count} room ${count === 1 ? "key" : "keys"}; old messages are readable now.`;
  } catch (error) {
    message.textContent = `Could not restore: ${error.message}`;
  }
  loadSecurity();
}

/** Tabs follow the ARIA pattern: arrows move, Home/End jump. */
function tabKeys(event) {
  const tabs = [...document.querySelectorAll(".settings-nav [role=tab]")];
  const index = tabs.indexOf(document.activeElement);
  if (index < 0) return;
  const next = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  tab.focus();
  selectTab(tab);
}

export function renderProfile() {
  const me = state.me;
  if (!me) return;
  $("profile-name").value = me.display_name ?? "";
  buildColourPicker($("profile-colour"), "profile-colour", me.avatar_colour);
  paintAvatar($("profile-avatar"), { name: me.display_name, id: me.user_id, colour: me.avatar_colour, avatarUrl: me.avatar_url });
}

async function saveProfile(event) {
  event.preventDefault();
  const status = $("profile-status");
  status.textContent = "Saving…";
  try {
    const file = $("profile-avatar-file").files[0];
    if (file) {
      await call("set_avatar", new Uint8Array(await file.arrayBuffer()), {
        headers: { "x-file-name": encodeURIComponent(file.name) },
      });
      $("profile-avatar-file").value = "";
    }
    state.me = await call("set_profile", {
      displayName: $("profile-name").value.trim() || null,
      avatarColour: pickedColour($("profile-colour")),
    });
    changed({ kind: "me" });
    status.textContent = "Saved.";
  } catch (error) {
    status.textContent = `Could not save: ${error.message}`;
  }
}

async function loadDevices() {
  const list = $("device-list");
  try {
    const devices = await call("devices");
    list.replaceChildren(...devices.map((device) => el("li", { class: "device" },
      el("div", {},
        el("strong", {}, device.display_name || device.device_id),
        device.device_id === state.me?.device_id ? " (this device)" : "",
        el("small", {}, `${device.device_id} · ${device.verified ? "verified ✓" : "not verified"}`
          + (device.last_seen_ts ? ` · last seen ${formatTime(device.last_seen_ts)}` : ""))),
      device.device_id === state.me?.device_id || device.verified ? null
        : el("button", {
          onclick: () => call("verify_device", { userId: state.me.user_id, deviceId: device.device_id })
            .catch((error) => showVerification({ id: "", other_user: state.me.user_id, status: { Cancelled: { reason: error.message } } })),
        }, "Verify"))));
  } catch (error) {
    list.replaceChildren(el("li", {}, `Could not load devices: ${error.message}`));
  }
}

/** The core's Verification: { id, other_user, other_device, status }. */
export function showVerification(flow) {
  verification = flow;
  const status = flow.status;
  const kind = typeof status === "string" ? status : Object.keys(status)[0];
  const emojis = status.ShowEmoji ?? [];
  const box = $("verification");
  if (!box.open) box.showModal();
  const device = flow.other_device ? ` (device ${flow.other_device})` : "";
  const words = {
    Requested: `${nameOf(flow.other_user)}${device} wants to verify with you.`,
    Waiting: "Waiting for the other device…",
    ShowEmoji: "Compare these emoji with the other screen. Do they match, in the same order?",
    Done: "Verified. ✓",
    Cancelled: `Verification cancelled: ${status.Cancelled?.reason ?? ""}`,
  };
  $("verification-status").textContent = words[kind] ?? kind;
  $("verification-emoji").replaceChildren(...emojis
    .map((e) => el("li", {}, el("span", { class: "emoji", "aria-hidden": "true" }, e.symbol), e.name)));
  $("verification-accept").hidden = kind !== "Requested";
  $("verification-match").hidden = kind !== "ShowEmoji";
  $("verification-mismatch").hidden = kind !== "ShowEmoji";
  $("verification-cancel").hidden = kind === "Done" || kind === "Cancelled";
  $("verification-close").hidden = kind !== "Done" && kind !== "Cancelled";
  // Focus follows the step: the one thing to do next.
  const next = ["verification-accept", "verification-match", "verification-close", "verification-cancel"]
    .map((id) => $(id)).find((button) => !button.hidden);
  next?.focus();
  if (kind === "Done") {
    loadDevices();
    changed({ kind: "trust", user_id: flow.other_user });
  }
  return kind;
}

function verificationAction(command) {
  if (!verification) return;
  call(command, { flowId: verification.id })
    .catch((error) => showVerification({ ...verification, status: { Cancelled: { reason: error.message } } }));
}

export function setupSettings({ onBack, onLogout, notify }) {
  const prefs = loadPrefs();
  document.querySelectorAll(".settings-nav [role=tab]").forEach((tab) =>
    tab.addEventListener("click", () => selectTab(tab)));
  document.querySelector(".settings-nav ul").addEventListener("keydown", tabKeys);
  $("settings-back").addEventListener("click", onBack);
  $("logout").addEventListener("click", onLogout);
  $("profile-form").addEventListener("submit", saveProfile);

  $(`theme-${prefs.theme}`).checked = true;
  document.querySelectorAll("input[name=theme]").forEach((radio) => radio.addEventListener("change", () => {
    const next = { ...loadPrefs(), theme: radio.value };
    savePrefs(next);
    applyTheme(next.theme);
  }));

  const toggles = { "notify-enabled": "notify", "notify-preview": "notifyPreview",
    "privacy-read-receipts": "readReceipts", "privacy-typing": "typing" };
  for (const [id, key] of Object.entries(toggles)) {
    $(id).checked = prefs[key];
    $(id).addEventListener("change", () => savePrefs({ ...loadPrefs(), [key]: $(id).checked }));
  }
  $("notify-test").addEventListener("click", () => notify("Obmin", "Notifications are working.", true));

  $("cross-signing-form").addEventListener("submit", setUpCrossSigning);
  $("backup-create-form").addEventListener("submit", createBackup);
  $("backup-restore-form").addEventListener("submit", restoreBackup);
  $("recovery-key-done").addEventListener("click", hideRecoveryKey);

  $("verification-accept").addEventListener("click", () => verificationAction("verification_accept"));
  $("verification-match").addEventListener("click", () => verificationAction("verification_confirm"));
  $("verification-mismatch").addEventListener("click", () => verificationAction("verification_mismatch"));
  $("verification-cancel").addEventListener("click", () => verificationAction("verification_cancel"));
  $("verification-close").addEventListener("click", () => $("verification").close());
  // Escape on the dialog cancels a verification in progress, as the Cancel button would.
  $("verification").addEventListener("cancel", () => {
    if (!$("verification-cancel").hidden) verificationAction("verification_cancel");
  });

  subscribe((what) => {
    if (what.kind === "me") renderProfile();
  });
}
