//! Server signing keys on the wire: this server's signed key document
//! (`GET /_matrix/key/v2/server`), checking another server's document before trusting it, and
//! notary counter-signatures (`/_matrix/key/v2/query`).

use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedServerSigningKeyId,
    ServerName, UInt,
    api::federation::discovery::{ServerSigningKeys, VerifyKey},
    serde::{Base64, Raw},
    signatures::{PublicKeyMap, PublicKeySet, sign_json, verify_json},
};

use crate::SigningKey;

/// How long other servers may cache our key document. Synapse uses a day as well; a
/// shorter time only costs refetches.
pub const KEY_VALIDITY_MS: u64 = 24 * 60 * 60 * 1000;

/// Why a key document is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key document is not valid JSON of the right shape: {0}")]
    Shape(String),
    #[error("the key document is for {found}, not {expected}")]
    WrongServer { expected: OwnedServerName, found: OwnedServerName },
    #[error("the key document is not signed by every key it lists: {0}")]
    Signature(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// This server's key document, signed by its own key, valid for [`KEY_VALIDITY_MS`].
pub fn own_key_document(
    server_name: &ServerName,
    key: &SigningKey,
    now: MilliSecondsSinceUnixEpoch,
) -> Result<Raw<ServerSigningKeys>, KeyError> {
    let valid_until = UInt::new(u64::from(now.get()).saturating_add(KEY_VALIDITY_MS)).unwrap_or(UInt::MAX);
    let mut doc = ServerSigningKeys::new(server_name.to_owned(), MilliSecondsSinceUnixEpoch(valid_until));
    let key_id =
        OwnedServerSigningKeyId::try_from(key.key_id().as_str()).map_err(|e| KeyError::Signing(e.to_string()))?;
    let public = Base64::parse(key.public_key_base64()).map_err(|e| KeyError::Signing(e.to_string()))?;
    doc.verify_keys.insert(key_id, VerifyKey::new(public));
    let mut object = to_canonical(&doc)?;
    object.remove("signatures");
    sign_json(server_name.as_str(), key.pair(), &mut object).map_err(|e| KeyError::Signing(e.to_string()))?;
    Raw::new(&object).map(Raw::cast_unchecked).map_err(|e| KeyError::Signing(e.to_string()))
}

/// A key document another server (or a notary) handed us, checked.
#[derive(Debug, Clone)]
pub struct VerifiedKeys {
    pub server_name: OwnedServerName,
    /// Key id -> unpadded base64 public key (current keys).
    pub verify_keys: BTreeMap<String, String>,
    /// Key id -> (public key, expired at ms): keys the server used before.
    pub old_verify_keys: BTreeMap<String, (String, i64)>,
    pub valid_until_ts: i64,
    /// The document exactly as the origin signed it (notaries re-serve it).
    pub document: CanonicalJsonObject,
}

/// Checks that `raw` is `expected`'s key document and that every current key in it signed
/// it (the spec's rule: the origin proves it holds each key it publishes).
pub fn verify_key_document(expected: &ServerName, raw: &Raw<ServerSigningKeys>) -> Result<VerifiedKeys, KeyError> {
    let doc: ServerSigningKeys = raw.deserialize().map_err(|e| KeyError::Shape(e.to_string()))?;
    if doc.server_name != expected {
        return Err(KeyError::WrongServer { expected: expected.to_owned(), found: doc.server_name });
    }
    let document: CanonicalJsonObject =
        serde_json::from_str(raw.json().get()).map_err(|e| KeyError::Shape(e.to_string()))?;
    if doc.verify_keys.is_empty() {
        return Err(KeyError::Shape("no verify_keys".to_owned()));
    }
    let verify_keys: BTreeMap<String, String> =
        doc.verify_keys.iter().map(|(id, key)| (id.to_string(), key.key.encode())).collect();
    // verify_json checks every signature of the server whose key we know; demand one per
    // listed key so a document cannot smuggle in a key its owner never used.
    let signed_by = doc.signatures.get(expected).map(|s| s.keys().map(|k| k.to_string()).collect::<Vec<_>>());
    for key_id in verify_keys.keys() {
        if !signed_by.as_ref().is_some_and(|ids| ids.contains(key_id)) {
            return Err(KeyError::Signature(format!("no signature by {key_id}")));
        }
    }
    let mut set = PublicKeySet::new();
    for (id, key) in &verify_keys {
        set.insert(id.clone(), Base64::parse(key).map_err(|e| KeyError::Shape(e.to_string()))?);
    }
    let mut map = PublicKeyMap::new();
    map.insert(expected.to_string(), set);
    // Only this server's own signatures count here; a notary's are checked separately.
    let mut own_only = document.clone();
    if let Some(CanonicalJsonValue::Object(signatures)) = own_only.get_mut("signatures") {
        signatures.retain(|server, _| server == expected.as_str());
    }
    verify_json(&map, &own_only).map_err(|e| KeyError::Signature(e.to_string()))?;
    let old_verify_keys = doc
        .old_verify_keys
        .iter()
        .map(|(id, old)| {
            (id.to_string(), (old.key.encode(), i64::try_from(u64::from(old.expired_ts.get())).unwrap_or(i64::MAX)))
        })
        .collect();
    Ok(VerifiedKeys {
        server_name: doc.server_name,
        verify_keys,
        old_verify_keys,
        valid_until_ts: i64::try_from(u64::from(doc.valid_until_ts.get())).unwrap_or(i64::MAX),
        document,
    })
}

/// Adds this server's signature to another server's key document, as a notary does.
pub fn notarize(
    document: &CanonicalJsonObject,
    notary: &ServerName,
    key: &SigningKey,
) -> Result<Raw<ServerSigningKeys>, KeyError> {
    let mut object = document.clone();
    // sign_json removes and restores `signatures`, keeping the origin's own.
    sign_json(notary.as_str(), key.pair(), &mut object).map_err(|e| KeyError::Signing(e.to_string()))?;
    Raw::new(&object).map(Raw::cast_unchecked).map_err(|e| KeyError::Signing(e.to_string()))
}

fn to_canonical(doc: &ServerSigningKeys) -> Result<CanonicalJsonObject, KeyError> {
    match CanonicalJsonValue::try_from(serde_json::to_value(doc).map_err(|e| KeyError::Signing(e.to_string()))?) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err(KeyError::Signing("not an object".to_owned())),
        Err(e) => Err(KeyError::Signing(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::parse("ed25519 a_test nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap()
    }

    #[test]
    fn own_document_verifies_and_expires_a_day_later() {
        let now = MilliSecondsSinceUnixEpoch(UInt::new(1_700_000_000_000).unwrap());
        let doc = own_key_document(server_name!("a.example"), &key(), now).unwrap();
        let verified = verify_key_document(server_name!("a.example"), &doc).unwrap();
        assert_eq!(verified.verify_keys.get("ed25519:a_test").unwrap(), &key().public_key_base64());
        assert_eq!(verified.valid_until_ts, 1_700_000_000_000 + KEY_VALIDITY_MS as i64);
        // A notary's signature is added beside the origin's and does not break it.
        let other = SigningKey::parse("ed25519 n_1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        let notarized = notarize(&verified.document, server_name!("notary.example"), &other).unwrap();
        let again = verify_key_document(server_name!("a.example"), &notarized).unwrap();
        assert!(again.document["signatures"].as_object().unwrap().contains_key("notary.example"));
    }

    #[test]
    fn wrong_server_or_tampered_document_is_refused() {
        let now = MilliSecondsSinceUnixEpoch::now();
        let doc = own_key_document(server_name!("a.example"), &key(), now).unwrap();
        assert!(matches!(verify_key_document(server_name!("b.example"), &doc), Err(KeyError::WrongServer { .. })));
        let mut object: CanonicalJsonObject = serde_json::from_str(doc.json().get()).unwrap();
        object.insert("valid_until_ts".into(), CanonicalJsonValue::Integer(ruma::Int::MAX));
        let tampered: Raw<ServerSigningKeys> = Raw::new(&object).unwrap().cast_unchecked();
        assert!(matches!(verify_key_document(server_name!("a.example"), &tampered), Err(KeyError::Signature(_))));
    }
}
