//! Who goes next, without a model: the queue of lines waiting for a KV slot (priority, then
//! arrival; deadlines) and the plan of how many prompt tokens each reply prefills in a step.
//!
//! **Deadlines** are instants on one clock: when the game sent the line
//! ([`Request::Say`](crate::Request::Say)'s `sent`) plus
//! [`SayOptions::deadline`](crate::SayOptions::deadline). A line still waiting at its
//! deadline fails with [`NpcError::DeadlineExceeded`](crate::NpcError::DeadlineExceeded); a
//! reply in progress at its deadline ends with the text so far.

use std::collections::VecDeque;
use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}
