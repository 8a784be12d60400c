//! HTTP: the router, the layers around it, and the Matrix endpoints.

pub mod client;
pub mod federation;
pub mod ops;
pub mod ruma;

use std::{sync::Arc, time::Instant};

use ::ruma::api::{IncomingRequest, path_builder::PathBuilder};
use axum::{
    Extension, Router,
    extract::{MatchedPath, Request, State},
    handler::Handler,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodFilter, get, on},
};
use http::{HeaderValue, Method, header};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{Any, CorsLayer},
    trace::TraceLayer,
};

use crate::{
    error::Error,
    metrics::{EndpointLabels, RequestLabels},
    service::Services,
};

/// Registers `handler` for every path (stable, legacy and unstable) ruma knows for `T`.
fn ruma_route<T, H, M>(mut router: Router<Arc<Services>>, handler: H) -> Router<Arc<Services>>
where
    T: IncomingRequest,
    H: Handler<M, Arc<Services>> + Clone,
    M: 'static,
{
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    for path in T::PATH_BUILDER.all_paths() {
        router = router.route(path, on(filter, handler.clone()));
        // An empty state key leaves `/state/{type}/` (or `/state/{type}`), which a router
        // cannot match against `/{state_key}`: route those forms too, marked as such.
        if let Some(prefix) = path.strip_suffix("/{state_key}") {
            for variant in [prefix.to_owned(), format!("{prefix}/")] {
                router = router.route(&variant, on(filter, handler.clone()).layer(Extension(ruma::EmptyStateKey)));
            }
        }
    }
    router
}

