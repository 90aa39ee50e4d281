//! Who goes next, without a model: the queue of lines waiting for a KV slot (priority, then
//! arrival; deadlines) and the plan of how many prompt tokens each reply prefills in a step.
//!
//! **Deadlines** are instants on one clock: when the game sent the line
//! ([`Request::Say`](crate::Request::Say)'s `sent`) plus
//! [`SayOptions::deadline`](crate::SayOptions::deadline). A line still waiting at its
//! deadline fails with [`NpcError::DeadlineExceeded`](crate::NpcError::DeadlineExceeded); a
//! reply in progress at its deadline ends with the text so far.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::{NpcId, Priority};

use super::sequence::Queued;

/// Lines waiting for a KV slot, in the order they will start: highest priority first, first
/// come first served within a priority.
#[derive(Default)]
pub(super) struct LineQueue {
    lines: VecDeque<Queued>,
}

impl LineQueue {
    /// Queues a line behind every line of its priority or higher.
    pub(super) fn push(&mut self, line: Queued) {
        let priority = line.options.priority;
        let at = self
            .lines
            .iter()
            .position(|q| q.options.priority < priority)
            .unwrap_or(self.lines.len());
        self.lines.insert(at, line);
    }

    /// Queues a line ahead of every other: its player has waited already (for the cloud).
    pub(super) fn push_first(&mut self, line: Queued) {
        self.lines.push_front(line);
    }

    /// The NPC of the line that starts next.
    pub(super) fn next_npc(&self) -> Option<NpcId> {
        self.lines.front().map(|q| q.npc)
    }

    /// Takes the line that starts next.
    pub(super) fn pop(&mut self) -> Option<Queued> {
        self.lines.pop_front()
    }

    /// Whether a line of `npc` is waiting.
    pub(super) fn holds(&self, npc: NpcId) -> bool {
        self.lines.iter().any(|q| q.npc == npc)
    }

    /// Takes `npc`'s waiting line, if it has one.
    pub(super) fn remove(&mut self, npc: NpcId) -> Option<Queued> {
        let at = self.lines.iter().position(|q| q.npc == npc)?;
        self.lines.remove(at)
    }

    /// Takes every line whose deadline is at or before `now`, in queue order.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Queued> {
        let (expired, waiting): (VecDeque<Queued>, VecDeque<Queued>) =
            std::mem::take(&mut self.lines)
                .into_iter()
                .partition(|q| q.deadline.is_some_and(|d| now >= d));
        self.lines = waiting;
        expired.into()
    }

    /// Whether no line is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Takes every waiting line (shutdown).
    pub(super) fn take_all(&mut self) -> VecDeque<Queued> {
        std::mem::take(&mut self.lines)
    }
}

/// A reply as the prefill plan sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Prefill {
    pub(super) priority: Priority,
    /// Prompt tokens it has not decoded yet.
    pub(super) remaining: usize,
    /// It is generating (its next token is in the batch): no prompt to prefill.
    pub(super) generating: bool,
}

/// Most batch entries a step gives generated tokens and prompt chunks together: the whole
/// batch when no NPC is speaking; while `generating` NPCs are mid-sentence, their tokens
/// plus `prefill_chunk`, so a long prompt does not freeze their speech.
pub(super) fn step_limit(batch: usize, generating: usize, prefill_chunk: usize) -> usize {
    if generating > 0 {
        batch.min(generating + prefill_chunk)
    } else {
        batch
    }
}

/// How many prompt tokens each reply prefills this step, when `used` batch entries are taken
/// already and the step holds at most `limit`: (index in `replies`, tokens), in the order
/// they go into the batch. The most important reply first, in order among equals, each as
/// much as fits.
pub(super) fn prefill_plan(replies: &[Prefill], used: usize, limit: usize) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..replies.len()).collect();
    // A stable sort: replies of one priority keep their order.
    order.sort_by_key(|&at| std::cmp::Reverse(replies[at].priority));
    let mut plan = Vec::new();
    let mut used = used;
    for at in order {
        let reply = replies[at];
        if reply.generating || reply.remaining == 0 || used >= limit {
            continue;
        }
        let take = reply.remaining.min(limit - used);
        plan.push((at, take));
        used += take;
    }
    plan
}

/// Fewest prompt tokens a step takes, however slow the machine.
const MIN_STEP_PROMPT: usize = 16;
/// A step this many times over [`RuntimeConfig::max_step_time`](crate::RuntimeConfig) cuts
/// the count at once.
const SLOW_STEP: f64 = 1.5;
/// Prompt steps in a row that would have fitted twice their tokens (with a fifth to spare)
/// before the count doubles back.
const FAST_STEPS: u32 = 16;

