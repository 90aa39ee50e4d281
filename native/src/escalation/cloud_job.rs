//! One cloud call on its own thread: stream the reply (holding its opening until it is known
//! not to be an "I don't know"), or fetch the fact, then finish exactly once.

#[cfg(feature = "cloud")]
use std::sync::Mutex;
#[cfg(feature = "cloud")]
use std::time::Instant;

#[cfg(feature = "cloud")]
use crossbeam_channel::Sender;

#[cfg(feature = "cloud")]
use crate::cost::PriceTable;
#[cfg(feature = "cloud")]
use crate::llama::prompt::Turn;
#[cfg(feature = "cloud")]
use crate::protocol::{CloudUsage, Event, FinishReason, ReplySource, ReplyStats};
use crate::text::is_refusal;

#[cfg(feature = "cloud")]
use super::CloudRole;
#[cfg(feature = "cloud")]
use super::escalator::{CloudCall, Informed, Shared, fallback_stats, lock};

/// Most characters of a cloud reply's opening held back while it may still turn out to be an
/// "I don't know" ([`OpeningHold`]).
pub(super) const OPENING_CHARS: usize = 64;

/// Holds back the opening of a streamed cloud reply ([`CloudRole::Speak`]) until its first
/// sentence (or [`OPENING_CHARS`]) is in: a reply that opens with "I don't know" is replaced
/// by the NPC's own don't-know line, so the player never sees the cloud's; any other reply
/// then streams on as it arrives.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(crate) struct OpeningHold {
    pub(super) held: String,
    pub(super) decided: Option<bool>,
}

#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
impl OpeningHold {
    /// Takes one streamed piece; returns what to send the player now (empty while holding,
    /// and for every piece of a refusal).
    pub(crate) fn push(&mut self, delta: &str) -> String {
        match self.decided {
            Some(true) => String::new(),
            Some(false) => delta.to_owned(),
            None => {
                self.held.push_str(delta);
                let sentence_done = self.held.char_indices().any(|(at, c)| {
                    matches!(c, '.' | '!' | '?' | '\n')
                        && self.held[at + c.len_utf8()..]
                            .chars()
                            .next()
                            .is_some_and(char::is_whitespace)
                });
                if sentence_done || self.held.len() >= OPENING_CHARS {
                    self.decide()
                } else {
                    String::new()
                }
            }
        }
    }

    /// At the end of the stream: what is still held, to send (empty for a refusal).
    pub(crate) fn finish(&mut self) -> String {
        if self.decided.is_none() {
            self.decide()
        } else {
            String::new()
        }
    }

    /// Whether the reply opened with "I don't know" (known once decided).
    pub(crate) fn refused(&self) -> bool {
        self.decided == Some(true)
    }

