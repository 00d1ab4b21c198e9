//! `gradcast healthcheck --grpc`: the coordinator's standard gRPC health
//! service (`grpc.health.v1`, as Kubernetes' `grpc` probes use it).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Succeeds if the coordinator at `addr` (plaintext gRPC) reports SERVING
/// for `service` ("" for the server as a whole).
pub fn probe(addr: &str, service: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .with_context(|| format!("bad address {addr}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("nothing serves gRPC on {addr}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .with_context(|| format!("{addr} does not answer grpc.health.v1"))?
            .into_inner();
        match ServingStatus::try_from(reply.status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => bail!("unhealthy: {}", other.as_str_name()),
            Err(_) => bail!("unhealthy: unknown status {}", reply.status),
        }
    })
}
