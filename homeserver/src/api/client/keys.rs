//! End-to-end encryption endpoints: keys, cross-signing, signatures, to-device, key backup.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::{
    OwnedDeviceId, OwnedServerName, OwnedUserId, RoomId, UInt,
    api::client::{
        backup::{
            RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session,
            create_backup_version, delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session,
            delete_backup_version, get_backup_info, get_backup_keys, get_backup_keys_for_room,
            get_backup_keys_for_session, get_latest_backup_info, update_backup_version,
        },
        keys::{claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys},
        to_device::send_event_to_device,
    },
    to_device::DeviceIdOrAllDevices,
};
use serde_json::{Value as JsonValue, json};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        events::to_raw,
        key_backups::{BackedUpKey, Selection},
        rate_limit::{Class, Key},
        streams::Positions,
        uiaa::UiaaAction,
    },
};

/// How a failed server shows in `failures` (the error JSON it would have been).
fn remote_failure(e: &Error) -> JsonValue {
    json!({"errcode": "M_UNAVAILABLE", "error": e.to_string()})
}

fn json_of<T>(raw: &ruma::serde::Raw<T>) -> Result<JsonValue> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::BadJson(e.to_string()))
}

fn counts(map: BTreeMap<String, i64>) -> BTreeMap<ruma::OneTimeKeyAlgorithm, UInt> {
    map.into_iter().map(|(k, v)| (k.as_str().into(), UInt::new(v.max(0) as u64).unwrap_or_default())).collect()
}

/// `POST /_matrix/client/v3/keys/upload`
pub async fn upload(
    State(services): State<Arc<Services>>,
    req: Ruma<upload_keys::v3::Request>,
) -> Result<RumaResponse<upload_keys::v3::Response>> {
    let user = req.user()?.clone();
    let device_keys = req.body.device_keys.as_ref().map(json_of).transpose()?;
    let otks = req
        .body
        .one_time_keys
        .iter()
        .map(|(id, raw)| Ok((id.to_string(), json_of(raw)?)))
        .collect::<Result<Vec<_>>>()?;
    let fallback = req
        .body
        .fallback_keys
        .iter()
        .map(|(id, raw)| Ok((id.to_string(), json_of(raw)?)))
        .collect::<Result<Vec<_>>>()?;
    let counts_now = services.keys.upload(&user.user_id, user.device_id.as_str(), device_keys, otks, fallback).await?;
    Ok(RumaResponse(upload_keys::v3::Response::new(counts(counts_now))))
}

/// `POST /_matrix/client/v3/keys/query`
pub async fn query(
    State(services): State<Arc<Services>>,
    req: Ruma<get_keys::v3::Request>,
) -> Result<RumaResponse<get_keys::v3::Response>> {
    let user = req.user()?.clone();
    let mut response = get_keys::v3::Response::new();
    // Remote users: one `user/keys/query` per server; a server that fails is reported in
    // `failures` and the rest of the answer still arrives.
    let mut remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>> = BTreeMap::new();
    for (target, devices) in &req.body.device_keys {
        if target.server_name() != services.settings.server_name {
            remote.entry(target.server_name().to_owned()).or_default().insert(target.clone(), devices.clone());
        }
    }
    for (server, users) in remote {
        let targets: Vec<OwnedUserId> = users.keys().cloned().collect();
        let request = ruma::api::federation::keys::get_keys::v1::Request::new(users);
        match services.fed.send(&server, request).await {
            Ok(answer) => {
                response.device_keys.extend(answer.device_keys);
                response.master_keys.extend(answer.master_keys);
                response.self_signing_keys.extend(answer.self_signing_keys);
            }
            Err(e) => {
                response.failures.insert(server.to_string(), remote_failure(&e));
                // The cross-signing keys its `m.signing_key_update` EDUs brought still answer.
                for target in targets {
                    if let Some(key) = services.keys.cross_signing_key(target.as_str(), "master").await? {
                        response.master_keys.insert(target.clone(), to_raw(&key)?);
                    }
                    if let Some(key) = services.keys.cross_signing_key(target.as_str(), "self_signing").await? {
                        response.self_signing_keys.insert(target.clone(), to_raw(&key)?);
                    }
                }
            }
        }
    }
    for (target, devices) in &req.body.device_keys {
        if target.server_name() != services.settings.server_name {
            continue;
        }
        let only: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        let public = services.keys.public_keys_of(target.as_str(), &only).await?;
        let mut keys = BTreeMap::new();
        for (device_id, value) in public.devices {
            keys.insert(OwnedDeviceId::from(device_id), to_raw(&value)?);
        }
        response.device_keys.insert(target.clone(), keys);
        if let Some(master) = public.master {
            response.master_keys.insert(target.clone(), to_raw(&master)?);
        }
        if let Some(key) = public.self_signing {
            response.self_signing_keys.insert(target.clone(), to_raw(&key)?);
        }
        if *target == user.user_id
            && let Some(key) = services.keys.cross_signing_key(target.as_str(), "user_signing").await?
        {
            response.user_signing_keys.insert(target.clone(), to_raw(&key)?);
        }
    }
    Ok(RumaResponse(response))
}

