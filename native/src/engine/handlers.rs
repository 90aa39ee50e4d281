//! The engine's answer to each request: personas, lines, memories, reveals, save and load,
//! cancels.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::actions::{self, NpcActions};
use crate::config::Backend;
use crate::escalation::{Decision, Escalator, NpcProfile};
use crate::guard::SecretGuard;
use crate::kv::cache::SeqSnapshot;
use crate::kv::persist::{self, StateIdentity};
use crate::llama::prompt::Turn;
use crate::mind::knowledge::Knowledge;
use crate::persona::Persona;
use crate::protocol::{Event, NpcError, NpcId, RequestId, SayOptions, StateError};

use super::Engine;
use super::sequence::{Conversation, Prewarm, Queued};

impl Engine<'_, '_> {
    pub(super) fn set_persona(&mut self, npc: NpcId, persona: &Persona) {
        match self.apply_persona(npc, persona) {
            Ok(prefix_tokens) => self.emit(Event::PersonaAccepted { npc, prefix_tokens }),
            Err(error) => self.emit(Event::PersonaRejected { npc, error }),
        }
    }

    /// Sets (or reloads) `npc`'s persona, keeping its conversation, what it learned and the
    /// secrets the game revealed; returns the system prompt's token count.
    pub(super) fn apply_persona(&mut self, npc: NpcId, base: &Persona) -> Result<usize, NpcError> {
        let revealed = self
            .npcs
            .get(&npc)
            .map(|c| c.knowledge.revealed.clone())
            .unwrap_or_default();
        let persona = &base.with_revealed(&revealed);
        let result = persona
            .validate()
            .map_err(|err| NpcError::InvalidPersona(err.to_string()))
            .and_then(|()| {
                let sampling = persona.sampling.apply_to(&self.config.sampling);
                let system = self.prompts.sanitize(&with_preamble(
                    &self.config.preamble,
                    &persona.system_prompt(),
                ));
                // The persona must leave room for a short line and a whole reply.
                let (tokens, _) = self.prompts.fit(
                    self.model,
                    &system,
                    &[],
                    "Hello.",
                    self.context_per_npc,
                    sampling.max_tokens as usize,
                )?;
                let grammar = actions::action_grammar(&persona.actions);
                // Built once here so a grammar llama.cpp refuses rejects the persona.
                if let Some(grammar) = &grammar {
                    LlamaSampler::grammar(self.model, grammar, "root").map_err(|err| {
                        NpcError::InvalidPersona(format!("action grammar refused: {err}"))
                    })?;
                }
                let mut knowledge = Knowledge::for_persona(persona, &self.config.assets_dir)?;
                if let Some(budget) = knowledge.budget().filter(|&b| b < tokens.len()) {
                    return Err(NpcError::InvalidPersona(format!(
                        "prompt_budget is {budget} tokens but the persona alone needs {} \
                         (its system prompt and a one-word line)",
                        tokens.len()
                    )));
                }
                if let Some(keep) = persona.compress_lore {
                    knowledge
                        .compress(
                            self.model,
                            &self.identity.model,
                            keep,
                            self.config.effective_threads(),
                            &self.config.cache_dir,
                        )
                        .map_err(NpcError::Inference)?;
                }
                let adapter = match &persona.adapter {
                    Some(wanted) => self.adapters.resolve(
                        &wanted.path,
                        wanted.scale,
                        &self.config.assets_dir,
                    )?,
                    None => None,
                };
                Ok((system, sampling, tokens.len(), grammar, knowledge, adapter))
            });
        let (system, sampling, prefix_tokens, grammar, mut knowledge, adapter) = result?;
        if base.backend == Some(crate::config::Backend::Remote) && self.remote.is_none() {
            tracing::warn!(
                "NPC {npc:?}: its persona asks for the remote backend but the runtime has no \
                 server (RuntimeConfig::remote); it runs on the local model"
            );
        }
        let profile = NpcProfile::new(persona);
        let guard = Arc::new(if self.config.guard {
            // The world preamble is public (what every NPC may say), not the NPC's framing.
            SecretGuard::new(
                persona,
                knowledge
                    .lore
                    .entries()
                    .iter()
                    .map(|e| e.text.as_str())
                    .chain([self.config.preamble.as_str()]),
                &persona.system_prompt(),
            )
        } else {
            SecretGuard::off()
        });
        let vocabulary = crate::escalation::vocabulary(
            profile
                .documents
                .iter()
                .map(String::as_str)
                .chain([persona.speech_style.as_str()])
                .chain(knowledge.lore.entries().iter().flat_map(|e| {
                    [e.title.as_str(), e.text.as_str()]
                        .into_iter()
                        .chain(e.keywords.iter().map(String::as_str))
                })),
        );
        let old = self.npcs.remove(&npc);
        let notes = old.as_ref().map(|c| c.actions.notes.clone());
        let (last_deflection, dont_know_hints) = old
            .as_ref()
            .map_or((None, 0), |c| (c.last_deflection, c.dont_know_hints));
        let (turns, old_knowledge) = old.map(|c| (c.turns, c.knowledge)).unwrap_or_default();
        knowledge.carry_over(old_knowledge);
        self.npcs.insert(
            npc,
            Conversation {
                persona: base.clone(),
                guard,
                last_deflection,
                dont_know_hints,
                vocabulary,
                system,
                sampling,
                turns,
                actions: NpcActions {
                    specs: persona.actions.clone(),
                    grammar,
                    notes: notes.unwrap_or_default(),
                },
                profile,
                knowledge,
                adapter,
            },
        );
        self.drop_prewarm(npc);
        if adapter.is_some() && self.is_remote(npc) {
            tracing::warn!(
                "NPC {npc:?}: its persona names a LoRA adapter, but its replies come from the \
                 inference server, which does not apply it"
            );
        }
        if self.ctx.is_none() && base.backend == Some(Backend::Local) {
            tracing::warn!(
                "NPC {npc:?}: its persona asks for the local model, but this runtime loads \
                 none (RemoteConfig::local_model is off): the inference server answers it"
            );
        }
        // The server computes a remote NPC's prompt: nothing to prepare here.
        if self.config.prewarm && self.config.kv_reuse && !self.is_remote(npc) {
            self.prewarm.push_back(Prewarm { npc, computed: 0 });
        }
        Ok(prefix_tokens)
    }

