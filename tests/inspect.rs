//! Checkpoints, `eval`, `predict` and plots, through the real binary, and the
//! checkpoint format read by Python's `safetensors` package.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use data::{Dataset, Split, CLASS_NAMES, IMAGE_BYTES};

mod common;

use common::{final_accuracy, gradcast_ok as gradcast, BIN};

struct Trained {
    _dir: tempfile::TempDir,
    data: PathBuf,
    checkpoints: PathBuf,
    plot: PathBuf,
    final_accuracy: f64,
}

/// One short training run shared by the tests of this file.
fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let spec = data::SyntheticSpec {
            train_per_file: 40,
            test: 60,
            seed: 5,
        };
        data::write_synthetic(dir.path(), &spec, false).unwrap();
        let data = dir.path().join("cifar-10-batches-bin");
        let checkpoints = dir.path().join("ckpt");
        let plot = dir.path().join("curves.png");
        let out = gradcast(&[
            "run",
            "--nodes",
            "2",
            "--threads-per-node",
            "1",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "20",
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ]);
        let final_accuracy = final_accuracy(&String::from_utf8_lossy(&out.stdout));
        Trained {
            _dir: dir,
            data,
            checkpoints,
            plot,
            final_accuracy,
        }
    })
}

#[test]
fn checkpoints_are_written_every_epoch_with_model_metadata() {
    let t = trained();
    for name in ["epoch-0001", "epoch-0002", "final"] {
        assert!(
            t.checkpoints.join(format!("{name}.safetensors")).exists(),
            "{name}"
        );
    }
    let ckpt = model::Checkpoint::load(&t.checkpoints.join("final.safetensors")).unwrap();
    assert_eq!(ckpt.metadata[model::MODEL_KEY], "simple-cnn");
    assert_eq!(ckpt.metadata["gradcast.epoch"], "2");
    assert_eq!(ckpt.metadata["gradcast.config.batch_size"], "20");
    assert_eq!(ckpt.tensor("conv1.weight").unwrap().0, &[32, 3, 3, 3]);
    assert_eq!(ckpt.tensor("dense1.weight").unwrap().0, &[128, 12544]);
}