/// `POST /_matrix/client/v3/keys/claim`
pub async fn claim(
    State(services): State<Arc<Services>>,
    req: Ruma<claim_keys::v3::Request>,
) -> Result<RumaResponse<claim_keys::v3::Response>> {
    req.user()?;
    let mut wanted = Vec::new();
    let mut remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, _>>> = BTreeMap::new();
    for (user_id, devices) in &req.body.one_time_keys {
        if user_id.server_name() != services.settings.server_name {
            remote.entry(user_id.server_name().to_owned()).or_default().insert(user_id.clone(), devices.clone());
            continue;
        }
        for (device_id, algorithm) in devices {
            wanted.push((user_id.to_string(), device_id.to_string(), algorithm.to_string()));
        }
    }
    let claimed = services.keys.claim(wanted).await?;
    let value = serde_json::to_value(&claimed).map_err(|e| Error::internal(e.to_string()))?;
    let one_time_keys = serde_json::from_value(value).map_err(|e| Error::internal(format!("claimed keys: {e}")))?;
    let mut response = claim_keys::v3::Response::new(one_time_keys);
    for (server, claims) in remote {
        let request = ruma::api::federation::keys::claim_keys::v1::Request::new(claims);
        match services.fed.send(&server, request).await {
            // Same shape on both APIs: user -> device -> key id -> key.
            Ok(answer) => response.one_time_keys.extend(answer.one_time_keys),
            Err(e) => {
                response.failures.insert(server.to_string(), remote_failure(&e));
            }
        }
    }
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v3/keys/changes`
pub async fn changes(
    State(services): State<Arc<Services>>,
    req: Ruma<get_key_changes::v3::Request>,
) -> Result<RumaResponse<get_key_changes::v3::Response>> {
    let user = req.user()?.clone();
    let parse = |t: &str| Positions::parse(t).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")));
    let (from, to) = (parse(&req.body.from)?, parse(&req.body.to)?);
    let changed = services.keys.device_list_changes(&user.user_id, from.stream, to.stream).await?;
    Ok(RumaResponse(get_key_changes::v3::Response::new(changed, Vec::new())))
}

/// `POST /_matrix/client/v3/keys/device_signing/upload`
pub async fn upload_cross_signing(
    State(services): State<Arc<Services>>,
    req: Ruma<upload_signing_keys::v3::Request>,
) -> Result<RumaResponse<upload_signing_keys::v3::Response>> {
    let user = req.user()?.clone();
    let master = req.body.master_key.as_ref().map(json_of).transpose()?;
    let self_signing = req.body.self_signing_key.as_ref().map(json_of).transpose()?;
    let user_signing = req.body.user_signing_key.as_ref().map(json_of).transpose()?;
    // The first upload needs no re-authentication (Matrix 1.11); replacing keys does, unless
    // the same keys are uploaded again (a client retrying).
    let existing = services.keys.cross_signing_key(user.user_id.as_str(), "master").await?;
    let replacing = existing.is_some()
        && master.as_ref().is_some_and(|m| Some(&m["keys"]) != existing.as_ref().map(|e| &e["keys"]));
    let uiaa = if replacing || (existing.is_some() && master.is_none()) {
        Some(
            services
                .uiaa
                .check(UiaaAction::UploadCrossSigningKeys, Some(&user.user_id), req.body.auth.as_ref())
                .await?,
        )
    } else {
        None
    };
    services.keys.upload_cross_signing(&user.user_id, master, self_signing, user_signing).await?;
    if let Some(uiaa) = uiaa {
        services.uiaa.finish(uiaa).await;
    }
    Ok(RumaResponse(upload_signing_keys::v3::Response::new()))
}

/// `POST /_matrix/client/v3/keys/signatures/upload`
pub async fn upload_signatures_handler(
    State(services): State<Arc<Services>>,
    req: Ruma<upload_signatures::v3::Request>,
) -> Result<RumaResponse<upload_signatures::v3::Response>> {
    let user = req.user()?.clone();
    let mut signed = Vec::new();
    for (target, keys) in &req.body.signed_keys {
        for (key_id, raw) in keys.iter() {
            let value: JsonValue = serde_json::from_str(raw.get()).map_err(|e| Error::BadJson(e.to_string()))?;
            signed.push((target.to_string(), key_id.to_owned(), value));
        }
    }
    let failures = services.keys.upload_signatures(&user.user_id, signed).await?;
    let mut response = upload_signatures::v3::Response::new();
    let value = serde_json::to_value(
        failures
            .into_iter()
            .map(|(u, m)| {
                (
                    u,
                    m.into_iter()
                        .map(|(k, e)| (k, json!({"errcode": "M_INVALID_SIGNATURE", "error": e})))
                        .collect::<BTreeMap<_, _>>(),
                )
            })
            .collect::<BTreeMap<_, _>>(),
    )
    .map_err(|e| Error::internal(e.to_string()))?;
    response.failures = serde_json::from_value(value).map_err(|e| Error::internal(e.to_string()))?;
    Ok(RumaResponse(response))
}

/// `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
pub async fn send_to_device(
    State(services): State<Arc<Services>>,
    req: Ruma<send_event_to_device::v3::Request>,
) -> Result<RumaResponse<send_event_to_device::v3::Response>> {
    let user = req.user()?.clone();
    let mut messages = Vec::new();
    for (target, devices) in &req.body.messages {
        for (device, raw) in devices {
            let device = match device {
                DeviceIdOrAllDevices::DeviceId(id) => id.to_string(),
                DeviceIdOrAllDevices::AllDevices => "*".to_owned(),
            };
            messages.push((target.to_string(), device, json_of(raw)?));
        }
    }
    // Room key requests to other users make their devices answer with keys: limited per
    // sending device (`rc_key_requests`). Our own devices may ask each other freely.
    if req.body.event_type.to_string() == "m.room_key_request"
        && req.body.messages.keys().any(|target| *target != user.user_id)
    {
        services.rate_limits.check(
            Some(&user.user_id),
            &[(Class::KeyRequests, Key::Device(user.user_id.as_str(), user.device_id.as_str()))],
        )?;
    }
    services
        .keys
        .send_to_device(
            &user.user_id,
            user.device_id.as_str(),
            req.body.txn_id.as_str(),
            &req.body.event_type.to_string(),
            messages,
        )
        .await?;
    Ok(RumaResponse(send_event_to_device::v3::Response::new()))
}

// Key backup.

fn raw_algorithm(text: &str) -> Result<ruma::serde::Raw<ruma::api::client::backup::BackupAlgorithm>> {
    let value: JsonValue = serde_json::from_str(text).map_err(|e| Error::internal(e.to_string()))?;
    to_raw(&value)
}

/// `POST /_matrix/client/v3/room_keys/version`
pub async fn backup_create(
    State(services): State<Arc<Services>>,
    req: Ruma<create_backup_version::v3::Request>,
) -> Result<RumaResponse<create_backup_version::v3::Response>> {
    let user = req.user()?;
    let version = services.key_backups.create_version(&user.user_id, req.body.algorithm.json().get()).await?;
    Ok(RumaResponse(create_backup_version::v3::Response::new(version.to_string())))
}

/// `GET /_matrix/client/v3/room_keys/version`
pub async fn backup_latest(
    State(services): State<Arc<Services>>,
    req: Ruma<get_latest_backup_info::v3::Request>,
) -> Result<RumaResponse<get_latest_backup_info::v3::Response>> {
    let user = req.user()?;
    let row = services.key_backups.latest_version(&user.user_id).await?;
    Ok(RumaResponse(get_latest_backup_info::v3::Response::new(
        raw_algorithm(&row.algorithm)?,
        UInt::new(row.count as u64).unwrap_or_default(),
        row.etag.to_string(),
        row.version.to_string(),
    )))
}

/// `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn backup_info(
    State(services): State<Arc<Services>>,
    req: Ruma<get_backup_info::v3::Request>,
) -> Result<RumaResponse<get_backup_info::v3::Response>> {
    let user = req.user()?;
    let row = services.key_backups.live_version(&user.user_id, &req.body.version).await?;
    Ok(RumaResponse(get_backup_info::v3::Response::new(
        raw_algorithm(&row.algorithm)?,
        UInt::new(row.count as u64).unwrap_or_default(),
        row.etag.to_string(),
        row.version.to_string(),
    )))
}