/// The whole HTTP application.
pub fn router(services: Arc<Services>) -> Router {
    use ::ruma::api::client::{
        account, alias, backup, config, context, device, directory, discovery, filter, keys, membership, message,
        presence, profile, push, read_marker, receipt, redact, relations, room, search::search_events, session, state,
        sync::sync_events, tag, threads, to_device, typing, user_directory, voip,
    };
    use client::{
        account as acc, account_data as ad, devices as dev, discovery as disc, keys as k, messages as msg,
        presence as pres, profile as prof, push as pu, register as reg, relations as rel, rooms as rm, search as se,
        session as ses, sync as sy, user_directory as ud, voip as vo,
    };

    let mut r = Router::new();
    r = ruma_route::<discovery::get_supported_versions::Request, _, _>(r, disc::versions);
    r = ruma_route::<discovery::discover_homeserver::Request, _, _>(r, disc::well_known_client);
    r = ruma_route::<discovery::get_capabilities::v3::Request, _, _>(r, disc::capabilities);
    r = ruma_route::<account::register::v3::Request, _, _>(r, reg::register);
    r = ruma_route::<account::get_username_availability::v3::Request, _, _>(r, reg::available);
    r = ruma_route::<account::check_registration_token_validity::v1::Request, _, _>(r, reg::token_validity);
    r = ruma_route::<session::get_login_types::v3::Request, _, _>(r, ses::login_types);
    r = ruma_route::<session::login::v3::Request, _, _>(r, ses::login);
    r = ruma_route::<session::logout::v3::Request, _, _>(r, ses::logout);
    r = ruma_route::<session::logout_all::v3::Request, _, _>(r, ses::logout_all);
    r = ruma_route::<account::whoami::v3::Request, _, _>(r, acc::whoami);
    r = ruma_route::<account::change_password::v3::Request, _, _>(r, acc::change_password);
    r = ruma_route::<account::deactivate::v3::Request, _, _>(r, acc::deactivate);
    r = ruma_route::<device::get_devices::v3::Request, _, _>(r, dev::list);
    r = ruma_route::<device::get_device::v3::Request, _, _>(r, dev::get);
    r = ruma_route::<device::update_device::v3::Request, _, _>(r, dev::update);
    r = ruma_route::<device::delete_device::v3::Request, _, _>(r, dev::delete);
    r = ruma_route::<device::delete_devices::v3::Request, _, _>(r, dev::delete_many);
    r = ruma_route::<profile::get_profile::v3::Request, _, _>(r, prof::get);
    r = ruma_route::<profile::get_profile_field::v3::Request, _, _>(r, prof::get_field);
    r = ruma_route::<profile::set_profile_field::v3::Request, _, _>(r, prof::set_field);
    r = ruma_route::<profile::delete_profile_field::v3::Request, _, _>(r, prof::delete_field);
    r = ruma_route::<room::create_room::v3::Request, _, _>(r, rm::create);
    r = ruma_route::<room::upgrade_room::v3::Request, _, _>(r, rm::upgrade);
    r = ruma_route::<membership::join_room_by_id::v3::Request, _, _>(r, rm::join_by_id);
    r = ruma_route::<membership::join_room_by_id_or_alias::v3::Request, _, _>(r, rm::join_by_id_or_alias);
    r = ruma_route::<membership::invite_user::v3::Request, _, _>(r, rm::invite);
    r = ruma_route::<membership::leave_room::v3::Request, _, _>(r, rm::leave);
    r = ruma_route::<membership::kick_user::v3::Request, _, _>(r, rm::kick);
    r = ruma_route::<membership::ban_user::v3::Request, _, _>(r, rm::ban);
    r = ruma_route::<membership::unban_user::v3::Request, _, _>(r, rm::unban);
    r = ruma_route::<membership::joined_rooms::v3::Request, _, _>(r, rm::joined);
    r = ruma_route::<membership::get_member_events::v3::Request, _, _>(r, rm::members);
    r = ruma_route::<membership::joined_members::v3::Request, _, _>(r, rm::joined_members_list);
    r = ruma_route::<state::get_state_events::v3::Request, _, _>(r, rm::state);
    r = ruma_route::<state::get_state_event_for_key::v3::Request, _, _>(r, rm::state_event);
    r = ruma_route::<state::send_state_event::v3::Request, _, _>(r, rm::send_state);
    r = ruma_route::<alias::create_alias::v3::Request, _, _>(r, rm::alias_create);
    r = ruma_route::<alias::get_alias::v3::Request, _, _>(r, rm::alias_get);
    r = ruma_route::<alias::delete_alias::v3::Request, _, _>(r, rm::alias_delete);
    r = ruma_route::<directory::get_room_visibility::v3::Request, _, _>(r, rm::visibility_get);
    r = ruma_route::<directory::set_room_visibility::v3::Request, _, _>(r, rm::visibility_set);
    r = ruma_route::<directory::get_public_rooms::v3::Request, _, _>(r, rm::public_rooms);
    r = ruma_route::<directory::get_public_rooms_filtered::v3::Request, _, _>(r, rm::public_rooms_filtered);
    r = ruma_route::<::ruma::api::client::room::aliases::v3::Request, _, _>(r, rm::room_aliases);
    r = ruma_route::<message::send_message_event::v3::Request, _, _>(r, msg::send);
    r = ruma_route::<message::get_message_events::v3::Request, _, _>(r, msg::messages);
    r = ruma_route::<redact::redact_event::v3::Request, _, _>(r, msg::redact);
    r = ruma_route::<room::get_room_event::v3::Request, _, _>(r, msg::event);
    r = ruma_route::<typing::create_typing_event::v3::Request, _, _>(r, msg::typing);
    r = ruma_route::<receipt::create_receipt::v3::Request, _, _>(r, msg::receipt);
    r = ruma_route::<read_marker::set_read_marker::v3::Request, _, _>(r, msg::read_markers);
    r = ruma_route::<sync_events::v3::Request, _, _>(r, sy::sync);
    r = ruma_route::<sync_events::v5::Request, _, _>(r, client::sliding_sync::sync);
    r = ruma_route::<filter::create_filter::v3::Request, _, _>(r, sy::filter_create);
    r = ruma_route::<filter::get_filter::v3::Request, _, _>(r, sy::filter_get);
    r = ruma_route::<config::set_global_account_data::v3::Request, _, _>(r, ad::set_global);
    r = ruma_route::<config::get_global_account_data::v3::Request, _, _>(r, ad::get_global);
    r = ruma_route::<config::set_room_account_data::v3::Request, _, _>(r, ad::set_room);
    r = ruma_route::<config::get_room_account_data::v3::Request, _, _>(r, ad::get_room);
    r = ruma_route::<push::get_pushrules_all::v3::Request, _, _>(r, pu::all);
    r = ruma_route::<push::get_pushrule::v3::Request, _, _>(r, pu::get);
    r = ruma_route::<push::set_pushrule::v3::Request, _, _>(r, pu::set);
    r = ruma_route::<push::delete_pushrule::v3::Request, _, _>(r, pu::delete);
    r = ruma_route::<push::get_pushrule_enabled::v3::Request, _, _>(r, pu::enabled);
    r = ruma_route::<push::set_pushrule_enabled::v3::Request, _, _>(r, pu::set_enabled);
    r = ruma_route::<push::get_pushrule_actions::v3::Request, _, _>(r, pu::actions);
    r = ruma_route::<push::set_pushrule_actions::v3::Request, _, _>(r, pu::set_actions);
    r = ruma_route::<push::get_notifications::v3::Request, _, _>(r, pu::notifications);
    r = ruma_route::<push::get_pushers::v3::Request, _, _>(r, pu::pushers);
    r = ruma_route::<push::set_pusher::v3::Request, _, _>(r, pu::set_pusher);
    r = ruma_route::<membership::forget_room::v3::Request, _, _>(r, rm::forget);
    r = ruma_route::<tag::get_tags::v3::Request, _, _>(r, ad::tags);
    r = ruma_route::<tag::create_tag::v3::Request, _, _>(r, ad::tag_put);
    r = ruma_route::<tag::delete_tag::v3::Request, _, _>(r, ad::tag_delete);
    r = ruma_route::<relations::get_relating_events::v1::Request, _, _>(r, rel::relating);
    r = ruma_route::<relations::get_relating_events_with_rel_type::v1::Request, _, _>(r, rel::relating_with_type);
    r = ruma_route::<relations::get_relating_events_with_rel_type_and_event_type::v1::Request, _, _>(
        r,
        rel::relating_with_type_and_event_type,
    );
    r = ruma_route::<threads::get_threads::v1::Request, _, _>(r, rel::threads);
    r = ruma_route::<context::get_context::v3::Request, _, _>(r, rel::context);
    r = ruma_route::<user_directory::search_users::v3::Request, _, _>(r, ud::search);
    r = ruma_route::<voip::get_turn_server_info::v3::Request, _, _>(r, vo::turn_server);
    r = ruma_route::<search_events::v3::Request, _, _>(r, se::search);
    r = ruma_route::<presence::set_presence::v3::Request, _, _>(r, pres::set);
    r = ruma_route::<presence::get_presence::v3::Request, _, _>(r, pres::get);
    r = ruma_route::<keys::upload_keys::v3::Request, _, _>(r, k::upload);
    r = ruma_route::<keys::get_keys::v3::Request, _, _>(r, k::query);
    r = ruma_route::<keys::claim_keys::v3::Request, _, _>(r, k::claim);
    r = ruma_route::<keys::get_key_changes::v3::Request, _, _>(r, k::changes);
    r = ruma_route::<keys::upload_signing_keys::v3::Request, _, _>(r, k::upload_cross_signing);
    r = ruma_route::<keys::upload_signatures::v3::Request, _, _>(r, k::upload_signatures_handler);
    r = ruma_route::<to_device::send_event_to_device::v3::Request, _, _>(r, k::send_to_device);
    r = ruma_route::<backup::create_backup_version::v3::Request, _, _>(r, k::backup_create);
    r = ruma_route::<backup::get_latest_backup_info::v3::Request, _, _>(r, k::backup_latest);
    r = ruma_route::<backup::get_backup_info::v3::Request, _, _>(r, k::backup_info);
    r = ruma_route::<backup::update_backup_version::v3::Request, _, _>(r, k::backup_update);
    r = ruma_route::<backup::delete_backup_version::v3::Request, _, _>(r, k::backup_delete);
    r = ruma_route::<backup::add_backup_keys::v3::Request, _, _>(r, k::backup_put_all);
    r = ruma_route::<backup::add_backup_keys_for_room::v3::Request, _, _>(r, k::backup_put_room);
    r = ruma_route::<backup::add_backup_keys_for_session::v3::Request, _, _>(r, k::backup_put_session);
    r = ruma_route::<backup::get_backup_keys::v3::Request, _, _>(r, k::backup_get_all);
    r = ruma_route::<backup::get_backup_keys_for_room::v3::Request, _, _>(r, k::backup_get_room);
    r = ruma_route::<backup::get_backup_keys_for_session::v3::Request, _, _>(r, k::backup_get_session);
    r = ruma_route::<backup::delete_backup_keys::v3::Request, _, _>(r, k::backup_delete_all);
    r = ruma_route::<backup::delete_backup_keys_for_room::v3::Request, _, _>(r, k::backup_delete_room);
    r = ruma_route::<backup::delete_backup_keys_for_session::v3::Request, _, _>(r, k::backup_delete_session);
    r = media_routes(r);
    r = r
        .route("/.well-known/matrix/server", get(disc::well_known_server))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics_with_token));
    with_layers(r, services)
}

