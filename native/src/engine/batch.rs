//! One step of the engine: admit waiting lines into free slots (building their prompts), fill
//! a batch with every speaking NPC's next token and prompt chunks, decode, sample.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::actions;
use crate::escalation::TokenConfidence;
use crate::guard::ReplyGuard;
use crate::kv::cache::seq_id;
use crate::llama::adapter::AdapterKey;
use crate::protocol::{Event, FinishReason, NpcError, ReplySource, ReplyStats, RequestId};
use crate::sampling::StopFilter;

use super::scheduler::{self, Prefill};
use super::sequence::{Job, Phase, Prepared, Queued, Reply};
use super::{Engine, no_local_model, pos};

impl Engine<'_, '_> {
    /// Moves queued replies into free slots, building their prompts.
    pub(super) fn admit_queued(&mut self) {
        while let Some(npc) = self.queue.next_npc() {
            // Without a local model nothing is queued (`Engine::enqueue_local`).
            let Some(ctx) = self.ctx.as_mut() else {
                return;
            };
            let Some(slot) = self.kv.acquire(ctx, npc) else {
                return;
            };
            let queued = self.queue.pop().expect("a line is waiting");
            match self.start_job(queued, slot) {
                Ok(job) => self.active.push(job),
                Err((request, error)) => {
                    self.kv.release(slot);
                    self.emit(Event::Failed {
                        npc,
                        request,
                        error,
                    });
                }
            }
        }
    }

    /// Builds the prompt of a waiting line and the [`Reply`] that will carry its text: the
    /// part of starting a reply that does not depend on who generates it. The local model's
    /// [`Engine::start_job`] and the inference server (`super::remote`) both start here.
    pub(super) fn prepare_reply(
        &mut self,
        queued: Queued,
    ) -> Result<(Reply, Prepared), (RequestId, NpcError)> {
        let Queued {
            npc,
            request,
            line,
            options,
            deadline,
            received,
            fact,
            cloud_fact,
            hint,
            unknown,
            routing,
            ..
        } = queued;
        let Some(conversation) = self.npcs.get_mut(&npc) else {
            return Err((request, NpcError::UnknownNpc(npc)));
        };
        let prompt_started = Instant::now();
        // A line the cloud was asked about is not sent to the cloud again, and a reply that
        // opens with a fact has streamed already.
        let escalate_held =
            cloud_fact.is_none() && fact.is_none() && self.escalator.holds(&conversation.profile);
        // `hint` marks a line about something the NPC may not know.
        let (remind, check) = self.escalator.dont_know_policy();
        // A reply that opens with a fact the cloud supplied is grounded in it.
        let check_grounding = check && hint.is_some() && fact.is_none();
        let line = conversation.actions.take_notes_into(line);
        let sampling = conversation.sampling.clone();
        let assembled = conversation
            .knowledge
            .assemble(
                &self.prompts,
                self.model,
                &conversation.system,
                &conversation.turns,
                &line,
                fact.as_deref(),
                hint.as_deref().filter(|_| remind),
                self.context_per_npc,
                sampling.max_tokens as usize,
            )
            .map_err(|error| (request, error))?;
        let reply = Reply {
            npc,
            request,
            line,
            filter: actions::filter(
                &conversation.actions,
                StopFilter::new(sampling.stop.clone()),
            ),
            max_tokens: sampling.max_tokens,
            stats: ReplyStats {
                prompt_tokens: assembled.tokens.len(),
                dropped_turns: conversation.knowledge.summary.turns,
                cloud_fact,
                lore_entries: assembled.lore_entries,
                dropped_lore: assembled.dropped_lore,
                memories: assembled.memories,
                dropped_memories: assembled.dropped_memories,
                timing: crate::protocol::ReplyTiming {
                    prompt: prompt_started.elapsed(),
                    routing,
                    ..Default::default()
                },
                ..ReplyStats::new(if cloud_fact.is_some() {
                    ReplySource::Informed
                } else {
                    ReplySource::Local
                })
            },
            // The score costs more than the pick (a pass of exponentials over the whole
            // vocabulary, every token): only where something reads it.
            confidence: (escalate_held || self.config.confidence_for_every_reply)
                .then(TokenConfidence::default),
            hold: escalate_held || check_grounding,
            escalate_held,
            check_grounding,
            unknown,
            fact,
            guard: ReplyGuard::default(),
            secrets: conversation.guard.clone(),
            deflection: None,
            received,
            first_token_at: None,
            priority: options.priority,
            deadline,
        };
        let prepared = Prepared {
            tokens: assembled.tokens,
            chat: assembled.chat,
            grammar: conversation.actions.grammar.clone(),
            budget: self
                .context_per_npc
                .saturating_sub(sampling.max_tokens as usize)
                .min(conversation.knowledge.budget().unwrap_or(usize::MAX)),
            sampling,
        };
        Ok((reply, prepared))
    }

