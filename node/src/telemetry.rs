//! The node's Prometheus metrics, through the `metrics` facade.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

/// Registers help texts for every node metric and publishes
/// `gradcast_node_info{device}` (always 1) so a scrape tells what the node
/// computes on.
pub fn describe_metrics(device: &str) {
    describe_gauge!(
        "gradcast_node_info",
        "Always 1; the label tells the compute device of this node"
    );
    gauge!("gradcast_node_info", "device" => device.to_string()).set(1.0);
    describe_counter!(
        "gradcast_node_tasks_total",
        "Tasks completed by this node, by phase (train, eval)"
    );
    describe_counter!(
        "gradcast_node_task_samples_total",
        Unit::Count,
        "Samples computed by this node, by phase"
    );
    describe_histogram!(
        "gradcast_node_task_seconds",
        Unit::Seconds,
        "Compute time of one task, by phase"
    );
    describe_counter!(
        "gradcast_sent_bytes_total",
        Unit::Bytes,
        "Payload bytes sent to the coordinator"
    );
    describe_counter!(
        "gradcast_received_bytes_total",
        Unit::Bytes,
        "Payload bytes received from the coordinator"
    );
}

pub(crate) fn task(phase: &'static str, samples: u32, seconds: f64) {
    counter!("gradcast_node_tasks_total", "phase" => phase).increment(1);
    counter!("gradcast_node_task_samples_total", "phase" => phase).increment(samples as u64);
    histogram!("gradcast_node_task_seconds", "phase" => phase).record(seconds);
}

pub(crate) fn sent(bytes: usize) {
    counter!("gradcast_sent_bytes_total").increment(bytes as u64);
}

pub(crate) fn received(bytes: usize) {
    counter!("gradcast_received_bytes_total").increment(bytes as u64);
}
