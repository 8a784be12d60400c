// The unlock screen: the passphrase that seals this device's encryption keys when no OS
// keyring (Secret Service) is used. Modes: "new" (choose one, typed twice), "unlock" (the one
// chosen before), "keyring" (the keys are in a keyring that failed or is not there: try
// again, or sign out).

import { call } from "./tauri.js";
import { $ } from "./dom.js";

let minChars = 8;

const TEXT = {
  new: {
    title: "Protect your encryption keys",
    intro: "Obmin keeps this device's encryption keys on this computer. No system keyring " +
      "(GNOME Keyring, KWallet) is in use, so choose a passphrase to lock them. Obmin asks for " +
      "it each time it starts; nobody can recover it for you.",
    button: "Set passphrase",
  },
  unlock: {
    title: "Unlock Obmin",
    intro: "Enter the passphrase that protects this device's encryption keys.",
    button: "Unlock",
  },
  keyring: {
    title: "Keyring not available",
    intro: "",
    button: "Try again",
  },
};

/** Shows the screen for `key` (the shell's KeyInfo, or { state: "keyring", message }). */
export function showUnlock(show, key, message) {
  const mode = key.state === "needs_passphrase" ? (key.new ? "new" : "unlock") : "keyring";
  minChars = key.min_chars ?? minChars;
  const text = TEXT[mode];
  const form = $("unlock-form");
  form.dataset.mode = mode;
  $("unlock-title").textContent = text.title;
  $("unlock-intro").textContent = mode === "keyring" ? message : text.intro;
  $("unlock-submit").textContent = text.button;
  const asks = mode !== "keyring";
  for (const id of ["unlock-passphrase-label", "unlock-passphrase"]) $(id).hidden = !asks;
  for (const id of ["unlock-confirm-label", "unlock-confirm"]) $(id).hidden = mode !== "new";
  $("unlock-passphrase").autocomplete = mode === "new" ? "new-password" : "current-password";
  $("unlock-logout-row").hidden = mode !== "keyring";
  $("unlock-passphrase").value = "";
  $("unlock-confirm").value = "";
  $("unlock-error").textContent = mode === "keyring" ? "" : (message ?? "");
  show("unlock");
  (asks ? $("unlock-passphrase") : $("unlock-submit")).focus();
}

/** Wires the form; `onUnlocked` runs once the keys can be opened (or to try again). */
export function setupUnlock({ onUnlocked, onLogout }) {
  $("unlock-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const mode = $("unlock-form").dataset.mode;
    const errorNode = $("unlock-error");
    errorNode.textContent = "";
    if (mode === "keyring") {
      onUnlocked();
      return;
    }
    const passphrase = $("unlock-passphrase").value;
    if (mode === "new" && [...passphrase].length < minChars) {
      errorNode.textContent = `Choose a passphrase of at least ${minChars} characters.`;
      $("unlock-passphrase").focus();
      return;
    }
    if (mode === "new" && passphrase !== $("unlock-confirm").value) {
      errorNode.textContent = "The two passphrases differ. Type the same one twice.";
      $("unlock-confirm").value = "";
      $("unlock-confirm").focus();
      return;
    }
    if (!passphrase) {
      errorNode.textContent = "Enter your passphrase.";
      $("unlock-passphrase").focus();
      return;
    }
    const button = $("unlock-submit");
    const label = button.textContent;
    button.disabled = true;
    button.textContent = "Unlocking…";
    try {
      await call("unlock", { passphrase });
      $("unlock-passphrase").value = "";
      $("unlock-confirm").value = "";
      onUnlocked();
    } catch (error) {
      errorNode.textContent = error.message || "Something went wrong.";
      $("unlock-passphrase").select();
      $("unlock-passphrase").focus();
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
  $("unlock-logout").addEventListener("click", onLogout);
}
