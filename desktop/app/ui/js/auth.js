// Login and registration screens.

import { call } from "./tauri.js";
import { $, buildColourPicker, pickedColour } from "./dom.js";

/** The core's errors are already sentences a person can act on (obmin_client::Error). */
function explain(error) {
  return error.message || "Something went wrong.";
}

async function submitWith(button, errorNode, action) {
  errorNode.textContent = "";
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Please wait…";
  try {
    return await action();
  } catch (error) {
    errorNode.textContent = explain(error);
    return null;
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function field(id) {
  return $(id).value.trim();
}

/** Wires both forms; `onSession` gets the shell's Session after a login or registration. */
export function setupAuth({ show, onSession }) {
  buildColourPicker($("register-colour"), "register-colour");

  $("go-register").addEventListener("click", () => {
    $("register-server").value = $("login-server").value;
    show("register");
    $("register-username").focus();
  });
  $("go-login").addEventListener("click", () => {
    show("login");
    $("login-username").focus();
  });

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const errorNode = $("login-error");
    if (!field("login-username") || !$("login-password").value) {
      errorNode.textContent = "Enter your username and password.";
      return;
    }
    const session = await submitWith($("login-submit"), errorNode, () =>
      call("login", {
        server: field("login-server") || "http://localhost:8008",
        username: field("login-username"),
        password: $("login-password").value,
      }));
    if (session) {
      $("login-password").value = "";
      onSession(session);
    }
  });

  $("register-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const errorNode = $("register-error");
    if (!field("register-username")) {
      errorNode.textContent = "Choose a username.";
      return;
    }
    if ($("register-password").value.length < 8) {
      errorNode.textContent = "The password needs at least 8 characters.";
      return;
    }
    const session = await submitWith($("register-submit"), errorNode, () =>
      call("register", {
        server: field("register-server") || "http://localhost:8008",
        username: field("register-username"),
        password: $("register-password").value,
        displayName: field("register-display-name") || null,
        avatarColour: pickedColour($("register-colour")),
      }));
    if (session) {
      $("register-password").value = "";
      onSession(session);
    }
  });
}
