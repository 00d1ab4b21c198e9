//! `GRADCAST_KERNEL_PATH=measure` with `GRADCAST_KERNEL_PLAN=FILE`: the
//! first run times each convolution shape's choices (vector width,
//! Winograd and its transforms, the weight gradient's forms) and writes them
//! to FILE; a run with that FILE makes the same choices without timing and ends
//! with the same weights to the bit; and a run with edited choices follows
//! the file, not its own timings.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{final_weights, first_difference, start, synthetic, wait};

/// Trains simple-cnn for one epoch on a 2-node cluster with the measured
/// kernel path and `plan`; returns the final weights.
fn train(dir: &Path, data: &Path, plan: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = dir.join("ckpt");
    let args = [
        "run",
        "--nodes",
        "2",
        "--threads-per-node",
        "1",
        "--model",
        "simple-cnn",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--data",
        data.to_str().unwrap(),
        "--checkpoint-dir",
        ckpt.to_str().unwrap(),
        "--progress",
        "plain",
    ];
    let env = [
        ("GRADCAST_KERNEL_PATH", "measure"),
        ("GRADCAST_KERNEL_PLAN", plan.to_str().unwrap()),
    ];
    let (mut run, lines) = start(&args, &env);
    assert!(
        wait(&mut run, Duration::from_secs(240), "gradcast run").success(),
        "{}",
        lines.text()
    );
    final_weights(&ckpt)
}

#[test]
fn a_kernel_plan_repeats_measured_choices_to_the_bit_and_is_followed() {
    // The vector width and Winograd's transforms are chosen on a CPU with
    // both widths; Winograd and the weight gradient's form on any CPU with
    // the direct kernels.
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (
        std::is_x86_feature_detected!("avx512f"),
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx512, avx2) = (false, false);
    if !avx512 && !avx2 {
        eprintln!("SKIPPED: `measure` chooses only on a CPU with AVX-512 or AVX2");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path(), 40, 20);
    let plan = dir.path().join("kernels.plan");

    let timed = train(&dir.path().join("timed"), &data, &plan);
    let written = std::fs::read_to_string(&plan).unwrap();
    let isa = avx512 && avx2;
    for what in [
        "isa ",
        "transforms ",
        "winograd ",
        "winograd-grad ",
        "gemm-grad ",
    ]
    .into_iter()
    .filter(|&w| isa || !matches!(w, "isa " | "transforms "))
    {
        assert!(
            written.lines().any(|l| l.starts_with(what)),
            "no `{what}` choice in the plan:\n{written}"
        );
    }

    let replayed = train(&dir.path().join("replayed"), &data, &plan);
    assert_eq!(
        std::fs::read_to_string(&plan).unwrap(),
        written,
        "a run with a complete plan timed and added choices"
    );
    if let Some(name) = first_difference(&timed, &replayed) {
        panic!("the replayed choices gave other weights ({name})");
    }

    // Every choice turned around: the run follows the file (other kernels,
    // so other rounding) and times nothing.
    let flipped: String = written
        .lines()
        .map(|l| {
            let (key, value) = l.split_once(" = ").unwrap();
            let transforms = key.starts_with("transforms ");
            let other = match value {
                "true" => "false",
                "false" => "true",
                "avx512" if transforms => "rows",
                "rows" => "avx512",
                "avx512" => "avx2",
                "avx2" => "avx512",
                v => panic!("unexpected choice {v:?} in {l:?}"),
            };
            format!("{key} = {other}\n")
        })
        .collect();
    std::fs::write(&plan, &flipped).unwrap();
    let followed = train(&dir.path().join("flipped"), &data, &plan);
    assert_eq!(std::fs::read_to_string(&plan).unwrap(), flipped);
    assert!(
        first_difference(&timed, &followed).is_some(),
        "the edited plan made no difference: its choices were not used"
    );
}

/// A plan that cannot be used stops `bench`, `run` and `node` at start with
/// a message that says why: set without `measure`, or holding a line that is
/// not a choice.
#[test]
fn an_unusable_plan_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("kernels.plan");
    let bench = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(common::BIN)
            .args([
                "bench",
                "--model",
                "simple-cnn",
                "--steps",
                "1",
                "--warmup",
                "0",
            ])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.success(), common::text(&out.stderr))
    };
    let p = plan.to_str().unwrap();
    let (ok, err) = bench(&[("GRADCAST_KERNEL_PLAN", p)]);
    assert!(
        !ok && err.contains("read only with GRADCAST_KERNEL_PATH=measure"),
        "{err}"
    );

    std::fs::write(&plan, "winograd cin=32 is not a choice\n").unwrap();
    let (ok, err) = bench(&[
        ("GRADCAST_KERNEL_PATH", "measure"),
        ("GRADCAST_KERNEL_PLAN", p),
    ]);
    assert!(
        !ok && err.contains(p) && err.contains("line 1 is not"),
        "{err}"
    );

    let out = std::process::Command::new(common::BIN)
        .args(["run", "--nodes", "1", "--data", "nowhere.tar.gz"])
        .env("GRADCAST_KERNEL_PATH", "measure")
        .env("GRADCAST_KERNEL_PLAN", p)
        .output()
        .unwrap();
    let err = common::text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 1 is not"),
        "{err}"
    );

    // A good plan, or none, passes the check (and a missing file is made).
    std::fs::remove_file(&plan).unwrap();
    let (ok, err) = bench(&[
        ("GRADCAST_KERNEL_PATH", "measure"),
        ("GRADCAST_KERNEL_PLAN", p),
    ]);
    assert!(ok, "{err}");
    assert!(plan.exists());
}
