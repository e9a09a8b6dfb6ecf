//! Training: the loss falls, and an interrupted-then-resumed run reproduces the
//! uninterrupted run exactly.

mod common;

use candle_core::Device;
use routelm::train::data::Dataset;
use routelm::train::{corpus, RunOptions, TrainConfigFile, Trainer};
use routelm::Tokenizer;

fn setup(steps: usize) -> (routelm::ModelConfig, routelm::TrainConfig, Dataset) {
    setup_with(steps, None)
}

/// [`setup`] of a model whose feed-forward blocks are Mixture-of-Experts layers.
fn setup_with(
    steps: usize,
    moe: Option<routelm::config::MoeFile>,
) -> (routelm::ModelConfig, routelm::TrainConfig, Dataset) {
    let mut f = common::tiny_file();
    f.vocab_size = Some(256);
    f.init_std = Some(0.02);
    f.moe = moe;
    let cfg = f.resolve("tiny").unwrap();
    let train = TrainConfigFile {
        steps: Some(steps),
        batch_size: Some(4),
        seq_len: Some(12),
        grad_accum: Some(2),
        lr: Some(3e-3),
        warmup_steps: Some(3),
        eval_every: Some(4),
        eval_batches: Some(2),
        log_every: Some(1),
        ..Default::default()
    }
    .resolve(cfg.max_seq_len, "test")
    .unwrap();
    let text = corpus::generate(3, 30_000);
    let data = Dataset::split(Tokenizer::Bytes.encode(&text).unwrap(), 0.1, 12).unwrap();
    (cfg, train, data)
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("routelm-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resumed_run_reproduces_uninterrupted_run() {
    resume_reproduces(setup(12), "dense");
}

/// The same for an MoE model, whose experts train as stacked variables: the checkpoint
/// still names each expert's weights and optimizer moments on their own.
#[test]
fn resumed_moe_run_reproduces_uninterrupted_run() {
    let moe = routelm::config::MoeFile {
        n_experts: Some(4),
        top_k: Some(2),
        ..Default::default()
    };
    let (cfg, train, data) = setup_with(12, Some(moe));
    assert!(cfg.moe_layers().next().is_some());
    let dir = resume_reproduces((cfg, train, data), "moe");
    let ckpt = dir.join("checkpoint");
    let names = |file: &str| {
        let t = candle_core::safetensors::load(ckpt.join(file), &Device::Cpu).unwrap();
        t.into_keys().collect::<std::collections::BTreeSet<_>>()
    };
    let (model, opt) = (names("model.safetensors"), names("optimizer.safetensors"));
    for e in 0..4 {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            let n = format!("model.layers.1.mlp.experts.{e}.{proj}.weight");
            assert!(model.contains(&n), "{n} missing from the checkpoint");
            for m in ["m", "v"] {
                assert!(opt.contains(&format!("{m}.{n}")), "{m}.{n} missing");
            }
        }
    }
    assert!(!model.iter().any(|n| n.contains("gate_up")), "{model:?}");
}

