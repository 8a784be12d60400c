//! Desktop notifications through tauri-plugin-notification (the system's notification
//! service; WebKitGTK's web Notification API is not wired up in Tauri on Linux).

use tauri::AppHandle;
use tauri_plugin_notification::NotificationExt;

use crate::error::{CommandError, CommandResult};

/// Shows one notification. The frontend decides when (settings, window focus). The text
/// comes from other people (message bodies, room names): it is made plain text here, so no
/// caller can pass markup on to the notification server.
#[tauri::command]
pub fn notify(app: AppHandle, title: String, body: String) -> CommandResult<()> {
    app.notification()
        .builder()
        .title(obmin_client::notification_title(&title))
        .body(obmin_client::notification_body(&body))
        .show()
        .map_err(|error| CommandError { kind: "notification", message: error.to_string() })
}
