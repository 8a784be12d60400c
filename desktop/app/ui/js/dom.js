// Small DOM helpers shared by the screens.

import { call } from "./tauri.js";

export const $ = (id) => document.getElementById(id);

/** Creates an element: el("li", { class: "x", onclick: f }, child, "text", ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Avatar colours: all carry white initials at 4.5:1 or better. */
export const AVATAR_COLOURS = [
  ["#0b6a83", "Teal"], ["#1f5fbf", "Blue"], ["#6a3fb5", "Violet"], ["#a8326e", "Raspberry"],
  ["#b23a1c", "Rust"], ["#8a5a00", "Amber"], ["#2e7d32", "Green"], ["#455a64", "Slate"],
];

/** A stable colour for someone who did not choose one. */
export function colourFor(id) {
  let hash = 0;
  for (const ch of id ?? "") hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return AVATAR_COLOURS[hash % AVATAR_COLOURS.length][0];
}

export function initials(name) {
  const clean = (name ?? "?").replace(/^[@#!]/, "").trim();
  return (clean[0] ?? "?").toUpperCase();
}

const pictures = new Map(); // mxc URI -> Promise of a data: URL (or null)

function picture(mxc) {
  if (!pictures.has(mxc)) pictures.set(mxc, call("avatar_image", { url: mxc }).catch(() => null));
  return pictures.get(mxc);
}

/** Fills an avatar element: initials on the colour, replaced by the picture once loaded. */
export function paintAvatar(node, { name, colour, id, avatarUrl, presence }) {
  node.textContent = initials(name || id);
  node.style.backgroundColor = colour || colourFor(id || name);
  node.style.backgroundImage = "";
  if (avatarUrl) {
    node.dataset.avatar = avatarUrl;
    picture(avatarUrl).then((dataUrl) => {
      if (!dataUrl || node.dataset.avatar !== avatarUrl) return;
      node.style.backgroundImage = `url("${dataUrl}")`;
      node.firstChild?.nodeType === Node.TEXT_NODE && node.firstChild.remove();
    });
  } else {
    delete node.dataset.avatar;
  }
  if (presence) {
    node.append(el("span", { class: `presence-dot presence-${presence.toLowerCase()}` }));
  }
  return node;
}

/** Builds the radio-button colour picker inside a fieldset. */
export function buildColourPicker(fieldset, name, selected) {
  fieldset.querySelectorAll("label").forEach((label) => label.remove());
  AVATAR_COLOURS.forEach(([value, label], index) => {
    const input = el("input", {
      type: "radio", name, value, id: `${name}-${index}`, "aria-label": label,
      checked: value === selected || (!selected && index === 0),
    });
    fieldset.append(el("label", { title: label }, input, el("span", { class: "swatch", style: `background:${value}` })));
  });
}

export function pickedColour(fieldset) {
  return fieldset.querySelector("input:checked")?.value ?? AVATAR_COLOURS[0][0];
}

export function formatTime(ts) {
  if (!ts) return "";
  const date = new Date(ts);
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { day: "numeric", month: "short" });
}

/** "online", "last seen 5 min ago", ... from the core's PresenceInfo. */
export function describePresence(info) {
  if (!info) return "";
  const { presence, last_active_ts: lastActiveTs, currently_active: currentlyActive } = info;
  if (presence === "Online" || currentlyActive) return "online";
  if (!lastActiveTs) return { Unavailable: "away", Offline: "offline" }[presence] ?? "status unknown";
  const minutes = Math.round((Date.now() - lastActiveTs) / 60000);
  const ago = minutes < 1 ? "just now" : minutes < 60 ? `${minutes} min ago`
    : minutes < 1440 ? `${Math.round(minutes / 60)} h ago` : formatTime(lastActiveTs);
  return `last seen ${ago}`;
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}
