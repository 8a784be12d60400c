//! The `[transactions]` section: how long idempotency records are kept
//! (`service::txn_retention`).

use serde::{Deserialize, Serialize};

use super::{ConfigError, err, options::section};

section! {
    /// How long a client's transaction id (`PUT .../send/{type}/{txnId}`, `.../redact/...`,
    /// `/sendToDevice/{type}/{txnId}`, and other servers' to-device message ids) is remembered.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct TransactionsConfig {
        /// Seconds a transaction id is remembered: a retry within them gets the first answer,
        /// after them the same id is a new request. A day, as Synapse keeps its transaction
        /// ids: clients retry for longer than minutes.
        pub retention_secs: u64,
        /// Seconds between passes that forget older ones.
        pub prune_interval_secs: u64,
    }
}

impl Default for TransactionsConfig {
    fn default() -> Self {
        Self { retention_secs: 86_400, prune_interval_secs: 600 }
    }
}

impl TransactionsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.retention_secs == 0 || self.retention_secs > 10 * 365 * 86_400 {
            return Err(err("transactions.retention_secs", "must be between 1 and 315360000"));
        }
        if self.prune_interval_secs == 0 || self.prune_interval_secs > 86_400 {
            return Err(err("transactions.prune_interval_secs", "must be between 1 and 86400"));
        }
        Ok(())
    }
}
