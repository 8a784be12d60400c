//! The Server-Server API, served on the TLS federation listener. Handlers are thin: ruma
//! parses the request and [`Ruma`] verifies its X-Matrix signature (for endpoints that
//! require one) before anything here runs.

mod events;
mod keys;
mod media;
mod query;
mod rooms;
mod user;

use std::sync::Arc;

use axum::Router;
use ruma::api::federation::discovery::get_server_version;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::Services,
};

/// Every federation and key-server route.
pub fn routes(mut r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    use super::ruma_route;
    use ruma::api::federation::{
        authenticated_media as am, device, directory, discovery, event as ev, keys as k, membership as m, query as q,
        transactions as t,
    };
    r = ruma_route::<get_server_version::v1::Request, _, _>(r, version);
    r = ruma_route::<discovery::get_server_keys::v2::Request, _, _>(r, keys::server_keys);
    r = ruma_route::<discovery::get_remote_server_keys::v2::Request, _, _>(r, keys::notary_one);
    r = ruma_route::<discovery::get_remote_server_keys_batch::v2::Request, _, _>(r, keys::notary_batch);
    r = ruma_route::<q::get_profile_information::v1::Request, _, _>(r, query::profile);
    r = ruma_route::<q::get_room_information::v1::Request, _, _>(r, query::directory);
    r = ruma_route::<device::get_devices::v1::Request, _, _>(r, query::user_devices);
    r = ruma_route::<directory::get_public_rooms::v1::Request, _, _>(r, query::public_rooms);
    r = ruma_route::<directory::get_public_rooms_filtered::v1::Request, _, _>(r, query::public_rooms_filtered);
    r = ruma_route::<am::get_content::v1::Request, _, _>(r, media::download);
    r = ruma_route::<am::get_content_thumbnail::v1::Request, _, _>(r, media::thumbnail);
    r = ruma_route::<k::get_keys::v1::Request, _, _>(r, user::keys_query);
    r = ruma_route::<k::claim_keys::v1::Request, _, _>(r, user::keys_claim);
    r = ruma_route::<m::prepare_join_event::v1::Request, _, _>(r, rooms::make_join);
    r = ruma_route::<m::create_join_event::v2::Request, _, _>(r, rooms::send_join);
    r = ruma_route::<m::prepare_leave_event::v1::Request, _, _>(r, rooms::make_leave);
    r = ruma_route::<m::create_leave_event::v2::Request, _, _>(r, rooms::send_leave);
    r = ruma_route::<m::create_invite::v2::Request, _, _>(r, rooms::invite);
    r = ruma_route::<t::send_transaction_message::v1::Request, _, _>(r, rooms::send_transaction);
    r = ruma_route::<ev::get_event::v1::Request, _, _>(r, events::event);
    r = ruma_route::<ev::get_room_state::v1::Request, _, _>(r, events::state);
    r = ruma_route::<ev::get_room_state_ids::v1::Request, _, _>(r, events::state_ids);
    r = ruma_route::<ruma::api::federation::authorization::get_event_authorization::v1::Request, _, _>(
        r,
        events::event_auth,
    );
    r = ruma_route::<ruma::api::federation::backfill::get_backfill::v1::Request, _, _>(r, events::backfill);
    r = ruma_route::<ev::get_missing_events::v1::Request, _, _>(r, events::missing_events);
    // Older servers also ask for `/_matrix/key/v2/server/{key_id}`; the answer is the same.
    r.route("/_matrix/key/v2/server/{key_id}", axum::routing::get(keys::server_keys_by_id))
}

async fn version(
    _req: Ruma<get_server_version::v1::Request>,
) -> Result<RumaResponse<get_server_version::v1::Response>> {
    let mut server = get_server_version::v1::Server::new();
    server.name = Some("Obmin".to_owned());
    server.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    let mut response = get_server_version::v1::Response::new();
    response.server = Some(server);
    Ok(RumaResponse(response))
}
