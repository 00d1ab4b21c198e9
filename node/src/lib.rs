//! A gradcast worker node: joins a coordinator over gRPC, receives weights and
//! samples, computes gradients (or evaluation sums) with candle and sends them
//! back.
//!
//! A node holds no data set and no optimizer state: everything it needs for a
//! step arrives with the step. It knows nothing of how results are averaged.

mod client;
mod emulate;
mod error;
mod shards;
mod telemetry;

pub use client::{device_name, run, ClientTls, Fault, NodeConfig};
pub use error::NodeError;
pub use telemetry::describe_metrics;