    /// Makes one of `npc`'s secrets knowledge ([`Request::RevealSecret`]).
    pub(super) fn reveal_secret(&mut self, npc: NpcId, query: &str) {
        let fail = |engine: &Self, error| engine.emit(Event::RevealFailed { npc, error });
        let Some(conversation) = self.npcs.get(&npc) else {
            return fail(self, NpcError::UnknownNpc(npc));
        };
        let base = conversation.persona.clone();
        let current = base.with_revealed(&conversation.knowledge.revealed);
        let secret = match current.find_secret(query) {
            Ok(secret) => secret.to_owned(),
            Err(message) => return fail(self, NpcError::NoSuchSecret(message)),
        };
        if let Some(conversation) = self.npcs.get_mut(&npc) {
            conversation.knowledge.revealed.push(secret.clone());
        }
        match self.apply_persona(npc, &base) {
            Ok(_) => self.emit(Event::SecretRevealed { npc, secret }),
            Err(error) => {
                // The persona was accepted before; only the new prompt can fail to fit.
                if let Some(conversation) = self.npcs.get_mut(&npc) {
                    conversation.knowledge.revealed.retain(|r| *r != secret);
                }
                fail(self, error);
            }
        }
    }

    pub(super) fn save_npc(&mut self, npc: NpcId, path: std::path::PathBuf) {
        self.absorb_cloud_turns();
        let Some(conversation) = self.npcs.get(&npc) else {
            let error = NpcError::UnknownNpc(npc).into();
            return self.emit(Event::NpcSaveFailed { npc, path, error });
        };
        let snapshot = self
            .ctx
            .as_ref()
            .and_then(|ctx| self.kv.snapshot(ctx, npc))
            .unwrap_or_default();
        let tokens: Vec<i32> = snapshot.tokens.iter().map(|t| t.0).collect();
        // The header names the adapter the saved keys and values were computed with.
        let identity = StateIdentity {
            adapter: snapshot.adapter.clone(),
            ..self.identity.clone()
        };
        match persist::save(
            &path,
            &identity,
            &conversation.turns,
            &tokens,
            &snapshot.bytes,
            &persist::SavedMind {
                memories: conversation.knowledge.memories.clone(),
                summary: conversation.knowledge.summary.clone(),
                revealed: conversation.knowledge.revealed.clone(),
            },
        ) {
            Ok(bytes) => self.emit(Event::NpcSaved {
                npc,
                path,
                bytes,
                kv_tokens: tokens.len(),
            }),
            Err(err) => {
                tracing::warn!("saving NPC {npc:?} to {} failed: {err}", path.display());
                let error = StateError::Io {
                    path: path.clone(),
                    writing: true,
                    message: err.to_string(),
                };
                self.emit(Event::NpcSaveFailed { npc, path, error });
            }
        }
    }