/// The prompt tokens one step may take to stay within
/// [`RuntimeConfig::max_step_time`](crate::RuntimeConfig::max_step_time): first what a
/// start-up timing says fits, then following the machine's speed. Another process on the
/// cores (a server, the game's own load, two threads too many) can make every decode several
/// times slower than at start-up: a step that takes over [`SLOW_STEP`] times the limit cuts
/// the count to the power of two that fits at the speed it ran; [`FAST_STEPS`] full prompt
/// steps in a row fast enough for twice their tokens double it back, up to the start-up
/// count. Powers of two, changed only when the speed moves that far: on a machine whose load
/// holds steady the chunks a prompt is cut into stay the same (replies stay reproducible,
/// see [`RuntimeConfig::reproducible_batching`](crate::RuntimeConfig)).
#[derive(Clone, Debug)]
pub(super) struct StepBudget {
    limit: Duration,
    /// The start-up count, rounded to a power of two: the most it grows back to.
    calibrated: usize,
    tokens: usize,
    /// Full prompt steps in a row that ran fast enough for twice their tokens.
    fast: u32,
}

impl StepBudget {
    /// `calibrated` prompt tokens fit `limit` at start-up (rounded down to a power of two,
    /// at least [`MIN_STEP_PROMPT`]).
    pub(super) fn new(limit: Duration, calibrated: usize) -> Self {
        let calibrated = power_of_two_floor(calibrated.max(MIN_STEP_PROMPT));
        Self {
            limit,
            calibrated,
            tokens: calibrated,
            fast: 0,
        }
    }

    /// The prompt tokens the next step may take.
    pub(super) fn tokens(&self) -> usize {
        self.tokens
    }

    /// A decode that carried `prompt` prompt tokens among `entries` batch entries took
    /// `took`.
    pub(super) fn observe(&mut self, prompt: usize, entries: usize, took: Duration) {
        if prompt == 0 || entries == 0 {
            return;
        }
        let limit = self.limit.as_secs_f64();
        let took = took.as_secs_f64();
        if took > limit * SLOW_STEP {
            let per_entry = took / entries as f64;
            let fits = (limit / per_entry) as usize;
            let cut = power_of_two_floor(fits.max(MIN_STEP_PROMPT));
            self.tokens = self.tokens.min(cut);
            self.fast = 0;
        } else if prompt >= self.tokens && took * 2.0 < limit * 0.8 {
            self.fast += 1;
            if self.fast >= FAST_STEPS {
                self.tokens = (self.tokens * 2).min(self.calibrated);
                self.fast = 0;
            }
        } else if prompt >= self.tokens {
            self.fast = 0;
        }
    }
}

