//! Forwards the core's updates to the window as the `update` event, unchanged: the frontend
//! reads obmin_client::Update's serde form (see ui/js/main.js).

use obmin_client::Update;
use tauri::{AppHandle, Emitter};
use tokio::sync::broadcast::{Receiver, error::RecvError};

pub const EVENT: &str = "update";

pub fn forward(app: AppHandle, mut updates: Receiver<Update>) {
    tauri::async_runtime::spawn(async move {
        loop {
            let update = match updates.recv().await {
                Ok(update) => update,
                // We fell behind: the frontend re-reads the room list (and the open timeline
                // with it) instead of replaying what was dropped.
                Err(RecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "update stream lagged; asking the window to reload");
                    Update::RoomsChanged
                }
                Err(RecvError::Closed) => break,
            };
            if let Err(error) = app.emit(EVENT, &update) {
                tracing::warn!(%error, "could not send an update to the window");
            }
        }
    });
}