/// The metrics listener's application (`metrics.listen`): `/metrics` and `/health` only.
pub fn metrics_router(services: Arc<Services>) -> Router {
    let r = Router::new().route("/metrics", get(ops::metrics)).route("/health", get(ops::health));
    with_layers(r, services)
}

/// The federation listener's application: the Server-Server API and the key server (and
/// `/.well-known/matrix/server`, which other servers may ask on that port too).
pub fn federation_router(services: Arc<Services>) -> Router {
    let r = federation::routes(Router::new())
        .route("/.well-known/matrix/server", get(client::discovery::well_known_server));
    with_layers(r, services)
}

/// Fallbacks and the layers every listener shares: Matrix errors for unknown routes, panic
/// catching, metrics, CORS and tracing.
fn with_layers(r: Router<Arc<Services>>, services: Arc<Services>) -> Router {
    let r = r.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed);
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            "x-requested-with".parse().expect("valid header name"),
        ]);

    r.layer(CatchPanicLayer::custom(|_panic| {
        tracing::error!("a request handler panicked");
        Error::internal("handler panicked").into_response()
    }))
    .layer(middleware::from_fn_with_state(services.clone(), record_metrics))
    .layer(cors)
    .layer(TraceLayer::new_for_http())
    .with_state(services)
}