/// The largest power of two not above `n` (`n` ≥ 1).
fn power_of_two_floor(n: usize) -> usize {
    1 << n.max(1).ilog2()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{RequestId, SayOptions};

    fn line(npc: u64, priority: Priority, deadline: Option<Instant>) -> Queued {
        Queued {
            npc: NpcId(npc),
            request: RequestId(npc),
            line: format!("line of {npc}"),
            options: SayOptions {
                priority,
                deadline: None,
            },
            deadline,
            received: Instant::now(),
            fact: None,
            cloud_fact: None,
            hint: None,
            unknown: Vec::new(),
            routing: Duration::ZERO,
            local_only: false,
        }
    }

    fn order(queue: &mut LineQueue) -> Vec<u64> {
        std::iter::from_fn(|| queue.pop().map(|q| q.npc.0)).collect()
    }

    #[test]
    fn lines_start_by_priority_then_by_arrival() {
        let mut queue = LineQueue::default();
        queue.push(line(1, Priority::Normal, None));
        queue.push(line(2, Priority::Background, None));
        queue.push(line(3, Priority::Player, None));
        queue.push(line(4, Priority::Normal, None));
        queue.push(line(5, Priority::Player, None));
        assert_eq!(queue.next_npc(), Some(NpcId(3)));
        assert_eq!(order(&mut queue), [3, 5, 1, 4, 2]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_line_that_waited_for_the_cloud_goes_first() {
        let mut queue = LineQueue::default();
        queue.push(line(1, Priority::Player, None));
        queue.push_first(line(2, Priority::Background, None));
        assert_eq!(order(&mut queue), [2, 1]);
    }

    #[test]
    fn expired_lines_leave_the_queue_in_order_and_the_rest_keep_theirs() {
        let now = Instant::now();
        let past = now.checked_sub(Duration::from_millis(1)).unwrap_or(now);
        let later = now + Duration::from_secs(60);
        let mut queue = LineQueue::default();
        queue.push(line(1, Priority::Normal, Some(later)));
        queue.push(line(2, Priority::Normal, Some(past)));
        queue.push(line(3, Priority::Normal, None));
        queue.push(line(4, Priority::Player, Some(now)));
        let expired: Vec<u64> = queue.expired(now).iter().map(|q| q.npc.0).collect();
        assert_eq!(expired, [4, 2], "at the deadline counts as past it");
        assert!(queue.expired(now).is_empty());
        assert_eq!(order(&mut queue), [1, 3]);
    }

    #[test]
    fn a_waiting_line_is_found_and_removed_by_its_npc() {
        let mut queue = LineQueue::default();
        queue.push(line(1, Priority::Normal, None));
        queue.push(line(2, Priority::Normal, None));
        assert!(queue.holds(NpcId(2)) && !queue.holds(NpcId(3)));
        assert_eq!(queue.remove(NpcId(2)).map(|q| q.npc), Some(NpcId(2)));
        assert!(queue.remove(NpcId(2)).is_none());
        assert_eq!(queue.take_all().len(), 1);
        assert!(queue.is_empty());
    }

    fn reply(priority: Priority, remaining: usize, generating: bool) -> Prefill {
        Prefill {
            priority,
            remaining,
            generating,
        }
    }

    #[test]
    fn prompts_fill_the_batch_most_important_first() {
        let replies = [
            reply(Priority::Normal, 300, false),
            reply(Priority::Player, 100, false),
            reply(Priority::Normal, 50, false),
        ];
        // Nobody speaks: the whole batch of 256.
        let limit = step_limit(256, 0, 128);
        assert_eq!(prefill_plan(&replies, 0, limit), [(1, 100), (0, 156)]);
        // Plenty of room: everyone's whole prompt.
        assert_eq!(
            prefill_plan(&replies, 0, 1000),
            [(1, 100), (0, 300), (2, 50)]
        );
    }

    #[test]
    fn while_an_npc_speaks_prompts_advance_in_chunks_around_its_tokens() {
        let replies = [
            reply(Priority::Normal, 0, true),
            reply(Priority::Normal, 0, true),
            reply(Priority::Player, 1400, false),
        ];
        let limit = step_limit(512, 2, 128);
        assert_eq!(limit, 130);
        // The two generated tokens are in the batch already.
        assert_eq!(prefill_plan(&replies, 2, limit), [(2, 128)]);
        // A full batch leaves nothing for prompts.
        assert!(prefill_plan(&replies, limit, limit).is_empty());
    }

    #[test]
    fn a_slow_step_cuts_the_count_at_once_and_fast_steps_double_it_back() {
        let limit = Duration::from_millis(500);
        let mut budget = StepBudget::new(limit, 200);
        assert_eq!(budget.tokens(), 128, "rounded down to a power of two");
        // Four times slower than at start-up: 128 tokens took 2 s.
        budget.observe(128, 130, Duration::from_secs(2));
        assert_eq!(
            budget.tokens(),
            32,
            "the power of two that fits 500 ms at that speed"
        );
        // A step within the limit changes nothing.
        budget.observe(32, 40, Duration::from_millis(400));
        assert_eq!(budget.tokens(), 32);
        // Fast again: full steps that would fit twice their tokens.
        for _ in 0..FAST_STEPS - 1 {
            budget.observe(32, 32, Duration::from_millis(100));
        }
        assert_eq!(
            budget.tokens(),
            32,
            "not before {FAST_STEPS} steps in a row"
        );
        budget.observe(32, 32, Duration::from_millis(100));
        assert_eq!(budget.tokens(), 64);
        // A middling step breaks the run.
        for _ in 0..FAST_STEPS - 1 {
            budget.observe(64, 64, Duration::from_millis(100));
        }
        budget.observe(64, 64, Duration::from_millis(300));
        budget.observe(64, 64, Duration::from_millis(100));
        assert_eq!(budget.tokens(), 64);
        for _ in 0..FAST_STEPS * 4 {
            budget.observe(budget.tokens(), budget.tokens(), Duration::from_millis(10));
        }
        assert_eq!(budget.tokens(), 128, "never past the start-up count");
    }

    #[test]
    fn the_count_stays_within_its_bounds_and_ignores_steps_without_a_prompt() {
        let mut budget = StepBudget::new(Duration::from_millis(500), 3);
        assert_eq!(budget.tokens(), MIN_STEP_PROMPT);
        budget.observe(16, 16, Duration::from_secs(60));
        assert_eq!(budget.tokens(), MIN_STEP_PROMPT, "never under the minimum");
        let mut budget = StepBudget::new(Duration::from_millis(500), 512);
        budget.observe(0, 8, Duration::from_secs(5));
        budget.observe(0, 0, Duration::from_secs(5));
        assert_eq!(
            budget.tokens(),
            512,
            "generated tokens alone say nothing of a prompt"
        );
        // A short step that is slow per entry still cuts (to the minimum here: 125 ms an
        // entry fits 4 in the limit).
        budget.observe(4, 8, Duration::from_secs(1));
        assert_eq!(budget.tokens(), MIN_STEP_PROMPT);
    }
}
