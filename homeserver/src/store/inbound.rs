//! PDUs of acknowledged `/send` transactions waiting to be worked on (`federation_inbound_pdus`,
//! see `service::inbound`).

use sqlx::Row;

use super::Store;

/// A queued PDU.
#[derive(Debug, Clone)]
pub struct InboundPdu {
    pub id: i64,
    pub room_id: String,
    pub origin: String,
    pub event_id: String,
    pub pdu: String,
}

impl Store {
    /// Queues PDUs of one transaction (room, origin, event id, PDU JSON). Durable with the
    /// transaction's record, which is written after this with
    /// [`Store::store_received_txn`] (a durable commit makes every earlier one durable too),
    /// before the transaction is answered. One already queued is not queued twice (a retried
    /// transaction).
    pub async fn queue_inbound_pdus(&self, pdus: &[(&str, &str, &str, &str)], now: i64) -> Result<(), sqlx::Error> {
        if pdus.is_empty() {
            return Ok(());
        }
        let (_serialized, mut tx) = self.begin_write().await?;
        for (room_id, origin, event_id, pdu) in pdus {
            sqlx::query(
                "INSERT INTO federation_inbound_pdus (room_id, origin, event_id, pdu, received_ts)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(*room_id)
            .bind(*origin)
            .bind(*event_id)
            .bind(*pdu)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// How many PDUs wait in the room.
    pub async fn inbound_pdus_waiting(&self, room_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM federation_inbound_pdus WHERE room_id = $1")
            .bind(room_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    /// The room's oldest queued PDU.
    pub async fn next_inbound_pdu(&self, room_id: &str) -> Result<Option<InboundPdu>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, room_id, origin, event_id, pdu FROM federation_inbound_pdus WHERE room_id = $1 ORDER BY id LIMIT 1",
        )
        .bind(room_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(InboundPdu {
                id: r.try_get("id")?,
                room_id: r.try_get("room_id")?,
                origin: r.try_get("origin")?,
                event_id: r.try_get("event_id")?,
                pdu: r.try_get("pdu")?,
            })
        })
        .transpose()
    }

    /// Removes a PDU that was worked on.
    pub async fn drop_inbound_pdu(&self, id: i64) -> Result<(), sqlx::Error> {
        self.execute_write(sqlx::query("DELETE FROM federation_inbound_pdus WHERE id = $1").bind(id)).await?;
        Ok(())
    }

    /// Rooms with queued PDUs (to carry on with after a restart).
    pub async fn rooms_with_inbound_pdus(&self) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT DISTINCT room_id FROM federation_inbound_pdus").fetch_all(&self.pool).await?;
        rows.iter().map(|r| r.try_get("room_id")).collect()
    }
}