    pub(super) fn load_npc(&mut self, npc: NpcId, path: &Path) {
        let fail =
            |engine: &Self, error: StateError| engine.emit(Event::NpcLoadFailed { npc, error });
        if !self.npcs.contains_key(&npc) {
            return fail(self, NpcError::UnknownNpc(npc).into());
        }
        if self.busy(npc) {
            return fail(self, NpcError::Busy.into());
        }
        self.absorb_cloud_turns();
        // The loaded state is what the NPC continues from.
        self.drop_prewarm(npc);
        // A summary job for the old conversation is moot; the loaded one gets its own.
        self.summarizer.cancel(npc);
        // Saved KV is restored only if it was computed with the adapter the NPC has now.
        let adapter = self
            .npcs
            .get(&npc)
            .map(|c| self.adapters.tag(c.adapter))
            .unwrap_or_default();
        let identity = StateIdentity {
            adapter: adapter.clone(),
            ..self.identity.clone()
        };
        let loaded = match persist::load(path, &identity) {
            Ok(loaded) => loaded,
            Err(error) => return fail(self, error),
        };
        let mut kv_note = None;
        let mut kv_tokens = 0;
        match loaded.kv {
            Ok((tokens, _)) if !tokens.is_empty() && self.ctx.is_none() => {
                kv_note = Some("this runtime loads no local model to restore it into".to_owned());
            }
            Ok((tokens, bytes)) if !tokens.is_empty() => {
                let n_vocab = self.model.n_vocab();
                if tokens.len() >= self.context_per_npc
                    || tokens.iter().any(|&t| t < 0 || t >= n_vocab)
                {
                    kv_note = Some("saved tokens do not fit this model or context".to_owned());
                    self.forget_kv(npc);
                } else {
                    kv_tokens = tokens.len();
                    let tokens = tokens.into_iter().map(LlamaToken).collect();
                    let snapshot = SeqSnapshot {
                        tokens,
                        adapter,
                        bytes,
                    };
                    let loaded = match self.ctx.as_mut() {
                        Some(ctx) => self.kv.load(ctx, npc, snapshot),
                        None => Err("no local model".to_owned()),
                    };
                    if let Err(reason) = loaded {
                        kv_tokens = 0;
                        kv_note = Some(reason);
                    }
                }
            }
            Ok(_) => self.forget_kv(npc),
            Err(reason) => {
                self.forget_kv(npc);
                kv_note = Some(reason);
            }
        }
        if let Some(note) = &kv_note {
            tracing::warn!(
                "NPC {npc:?}: KV state in {} not restored ({note}); it will be recomputed",
                path.display()
            );
        }
        let mind_note = loaded.mind_note;
        if let Some(note) = &mind_note {
            tracing::warn!("NPC {npc:?}: {note} in {}", path.display());
        }
        let turns = loaded.turns.len();
        let mut reveals_changed = None;
        if let Some(conversation) = self.npcs.get_mut(&npc) {
            // Saved text is the player's file: it enters prompts only sanitized.
            conversation.turns = loaded
                .turns
                .into_iter()
                .map(|turn| self.prompts.sanitize_turn(turn))
                .collect();
            let mind = loaded.mind.unwrap_or_default();
            conversation.knowledge.memories = mind.memories;
            conversation.knowledge.summary = mind.summary;
            conversation.knowledge.sanitize(&self.prompts);
            if conversation.knowledge.revealed != mind.revealed {
                // Only secrets of this persona count (`Persona::with_revealed`).
                conversation.knowledge.revealed = mind.revealed;
                reveals_changed = Some(conversation.persona.clone());
            }
        }
        if let Some(persona) = reveals_changed
            && let Err(error) = self.apply_persona(npc, &persona)
        {
            tracing::warn!("NPC {npc:?}: the saved reveals do not fit its persona ({error})");
        }
        self.emit(Event::NpcLoaded {
            npc,
            turns,
            kv_tokens,
            kv_note,
            mind_note,
        });
    }

