//! The coordinator's Prometheus metrics, emitted through the `metrics` facade
//! (the binary decides how they are exported). Names follow the project's
//! conventions: `gradcast_` prefix, base units in the name, `_total` for
//! counters, few bounded labels (`phase`, `node`).

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

/// Registers help texts for every coordinator metric.
pub fn describe_metrics() {
    describe_counter!("gradcast_steps_total", "Optimizer steps completed");
    describe_counter!(
        "gradcast_steps_skipped_total",
        "Steps whose averaged gradient was not finite or beyond the norm limit, so no update was applied"
    );
    describe_counter!(
        "gradcast_samples_total",
        Unit::Count,
        "Training samples processed"
    );
    describe_histogram!(
        "gradcast_step_duration_seconds",
        Unit::Seconds,
        "Time of one step by phase, adding up to the step: send (weights published, tasks queued), compute (slowest node's own compute), transfer (rest of the wait: weight loading on the node, results back), update (averaging and optimizer)"
    );
    describe_counter!(
        "gradcast_sent_bytes_total",
        Unit::Bytes,
        "Payload bytes sent to nodes"
    );
    describe_counter!(
        "gradcast_received_bytes_total",
        Unit::Bytes,
        "Payload bytes received from nodes"
    );
    describe_gauge!("gradcast_epoch", "Current epoch (1-based)");
    describe_gauge!(
        "gradcast_learning_rate",
        "Learning rate of the current epoch"
    );
    describe_gauge!(
        "gradcast_train_loss",
        "Mean training loss of the current epoch so far"
    );
    describe_gauge!(
        "gradcast_train_accuracy",
        "Training accuracy of the current epoch so far"
    );
    describe_gauge!("gradcast_val_loss", "Test loss after the last epoch");
    describe_gauge!(
        "gradcast_val_accuracy",
        "Test accuracy after the last epoch"
    );
    describe_gauge!(
        "gradcast_nodes_connected",
        "Nodes connected to the coordinator"
    );
    describe_counter!("gradcast_node_joins_total", "Nodes admitted");
    describe_gauge!(
        "gradcast_node_info",
        "1 for each connected node, labelled with its id, compute device and host (0 once it left)"
    );
    describe_counter!(
        "gradcast_node_evictions_total",
        "Nodes that left or were removed"
    );
    describe_counter!(
        "gradcast_parts_reassigned_total",
        "Parts of steps or evaluations moved to another node after a loss"
    );
    describe_counter!(
        "gradcast_join_refusals_total",
        "Join or session attempts refused (bad token, unknown node, wrong protocol)"
    );
    describe_histogram!(
        "gradcast_node_compute_seconds",
        Unit::Seconds,
        "Compute time of each node's share of a step, as the node reports it"
    );
    describe_counter!(
        "gradcast_node_samples_total",
        Unit::Count,
        "Training samples computed by each node"
    );
}

/// Records the phases of one step.
/// Where one step's wall time went, named by what the coordinator waited
/// for; the four phases add up to the step. Also sums them over many steps.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StepPhases {
    /// Publishing the weights and queueing every node's task.
    send: f64,
    /// The slowest node's own compute time (its forward and backward).
    compute: f64,
    /// The rest of the wait for the last answer: loading weights on the
    /// node, moving the gradients back, and the time between the two.
    transfer: f64,
    /// Averaging the gradients and applying the optimizer.
    update: f64,
    steps: u64,
}

impl StepPhases {
    pub fn new(send: Duration, compute: f64, wait: Duration, update: Duration) -> Self {
        let wait = wait.as_secs_f64();
        Self {
            send: send.as_secs_f64(),
            compute: compute.min(wait),
            transfer: (wait - compute).max(0.0),
            update: update.as_secs_f64(),
            steps: 1,
        }
    }

    /// Records one step in `gradcast_step_duration_seconds{phase}`.
    pub fn record(&self) {
        let h = |phase: &'static str, secs: f64| {
            histogram!("gradcast_step_duration_seconds", "phase" => phase).record(secs)
        };
        h("send", self.send);
        h("compute", self.compute);
        h("transfer", self.transfer);
        h("update", self.update);
    }

    pub fn add(&mut self, other: &StepPhases) {
        self.send += other.send;
        self.compute += other.compute;
        self.transfer += other.transfer;
        self.update += other.update;
        self.steps += other.steps;
    }
}

impl std::fmt::Display for StepPhases {
    /// Mean milliseconds per step.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |s: f64| 1e3 * s / self.steps.max(1) as f64;
        write!(
            f,
            "{:.1} ms per step = send {:.1} + compute {:.1} + transfer {:.1} + update {:.1}",
            ms(self.send + self.compute + self.transfer + self.update),
            ms(self.send),
            ms(self.compute),
            ms(self.transfer),
            ms(self.update)
        )
    }
}

pub(crate) fn step_skipped() {
    counter!("gradcast_steps_skipped_total").increment(1);
}

pub(crate) fn step_done(samples: u64, loss: f64, accuracy: f64) {
    counter!("gradcast_steps_total").increment(1);
    counter!("gradcast_samples_total").increment(samples);
    gauge!("gradcast_train_loss").set(loss);
    gauge!("gradcast_train_accuracy").set(accuracy);
}

pub(crate) fn node_work(node: u64, samples: u32, compute_seconds: f64) {
    let node = node.to_string();
    counter!("gradcast_node_samples_total", "node" => node.clone()).increment(samples as u64);
    histogram!("gradcast_node_compute_seconds", "node" => node).record(compute_seconds);
}

pub(crate) fn bytes(sent: usize, received: usize) {
    counter!("gradcast_sent_bytes_total").increment(sent as u64);
    counter!("gradcast_received_bytes_total").increment(received as u64);
}

pub(crate) fn epoch(epoch: u32, lr: f64) {
    gauge!("gradcast_epoch").set(epoch as f64);
    gauge!("gradcast_learning_rate").set(lr);
}

pub(crate) fn validation(loss: f64, accuracy: f64) {
    gauge!("gradcast_val_loss").set(loss);
    gauge!("gradcast_val_accuracy").set(accuracy);
}

pub(crate) fn reassigned() {
    counter!("gradcast_parts_reassigned_total").increment(1);
}

pub(crate) fn refused() {
    counter!("gradcast_join_refusals_total").increment(1);
}

/// Marks a node present (1) or gone (0) in `gradcast_node_info`.
pub(crate) fn node_info(node: u64, device: &str, host: &str, present: bool) {
    gauge!(
        "gradcast_node_info",
        "node" => node.to_string(),
        "device" => device.to_string(),
        "host" => host.to_string()
    )
    .set(if present { 1.0 } else { 0.0 });
}

pub(crate) fn membership(connected: usize, joined: bool) {
    gauge!("gradcast_nodes_connected").set(connected as f64);
    if joined {
        counter!("gradcast_node_joins_total").increment(1);
    } else {
        counter!("gradcast_node_evictions_total").increment(1);
    }
}