    fn decide(&mut self) -> String {
        let refused = is_refusal(&self.held);
        self.decided = Some(refused);
        if refused {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

/// `text` without a sentence the token limit cut short (`truncated`): up to its last `.`,
/// `!` or `?` followed by a space or the end. Text with no complete sentence is kept whole.
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(crate) fn complete_sentences(text: &str, truncated: bool) -> &str {
    if !truncated {
        return text;
    }
    let mut ends = text.char_indices().filter(|&(at, c)| {
        matches!(c, '.' | '!' | '?')
            && text[at + c.len_utf8()..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
    });
    match ends.next_back() {
        Some((at, c)) => &text[..at + c.len_utf8()],
        None => text,
    }
}

/// Body of a cloud thread: stream the reply (or fetch the fact), then finish exactly once
/// (unless cancelled, in which case the worker already answered). A fact is handed to the
/// worker, whose local reply finishes the line.
#[cfg(feature = "cloud")]
pub(super) fn run_cloud_job(
    client: &crate::cloud::CloudClient,
    shared: &Mutex<Shared>,
    job: &CloudCall,
    prices: &PriceTable,
    events: &Sender<Event>,
) {
    let started = Instant::now();
    let mut first_at: Option<Instant> = None;
    let speak = job.role == CloudRole::Speak;
    let live = |shared: &Shared| shared.in_flight.get(&job.npc) == Some(&job.request);
    let cancelled = || !live(&lock(shared));
    let mut opening = OpeningHold::default();
    let send = |text: String, first_at: &mut Option<Instant>| {
        if !text.is_empty() {
            first_at.get_or_insert_with(Instant::now);
            let _ = events.send(Event::Delta {
                npc: job.npc,
                request: job.request,
                text,
            });
        }
    };
    let result = client.chat_stream(&job.messages, job.max_tokens, &cancelled, &mut |delta| {
        let guard = lock(shared);
        let live = live(&guard);
        if live && speak {
            send(opening.push(delta), &mut first_at);
        }
        live
    });
    let mut guard = lock(shared);
    if !live(&guard) {
        // Cancelled, or the runtime shut down: the worker has answered already.
        return;
    }
    let usage = result.as_ref().ok().map(|reply| CloudUsage {
        prompt_tokens: reply.prompt_tokens.unwrap_or(reply.estimated_prompt_tokens),
        completion_tokens: reply
            .completion_tokens
            .unwrap_or(reply.streamed_chunks as u64),
    });
    if let Some(usage) = usage
        && let Some(entry) = guard.spend.iter_mut().find(|e| e.2 == job.request)
    {
        // Replace this escalation's estimate by its actual cost.
        entry.1 = prices.cloud_cost(usage.prompt_tokens, usage.completion_tokens);
    }
    if speak && result.is_ok() {
        // The end of a reply shorter than its held opening.
        send(opening.finish(), &mut first_at);
    }
    if !speak || opening.refused() {
        match &result {
            Ok(reply) if !speak && !reply.text.trim().is_empty() && !is_refusal(&reply.text) => {
                // The NPC stays busy (and cancellable) until the worker takes the fact.
                guard.informed.push(Informed {
                    npc: job.npc,
                    request: job.request,
                    line: job.player_line.clone(),
                    fact: complete_sentences(reply.text.trim(), reply.truncated).to_owned(),
                    usage: usage.unwrap_or_default(),
                    asked: job.asked,
                });
                return;
            }
            Ok(_) => tracing::info!(
                "NPC {:?}: the cloud did not know either; answering with the fallback line",
                job.npc
            ),
            Err(error) => tracing::warn!(
                "NPC {:?}: cloud fact failed ({error}); answering with the fallback line",
                job.npc
            ),
        }
        guard.in_flight.remove(&job.npc);
        guard.finished.push((
            job.npc,
            Turn {
                player: job.player_line.clone(),
                npc: job.fallback.clone(),
            },
        ));
        drop(guard);
        let mut stats = fallback_stats();
        // What the cloud was paid for an answer it could not give.
        stats.cloud_fact = usage;
        let _ = events.send(Event::Delta {
            npc: job.npc,
            request: job.request,
            text: job.fallback.clone(),
        });
        let _ = events.send(Event::Replied {
            npc: job.npc,
            request: job.request,
            text: job.fallback.clone(),
            stats,
        });
        return;
    }
    guard.in_flight.remove(&job.npc);
    let (text, stats) = match result {
        Ok(reply) if !reply.text.trim().is_empty() => {
            let (prompt, completion) = usage
                .map(|u| (u.prompt_tokens, u.completion_tokens))
                .unwrap_or_default();
            let now = Instant::now();
            let first = first_at.unwrap_or(now);
            let stats = ReplyStats {
                finish: if reply.truncated {
                    FinishReason::MaxTokens
                } else {
                    FinishReason::EndOfTurn
                },
                prompt_tokens: usize::try_from(prompt).unwrap_or(usize::MAX),
                generated_tokens: usize::try_from(completion).unwrap_or(usize::MAX),
                time_to_first_token: first - started,
                generation_time: now - first,
                ..ReplyStats::new(ReplySource::Cloud)
            };
            (reply.text.trim().to_owned(), stats)
        }
        other => {
            if let Err(error) = &other {
                tracing::warn!(
                    "NPC {:?}: cloud reply failed ({error}); answering with the fallback line",
                    job.npc
                );
            }
            if first_at.is_some() {
                // Part of a reply was streamed before the failure: keep it, as a deadline
                // keeps a local reply's text so far.
                let partial = match &other {
                    Err(crate::cloud::CloudError::Interrupted { partial, .. }) => partial.clone(),
                    _ => String::new(),
                };
                if !partial.trim().is_empty() {
                    let mut stats = fallback_stats();
                    stats.source = ReplySource::Cloud;
                    stats.finish = FinishReason::Deadline;
                    guard.finished.push((
                        job.npc,
                        Turn {
                            player: job.player_line.clone(),
                            npc: partial.trim().to_owned(),
                        },
                    ));
                    let _ = events.send(Event::Replied {
                        npc: job.npc,
                        request: job.request,
                        text: partial.trim().to_owned(),
                        stats,
                    });
                    return;
                }
            }
            let _ = events.send(Event::Delta {
                npc: job.npc,
                request: job.request,
                text: job.fallback.clone(),
            });
            (job.fallback.clone(), fallback_stats())
        }
    };
    guard.finished.push((
        job.npc,
        Turn {
            player: job.player_line.clone(),
            npc: text.clone(),
        },
    ));
    let _ = events.send(Event::Replied {
        npc: job.npc,
        request: job.request,
        text,
        stats,
    });
}
