//! The training loop: micro-batches → TTT forward/backward → (gradient sync) → clip → AdamW,
//! with metrics, checkpoints and exact resume.
//!
//! Data order is a pure function of (seed, epoch, world size), so resuming at a checkpoint's
//! micro-batch cursor with the same world size replays exactly what an uninterrupted run does.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, TrainState};
use super::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use super::ttt::{ttt_forward, StepCounts, TttBatch};
use crate::config::recipe::TrainConfig;
use crate::dist::Collective;
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::target::head::TargetHead;

/// A right-padded micro-batch the trainer owns.
pub struct TrainBatch {
    /// `[B, T]` int64.
    pub input_ids: Tensor,
    /// `[B, T]` 1 = real token.
    pub attention_mask: Tensor,
    /// `[B, T]` 1 = assistant token.
    pub loss_mask: Tensor,
    /// `[B, T, A·H]`.
    pub aux: Tensor,
    /// `[B, T, H]`.
    pub last_hidden: Tensor,
}

impl TrainBatch {
    /// Whether every feature is finite (NaN / inf batches are skipped and counted, never trained on).
    pub fn is_finite(&self) -> bool {
        let ok = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
        ok(&self.aux) && ok(&self.last_hidden)
    }

    fn as_ttt(&self) -> TttBatch<'_> {
        TttBatch {
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            loss_mask: &self.loss_mask,
            aux: &self.aux,
            last_hidden: &self.last_hidden,
        }
    }
}

/// This rank's micro-batches, epoch by epoch.
pub trait MicroBatches {
    /// How many micro-batches this rank gets in `epoch` (equal on every rank).
    fn len(&self, epoch: u64) -> Result<u64>;
    /// The micro-batches of `epoch` from index `start` on, in order.
    fn iter_from(&self, epoch: u64, start: u64) -> Result<Box<dyn Iterator<Item = Result<TrainBatch>> + '_>>;
    /// Called once `epoch` is trained and checkpointed (chunked-rolling runs delete its features).
    fn epoch_done(&self, _epoch: u64) -> Result<()> {
        Ok(())
    }
    /// What the batches are made of and how they are planned (see [`data_fingerprint`]); a
    /// resume on other data is refused.
    fn fingerprint(&self) -> String;
}

/// A fingerprint of training data: per chunk the (dataset index, length) of every sample, and
/// the plan's inputs (batching options, seed, world size). `train` on an extracted chunk and
/// `run`'s rolling chunk of the same samples agree.
pub fn data_fingerprint(chunks: &[Vec<(i64, usize)>], opts: &crate::extract::reader::BatchOptions, seed: u64, world: usize) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(format!("{} {} {} {seed} {world}", opts.token_budget, opts.max_batch_size, opts.max_len).as_bytes());
    for c in chunks {
        let mut c = c.clone();
        c.sort_unstable();
        h.update(format!("|{}", c.len()).as_bytes());
        for (i, n) in c {
            h.update(&i.to_le_bytes());
            h.update(&(n as u64).to_le_bytes());
        }
    }
    format!("{:016x}", h.digest())
}

/// One line of `metrics.jsonl` (one optimizer step, reduced over ranks).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Epoch.
    pub epoch: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Mean weighted loss over the step's micro-batches.
    pub loss: f64,
    /// Mean loss_k.
    pub loss_k: Vec<f64>,
    /// acc_k.
    pub acc: Vec<f64>,
    /// cond_acc_k.
    pub cond_acc: Vec<f64>,
    /// `1 + Σ_k Π_{i≤k} cond_acc_i`.
    pub sim_accept_len: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised positions in the step.
    pub positions: u64,
    /// Micro-batches skipped for non-finite features so far.
    pub skipped_nonfinite: u64,
}

/// Everything the trainer works with.
pub struct Trainer<'a> {
    /// The head being trained.
    pub draft: Eagle3Draft,
    head: &'a TargetHead,
    cfg: TrainConfig,
    recipe_toml: String,
    run_dir: PathBuf,
    opt: AdamW,
    params: Vec<(String, Tensor)>,
    /// Where training stands.
    pub state: TrainState,
    comm: &'a dyn Collective,
    device: Device,
    /// Checkpoint at the last step of every epoch (chunked-rolling runs need it before a chunk's
    /// features may be deleted).
    pub save_each_epoch: bool,
}