    pub(super) fn say(
        &mut self,
        npc: NpcId,
        request: RequestId,
        text: String,
        options: SayOptions,
        sent: Instant,
    ) {
        let fail = |engine: &Self, error| {
            engine.emit(Event::Failed {
                npc,
                request,
                error,
            });
        };
        let line = self.prompts.sanitize(text.trim());
        let chars = text.chars().count();
        if line.trim().is_empty() {
            return fail(self, NpcError::EmptyLine);
        }
        if chars > self.config.max_line_chars {
            return fail(
                self,
                NpcError::LineTooLong {
                    chars,
                    limit: self.config.max_line_chars,
                },
            );
        }
        if !self.npcs.contains_key(&npc) {
            return fail(self, NpcError::UnknownNpc(npc));
        }
        if self.busy(npc) {
            return fail(self, NpcError::Busy);
        }
        self.absorb_cloud_turns();
        // The reply computes the prefix itself.
        self.drop_prewarm(npc);
        let routing_started = Instant::now();
        let Some(c) = self.npcs.get_mut(&npc) else {
            return;
        };
        let known = c.knowledge.routing_documents(&line);
        let decision = if self.escalator.routes(&c.profile) {
            self.escalator.divert(
                npc,
                request,
                &line,
                &c.profile,
                &c.turns,
                &known,
                self.events,
            )
        } else {
            Decision::Local
        };
        match decision {
            Decision::Local => {}
            Decision::Cloud => return,
            Decision::Fallback(said) => return self.reply_with_fallback(npc, request, line, said),
        }
        // A line about something the NPC does not know gets a reminder to say so.
        let documents: Vec<&str> = c
            .profile
            .documents
            .iter()
            .map(String::as_str)
            .chain(known.iter().copied())
            .collect();
        let unknown = crate::escalation::unfamiliar_names(&documents, &c.vocabulary, &line);
        let hint = unknown.as_ref().map(|_| {
            let example = c.next_dont_know();
            format!(
                "(What you know may not answer this. If it does not, say that you don't know, \
                 in your own words (for example: \"{example}\"), and make nothing up.)"
            )
        });
        let routing = routing_started.elapsed();
        // The same question as one the cloud answered before: its fact opens the reply again.
        let learned = self.npcs.get(&npc).and_then(|c| {
            crate::escalation::learned_answer(&c.knowledge.memories.texts(), &line)
                .map(str::to_owned)
        });
        self.enqueue(
            Queued {
                npc,
                request,
                line,
                options,
                deadline: options.deadline.map(|d| sent + d),
                received: Instant::now(),
                fact: learned,
                cloud_fact: None,
                hint,
                unknown: unknown.unwrap_or_default(),
                routing,
                local_only: false,
            },
            false,
        );
    }

    /// Queues a local reply for each fact the cloud supplied, with the fact before the line.
    pub(super) fn absorb_informed(&mut self) {
        for informed in self.escalator.take_informed() {
            let Some(conversation) = self.npcs.get(&informed.npc) else {
                continue;
            };
            // Nothing in it may end the reply or open an action call.
            let mut fact = self.prompts.sanitize(&informed.fact);
            for marker in conversation
                .sampling
                .stop
                .iter()
                .map(String::as_str)
                .chain([actions::ACTION_MARKER.trim()])
            {
                if let Some(at) = fact.find(marker) {
                    fact.truncate(at);
                }
            }
            let fact = Some(fact.trim().to_owned()).filter(|fact| !fact.is_empty());
            if fact.is_none() {
                // Nothing usable: the local model answers the line on its own.
                tracing::info!("NPC {:?}: the cloud's fact was unusable", informed.npc);
            }
            // Ahead of every waiting line: the player has waited for the cloud already.
            self.enqueue(
                Queued {
                    npc: informed.npc,
                    request: informed.request,
                    line: informed.line,
                    options: SayOptions::default(),
                    deadline: None,
                    received: informed.asked,
                    fact,
                    cloud_fact: Some(informed.usage),
                    hint: None,
                    unknown: Vec::new(),
                    routing: Duration::ZERO,
                    local_only: false,
                },
                true,
            );
        }
    }