    pub(super) fn start_job(
        &mut self,
        queued: Queued,
        slot: usize,
    ) -> Result<Job, (RequestId, NpcError)> {
        let aligning_started = Instant::now();
        let npc = queued.npc;
        let (mut reply, prepared) = self.prepare_reply(queued)?;
        let adapter = self.npcs.get(&npc).and_then(|c| c.adapter);
        let tag = self.adapters.tag(adapter);
        let prompt = align_with_cache(
            self.model,
            self.kv.tokens_under(slot, &tag),
            prepared.tokens,
            // The respelling stays inside the persona's prompt budget too.
            prepared.budget,
        );
        let Some(ctx) = self.ctx.as_mut() else {
            return Err((reply.request, no_local_model()));
        };
        let reuse = self.kv.reuse_prefix(ctx, slot, &prompt, &tag);
        let cached = reuse.cached;
        let seed = fresh_seed(reply.request);
        if let Some(fact) = reply.fact.clone() {
            // The reply opens with the fact (the prompt ends with it): the game gets it now,
            // and this is its first token.
            let (opening, _) = reply.push(fact.as_bytes());
            if !opening.is_empty() {
                let now = Instant::now();
                reply.first_token_at = Some(now);
                reply.stats.time_to_first_token = now - reply.received;
                let _ = self.events.send(Event::Delta {
                    npc: reply.npc,
                    request: reply.request,
                    text: opening,
                });
            }
        }
        reply.stats.prompt_tokens = prompt.len();
        reply.stats.cached_tokens = cached;
        reply.stats.shared_tokens = reuse.copied;
        reply.stats.timing.prompt = aligning_started.elapsed();
        Ok(Job {
            reply,
            slot,
            pending_from: cached,
            in_batch: 0,
            n_past: cached,
            next_token: None,
            logits_at: None,
            token_in_batch: false,
            sampler: actions::ReplySampler::new(
                self.model,
                prepared.grammar.as_deref(),
                prepared.sampling.sampler(self.model.n_vocab(), seed),
                prepared.sampling.candidates_needed(),
            ),
            pending: prompt,
            adapter,
        })
    }

    /// One step over the active jobs: one token for each job that is generating, then
    /// prompt chunks for jobs still prefilling, up to the batch size.
    ///
    /// Jobs on different LoRA adapters cannot share a `decode` call (llama.cpp applies a
    /// context's adapter to every token of it), and changing the context's adapter makes
    /// llama.cpp rebuild its scheduler and reserve its graphs again. So when the active jobs
    /// are on several adapters, a step decodes one adapter's jobs: the context's adapter
    /// keeps it for
    /// [`RuntimeConfig::adapter_slice_steps`](crate::RuntimeConfig::adapter_slice_steps)
    /// steps, then the next adapter in turn takes it, so that every adapter's NPCs advance
    /// and the switches are one per slice.
    pub(super) fn step(&mut self) {
        self.enforce_deadlines();
        if self.active.is_empty() {
            return;
        }
        let current = self.adapters.current();
        let group = if self.active.iter().all(|job| job.adapter == current) {
            // One group, on the context's adapter already (always so without adapters).
            current
        } else {
            self.next_group(current)
        };
        let Some(ctx) = self.ctx.as_mut() else {
            return self.fail_active("no local model", |_| true);
        };
        if let Err(reason) = self.adapters.apply(ctx, group) {
            let reason = format!("the LoRA adapter could not be set: {reason}");
            return self.fail_active(&reason, |job| job.adapter == group);
        }
        self.adapters.stepped();
        self.step_group(group);
    }

