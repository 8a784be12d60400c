//! Other servers asking for our users' end-to-end encryption keys: device keys with the
//! cross-signing keys others may see (`user/keys/query`) and one-time keys (`user/keys/claim`).

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use ruma::{
    OwnedDeviceId,
    api::federation::keys::{claim_keys, get_keys},
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, events::to_raw},
};

/// Most users one request may ask about.
const MAX_USERS: usize = 1000;

/// `POST /_matrix/federation/v1/user/keys/query`
pub async fn keys_query(
    State(services): State<Arc<Services>>,
    req: Ruma<get_keys::v1::Request>,
) -> Result<RumaResponse<get_keys::v1::Response>> {
    if req.body.device_keys.len() > MAX_USERS {
        return Err(Error::InvalidParam(format!("at most {MAX_USERS} users per request")));
    }
    let mut response = get_keys::v1::Response::new(BTreeMap::new());
    for (target, devices) in &req.body.device_keys {
        // Only our own users; another server's are not ours to answer for.
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
    }
    Ok(RumaResponse(response))
}

/// `POST /_matrix/federation/v1/user/keys/claim`
pub async fn keys_claim(
    State(services): State<Arc<Services>>,
    req: Ruma<claim_keys::v1::Request>,
) -> Result<RumaResponse<claim_keys::v1::Response>> {
    let mut wanted = Vec::new();
    for (user_id, devices) in &req.body.one_time_keys {
        if user_id.server_name() != services.settings.server_name {
            continue;
        }
        for (device_id, algorithm) in devices {
            wanted.push((user_id.to_string(), device_id.to_string(), algorithm.to_string()));
        }
    }
    if wanted.len() > MAX_USERS * 10 {
        return Err(Error::InvalidParam("too many devices in one claim".to_owned()));
    }
    let claimed = services.keys.claim(wanted).await?;
    let value = serde_json::to_value(&claimed).map_err(|e| Error::internal(e.to_string()))?;
    let one_time_keys = serde_json::from_value(value).map_err(|e| Error::internal(format!("claimed keys: {e}")))?;
    Ok(RumaResponse(claim_keys::v1::Response::new(one_time_keys)))
}
