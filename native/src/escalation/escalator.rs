//! The worker's escalation state ([`Escalator`]): routing each line, spend caps and the rate
//! limit, cloud calls in flight, fallback lines in turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::llama::prompt::Turn;
use crate::protocol::{CloudUsage, Event, NpcError, NpcId, ReplySource, ReplyStats, RequestId};
use crate::text::is_refusal;

#[cfg(feature = "cloud")]
use super::cloud_job::run_cloud_job;
use super::profile::{NpcProfile, fact_prompt};
use super::{
    Blocked, CloudRole, DEFAULT_DONT_KNOW, EscalationConfig, EscalationReason, ReplyConfidence,
    Route, knowledge_match, mentions, should_escalate,
};

/// A fact the cloud supplied for a line ([`CloudRole::Inform`]), waiting for the worker to
/// have the local model voice it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Informed {
    pub(crate) npc: NpcId,
    pub(crate) request: RequestId,
    pub(crate) line: String,
    pub(crate) fact: String,
    pub(crate) usage: CloudUsage,
    /// When the line was sent to the cloud: the reply's time to first token counts from here.
    pub(crate) asked: Instant,
}

/// State shared between the worker and the cloud threads.
#[derive(Default)]
pub(super) struct Shared {
    /// The cloud reply each NPC has in flight. Cancelling removes the entry: its thread
    /// then stops and sends nothing more.
    pub(super) in_flight: HashMap<NpcId, RequestId>,
    /// Turns finished by the cloud, not yet added to the worker's conversations.
    pub(super) finished: Vec<(NpcId, Turn)>,
    /// Facts the cloud supplied, not yet taken by the worker. Their NPCs stay in
    /// `in_flight` (busy, cancellable) until the worker takes them.
    pub(super) informed: Vec<Informed>,
    /// (when, cost) of each escalation; estimates until the cloud reports its usage.
    pub(super) spend: VecDeque<(Instant, f64, RequestId)>,
    /// When each escalation started, for the rate limit.
    pub(super) started: VecDeque<Instant>,
    /// Fallback lines said per NPC: which one is next.
    pub(super) fallbacks: HashMap<NpcId, usize>,
}

/// The worker's escalation state: spend, rate limit, cloud replies in flight.
pub(crate) struct Escalator {
    pub(super) config: EscalationConfig,
    pub(super) shared: Arc<Mutex<Shared>>,
    #[cfg(feature = "cloud")]
    pub(super) client: Option<Arc<crate::cloud::CloudClient>>,
}

pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);
pub(super) const MINUTE: Duration = Duration::from_secs(60);

pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A cloud thread that panicked mid-update leaves counters that are still usable.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Escalator {
    pub(crate) fn new(config: &EscalationConfig) -> Self {
        Self {
            config: config.clone(),
            shared: Arc::default(),
            #[cfg(feature = "cloud")]
            client: config
                .cloud
                .clone()
                .map(|c| Arc::new(crate::cloud::CloudClient::new(c))),
        }
    }

    fn cloud_available(&self) -> bool {
        #[cfg(feature = "cloud")]
        {
            self.client.is_some()
        }
        #[cfg(not(feature = "cloud"))]
        {
            false
        }
    }

    /// Whether an escalation for `reason` may reach the cloud now; reserves its estimated
    /// spend and a rate-limit slot when it may.
    fn admit(
        &self,
        reason: EscalationReason,
        prompt_chars: usize,
        max_tokens: u32,
        request: RequestId,
    ) -> Route {
        if self.config.offline {
            return Route::Fallback(reason, Blocked::Offline);
        }
        if !self.cloud_available() {
            return Route::Fallback(reason, Blocked::NoCloud);
        }
        let now = Instant::now();
        let mut shared = lock(&self.shared);
        while shared
            .started
            .front()
            .is_some_and(|&t| now.duration_since(t) >= MINUTE)
        {
            shared.started.pop_front();
        }
        while shared
            .spend
            .front()
            .is_some_and(|&(t, _, _)| now.duration_since(t) >= DAY)
        {
            shared.spend.pop_front();
        }
        if shared.started.len() >= self.config.max_escalations_per_minute as usize {
            return Route::Fallback(reason, Blocked::RateLimited);
        }
        // About four characters a token; the whole completion budget is assumed.
        let estimate = self
            .config
            .prices
            .cloud_cost((prompt_chars / 4) as u64, u64::from(max_tokens));
        let day: f64 = shared.spend.iter().map(|(_, c, _)| c).sum();
        let hour: f64 = shared
            .spend
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) < HOUR)
            .map(|(_, c, _)| c)
            .sum();
        if hour + estimate > self.config.max_spend_per_hour
            || day + estimate > self.config.max_spend_per_day
        {
            return Route::Fallback(reason, Blocked::SpendCap);
        }
        shared.started.push_back(now);
        shared.spend.push_back((now, estimate, request));
        Route::Cloud(reason)
    }

    /// Whether `npc` has a cloud reply in flight.
    pub(crate) fn busy(&self, npc: NpcId) -> bool {
        lock(&self.shared).in_flight.contains_key(&npc)
    }

    /// Whether any cloud call is in flight or its fact waits (the worker then polls
    /// [`Escalator::take_informed`] instead of blocking on its inbox).
    pub(crate) fn awaiting_cloud(&self) -> bool {
        !lock(&self.shared).in_flight.is_empty()
    }

    /// Facts the cloud supplied since the last call, for lines still wanted (not
    /// cancelled); their NPCs are no longer busy with the cloud.
    pub(crate) fn take_informed(&self) -> Vec<Informed> {
        let mut shared = lock(&self.shared);
        let informed = std::mem::take(&mut shared.informed);
        informed
            .into_iter()
            .filter(|i| {
                let live = shared.in_flight.get(&i.npc) == Some(&i.request);
                if live {
                    shared.in_flight.remove(&i.npc);
                }
                live
            })
            .collect()
    }

    /// The cloud role for an NPC.
    fn role(&self, profile: &NpcProfile) -> CloudRole {
        profile
            .settings
            .cloud_role
            .unwrap_or(self.config.cloud_role)
    }

    /// Cloud turns finished since the last call, to add to the conversations.
    pub(crate) fn take_finished(&self) -> Vec<(NpcId, Turn)> {
        std::mem::take(&mut lock(&self.shared).finished)
    }

    /// Cancels `npc`'s cloud reply, if any, answering [`Event::Cancelled`] now.
    pub(crate) fn cancel(&self, npc: NpcId, events: &Sender<Event>) {
        // Removing the entry frees the NPC at once; its thread stops at its next read.
        let mut shared = lock(&self.shared);
        if let Some(request) = shared.in_flight.remove(&npc) {
            let _ = events.send(Event::Cancelled { npc, request });
        }
    }

    /// Fails every cloud reply in flight (the runtime is shutting down).
    pub(crate) fn shut_down(&self, events: &Sender<Event>) {
        let mut shared = lock(&self.shared);
        for (npc, request) in shared.in_flight.drain() {
            let _ = events.send(Event::Failed {
                npc,
                request,
                error: NpcError::ShuttingDown,
            });
        }
    }

    /// The fallback line for an NPC, in turn: its persona's `dont_know` lines if it has
    /// some, else its (or the runtime's) fallback line and [`DEFAULT_DONT_KNOW`]; never the
    /// same line twice in a row.
    pub(crate) fn fallback_line(&self, npc: NpcId, profile: &NpcProfile) -> String {
        let mut lines = profile.dont_know.clone();
        if lines.is_empty() {
            lines.push(
                profile
                    .settings
                    .fallback_line
                    .clone()
                    .unwrap_or_else(|| self.config.fallback_line.clone()),
            );
            lines.extend(DEFAULT_DONT_KNOW.iter().map(|&l| l.to_owned()));
        }
        let mut shared = lock(&self.shared);
        let said = shared.fallbacks.entry(npc).or_default();
        let line = lines[*said % lines.len()].clone();
        *said += 1;
        line
    }

    /// Answers with a fallback line: one delta, then the reply (the caller keeps the turn).
    pub(crate) fn reply_with_fallback(
        events: &Sender<Event>,
        npc: NpcId,
        request: RequestId,
        line: String,
    ) {
        let _ = events.send(Event::Delta {
            npc,
            request,
            text: line.clone(),
        });
        let _ = events.send(Event::Replied {
            npc,
            request,
            text: line,
            stats: fallback_stats(),
        });
    }

    /// Routes one player line: the local model answers it, the cloud has it (it answers, or
    /// supplies a fact for the local model: [`Escalator::take_informed`]), or the NPC says a
    /// fallback line, which the engine sends. `known` are more documents that count as
    /// knowledge: the lore retrieved for the line and the questions the NPC learned answers
    /// to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn divert(
        &self,
        npc: NpcId,
        request: RequestId,
        line: &str,
        profile: &NpcProfile,
        turns: &[Turn],
        known: &[&str],
        events: &Sender<Event>,
    ) -> Decision {
        let documents: Vec<&str> = profile
            .documents
            .iter()
            .map(String::as_str)
            .chain(known.iter().copied())
            .collect();
        let knowledge = knowledge_match(&documents, line);
        let reason = should_escalate(&self.config, &profile.settings, line, knowledge);
        self.dispatch(reason, npc, request, line, profile, turns, events)
    }

    /// Whether this NPC's lines are routed at all (the persona may opt out of the runtime's
    /// setting); [`Escalator::divert`] is only worth its documents when they are.
    pub(crate) fn routes(&self, profile: &NpcProfile) -> bool {
        profile.settings.enabled.unwrap_or(self.config.enabled)
    }

    /// The don't-know reminder and the grounding check ([`EscalationConfig`]).
    pub(crate) fn dont_know_policy(&self) -> (bool, bool) {
        (self.config.dont_know_reminder, self.config.grounding_check)
    }

    /// Whether replies of this NPC are held back until their confidence is known (only
    /// when a confidence threshold is set: holding costs the streaming of local replies).
    pub(crate) fn holds(&self, profile: &NpcProfile) -> bool {
        self.routes(profile)
            && profile
                .settings
                .min_confidence
                .or(self.config.min_confidence)
                .is_some()
    }

    /// After a held local reply: whether its confidence or an explicit "I don't know" sends
    /// the line to the cloud (or the fallback line) instead, or the reply stays.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn second_opinion(
        &self,
        npc: NpcId,
        request: RequestId,
        line: &str,
        reply: &str,
        confidence: Option<&ReplyConfidence>,
        profile: &NpcProfile,
        turns: &[Turn],
        events: &Sender<Event>,
    ) -> Decision {
        let threshold = profile
            .settings
            .min_confidence
            .or(self.config.min_confidence);
        let settings = &profile.settings;
        if mentions(line, &settings.never_topics)
            .or_else(|| mentions(line, &self.config.never_topics))
            .is_some()
        {
            return Decision::Local;
        }
        let reason = if is_refusal(reply) {
            Some(EscalationReason::Refusal)
        } else {
            match (threshold, confidence) {
                (Some(min), Some(c)) if c.p10_prob < min => {
                    Some(EscalationReason::LowConfidence(c.p10_prob))
                }
                _ => None,
            }
        };
        self.dispatch(reason, npc, request, line, profile, turns, events)
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        reason: Option<EscalationReason>,
        npc: NpcId,
        request: RequestId,
        line: &str,
        profile: &NpcProfile,
        turns: &[Turn],
        events: &Sender<Event>,
    ) -> Decision {
        let Some(reason) = reason else {
            return Decision::Local;
        };
        let role = self.role(profile);
        let (messages, max_tokens) = match role {
            CloudRole::Speak => {
                let keep = turns.len().saturating_sub(self.config.cloud_history_turns);
                let mut messages = vec![("system".to_owned(), profile.cloud_prompt(line))];
                for turn in &turns[keep..] {
                    // Without the local model's action calls: the cloud gets no actions.
                    let spoken = turn.npc.split(crate::actions::ACTION_MARKER).next();
                    messages.push(("user".to_owned(), turn.player.clone()));
                    messages.push(("assistant".to_owned(), spoken.unwrap_or("").to_owned()));
                }
                messages.push(("user".to_owned(), line.to_owned()));
                (messages, self.config.cloud_max_tokens)
            }
            CloudRole::Inform => (
                fact_prompt(&profile.identity, line),
                self.config.fact_max_tokens,
            ),
        };
        let chars = messages.iter().map(|(_, c)| c.len()).sum();
        let fallback = self.fallback_line(npc, profile);
        match self.admit(reason, chars, max_tokens, request) {
            Route::Local => Decision::Local,
            Route::Cloud(reason) => {
                tracing::info!("NPC {npc:?}: escalating to the cloud ({reason:?}, {role:?})");
                self.start_cloud(
                    CloudCall {
                        npc,
                        request,
                        player_line: line.to_owned(),
                        messages,
                        max_tokens,
                        role,
                        fallback,
                        asked: Instant::now(),
                    },
                    events.clone(),
                );
                Decision::Cloud
            }
            Route::Fallback(reason, blocked) => {
                tracing::info!(
                    "NPC {npc:?}: would escalate ({reason:?}) but {blocked:?}; fallback line"
                );
                Decision::Fallback(fallback)
            }
        }
    }

    /// Starts a cloud call on its own thread. When the cloud fails before saying anything,
    /// the NPC says the call's fallback line instead.
    fn start_cloud(&self, call: CloudCall, events: Sender<Event>) {
        let CloudCall {
            npc,
            request,
            player_line,
            fallback,
            ..
        } = call.clone();
        #[cfg(feature = "cloud")]
        if let Some(client) = self.client.clone() {
            lock(&self.shared).in_flight.insert(npc, request);
            let shared = Arc::clone(&self.shared);
            let prices = self.config.prices.clone();
            let spawned = std::thread::Builder::new()
                .name("npc_native cloud".into())
                .spawn({
                    let events = events.clone();
                    move || run_cloud_job(&client, &shared, &call, &prices, &events)
                });
            if spawned.is_ok() {
                return;
            }
            tracing::warn!("could not spawn a cloud thread; answering with the fallback line");
            lock(&self.shared).in_flight.remove(&npc);
        }
        #[cfg(not(feature = "cloud"))]
        drop(call);
        let mut shared = lock(&self.shared);
        shared.finished.push((
            npc,
            Turn {
                player: player_line,
                npc: fallback.clone(),
            },
        ));
        drop(shared);
        Self::reply_with_fallback(&events, npc, request, fallback);
    }
}

/// What routing decided for one line ([`Escalator::divert`], [`Escalator::second_opinion`]).
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// The local model answers (or its held reply stays).
    Local,
    /// The cloud has the line: it answers, or supplies a fact; its thread finishes the line.
    Cloud,
    /// Escalation was not allowed: the NPC says this fallback line, sent by the engine.
    Fallback(String),
}

/// Stats of a fallback reply: nothing computed, nothing sent.
pub(super) fn fallback_stats() -> ReplyStats {
    ReplyStats::new(ReplySource::Fallback)
}

/// One cloud call: what to send, and what to do with its answer.
#[derive(Clone)]
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(super) struct CloudCall {
    pub(super) npc: NpcId,
    pub(super) request: RequestId,
    pub(super) player_line: String,
    /// (role, content) pairs.
    pub(super) messages: Vec<(String, String)>,
    pub(super) max_tokens: u32,
    pub(super) role: CloudRole,
    pub(super) fallback: String,
    pub(super) asked: Instant,
}
