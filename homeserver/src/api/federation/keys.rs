//! The key server (`/_matrix/key/v2/server`) and the notary (`/_matrix/key/v2/query`).

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    MilliSecondsSinceUnixEpoch,
    api::federation::discovery::{get_remote_server_keys, get_remote_server_keys_batch, get_server_keys},
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};

/// Most servers one notary request may ask about (each may cost an outbound fetch).
const MAX_NOTARY_SERVERS: usize = 100;

pub async fn server_keys(
    State(services): State<Arc<Services>>,
    _req: Ruma<get_server_keys::v2::Request>,
) -> Result<RumaResponse<get_server_keys::v2::Response>> {
    Ok(RumaResponse(get_server_keys::v2::Response::new(services.own_key_document()?)))
}

pub async fn server_keys_by_id(
    State(services): State<Arc<Services>>,
) -> Result<RumaResponse<get_server_keys::v2::Response>> {
    Ok(RumaResponse(get_server_keys::v2::Response::new(services.own_key_document()?)))
}

fn ms(ts: MilliSecondsSinceUnixEpoch) -> i64 {
    i64::try_from(u64::from(ts.get())).unwrap_or(i64::MAX)
}

pub async fn notary_one(
    State(services): State<Arc<Services>>,
    req: Ruma<get_remote_server_keys::v2::Request>,
) -> Result<RumaResponse<get_remote_server_keys::v2::Response>> {
    let keys = services.notary_keys(&req.body.server_name, ms(req.body.minimum_valid_until_ts)).await?;
    Ok(RumaResponse(get_remote_server_keys::v2::Response::new(keys)))
}

pub async fn notary_batch(
    State(services): State<Arc<Services>>,
    req: Ruma<get_remote_server_keys_batch::v2::Request>,
) -> Result<RumaResponse<get_remote_server_keys_batch::v2::Response>> {
    if req.body.server_keys.len() > MAX_NOTARY_SERVERS {
        return Err(Error::InvalidParam(format!("at most {MAX_NOTARY_SERVERS} servers per request")));
    }
    let now = ms(MilliSecondsSinceUnixEpoch::now());
    let mut all = Vec::new();
    for (server, wanted) in &req.body.server_keys {
        let minimum =
            wanted.values().filter_map(|criteria| criteria.minimum_valid_until_ts.map(ms)).max().unwrap_or(now);
        all.extend(services.notary_keys(server, minimum).await?);
    }
    Ok(RumaResponse(get_remote_server_keys_batch::v2::Response::new(all)))
}
