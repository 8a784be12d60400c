//! The key server (`/_matrix/key/v2/server`) and the notary (`/_matrix/key/v2/query`).

use std::sync::{Arc, atomic::AtomicUsize};

use axum::extract::State;
use futures_util::{StreamExt, stream};
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
/// Origins one notary request may make us contact (servers whose keys we do not hold fresh).
const MAX_NOTARY_ORIGIN_FETCHES: usize = 8;
/// Servers of one notary request looked up at once.
const NOTARY_CONCURRENCY: usize = 4;

/// `GET /_matrix/key/v2/server`
pub async fn server_keys(
    State(services): State<Arc<Services>>,
    _req: Ruma<get_server_keys::v2::Request>,
) -> Result<RumaResponse<get_server_keys::v2::Response>> {
    Ok(RumaResponse(get_server_keys::v2::Response::new(services.fed.key_document()?)))
}

pub async fn server_keys_by_id(
    State(services): State<Arc<Services>>,
) -> Result<RumaResponse<get_server_keys::v2::Response>> {
    Ok(RumaResponse(get_server_keys::v2::Response::new(services.fed.key_document()?)))
}

fn ms(ts: MilliSecondsSinceUnixEpoch) -> i64 {
    i64::try_from(u64::from(ts.get())).unwrap_or(i64::MAX)
}

/// `GET /_matrix/key/v2/query/{serverName}`
pub async fn notary_one(
    State(services): State<Arc<Services>>,
    req: Ruma<get_remote_server_keys::v2::Request>,
) -> Result<RumaResponse<get_remote_server_keys::v2::Response>> {
    let budget = AtomicUsize::new(1);
    let keys = services.fed.notary_keys(&req.body.server_name, ms(req.body.minimum_valid_until_ts), &budget).await?;
    Ok(RumaResponse(get_remote_server_keys::v2::Response::new(keys)))
}

/// `POST /_matrix/key/v2/query`
pub async fn notary_batch(
    State(services): State<Arc<Services>>,
    req: Ruma<get_remote_server_keys_batch::v2::Request>,
) -> Result<RumaResponse<get_remote_server_keys_batch::v2::Response>> {
    if req.body.server_keys.len() > MAX_NOTARY_SERVERS {
        return Err(Error::InvalidParam(format!("at most {MAX_NOTARY_SERVERS} servers per request")));
    }
    let now = ms(MilliSecondsSinceUnixEpoch::now());
    // Anyone may ask a notary about up to 100 servers: at most a few origins are contacted
    // per request, a few at a time, so that one request cannot make us wait on (or call)
    // a hundred servers; the rest are answered from what we hold.
    let budget = Arc::new(AtomicUsize::new(MAX_NOTARY_ORIGIN_FETCHES));
    let wanted: Vec<_> = req
        .body
        .server_keys
        .iter()
        .map(|(server, wanted)| {
            let minimum =
                wanted.values().filter_map(|criteria| criteria.minimum_valid_until_ts.map(ms)).max().unwrap_or(now);
            (server.clone(), minimum)
        })
        .collect();
    // Owned values in each lookup: the stream's futures must not borrow the request.
    let answers: Vec<Result<_>> = stream::iter(wanted)
        .map(|(server, minimum)| {
            let (services, budget) = (services.clone(), budget.clone());
            async move { services.fed.notary_keys(&server, minimum, &budget).await }
        })
        .buffer_unordered(NOTARY_CONCURRENCY)
        .collect()
        .await;
    let mut all = Vec::new();
    for answer in answers {
        all.extend(answer?);
    }
    Ok(RumaResponse(get_remote_server_keys_batch::v2::Response::new(all)))
}