#[test]
fn eval_reproduces_the_final_accuracy_and_prints_every_class() {
    let t = trained();
    let ckpt = t.checkpoints.join("final.safetensors");
    let out = gradcast(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        t.data.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let acc: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test accuracy: "))
        .expect("accuracy line")
        .trim()
        .parse()
        .unwrap();
    assert!(
        (acc - t.final_accuracy).abs() < 1e-3,
        "eval says {acc}, training said {}",
        t.final_accuracy
    );
    for class in CLASS_NAMES {
        assert!(
            stdout.lines().any(|l| l.starts_with(class)),
            "no row for {class}:\n{stdout}"
        );
    }
}

/// The resume state sits next to the checkpoints; evaluating it says what it
/// is and which file to pass instead.
#[test]
fn eval_of_the_resume_state_says_which_file_to_pass() {
    let t = trained();
    let resume = t.checkpoints.join("resume.safetensors");
    assert!(resume.exists());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gradcast"))
        .args(["eval", "--checkpoint", resume.to_str().unwrap()])
        .args(["--data", t.data.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("resume state"), "{stderr}");
    assert!(stderr.contains("final.safetensors"), "{stderr}");
}

fn write_png(path: &Path, chw: &[u8], scale: u32) {
    let img = image::RgbImage::from_fn(32 * scale, 32 * scale, |x, y| {
        let (x, y) = ((x / scale) as usize, (y / scale) as usize);
        image::Rgb([
            chw[y * 32 + x],
            chw[1024 + y * 32 + x],
            chw[2048 + y * 32 + x],
        ])
    });
    img.save(path).unwrap();
}

#[test]
fn predict_classifies_pngs_of_any_size() {
    let t = trained();
    let test = Dataset::load(&t.data, Split::Test).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.png");
    let large = dir.path().join("large.png");
    write_png(&small, &test.image(0)[..IMAGE_BYTES], 1);
    write_png(&large, &test.image(0)[..IMAGE_BYTES], 3);
    let ckpt = t.checkpoints.join("final.safetensors");
    let out = gradcast(&[
        "predict",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        small.to_str().unwrap(),
        large.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for line in &lines {
        let (_, top) = line.split_once(": ").unwrap();
        let entries: Vec<&str> = top.split(", ").collect();
        assert_eq!(entries.len(), 3, "{line}");
        let probs: Vec<f64> = entries
            .iter()
            .map(|e| e.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-3,
            "{line}"
        );
    }
    // The synthetic classes are learnt after two epochs: the exact-size image is
    // recognised, and its 3x upscaled copy (resized back) gets the same answer.
    let top = |l: &str| {
        l.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    if t.final_accuracy > 0.9 {
        assert_eq!(top(lines[0]), CLASS_NAMES[test.label(0) as usize]);
    }
    assert_eq!(top(lines[0]), top(lines[1]));
}

#[test]
fn plot_png_is_written_and_overlays_histories() {
    let t = trained();
    let img = image::open(&t.plot).unwrap();
    assert_eq!((img.width(), img.height()), (1200, 480));
    // Not a blank canvas.
    let rgb = img.to_rgb8();
    let coloured = rgb.pixels().filter(|p| p[0] != p[2]).count();
    assert!(coloured > 500, "only {coloured} coloured pixels");

    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("h.json");
    std::fs::write(&h, r#"{"loss":[2.0,1.5,1.2],"accuracy":[0.3,0.5,0.6],"val_loss":[1.8,1.6,1.5],"val_accuracy":[0.35,0.45,0.5],"lr":[0.001,0.001,0.001]}"#).unwrap();
    let out = dir.path().join("both.png");
    gradcast(&[
        "plot",
        h.to_str().unwrap(),
        h.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--labels",
        "a,b",
    ]);
    assert!(image::open(&out).is_ok());
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let fail = Command::new(BIN)
        .args(["plot", bad.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!fail.status.success());
}

/// A Python that imports `safetensors` and `numpy`: `$GRADCAST_TEST_PYTHON`
/// (`.ci/run` makes one), else `python3` if it can. None: the caller skips.
fn python_with_safetensors() -> Option<PathBuf> {
    let candidates = std::env::var_os("GRADCAST_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("python3")]);
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import safetensors, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    None
}

#[test]
fn python_safetensors_reads_names_shapes_values_and_metadata() {
    let t = trained();
    let ckpt = t.checkpoints.join("final.safetensors");
    let script = r#"
import json, sys
from safetensors import safe_open
from safetensors.numpy import load_file
tensors = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="numpy") as f:
    meta = f.metadata()
print(json.dumps({"meta": meta, "tensors": {k: [list(v.shape), str(v.dtype), float(v.astype("float64").sum())] for k, v in tensors.items()}}))
"#;
    let Some(python) = python_with_safetensors() else {
        eprintln!(
            "SKIPPED: no Python with safetensors and numpy \
             (set GRADCAST_TEST_PYTHON; .ci/run makes one)"
        );
        return;
    };
    let out = Command::new(python)
        .args(["-c", script])
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["meta"]["gradcast.model"], "simple-cnn");
    let ours = model::Checkpoint::load(&ckpt).unwrap();
    let m = model::Model::new(
        model::ModelSpec::new(model::ModelKind::SimpleCnn),
        0,
        &model::Device::Cpu,
    )
    .unwrap();
    let names: Vec<String> = m.params().map(|i| i.name.clone()).collect();
    assert_eq!(v["tensors"].as_object().unwrap().len(), names.len());
    for name in names {
        let entry = &v["tensors"][&name];
        let (shape, values) = ours.tensor(&name).unwrap();
        let py_shape: Vec<usize> = entry[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(py_shape, shape, "{name}");
        assert_eq!(entry[1], "float32", "{name}");
        let sum: f64 = values.iter().map(|&x| x as f64).sum();
        let py_sum = entry[2].as_f64().unwrap();
        assert!(
            (sum - py_sum).abs() <= 1e-6 * sum.abs().max(1.0),
            "{name}: {sum} vs {py_sum}"
        );
    }
}

/// On a terminal (a pseudo-terminal from util-linux `script`), `gradcast run`
/// draws the coordinator's per-epoch progress bar; off a terminal it prints
/// plain lines only.
#[test]
fn progress_bar_on_a_terminal_plain_lines_otherwise() {
    let t = trained();
    let cmd = format!(
        "{BIN} run --nodes 1 --threads-per-node 1 --data {} --epochs 1 --batch-size 20",
        t.data.display()
    );
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("util-linux `script` is needed for this test");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("epoch 1/1 [") && screen.contains("steps") && screen.contains("ETA"),
        "no bar:\n{screen}"
    );
    assert!(screen.contains("val_accuracy"), "{screen}");

    let piped = gradcast(&[
        "run",
        "--nodes",
        "1",
        "--threads-per-node",
        "1",
        "--data",
        t.data.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "20",
    ]);
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !err.contains("ETA"),
        "a bar was drawn off a terminal:\n{err}"
    );
    assert!(err.contains("epoch 1/1: loss"), "{err}");
}