/// The media repository. Uploads stream their bodies (see `client::media`), so their
/// handlers take the raw request; the paths still come from ruma's request types.
#[allow(deprecated)]
fn media_routes(mut r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    use ::ruma::api::client::{authenticated_media as am, media};
    use axum::routing::{patch, post};
    use client::media as md;
    r = ruma_route::<media::create_content::v3::Request, _, _>(r, md::upload);
    r = ruma_route::<media::create_content_async::v3::Request, _, _>(r, md::upload_reserved);
    r = ruma_route::<media::create_mxc_uri::v1::Request, _, _>(r, md::create);
    r = ruma_route::<am::get_media_config::v1::Request, _, _>(r, md::config);
    r = ruma_route::<media::get_media_config::v3::Request, _, _>(r, md::config_legacy);
    r = ruma_route::<am::get_content::v1::Request, _, _>(r, md::download);
    r = ruma_route::<am::get_content_as_filename::v1::Request, _, _>(r, md::download_as);
    r = ruma_route::<am::get_content_thumbnail::v1::Request, _, _>(r, md::thumbnail);
    r = ruma_route::<media::get_content::v3::Request, _, _>(r, md::download_legacy);
    r = ruma_route::<media::get_content_as_filename::v3::Request, _, _>(r, md::download_as_legacy);
    r = ruma_route::<media::get_content_thumbnail::v3::Request, _, _>(r, md::thumbnail_legacy);
    r.route("/_obmin/media/v1/upload", post(md::resumable_create)).route(
        "/_obmin/media/v1/upload/{server_name}/{media_id}",
        get(md::resumable_status).merge(patch(md::resumable_append)),
    )
}

async fn unrecognized() -> Error {
    Error::UnrecognizedEndpoint
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

/// Counts requests and their latency per route template.
async fn record_metrics(State(services): State<Arc<Services>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let metrics = &services.metrics;
    metrics.requests_in_flight.inc();
    let started = Instant::now();
    let mut response = next.run(request).await;
    metrics.requests_in_flight.dec();
    let labels = EndpointLabels { method: method.clone(), endpoint: endpoint.clone() };
    metrics.request_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { method, endpoint, status: response.status().as_u16() }).inc();
    // Matrix clients cache nothing from the API; say so explicitly.
    response.headers_mut().entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-cache"));
    response
}
