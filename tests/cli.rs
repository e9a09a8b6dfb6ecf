//! The command line end to end on a tiny preset: train → files in the run folder →
//! generate, eval, flops, inspect.

use std::process::Command;

fn routelm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_routelm"))
        .args(args)
        .env("ROUTELM_NO_PROGRESS", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn train_generate_eval_round_trip() {
    let d = std::env::temp_dir().join(format!("routelm-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let preset = d.join("tiny.toml");
    std::fs::write(&preset, "[model]\nd_model = 32\nn_layers = 2\nn_heads = 4\nmax_seq_len = 32\n[train]\nsteps = 20\nbatch_size = 4\neval_every = 10\neval_batches = 2\nlog_every = 5\n").unwrap();
    let data = d.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(200),
    )
    .unwrap();
    let run = d.join("run");
    let (ok, _, err) = routelm(&[
        "train",
        "--config",
        preset.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for f in [
        "metrics.jsonl",
        "loss.png",
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
        "checkpoint/optimizer.safetensors",
        "checkpoint/state.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let ckpt = run.join("checkpoint");
    let (ok, out, err) = routelm(&[
        "generate",
        "--model",
        ckpt.to_str().unwrap(),
        "--prompt",
        "the quick",
        "--max-tokens",
        "10",
        "--temperature",
        "0",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("the quick") && out.len() > "the quick".len(),
        "{out}"
    );
    assert!(err.contains("tokens/s"), "{err}");
    let (ok, out, err) = routelm(&[
        "eval",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batches",
        "2",
    ]);
    assert!(ok && out.contains("val_loss"), "{out}{err}");
    let (ok, out, _) = routelm(&["flops", "--config", ckpt.to_str().unwrap(), "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["seq_len"], 32);
    let (ok, out, _) = routelm(&["inspect", ckpt.to_str().unwrap()]);
    assert!(ok && out.contains("parameters"), "{out}");
    // resume continues to more steps from the saved step
    let (ok, _, err) = routelm(&["train", "--resume", run.to_str().unwrap(), "--steps", "25"]);
    assert!(ok, "{err}");
    assert!(err.contains("done: step 25"), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().last().unwrap().contains("\"step\":25"),
        "{metrics}"
    );
}
