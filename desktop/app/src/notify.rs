//! Desktop notifications through tauri-plugin-notification (the system's notification
//! service; WebKitGTK's web Notification API is not wired up in Tauri on Linux).

use tauri::AppHandle;
use tauri_plugin_notification::NotificationExt;

use crate::error::{CommandError, CommandResult};

/// Shows one notification. The frontend decides when (settings, window focus).
#[tauri::command]
pub fn notify(app: AppHandle, title: String, body: String) -> CommandResult<()> {
    app.notification()
        .builder()
        .title(title)
        .body(body)
        .show()
        .map_err(|error| CommandError { kind: "notification", message: error.to_string() })
}
