//! The members the coordinator admitted, as an aggregator checks them.

use std::collections::HashMap;
use std::sync::Mutex;

use metrics::counter;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::Status;

use super::MEMBER_WAIT;

/// The nodes the coordinator admitted, with their session secrets, and the
/// size of this aggregator's slice.
#[derive(Default)]
pub(super) struct Members {
    known: Mutex<(HashMap<u64, Vec<u8>>, u64)>,
    changed: Notify,
}

impl Members {
    pub(super) fn set(&self, node: u64, secret: Option<Vec<u8>>) {
        if let Ok(mut k) = self.known.lock() {
            match secret {
                Some(s) => k.0.insert(node, s),
                None => k.0.remove(&node),
            };
        }
        self.changed.notify_waiters();
    }

    pub(super) fn reset(&self, slice_len: u64) {
        if let Ok(mut k) = self.known.lock() {
            k.0.clear();
            k.1 = slice_len;
        }
        self.changed.notify_waiters();
    }

    pub(super) fn contains(&self, node: u64) -> bool {
        self.known.lock().is_ok_and(|k| k.0.contains_key(&node))
    }

    /// Waits until the coordinator names `node` a member; returns the
    /// slice's length. Refuses a wrong secret at once.
    pub(super) async fn admit(&self, node: u64, secret: &[u8]) -> Result<u64, Status> {
        let deadline = Instant::now() + MEMBER_WAIT;
        loop {
            let changed = self.changed.notified();
            {
                let k = self
                    .known
                    .lock()
                    .map_err(|_| Status::internal("member lock poisoned"))?;
                match k.0.get(&node) {
                    Some(s) if bool::from(s.ct_eq(secret)) => return Ok(k.1),
                    Some(_) => {
                        counter!("gradcast_aggregator_refused_total").increment(1);
                        return Err(Status::permission_denied(format!(
                            "wrong session secret for node {node}"
                        )));
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                counter!("gradcast_aggregator_refused_total").increment(1);
                return Err(Status::not_found(format!(
                    "node {node} is not a member of the coordinator's cluster"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn members_are_checked_by_id_and_secret_and_strangers_wait_then_go() {
        let m = Arc::new(Members::default());
        m.reset(48);
        m.set(3, Some(vec![7u8; 16]));
        assert_eq!(m.admit(3, &[7u8; 16]).await.unwrap(), 48);
        let wrong = m.admit(3, &[8u8; 16]).await.unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
        let empty = m.admit(3, &[]).await.unwrap_err();
        assert_eq!(empty.code(), tonic::Code::PermissionDenied);
        // A node the coordinator names while it waits gets in...
        let late = {
            let m = m.clone();
            tokio::spawn(async move { m.admit(5, &[1u8; 16]).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.set(5, Some(vec![1u8; 16]));
        assert_eq!(late.await.unwrap().unwrap(), 48);
        // ...one it never names is refused after MEMBER_WAIT, and one it
        // removed is a stranger again.
        let started = Instant::now();
        let stranger = m.admit(9, &[1u8; 16]).await.unwrap_err();
        assert_eq!(stranger.code(), tonic::Code::NotFound);
        assert!(started.elapsed() >= MEMBER_WAIT);
        m.set(5, None);
        assert!(!m.contains(5));
    }
}