    /// The adapter the next step decodes when the active jobs are on several adapters or not
    /// on `current`: `current` until it has had its slice of steps, then the next adapter in
    /// turn that has an active job.
    fn next_group(&self, current: Option<AdapterKey>) -> Option<AdapterKey> {
        let mut groups: Vec<Option<AdapterKey>> =
            self.active.iter().map(|job| job.adapter).collect();
        groups.sort_unstable();
        groups.dedup();
        if groups.contains(&current) && self.adapters.steps() < self.config.adapter_slice_steps {
            return current;
        }
        groups
            .iter()
            .copied()
            .find(|&g| g > current)
            .unwrap_or(groups[0])
    }

    /// [`Engine::step`] for the jobs on one adapter (`None`: the base model), the context's
    /// adapter set to it.
    fn step_group(&mut self, group: Option<AdapterKey>) {
        // Generated tokens enter the batch in sequence order: llama.cpp splits a
        // multi-sequence batch into one micro-batch per run of consecutive sequence ids, so an
        // unordered batch would decode one NPC at a time.
        self.active.sort_by_key(|job| job.slot);
        let in_group = self.active.iter().filter(|job| job.adapter == group);
        let generating = in_group
            .clone()
            .filter(|job| job.next_token.is_some())
            .count();
        let prompting = in_group
            .clone()
            .any(|job| job.next_token.is_none() && job.pending_from < job.pending.len());
        if self.config.reproducible_batching_applies() && generating > 0 && prompting {
            // A micro-batch that mixes prompt tokens with generated ones computes the prompt's
            // keys and values differently (in the last bits) from one that holds prompt tokens
            // alone, so they go to llama.cpp in two calls.
            self.decode(Phase::Generated, generating, group);
            // The game is quitting: the prompts' decode would only keep it waiting.
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            self.decode(Phase::Prompts, generating, group);
        } else {
            self.decode(Phase::Both, generating, group);
        }
    }

    /// One `decode` call for the jobs on `group`'s adapter: the next token of every speaking
    /// NPC and/or prompt chunks ([`Engine::fill_batch`]), then what it computed goes into
    /// each reply's sequence ([`Engine::commit_batch`]) and every reply whose logits it
    /// produced samples its next token ([`Engine::sample_batch`]).
    fn decode(&mut self, phase: Phase, generating: usize, group: Option<AdapterKey>) {
        let started = Instant::now();
        if self.fill_batch(phase, generating, group) == 0 {
            return;
        }
        let decode_started = Instant::now();
        let Some(ctx) = self.ctx.as_mut() else {
            return self.fail_active("no local model", |_| true);
        };
        let decoded = ctx.decode(&mut self.batch);
        let decode_time = decode_started.elapsed();
        // Pending sequence copies ran at the start of the decode, whatever its outcome.
        self.kv.decoded();
        if let Err(err) = decoded {
            return self.fail_all(&format!("decode failed: {err}"));
        }
        if let Some(budget) = self.step_budget.as_mut() {
            let entries = usize::try_from(self.batch.n_tokens()).unwrap_or(0);
            let prompt = self.active.iter().map(|job| job.in_batch).sum();
            budget.observe(prompt, entries, decode_time);
        }
        self.commit_batch(decode_time);
        let finished = self.sample_batch();
        let host = started.elapsed().saturating_sub(decode_time);
        for job in &mut self.active {
            if job.token_in_batch {
                job.stats.timing.step_host += host;
            }
        }
        // Remove from the back so earlier indices stay valid.
        for (at, reason) in finished.into_iter().rev() {
            let job = self.active.swap_remove(at);
            self.finish(job, reason);
        }
    }