    /// Drops `npc`'s KV state, wherever it is (a runtime without a local model has none).
    pub(super) fn forget_kv(&mut self, npc: NpcId) {
        if let Some(ctx) = self.ctx.as_mut() {
            self.kv.forget(ctx, npc);
        }
    }

    /// Answers `line` with the NPC's fallback line `said` (routing would escalate it but may
    /// not): the conversation keeps the turn, the game gets one delta and the reply.
    pub(super) fn reply_with_fallback(
        &mut self,
        npc: NpcId,
        request: RequestId,
        line: String,
        said: String,
    ) {
        if let Some(conversation) = self.npcs.get_mut(&npc) {
            conversation.turns.push(self.prompts.sanitize_turn(Turn {
                player: line,
                npc: said.clone(),
            }));
        }
        Escalator::reply_with_fallback(self.events, npc, request, said);
    }

    /// Adds the turns the cloud (or the fallback line) answered to their conversations.
    pub(super) fn absorb_cloud_turns(&mut self) {
        for (npc, turn) in self.escalator.take_finished() {
            if let Some(conversation) = self.npcs.get_mut(&npc) {
                conversation.turns.push(self.prompts.sanitize_turn(turn));
            }
        }
    }

    pub(super) fn remember(&mut self, npc: NpcId, text: &str, importance: u8) {
        let text = self.prompts.sanitize(text.trim());
        let Some(conversation) = self.npcs.get_mut(&npc) else {
            let error = NpcError::UnknownNpc(npc);
            return self.emit(Event::RememberFailed { npc, error });
        };
        if text.trim().is_empty() {
            let error = NpcError::EmptyLine;
            return self.emit(Event::RememberFailed { npc, error });
        }
        let memories = conversation.knowledge.memories.remember(&text, importance);
        self.emit(Event::Remembered { npc, memories });
    }

    pub(super) fn inspect(&self, npc: NpcId) {
        let Some(conversation) = self.npcs.get(&npc) else {
            let error = NpcError::UnknownNpc(npc);
            return self.emit(Event::RememberFailed { npc, error });
        };
        let knowledge = &conversation.knowledge;
        self.emit(Event::Mind {
            npc,
            memories: knowledge.memories.memories.clone(),
            summary: knowledge.summary.facts.clone(),
            summarised_turns: knowledge.summary.turns,
            lore_entries: knowledge.lore.len(),
            lore_compression: knowledge.compression(),
            written_summary: Some(knowledge.summary.written.clone()).filter(|w| !w.is_empty()),
        });
    }

    pub(super) fn cancel(&mut self, npc: NpcId) {
        self.escalator.cancel(npc, self.events);
        if let Some(request) = self.remote.as_mut().and_then(|r| r.cancel(npc)) {
            self.emit(Event::Cancelled { npc, request });
        }
        if let Some(queued) = self.queue.remove(npc) {
            self.emit(Event::Cancelled {
                npc,
                request: queued.request,
            });
        }
        if let Some(at) = self.active.iter().position(|job| job.npc == npc) {
            let job = self.active.swap_remove(at);
            self.kv.release(job.slot);
            self.emit(Event::Cancelled {
                npc,
                request: job.request,
            });
        }
    }
}

/// The world preamble, then the persona: every NPC's prompt starts with the same tokens.
fn with_preamble(preamble: &str, persona: &str) -> String {
    let preamble = preamble.trim();
    if preamble.is_empty() {
        persona.to_owned()
    } else {
        format!("{preamble}\n\n{persona}")
    }
}
