//! Push rules CRUD, pushers and `/notifications`.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::push::{
    delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
    get_pushrules_all, set_pusher, set_pushrule, set_pushrule_actions, set_pushrule_enabled,
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, streams::Positions},
};

fn not_found() -> Error {
    Error::NotFound("Unknown push rule".to_owned())
}

/// `GET /_matrix/client/v3/pushrules/`
pub async fn all(
    State(services): State<Arc<Services>>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<RumaResponse<get_pushrules_all::v3::Response>> {
    let user = req.user()?.clone();
    let rules = services.push.rules(&user.user_id).await?;
    Ok(RumaResponse(get_pushrules_all::v3::Response::new((*rules).clone())))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_pushrule::v3::Request>,
) -> Result<RumaResponse<get_pushrule::v3::Response>> {
    let user = req.user()?.clone();
    let rules = services.push.rules(&user.user_id).await?;
    let rule = rules.get(req.body.kind.clone(), &req.body.rule_id).ok_or_else(not_found)?;
    Ok(RumaResponse(get_pushrule::v3::Response::new(rule.into())))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn set(
    State(services): State<Arc<Services>>,
    req: Ruma<set_pushrule::v3::Request>,
) -> Result<RumaResponse<set_pushrule::v3::Response>> {
    let user = req.user()?.clone();
    let mut rules = (*services.push.rules(&user.user_id).await?).clone();
    rules.insert(req.body.rule.clone(), req.body.after.as_deref(), req.body.before.as_deref()).map_err(
        |e| match e {
            ruma::push::InsertPushRuleError::UnknownRuleId => Error::NotFound(e.to_string()),
            other => Error::InvalidParam(other.to_string()),
        },
    )?;
    services.push.save_rules(&user.user_id, rules).await?;
    Ok(RumaResponse(set_pushrule::v3::Response::new()))
}

/// `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<RumaResponse<delete_pushrule::v3::Response>> {
    let user = req.user()?.clone();
    let mut rules = (*services.push.rules(&user.user_id).await?).clone();
    rules.remove(req.body.kind.clone(), &req.body.rule_id).map_err(|e| match e {
        ruma::push::RemovePushRuleError::NotFound => not_found(),
        other => Error::Forbidden(other.to_string()),
    })?;
    services.push.save_rules(&user.user_id, rules).await?;
    Ok(RumaResponse(delete_pushrule::v3::Response::new()))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn enabled(
    State(services): State<Arc<Services>>,
    req: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<get_pushrule_enabled::v3::Response>> {
    let user = req.user()?.clone();
    let rules = services.push.rules(&user.user_id).await?;
    let rule = rules.get(req.body.kind.clone(), &req.body.rule_id).ok_or_else(not_found)?;
    Ok(RumaResponse(get_pushrule_enabled::v3::Response::new(rule.enabled())))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn set_enabled(
    State(services): State<Arc<Services>>,
    req: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<set_pushrule_enabled::v3::Response>> {
    let user = req.user()?.clone();
    let mut rules = (*services.push.rules(&user.user_id).await?).clone();
    rules.set_enabled(req.body.kind.clone(), &req.body.rule_id, req.body.enabled).map_err(|_| not_found())?;
    services.push.save_rules(&user.user_id, rules).await?;
    Ok(RumaResponse(set_pushrule_enabled::v3::Response::new()))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn actions(
    State(services): State<Arc<Services>>,
    req: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<get_pushrule_actions::v3::Response>> {
    let user = req.user()?.clone();
    let rules = services.push.rules(&user.user_id).await?;
    let rule = rules.get(req.body.kind.clone(), &req.body.rule_id).ok_or_else(not_found)?;
    Ok(RumaResponse(get_pushrule_actions::v3::Response::new(rule.actions().to_vec())))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn set_actions(
    State(services): State<Arc<Services>>,
    req: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<set_pushrule_actions::v3::Response>> {
    let user = req.user()?.clone();
    let mut rules = (*services.push.rules(&user.user_id).await?).clone();
    rules.set_actions(req.body.kind.clone(), &req.body.rule_id, req.body.actions.clone()).map_err(|_| not_found())?;
    services.push.save_rules(&user.user_id, rules).await?;
    Ok(RumaResponse(set_pushrule_actions::v3::Response::new()))
}

/// `GET /_matrix/client/v3/notifications`
pub async fn notifications(
    State(services): State<Arc<Services>>,
    req: Ruma<get_notifications::v3::Request>,
) -> Result<RumaResponse<get_notifications::v3::Response>> {
    let user = req.user()?.clone();
    let before = match req.body.from.as_deref() {
        Some(t) => Positions::parse(t).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")))?.stream,
        None => i64::MAX,
    };
    let limit = req.body.limit.map(|l| i64::try_from(u64::from(l)).unwrap_or(20)).unwrap_or(20).clamp(1, 100);
    let only_highlight = req.body.only.as_deref() == Some("highlight");
    let page = services.push.notifications(&user, before, limit, only_highlight).await?;
    let mut response = get_notifications::v3::Response::new(page.notifications);
    response.next_token = page.next_token;
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v3/pushers`
pub async fn pushers(
    State(services): State<Arc<Services>>,
    req: Ruma<get_pushers::v3::Request>,
) -> Result<RumaResponse<get_pushers::v3::Response>> {
    let user = req.user()?.clone();
    Ok(RumaResponse(get_pushers::v3::Response::new(services.push.pushers(&user).await?)))
}

/// `POST /_matrix/client/v3/pushers/set`
pub async fn set_pusher(
    State(services): State<Arc<Services>>,
    req: Ruma<set_pusher::v3::Request>,
) -> Result<RumaResponse<set_pusher::v3::Response>> {
    let user = req.user()?.clone();
    match &req.body.action {
        set_pusher::v3::PusherAction::Post(post) => services.push.set_pusher(&user, &post.pusher, post.append).await?,
        set_pusher::v3::PusherAction::Delete(ids) => services.push.delete_pusher(&user, ids).await?,
        _ => return Err(Error::InvalidParam("Unknown pusher action".to_owned())),
    }
    Ok(RumaResponse(set_pusher::v3::Response::new()))
}