    /// Fills the batch for one `decode` call of the jobs on `group`'s adapter: the next token
    /// of every speaking NPC (unless `phase` is prompts only), then prompt chunks as
    /// [`scheduler::prefill_plan`] shares them out (unless `phase` is generated tokens only).
    /// Returns the entries added.
    fn fill_batch(&mut self, phase: Phase, generating: usize, group: Option<AdapterKey>) -> usize {
        let limit = scheduler::step_limit(
            self.config.batch_size as usize,
            generating,
            self.config.prefill_chunk as usize,
        );
        self.batch.clear();
        let mut used = 0;
        for job in &mut self.active {
            job.logits_at = None;
            job.token_in_batch = false;
            if phase == Phase::Prompts || job.adapter != group {
                continue;
            }
            if let Some(token) = job.next_token {
                let added = self
                    .batch
                    .add(token, pos(job.n_past), &[seq_id(job.slot)], true);
                debug_assert!(added.is_ok(), "batch holds one token per slot");
                job.logits_at = Some(i32::try_from(used).unwrap_or(i32::MAX));
                job.token_in_batch = true;
                used += 1;
            }
        }
        if phase == Phase::Generated {
            return used;
        }
        let limit = self.step_time_limit(limit, used);
        let replies: Vec<Prefill> = self
            .active
            .iter()
            .map(|job| Prefill {
                priority: job.priority,
                // Another adapter's prompts go in that adapter's call.
                remaining: if job.adapter == group {
                    job.pending.len().saturating_sub(job.pending_from)
                } else {
                    0
                },
                generating: job.next_token.is_some() && job.adapter == group,
            })
            .collect();
        for (at, take) in scheduler::prefill_plan(&replies, used, limit) {
            let job = &mut self.active[at];
            let end = job.pending_from + take;
            job.in_batch = take;
            for index in job.pending_from..end {
                let last = index + 1 == job.pending.len();
                let position = pos(job.n_past + index - job.pending_from);
                let _ = self
                    .batch
                    .add(job.pending[index], position, &[seq_id(job.slot)], last);
                if last {
                    job.logits_at = Some(i32::try_from(used).unwrap_or(i32::MAX));
                }
                used += 1;
            }
        }
        used
    }

    /// `limit` (batch entries this step may hold; `used` are taken by generated tokens) cut
    /// to the prompt tokens [`RuntimeConfig::max_step_time`] allows (see
    /// [`StepBudget`](super::scheduler::StepBudget)).
    fn step_time_limit(&self, limit: usize, used: usize) -> usize {
        match &self.step_budget {
            Some(budget) => limit.min(used.saturating_add(budget.tokens())),
            None => limit,
        }
    }

    /// After a decode: what the batch computed is in the KV cache now; record what each
    /// sequence holds and where each reply stands.
    fn commit_batch(&mut self, decode_time: Duration) {
        for job in &mut self.active {
            if job.token_in_batch {
                job.stats.timing.decode += decode_time;
                job.stats.timing.steps += 1;
            } else if job.in_batch > 0 {
                job.stats.timing.prefill += decode_time;
            }
            // `token_in_batch` stays set until the next call's batch is filled: the step's
            // host time goes to the replies it carried.
            if job.token_in_batch {
                if let Some(token) = job.next_token.take() {
                    self.kv.push(job.slot, token);
                    job.n_past += 1;
                }
            } else if job.in_batch > 0 {
                let added = std::mem::take(&mut job.in_batch);
                for &token in &job.pending[job.pending_from..job.pending_from + added] {
                    self.kv.push(job.slot, token);
                }
                job.pending_from += added;
                job.n_past += added;
            }
        }
    }

