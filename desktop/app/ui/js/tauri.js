// The bridge to the Rust shell. `withGlobalTauri` exposes window.__TAURI__, so the frontend
// needs no npm package and no bundler.

const tauri = window.__TAURI__;

/** Calls a shell command; rejects with an Error whose `kind` is the shell's error kind. */
export async function call(command, args = {}, options) {
  try {
    return await tauri.core.invoke(command, args, options);
  } catch (raw) {
    // Shell errors arrive as { kind, message } (see src/error.rs); anything else is a bug.
    const error = new Error(raw?.message ?? String(raw));
    error.kind = raw?.kind ?? "internal";
    throw error;
  }
}

/** Subscribes to a shell event; returns a function that unsubscribes. */
export function on(event, handler) {
  return tauri.event.listen(event, (e) => handler(e.payload));
}
