use anyhow::Result;
use std::path::PathBuf;

use routelm::generate::{generate, GenerateConfig, SamplerConfig};
use routelm::train::{Event, RunOptions, Trainer};
use routelm::Tokenizer;

/// Train a small model on the embedded synthetic corpus (a few minutes on two cores),
/// show the validation loss falling, and generate a sample. Needs no files.
#[derive(clap::Args)]
pub struct Args {
    /// Override the number of training steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Then compare dense, MoE and MoD versions for this many dense-equivalent steps each
    /// (0: skip).
    #[arg(long, default_value_t = 150)]
    compare_steps: usize,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::device();
    let mut preset = super::load_preset("demo")?;
    if let Some(s) = a.steps {
        preset.train.steps = Some(s);
    }
    let model_cfg = preset.model.resolve("demo preset")?;
    let train = preset.train.resolve(model_cfg.max_seq_len, "demo preset")?;
    let tok = Tokenizer::Bytes;
    let tokens = super::load_tokens(None, &tok, train.seed)?;
    let data = super::dataset(tokens, train.val_fraction, train.seq_len)?;
    eprintln!(
        "routelm demo: {}-layer d_model {} model, {} steps on {} tokens of the embedded corpus",
        model_cfg.n_layers,
        model_cfg.d_model,
        train.steps,
        data.train.len()
    );
    let mut trainer = Trainer::new(&model_cfg, &train, &device)?;
    let before = trainer.evaluate(&data)?;
    println!("validation loss before training: {before:.4}");
    let pb = super::bar(train.steps as u64, "train");
    let summary = trainer.run(
        &data,
        &RunOptions {
            out: a.out.clone(),
            stop_after: None,
        },
        &mut |e| match e {
            Event::Tick { step, loss, .. } => {
                pb.set_position(step as u64);
                pb.set_message(format!("loss {loss:.3}"));
            }
            Event::Step(m) => {
                if let Some(v) = m.val_loss {
                    super::say(
                        &pb,
                        format!(
                            "step {:>5}  validation loss {v:.4}  ({:.0} tokens/s)",
                            m.step, m.tokens_per_s
                        ),
                    );
                }
            }
            Event::Checkpoint(_) => {}
        },
    )?;
    pb.finish_and_clear();
    println!(
        "validation loss after {} steps: {:.4} (from {before:.4}) in {:.0} s",
        summary.steps, summary.final_val_loss, summary.wall_s
    );
    let prompt = "Once upon a time there was a person named";
    let cfg = GenerateConfig {
        sampler: SamplerConfig {
            temperature: 0.7,
            top_k: 20,
            ..Default::default()
        },
        max_tokens: 200,
        stop: vec!["\n".into()],
        eos: Vec::new(),
        seed: 1,
        top_logits: 0,
        cancel: None,
    };
    println!("\nsample:");
    print!("{prompt}");
    let stats = generate(&trainer.model, &tok, &tok.encode(prompt)?, &cfg, &mut |p| {
        print!("{p}")
    })?;
    println!(
        "\n\n({} tokens at {:.0} tokens/s; model saved in {})",
        stats.new_tokens,
        stats.tokens_per_s(),
        a.out.join("checkpoint").display()
    );
    if a.compare_steps > 0 {
        compare_variants(&preset, &data, a.compare_steps, &a.out.join("compare"))?;
    }
    Ok(())
}

/// The demo model as dense, Mixture-of-Experts (8 experts, top-2, same active FLOPs) and
/// Mixture-of-Depths (every other block at 12.5%), trained at equal FLOPs.
fn compare_variants(
    preset: &routelm::RunFile,
    data: &routelm::train::data::Dataset,
    steps: usize,
    out: &std::path::Path,
) -> Result<()> {
    let mut dense = preset.clone();
    dense.train.steps = Some(steps);
    let mut moe = dense.clone();
    moe.model.moe = Some(routelm::config::MoeFile {
        n_experts: Some(8),
        top_k: Some(2),
        ..Default::default()
    });
    let mut mod_ = dense.clone();
    mod_.model.depth = Some(routelm::config::DepthFile {
        capacity: Some(0.125),
        ..Default::default()
    });
    use super::compare::Variant;
    let variants = vec![
        Variant::from_preset("dense", &dense)?,
        Variant::from_preset("moe-8x2", &moe)?,
        Variant::from_preset("mod-12.5%", &mod_)?,
    ];
    let budget = super::compare::budget_of(&variants[0], steps);
    println!(
        "
comparing dense, MoE and MoD at equal training FLOPs ({steps} dense steps each):"
    );
    let seed = variants[0].train.seed;
    let rows = super::compare::compare(variants, data, budget, 4, out, None, seed)?;
    let md = super::compare::write_report(&rows, budget, out)?;
    println!(
        "{md}
(plots in {})",
        out.display()
    );
    Ok(())
}