/// Train 12 steps straight, and 5 steps then a resume to 12: the same losses. Returns the
/// resumed run's folder.
fn resume_reproduces(
    (cfg, train, data): (routelm::ModelConfig, routelm::TrainConfig, Dataset),
    name: &str,
) -> std::path::PathBuf {
    let dev = Device::Cpu;
    let a_dir = dir(&format!("{name}-a"));
    let mut a = Trainer::new(&cfg, &train, &dev).unwrap();
    a.run(
        &data,
        &RunOptions {
            out: a_dir.clone(),
            stop_after: None,
        },
        &mut |_| {},
    )
    .unwrap();

    let b_dir = dir(&format!("{name}-b"));
    let mut b = Trainer::new(&cfg, &train, &dev).unwrap();
    b.run(
        &data,
        &RunOptions {
            out: b_dir.clone(),
            stop_after: Some(5),
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(b.step, 5);
    drop(b);
    let mut b = Trainer::resume(&b_dir, &dev).unwrap();
    assert_eq!(b.step, 5);
    b.check_data(&b_dir, &data).unwrap();
    b.run(
        &data,
        &RunOptions {
            out: b_dir.clone(),
            stop_after: None,
        },
        &mut |_| {},
    )
    .unwrap();

    assert_eq!(a.metrics.len(), b.metrics.len());
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        assert_eq!(x.step, y.step);
        assert!(
            (x.train_loss - y.train_loss).abs() <= 1e-6,
            "step {}: {} vs {}",
            x.step,
            x.train_loss,
            y.train_loss
        );
        assert!((x.lr - y.lr).abs() <= 1e-12);
        match (x.val_loss, y.val_loss) {
            (Some(p), Some(q)) => assert!((p - q).abs() <= 1e-6, "val at {}: {p} vs {q}", x.step),
            (None, None) => {}
            _ => panic!("evaluation at different steps"),
        }
    }
    // metrics.jsonl of the resumed run has one line per logged step, no duplicates
    let lines = std::fs::read_to_string(b_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    for key in ["\"step\"", "\"train_loss\"", "\"lr\"", "\"tokens_per_s\""] {
        assert!(lines.lines().all(|l| l.contains(key)), "{key} missing");
    }
    assert!(lines.lines().filter(|l| l.contains("\"val_loss\"")).count() == 3);
    b_dir
}

#[test]
fn loss_falls() {
    let (cfg, mut train, data) = setup(60);
    train.grad_accum = 1;
    train.eval_every = 60;
    let mut t = Trainer::new(&cfg, &train, &Device::Cpu).unwrap();
    let before = t.evaluate(&data).unwrap();
    let s = t
        .run(
            &data,
            &RunOptions {
                out: dir("falls"),
                stop_after: None,
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(
        s.final_val_loss < before - 1.0,
        "validation loss {before} -> {}",
        s.final_val_loss
    );
}

#[test]
fn resume_with_other_data_is_refused() {
    let (cfg, train, data) = setup(4);
    let d = dir("otherdata");
    let mut t = Trainer::new(&cfg, &train, &Device::Cpu).unwrap();
    t.run(
        &data,
        &RunOptions {
            out: d.clone(),
            stop_after: Some(2),
        },
        &mut |_| {},
    )
    .unwrap();
    let other = Dataset::split(
        Tokenizer::Bytes
            .encode(&corpus::generate(4, 30_000))
            .unwrap(),
        0.1,
        12,
    )
    .unwrap();
    let err = Trainer::resume(&d, &Device::Cpu)
        .unwrap()
        .check_data(&d, &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data differs"), "{err}");
}

/// Mixture-of-Depths routers stay bounded over a long run at a high learning rate: the
/// decider's BCE rewards ever larger logits on separable tokens, and weight decay must hold
/// them (no NaN, no runaway scores), while the model still learns.
#[test]
fn router_scores_stay_bounded_on_a_long_run() {
    let (mut cfg, mut train, data) = setup(400);
    let depth = routelm::config::DepthConfig {
        capacity: 0.25,
        aux_loss_coef: 1.0,
        predictor: 0,
        selection: Default::default(),
        scale: Default::default(),
        keep_first: false,
        skip: Default::default(),
        norm_input: false,
    };
    cfg.layers = vec![
        routelm::config::LayerSpec {
            depth: Some(depth),
            ..Default::default()
        };
        cfg.n_layers
    ];
    train.grad_accum = 1;
    train.lr = 1e-2;
    train.eval_every = 400;
    let mut t = Trainer::new(&cfg, &train, &Device::Cpu).unwrap();
    let before = t.evaluate(&data).unwrap();
    let s = t
        .run(
            &data,
            &RunOptions {
                out: dir("bounded"),
                stop_after: None,
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(
        s.final_val_loss < before - 0.5,
        "{before} -> {}",
        s.final_val_loss
    );
    let ids = common::ids(
        &[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33],
        1,
    );
    let out = t.model.forward(&ids, None, false).unwrap();
    for d in &out.depth {
        let v: Vec<f32> = d.router_logits.flatten_all().unwrap().to_vec1().unwrap();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max.is_finite() && max < 100.0,
            "layer {} router logits reach {max}",
            d.layer
        );
    }
}

/// A batch split into shards computed on concurrent threads (one per thread of the pool)
/// takes the same steps as the whole batch on one thread: same losses and weights up to
/// float summation order.
#[test]
fn sharded_batches_take_the_same_steps() {
    let (cfg, train, data) = setup(4);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut t = Trainer::new(&cfg, &train, &Device::Cpu).unwrap();
            let losses: Vec<f64> = (0..4).map(|_| t.train_step(&data).unwrap().0).collect();
            let x = common::ids(&[3, 1, 4, 1, 5], 1);
            (losses, t.model.forward(&x, None, false).unwrap().logits)
        })
    };
    let (one, l1) = run(1);
    let (two, l2) = run(2);
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() < 1e-5, "losses {one:?} vs {two:?}");
    }
    let d = common::max_abs_diff(&l1, &l2);
    assert!(d < 1e-4, "logits after 4 steps differ by {d}");
    assert!(one[3] < one[0], "it trains: {one:?}");
}

/// A checkpoint write stopped at any point (after each file, after the previous checkpoint
/// moved aside, after the new one moved in) leaves a checkpoint that loads, and resuming
/// from it reproduces the uninterrupted run exactly.
#[test]
fn a_checkpoint_write_stopped_anywhere_resumes_exactly() {
    use routelm::train::checkpoint::{inject_fault, WriteStage};
    let (cfg, train, data) = setup(12);
    let dev = Device::Cpu;
    let opts = |out: &std::path::Path, stop: Option<usize>| RunOptions {
        out: out.to_path_buf(),
        stop_after: stop,
    };
    let a_dir = dir("fault-ref");
    let mut a = Trainer::new(&cfg, &train, &dev).unwrap();
    a.run(&data, &opts(&a_dir, None), &mut |_| {}).unwrap();
    for stage in [
        WriteStage::Model,
        WriteStage::Optimizer,
        WriteStage::State,
        WriteStage::OldMoved,
        WriteStage::NewMoved,
    ] {
        let d = dir(&format!("fault-{stage:?}"));
        let mut b = Trainer::new(&cfg, &train, &dev).unwrap();
        b.run(&data, &opts(&d, Some(5)), &mut |_| {}).unwrap();
        drop(b);
        // the next checkpoint write (at a step past 5) stops after `stage`
        let mut b = Trainer::resume(&d, &dev).unwrap();
        inject_fault(Some(stage));
        let err = b.run(&data, &opts(&d, Some(9)), &mut |_| {}).unwrap_err();
        inject_fault(None);
        assert!(
            err.to_string().contains("injected fault"),
            "{stage:?}: {err}"
        );
        let failed_at = b.step;
        assert!(failed_at > 5, "{stage:?}: the write at step {failed_at}");
        drop(b);
        // the files are as a crash at that point leaves them
        let ck = d.join("checkpoint");
        let (tmp, old) = (ck.with_extension("tmp"), ck.with_extension("old"));
        let has = |p: &std::path::Path| p.exists();
        let left = match stage {
            WriteStage::Model => {
                has(&tmp.join("model.safetensors")) && !has(&tmp.join("optimizer.safetensors"))
            }
            WriteStage::Optimizer => {
                has(&tmp.join("optimizer.safetensors")) && !has(&tmp.join("state.json"))
            }
            WriteStage::State => has(&tmp.join("state.json")) && has(&ck),
            WriteStage::OldMoved => has(&old) && !has(&ck) && has(&tmp),
            WriteStage::NewMoved => has(&old) && has(&ck) && !has(&tmp),
        };
        assert!(left, "{stage:?}: unexpected files after the stop");
        let mut c = Trainer::resume(&d, &dev).unwrap();
        let want = if stage == WriteStage::NewMoved {
            failed_at
        } else {
            5
        };
        assert_eq!(c.step, want, "{stage:?}: resumed from step {}", c.step);
        c.check_data(&d, &data).unwrap();
        c.run(&data, &opts(&d, None), &mut |_| {}).unwrap();
        assert_eq!(a.metrics.len(), c.metrics.len(), "{stage:?}");
        for (x, y) in a.metrics.iter().zip(&c.metrics) {
            assert_eq!(x.step, y.step);
            assert!(
                (x.train_loss - y.train_loss).abs() <= 1e-6,
                "{stage:?}, step {}: {} vs {}",
                x.step,
                x.train_loss,
                y.train_loss
            );
        }
        // the next write cleaned up after the crash
        assert!(!ck.with_extension("tmp").exists() && !ck.with_extension("old").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A step whose loss or gradient is not finite stops training with an error naming the
/// step, before the optimizer touches any parameter.
#[test]
fn a_non_finite_loss_stops_training_before_any_update() {
    let (cfg, train, data) = setup(3);
    let mut p =
        routelm::model::init::init_params(&cfg, 1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = &p["model.norm.weight"];
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    p.insert("model.norm.weight".into(), nan);
    let mut t = Trainer::from_params(&cfg, &train, p, "test").unwrap();
    let bits = |t: &Trainer| -> Vec<Vec<u32>> {
        t.params()
            .unwrap()
            .values()
            .map(|x| {
                let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            })
            .collect()
    };
    let before = bits(&t);
    let err = t.train_step(&data).unwrap_err().to_string();
    assert!(err.contains("diverged") && err.contains("step 1"), "{err}");
    assert_eq!(t.step, 0);
    assert!(before == bits(&t), "a parameter changed");
}
