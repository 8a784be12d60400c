//! Obmin desktop: the Tauri window over the obmin-client core. The shell only opens the
//! client, forwards its updates to the web frontend (ui/) and exposes its calls as commands;
//! all Matrix logic lives in desktop/core.

// No console window on Windows release builds; harmless elsewhere.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod commands;
mod error;
mod keys;
mod notify;
mod updates;

use std::path::PathBuf;

use tauri::Manager;

use crate::commands::AppState;

/// Where the client keeps its session, cache and keys: `--data-dir DIR` (the UI tests give
/// each run a fresh one), `$OBMIN_DESKTOP_DATA_DIR`, else the platform's app data directory
/// (`~/.local/share/org.obmin.desktop` on Linux).
fn data_dir(app: &tauri::App) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if let Some(dir) = arg.strip_prefix("--data-dir=") {
            return Ok(dir.into());
        }
        if arg == "--data-dir" {
            return args.next().map(PathBuf::from).ok_or_else(|| "--data-dir needs a directory".into());
        }
    }
    if let Some(dir) = std::env::var_os("OBMIN_DESKTOP_DATA_DIR") {
        return Ok(dir.into());
    }
    Ok(app.path().app_data_dir()?)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OBMIN_DESKTOP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    tauri::Builder::default()
        .plugin(tauri_plugin_notification::init())
        .setup(|app| {
            let data_dir = data_dir(app)?;
            tracing::info!(data_dir = %data_dir.display(), "opening the client");
            let key_storage = keys::choose(&data_dir);
            let client = tauri::async_runtime::block_on(obmin_client::Client::open_with(&data_dir, key_storage))?;
            // Subscribe before anything can start the sync loop, so no update is missed.
            updates::forward(app.handle().clone(), client.subscribe());
            app.manage(AppState { client });
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            commands::key_state,
            commands::unlock,
            commands::restore_session,
            commands::login,
            commands::register,
            commands::logout,
            commands::rooms,
            commands::timeline,
            commands::load_older,
            commands::send_text,
            commands::create_direct,
            commands::create_group,
            commands::join_room,
            commands::leave_room,
            commands::set_typing,
            commands::mark_read,
            commands::search_users,
            commands::set_presence,
            commands::set_profile,
            commands::set_avatar,
            commands::send_file,
            commands::save_file,
            commands::devices,
            commands::verify_device,
            commands::verify_user,
            commands::user_verified,
            commands::verification_accept,
            commands::verification_confirm,
            commands::verification_mismatch,
            commands::verification_cancel,
            commands::security_status,
            commands::set_up_cross_signing,
            commands::enable_key_backup,
            commands::restore_key_backup,
            commands::avatar_image,
            notify::notify,
        ])
        .build(tauri::generate_context!())
        .expect("the Tauri application failed to start")
        .run(|app, event| {
            // Close the encrypted cache before the process exits (see `Client::close`).
            if let tauri::RunEvent::Exit = event
                && let Some(state) = app.try_state::<AppState>()
            {
                tauri::async_runtime::block_on(state.client.close());
            }
        });
}