impl<'a> Trainer<'a> {
    /// A trainer for `draft`; resumes from `run_dir`'s latest checkpoint when there is one.
    ///
    /// # Errors
    /// A checkpoint written with a different world size is refused: every rank's data slice and
    /// the number of micro-batches per optimizer step depend on it, so continuing would not be
    /// the same run. Start a new run directory (initialising from the exported head) instead.
    pub fn new(
        draft: Eagle3Draft,
        head: &'a TargetHead,
        cfg: TrainConfig,
        recipe_toml: String,
        run_dir: &Path,
        comm: &'a dyn Collective,
    ) -> Result<Self> {
        let params = draft.named_parameters();
        let opt = AdamW::new(
            &params,
            AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay },
        );
        let device = draft.fc.device();
        let mut t = Trainer {
            draft,
            head,
            cfg,
            recipe_toml,
            run_dir: run_dir.to_path_buf(),
            opt,
            params,
            state: TrainState::default(),
            comm,
            device,
            save_each_epoch: false,
        };
        t.state.world_size = comm.world_size() as u64;
        if let Some(ck) = checkpoint::latest(run_dir)? {
            if ck.state.world_size != comm.world_size() as u64 {
                return Err(Error::Input(format!(
                    "{} was written with world size {}, this run has {}: resume needs the same world size (data slices and steps depend on it); start a new run from an exported head instead",
                    ck.dir.display(),
                    ck.state.world_size,
                    comm.world_size()
                )));
            }
            let saved = crate::error::read_to_string(&ck.dir.join("recipe.toml"))?;
            if let Some((key, then, now)) = crate::config::recipe::first_difference(&saved, &t.recipe_toml) {
                return Err(Error::config(
                    ck.dir.join("recipe.toml"),
                    key,
                    format!("is {then} in the checkpoint but {now} now: a resume must be the same run; use a new --out (or delete this one to start over)"),
                ));
            }
            let file = crate::weights::SafetensorsFile::open(&ck.dir.join("model.safetensors"))?;
            t.draft.load_weights(&file)?;
            t.opt.load_state(&checkpoint::optimizer_state(&ck.dir)?, ck.state.step as i64)?;
            tracing::info!(checkpoint = %ck.dir.display(), step = ck.state.step, "resuming");
            t.state = ck.state;
        } else {
            // Every rank starts from rank 0's initial weights.
            let mut tensors: Vec<Tensor> = t.params.iter().map(|(_, p)| p.shallow_clone()).collect();
            tch::no_grad(|| comm.broadcast(&mut tensors, 0))?;
        }
        Ok(t)
    }

    /// Before the first step every rank checks that it runs the same thing as rank 0: the recipe,
    /// the data fingerprint, the parameters' names and shapes, and where it resumes (node-local
    /// run directories that disagree show up here). All ranks reach the same verdict, so a
    /// mismatch stops every rank with one message instead of a hang.
    fn agree(&self) -> Result<()> {
        let hash = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes()) as i64;
        let shapes: String = self.params.iter().map(|(n, p)| format!("{n}{:?};", p.size())).collect();
        let fields: [(&str, i64); 4] = [
            ("recipe", hash(&self.recipe_toml)),
            ("data_fingerprint", hash(&self.state.data_fingerprint)),
            ("parameter shapes", hash(&shapes)),
            ("resumed step (its run directory's latest checkpoint)", self.state.step as i64),
        ];
        let mine: Vec<i64> = fields.iter().map(|(_, v)| *v).collect();
        let all = self.comm.all_gather_i64(&mine)?;
        for (rank, theirs) in all.iter().enumerate() {
            if let Some(i) = (0..fields.len()).find(|&i| theirs.get(i) != all[0].get(i)) {
                return Err(Error::Input(format!(
                    "rank {rank} disagrees with rank 0 on the {}: every rank must run the same recipe on the same data from the same checkpoint",
                    fields[i].0
                )));
            }
        }
        Ok(())
    }

    fn is_rank0(&self) -> bool {
        self.comm.rank() == 0
    }

    fn metrics_path(&self) -> PathBuf {
        self.run_dir.join("metrics.jsonl")
    }

    /// Drops metric lines past the resumed step (written by a run that was killed later).
    fn trim_metrics(&self) -> Result<()> {
        let p = self.metrics_path();
        if !p.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let keep: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= self.state.step)
            })
            .collect();
        let mut out = keep.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        crate::util::fs::write_atomic(&p, out.as_bytes())
    }

    /// Optimizer steps over all epochs for `data`, capped by `max_steps`.
    pub fn total_steps(&self, data: &dyn MicroBatches) -> Result<u64> {
        let mut total = 0;
        for e in 0..self.cfg.epochs {
            total += data.len(e)? / self.cfg.grad_accum;
        }
        Ok(self.cfg.max_steps.map_or(total, |m| m.min(total)))
    }

    /// Trains to the end (all epochs or `max_steps`), checkpointing on the way and at the end.
    pub fn run(&mut self, data: &dyn MicroBatches) -> Result<Vec<StepMetrics>> {
        let fingerprint = data.fingerprint();
        if self.state.step > 0 && !self.state.data_fingerprint.is_empty() && self.state.data_fingerprint != fingerprint {
            return Err(Error::config(
                self.run_dir.join("checkpoints"),
                "data_fingerprint",
                format!(
                    "is {} in the checkpoint but {fingerprint} now: the feature chunks, their samples or the batch plan (token_budget, max_batch_size, max_len, seed, world size) changed, so this is another run; use a new --out",
                    self.state.data_fingerprint
                ),
            ));
        }
        self.state.data_fingerprint = fingerprint;
        self.agree()?;
        let total = self.total_steps(data)?;
        self.state.total_steps = total;
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as u64;
        if self.is_rank0() {
            std::fs::create_dir_all(&self.run_dir).map_err(|e| Error::io(&self.run_dir, e))?;
            self.trim_metrics()?;
        }
        if self.cfg.bf16 && self.device.is_cuda() {
            // tch's autocast alone computes in float16 (libtorch's default) without loss scaling.
            let bf16 = crate::dist::set_autocast_cuda_bf16(true).map_err(Error::Input)?;
            if !bf16 {
                return Err(Error::Input("CUDA autocast did not switch to bfloat16".into()));
            }
        }
        let accum = self.cfg.grad_accum;
        let bar = crate::util::progress::bar(total, "train");
        bar.set_position(self.state.step);
        let mut history = Vec::new();
        let world = self.comm.world_size() as f64;
        'epochs: while self.state.epoch < self.cfg.epochs && self.state.step < total {
            let epoch = self.state.epoch;
            let usable = data.len(epoch)? / accum * accum;
            // Opened only when there is something left to train in this epoch (a rolling run's
            // iterator extracts features).
            let mut batches = None;
            let mut counts = StepCounts::zeros(self.cfg.ttt_steps);
            let mut loss_sum = 0.0;
            let mut loss_k_sum = vec![0.0; self.cfg.ttt_steps];
            let mut trained = 0u64;
            let mut positions = 0u64;
            while self.state.micro < usable {
                if batches.is_none() {
                    batches = Some(data.iter_from(epoch, self.state.micro)?);
                }
                let batch = batches.as_mut().and_then(|b| b.next()).ok_or_else(|| {
                    Error::Input(format!("data ended at micro-batch {} of epoch {epoch}, expected {usable}", self.state.micro))
                })??;
                let batch = to_device(batch, self.device)?;
                if batch.is_finite() {
                    let out = tch::autocast(self.cfg.bf16 && self.device.is_cuda(), || {
                        ttt_forward(
                            &self.draft,
                            &self.head.embed_tokens,
                            &self.head.lm_head,
                            &batch.as_ttt(),
                            self.cfg.ttt_steps,
                            self.cfg.step_decay,
                        )
                    })?;
                    (&out.weighted_loss / accum as f64).backward();
                    loss_sum += out.weighted_loss.double_value(&[]);
                    loss_k_sum.iter_mut().zip(&out.losses).for_each(|(a, b)| *a += b);
                    counts.add(&out.counts);
                    positions += out.positions as u64;
                    trained += 1;
                } else {
                    self.state.skipped_nonfinite += 1;
                    tracing::warn!(epoch, micro = self.state.micro, "skipping a micro-batch with non-finite features");
                }
                self.state.micro += 1;
                if self.state.micro % accum != 0 {
                    continue;
                }
                // Optimizer step: average gradients over ranks, clip, update. A rank whose every
                // micro-batch was skipped still has a gradient for each parameter (zeros), so
                // all ranks reduce the same tensors.
                if self.params.iter().any(|(_, p)| !p.grad().defined()) {
                    let zero = self
                        .params
                        .iter()
                        .map(|(_, p)| p.sum(p.kind()) * 0.0)
                        .fold(Tensor::zeros([], (Kind::Float, self.device)), |a, b| a + b);
                    zero.backward();
                }
                let mut grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
                tch::no_grad(|| -> Result<()> {
                    self.comm.all_reduce_sum(&mut grads)?;
                    if world > 1.0 {
                        for g in &grads {
                            let _ = g.shallow_clone().g_div_scalar_(world);
                        }
                    }
                    Ok(())
                })?;
                let grad_norm = clip_grad_norm(&self.params, self.cfg.max_grad_norm);
                let lr = lr_at(self.state.step, total, warmup, self.cfg.lr, self.cfg.min_lr);
                self.opt.step(&self.params, lr)?;
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let m = self.reduce_metrics(counts, loss_sum, loss_k_sum, trained, positions, lr, grad_norm)?;
                self.state.step += 1;
                self.state.positions_seen += m.positions;
                if self.is_rank0() {
                    self.log(&m)?;
                    bar.set_position(self.state.step);
                    bar.set_message(format!(
                        "loss {:.3} acc0 {:.3} τ {:.2}",
                        m.loss,
                        m.acc.first().copied().unwrap_or(0.0),
                        m.sim_accept_len
                    ));
                }
                history.push(m);
                counts = StepCounts::zeros(self.cfg.ttt_steps);
                loss_sum = 0.0;
                loss_k_sum = vec![0.0; self.cfg.ttt_steps];
                trained = 0;
                positions = 0;
                let done = self.state.step >= total;
                let epoch_end = self.state.micro >= usable;
                if done || (epoch_end && self.save_each_epoch) || (self.cfg.save_every > 0 && self.state.step % self.cfg.save_every == 0) {
                    self.save()?;
                }
                if epoch_end && self.save_each_epoch {
                    data.epoch_done(epoch)?;
                }
                if done {
                    break 'epochs;
                }
            }
            if self.state.micro >= usable {
                self.state.epoch += 1;
                self.state.micro = 0;
            }
        }
        bar.finish_and_clear();
        Ok(history)
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce_metrics(
        &self,
        counts: StepCounts,
        loss_sum: f64,
        loss_k_sum: Vec<f64>,
        trained: u64,
        positions: u64,
        lr: f64,
        grad_norm: f64,
    ) -> Result<StepMetrics> {
        // Sums across ranks first, ratios after.
        let k = self.cfg.ttt_steps;
        let mut floats = vec![loss_sum, trained as f64, positions as f64];
        floats.extend(&loss_k_sum);
        let mut t = [Tensor::from_slice(&floats), Tensor::from_slice(&counts.to_flat())];
        self.comm.all_reduce_sum(&mut t)?;
        let floats: Vec<f64> = Vec::try_from(&t[0])?;
        let counts = StepCounts::from_flat(&Vec::<i64>::try_from(&t[1])?);
        let n = floats[1].max(1.0);
        Ok(StepMetrics {
            step: self.state.step + 1,
            epoch: self.state.epoch,
            lr,
            loss: floats[0] / n,
            loss_k: floats[3..3 + k].iter().map(|x| x / n).collect(),
            acc: counts.acc(),
            cond_acc: counts.cond_acc(),
            sim_accept_len: counts.sim_accept_len(),
            grad_norm,
            positions: floats[2] as u64,
            skipped_nonfinite: self.state.skipped_nonfinite,
        })
    }

    fn log(&self, m: &StepMetrics) -> Result<()> {
        let p = self.metrics_path();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(|e| Error::io(&p, e))?;
        let line = serde_json::to_string(m).map_err(|e| Error::Input(e.to_string()))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&p, e))?;
        tracing::debug!(
            step = m.step,
            loss = m.loss,
            acc0 = m.acc.first().copied().unwrap_or(0.0),
            tau = m.sim_accept_len,
            lr = m.lr,
            "step"
        );
        Ok(())
    }

    /// Writes a checkpoint (rank 0 only; other ranks return at once).
    pub fn save(&self) -> Result<Option<PathBuf>> {
        if !self.is_rank0() {
            return Ok(None);
        }
        let dir =
            checkpoint::save(&self.run_dir, &self.state, &self.draft, &self.opt.state_tensors(), &self.recipe_toml, self.cfg.keep_last)?;
        Ok(Some(dir))
    }
}

fn to_device(b: TrainBatch, device: Device) -> Result<TrainBatch> {
    if device == Device::Cpu {
        return Ok(b);
    }
    Ok(TrainBatch {
        input_ids: b.input_ids.f_to_device(device)?,
        attention_mask: b.attention_mask.f_to_device(device)?,
        loss_mask: b.loss_mask.f_to_device(device)?,
        aux: b.aux.f_to_device(device)?,
        last_hidden: b.last_hidden.f_to_device(device)?,
    })
}