    /// Samples the next token of every reply whose logits the decode produced, scores its
    /// confidence, streams its text through the stop filter and the guard; returns the
    /// replies that ended (index in `active`, why), in index order.
    fn sample_batch(&mut self) -> Vec<(usize, FinishReason)> {
        let picks = self.pick_tokens();
        let mut finished = Vec::new();
        for (at, (job, pick)) in self.active.iter_mut().zip(picks).enumerate() {
            let Some(sampled) = pick else { continue };
            let Some(token) = sampled else {
                // The action grammar allows no token at all: the reply ends here.
                finished.push((at, FinishReason::EndOfTurn));
                continue;
            };
            let now = Instant::now();
            if job.first_token_at.is_none() {
                job.stats.time_to_first_token = now - job.received;
            }
            let first = *job.first_token_at.get_or_insert(now);
            let vocab = self.model.vocab();
            if vocab.is_eog(token) || vocab.is_control(token) {
                finished.push((at, FinishReason::EndOfTurn));
                continue;
            }
            // Up to the last token of the reply: the end-of-turn token is not one, and
            // neither is the decode before it (tokens per second counts n - 1 intervals).
            job.stats.generation_time = now - first;
            job.stats.generated_tokens += 1;
            let (text, stopped) = job.reply.push(&vocab.token_to_piece(token, false, None));
            if !text.is_empty() {
                let _ = self.events.send(Event::Delta {
                    npc: job.npc,
                    request: job.request,
                    text,
                });
            }
            job.stats.timing.text += now.elapsed();
            if job.guard.breach().is_some() {
                finished.push((at, FinishReason::Guarded));
            } else if stopped {
                finished.push((at, FinishReason::StopString));
            } else if job.stats.generated_tokens >= job.max_tokens as usize {
                finished.push((at, FinishReason::MaxTokens));
            } else if job.n_past + 1 >= self.context_per_npc {
                finished.push((at, FinishReason::ContextFull));
            } else {
                job.next_token = Some(token);
            }
        }
        finished
    }

    /// Picks and scores the next token of every reply whose logits the decode produced, in
    /// `active`'s order: `None` for a reply without logits in this call, `Some(None)` when
    /// its grammar allows no token. The logits are read here (the context stays on the
    /// worker thread); the samplers then run on up to
    /// [`RuntimeConfig::sampling_threads`](crate::RuntimeConfig::sampling_threads) threads,
    /// which llama.cpp's are not (its CPU threads
    /// live only within a `decode`).
    fn pick_tokens(&mut self) -> Vec<Picked> {
        let Some(ctx) = self.ctx.as_ref() else {
            return vec![None; self.active.len()];
        };
        let logits: Vec<Option<&[f32]>> = self
            .active
            .iter()
            .map(|job| job.logits_at.map(|index| ctx.get_logits_ith(index)))
            .collect();
        // Another thread pays off only for picks that pass over the whole vocabulary: the
        // confidence score, or a chain with no bound on its candidates. A pick among the best
        // few alone costs less than the hand-over: 16 such replies took 384 µs a step on the
        // worker alone and 441 µs on two threads (the batching bench's host table, default
        // model, 2 cores).
        let heavy = self
            .active
            .iter()
            .zip(&logits)
            .filter(|(job, logits)| {
                logits.is_some() && (job.confidence.is_some() || job.sampler.reads_every_logit())
            })
            .count();
        let threads = self
            .sampling_threads
            .min(heavy / MIN_SAMPLED_PER_THREAD)
            .max(1);
        if threads == 1 {
            return self
                .active
                .iter_mut()
                .zip(&logits)
                .map(|(job, logits)| logits.map(|logits| pick(job, logits)))
                .collect();
        }
        let mut picks = vec![None; self.active.len()];
        let per_thread = self.active.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let mut shares = self
                .active
                .chunks_mut(per_thread)
                .zip(logits.chunks(per_thread))
                .zip(picks.chunks_mut(per_thread));
            let own = shares.next();
            for ((jobs, logits), out) in shares {
                scope.spawn(move || pick_share(jobs, logits, out));
            }
            // The worker takes the first share itself.
            if let Some(((jobs, logits), out)) = own {
                pick_share(jobs, logits, out);
            }
        });
        picks
    }

    /// Queued replies past their deadline fail; replies in progress end with what they have.
    pub(super) fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        for queued in self.queue.expired(now) {
            self.emit(Event::Failed {
                npc: queued.npc,
                request: queued.request,
                error: NpcError::DeadlineExceeded,
            });
        }
        while let Some(at) = self
            .active
            .iter()
            .position(|job| job.deadline.is_some_and(|d| now >= d))
        {
            let job = self.active.swap_remove(at);
            if job.stats.generated_tokens == 0 {
                // Nothing said yet: no reply to keep.
                self.kv.release(job.slot);
                self.emit(Event::Failed {
                    npc: job.npc,
                    request: job.request,
                    error: NpcError::DeadlineExceeded,
                });
            } else {
                self.finish(job, FinishReason::Deadline);
            }
        }
    }
}

