//! Signing and verifying JSON objects the way the spec's "Signing JSON" appendix says:
//! drop `signatures` and `unsigned`, serialise as canonical JSON, sign the bytes with ed25519,
//! and put the unpadded-base64 signature under `signatures.<entity>.<key id>`.
//!
//! Canonical JSON comes from ruma (`CanonicalJsonValue`'s `Display` is the canonical form, and
//! its conversion refuses floats and out-of-range integers as the spec requires); the ed25519
//! keys are vodozemac's, so no second ed25519 implementation is linked.

use ruma::CanonicalJsonValue;
use serde_json::{Map, Value};
use vodozemac::{Ed25519PublicKey, Ed25519Signature};

use crate::error::{Error, Result, SigningError};

/// The canonical JSON bytes that a signature covers.
pub fn canonical_signable(value: &Value) -> Result<String> {
    let Value::Object(object) = value else {
        return Err(Error::malformed("signed object", "not a JSON object"));
    };
    let mut object = object.clone();
    object.remove("signatures");
    object.remove("unsigned");
    let canonical = CanonicalJsonValue::try_from(Value::Object(object))
        .map_err(|e| Error::malformed("signed object", format!("not canonical JSON: {e}")))?;
    Ok(canonical.to_string())
}

/// Anything that can make an ed25519 signature (an Olm account, a cross-signing key).
pub trait Signer {
    fn sign_bytes(&self, message: &[u8]) -> Ed25519Signature;
}

impl Signer for vodozemac::olm::Account {
    fn sign_bytes(&self, message: &[u8]) -> Ed25519Signature {
        self.sign(message)
    }
}

impl Signer for vodozemac::Ed25519SecretKey {
    fn sign_bytes(&self, message: &[u8]) -> Ed25519Signature {
        self.sign(message)
    }
}

/// Adds `signatures.<entity>.<key_id>` to `value` (other signatures are kept).
pub fn sign_json(signer: &dyn Signer, entity: &str, key_id: &str, value: &mut Value) -> Result<()> {
    let signature = signer.sign_bytes(canonical_signable(value)?.as_bytes());
    let Value::Object(object) = value else { unreachable!("canonical_signable checked for an object") };
    let signatures = object.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(signatures) = signatures else {
        return Err(Error::malformed("signed object", "`signatures` is not an object"));
    };
    let by_entity = signatures.entry(entity.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(by_entity) = by_entity else {
        return Err(Error::malformed("signed object", "`signatures` entry is not an object"));
    };
    by_entity.insert(key_id.to_owned(), Value::String(signature.to_base64()));
    Ok(())
}

/// Checks `signatures.<entity>.<key_id>` of `value` against `key`.
pub fn verify_json(value: &Value, entity: &str, key_id: &str, key: &Ed25519PublicKey) -> Result<()> {
    let signature = value
        .get("signatures")
        .and_then(|s| s.get(entity))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(|| SigningError::Missing { entity: entity.to_owned(), key_id: key_id.to_owned() })?;
    let signature = Ed25519Signature::from_base64(signature).map_err(|source| SigningError::Undecodable {
        entity: entity.to_owned(),
        key_id: key_id.to_owned(),
        source,
    })?;
    key.verify(canonical_signable(value)?.as_bytes(), &signature)
        .map_err(|source| SigningError::Invalid { entity: entity.to_owned(), key_id: key_id.to_owned(), source }.into())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use vodozemac::Ed25519SecretKey;

    use super::*;

    /// The spec's appendix "Signing JSON" example key (seed in unpadded base64, with
    /// non-zero trailing bits, so it needs a lenient decoder).
    fn appendix_key() -> Ed25519SecretKey {
        use base64::Engine;
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_allow_trailing_bits(true)
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let seed = lenient.decode("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1").unwrap();
        Ed25519SecretKey::from_slice(&seed.try_into().unwrap())
    }

    #[test]
    fn spec_appendix_known_answers() {
        let key = appendix_key();
        let mut empty = json!({});
        sign_json(&key, "domain", "ed25519:1", &mut empty).unwrap();
        assert_eq!(
            empty["signatures"]["domain"]["ed25519:1"],
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        );
        let mut two = json!({"two": "Two", "one": 1});
        sign_json(&key, "domain", "ed25519:1", &mut two).unwrap();
        assert_eq!(
            two["signatures"]["domain"]["ed25519:1"],
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        );
        verify_json(&two, "domain", "ed25519:1", &key.public_key()).unwrap();
    }

    #[test]
    fn unsigned_is_not_covered_and_tampering_is_caught() {
        let key = appendix_key();
        let mut value = json!({"a": 1, "unsigned": {"x": 1}});
        sign_json(&key, "@u:x", "ed25519:D", &mut value).unwrap();
        value["unsigned"] = json!({"y": 2});
        verify_json(&value, "@u:x", "ed25519:D", &key.public_key()).unwrap();
        value["a"] = json!(2);
        assert!(matches!(verify_json(&value, "@u:x", "ed25519:D", &key.public_key()), Err(Error::Signing(_))));
        assert!(matches!(verify_json(&value, "@u:x", "ed25519:OTHER", &key.public_key()), Err(Error::Signing(_))));
        assert!(verify_json(&json!([1]), "@u:x", "ed25519:D", &key.public_key()).is_err());
    }

    #[test]
    fn floats_are_not_canonical() {
        assert!(canonical_signable(&json!({"a": 1.5})).is_err());
    }
}