/// `PUT /_matrix/client/v3/room_keys/version/{version}`
pub async fn backup_update(
    State(services): State<Arc<Services>>,
    req: Ruma<update_backup_version::v3::Request>,
) -> Result<RumaResponse<update_backup_version::v3::Response>> {
    let user = req.user()?;
    services.key_backups.update_version(&user.user_id, &req.body.version, req.body.algorithm.json().get()).await?;
    Ok(RumaResponse(update_backup_version::v3::Response::new()))
}

/// `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn backup_delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_backup_version::v3::Request>,
) -> Result<RumaResponse<delete_backup_version::v3::Response>> {
    let user = req.user()?;
    services.key_backups.delete_version(&user.user_id, &req.body.version).await?;
    Ok(RumaResponse(delete_backup_version::v3::Response::new()))
}

fn backed_up<T>(room_id: &RoomId, session_id: &str, raw: &ruma::serde::Raw<T>) -> Result<BackedUpKey> {
    Ok(BackedUpKey { room_id: room_id.to_string(), session_id: session_id.to_owned(), data: json_of(raw)? })
}

/// `PUT /_matrix/client/v3/room_keys/keys`
pub async fn backup_put_all(
    State(services): State<Arc<Services>>,
    req: Ruma<add_backup_keys::v3::Request>,
) -> Result<RumaResponse<add_backup_keys::v3::Response>> {
    let user = req.user()?;
    let mut keys = Vec::new();
    for (room_id, room) in &req.body.rooms {
        for (session_id, raw) in &room.sessions {
            keys.push(backed_up(room_id, session_id, raw)?);
        }
    }
    let state = services.key_backups.put_keys(&user.user_id, &req.body.version, keys).await?;
    Ok(RumaResponse(add_backup_keys::v3::Response::new(state.etag, state.count)))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn backup_put_room(
    State(services): State<Arc<Services>>,
    req: Ruma<add_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<add_backup_keys_for_room::v3::Response>> {
    let user = req.user()?;
    let keys = req
        .body
        .sessions
        .iter()
        .map(|(session_id, raw)| backed_up(&req.body.room_id, session_id, raw))
        .collect::<Result<Vec<_>>>()?;
    let state = services.key_backups.put_keys(&user.user_id, &req.body.version, keys).await?;
    Ok(RumaResponse(add_backup_keys_for_room::v3::Response::new(state.etag, state.count)))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn backup_put_session(
    State(services): State<Arc<Services>>,
    req: Ruma<add_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<add_backup_keys_for_session::v3::Response>> {
    let user = req.user()?;
    let keys = vec![backed_up(&req.body.room_id, &req.body.session_id, &req.body.session_data)?];
    let state = services.key_backups.put_keys(&user.user_id, &req.body.version, keys).await?;
    Ok(RumaResponse(add_backup_keys_for_session::v3::Response::new(state.etag, state.count)))
}

/// `GET /_matrix/client/v3/room_keys/keys`
pub async fn backup_get_all(
    State(services): State<Arc<Services>>,
    req: Ruma<get_backup_keys::v3::Request>,
) -> Result<RumaResponse<get_backup_keys::v3::Response>> {
    let user = req.user()?;
    let mut rooms: BTreeMap<ruma::OwnedRoomId, RoomKeyBackup> = BTreeMap::new();
    for key in services.key_backups.keys(&user.user_id, &req.body.version, Selection::All).await? {
        let Ok(room_id) = ruma::RoomId::parse(key.room_id) else { continue };
        rooms
            .entry(room_id)
            .or_insert_with(|| RoomKeyBackup::new(BTreeMap::new()))
            .sessions
            .insert(key.session_id, to_raw(&key.data)?);
    }
    Ok(RumaResponse(get_backup_keys::v3::Response::new(rooms)))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn backup_get_room(
    State(services): State<Arc<Services>>,
    req: Ruma<get_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<get_backup_keys_for_room::v3::Response>> {
    let user = req.user()?;
    let mut sessions = BTreeMap::new();
    let which = Selection::Room(&req.body.room_id);
    for key in services.key_backups.keys(&user.user_id, &req.body.version, which).await? {
        sessions.insert(key.session_id, to_raw(&key.data)?);
    }
    Ok(RumaResponse(get_backup_keys_for_room::v3::Response::new(sessions)))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn backup_get_session(
    State(services): State<Arc<Services>>,
    req: Ruma<get_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<get_backup_keys_for_session::v3::Response>> {
    let user = req.user()?;
    let which = Selection::Session(&req.body.room_id, &req.body.session_id);
    let keys = services.key_backups.keys(&user.user_id, &req.body.version, which).await?;
    let key = keys.into_iter().next().ok_or_else(|| Error::NotFound("No key for this session".to_owned()))?;
    Ok(RumaResponse(get_backup_keys_for_session::v3::Response::new(to_raw(&key.data)?)))
}

/// `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn backup_delete_all(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_backup_keys::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys::v3::Response>> {
    let user = req.user()?;
    let state = services.key_backups.delete_keys(&user.user_id, &req.body.version, Selection::All).await?;
    Ok(RumaResponse(delete_backup_keys::v3::Response::new(state.etag, state.count)))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn backup_delete_room(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys_for_room::v3::Response>> {
    let user = req.user()?;
    let which = Selection::Room(&req.body.room_id);
    let state = services.key_backups.delete_keys(&user.user_id, &req.body.version, which).await?;
    Ok(RumaResponse(delete_backup_keys_for_room::v3::Response::new(state.etag, state.count)))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn backup_delete_session(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys_for_session::v3::Response>> {
    let user = req.user()?;
    let which = Selection::Session(&req.body.room_id, &req.body.session_id);
    let state = services.key_backups.delete_keys(&user.user_id, &req.body.version, which).await?;
    Ok(RumaResponse(delete_backup_keys_for_session::v3::Response::new(state.etag, state.count)))
}