/// Fewest scored (or whole-vocabulary) replies a sampling thread takes: starting a thread
/// costs tens of microseconds, a reply's pick and score 0.07–0.15 ms on the default model (the
/// batching bench's host table).
/// Shares are cut by position in `active`, so one may hold more replies with logits than
/// another while prompts are being processed.
const MIN_SAMPLED_PER_THREAD: usize = 4;

/// A reply's pick in one call: `None` without logits, `Some(None)` when its grammar allows
/// no token.
type Picked = Option<Option<LlamaToken>>;

/// [`pick`] over one thread's share of the step's replies.
fn pick_share(jobs: &mut [Job], logits: &[Option<&[f32]>], out: &mut [Picked]) {
    for ((job, logits), out) in jobs.iter_mut().zip(logits).zip(out) {
        *out = logits.map(|logits| pick(job, logits));
    }
}

/// `job`'s next token from its `logits`, its confidence scored if the reply keeps a score;
/// `None` when its grammar allows no token. Timed into its stats.
fn pick(job: &mut Job, logits: &[f32]) -> Option<LlamaToken> {
    let started = Instant::now();
    let token = job.sampler.sample(logits);
    let scoring = Instant::now();
    job.stats.timing.sampling += scoring - started;
    let token = token?;
    if let Some(confidence) = &mut job.confidence {
        confidence.observe(logits, token.0);
        job.stats.timing.confidence += scoring.elapsed();
    }
    Some(token)
}

/// A seed for a reply whose persona sets none: the clock's nanoseconds and the request.
pub(super) fn fresh_seed(request: RequestId) -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ (request.0 as u32)
}

/// Re-tokenizing a reply's text does not always give back the tokens that were sampled (a
/// byte-pair vocabulary spells many texts in several ways), and a prompt that spells an
/// earlier reply differently would recompute everything after the first difference. Where
/// `prompt` leaves the cached tokens but the cached tokens spell the same bytes, they are
/// kept and only the rest of the prompt's text is tokenized again.
///
/// The respelling may take more tokens than the prompt's own spelling (grammar-constrained
/// action lines are often sampled a few letters at a time); it is kept only while it leaves
/// `limit` tokens or fewer, the context less the reply's room. Those tokens are cached, so
/// they cost nothing to compute.
fn align_with_cache(
    model: &LlamaModel,
    cached: &[LlamaToken],
    prompt: Vec<LlamaToken>,
    limit: usize,
) -> Vec<LlamaToken> {
    let common = cached
        .iter()
        .zip(&prompt)
        .take_while(|(a, b)| a == b)
        .count();
    if common == cached.len() || common == prompt.len() {
        return prompt;
    }
    let vocab = model.vocab();
    let mut rest = Vec::new();
    for &token in &prompt[common..] {
        vocab.token_to_piece_into(token, &mut rest, true, None);
    }
    let (mut spelled, mut take, mut matched) = (Vec::new(), 0, 0);
    for (at, &token) in cached[common..].iter().enumerate() {
        vocab.token_to_piece_into(token, &mut spelled, true, None);
        if !rest.starts_with(&spelled) {
            break;
        }
        (take, matched) = (at + 1, spelled.len());
    }
    if take == 0 {
        return prompt;
    }
    let Ok(tail) = std::str::from_utf8(&rest[matched..]) else {
        return prompt;
    };
    let mut aligned = prompt[..common].to_vec();
    aligned.extend_from_slice(&cached[common..common + take]);
    aligned.extend(vocab.tokenize(tail.as_bytes(), false, true));
    if aligned.len() > limit.max(prompt.len()) {
        return prompt;
    }
    aligned
}
