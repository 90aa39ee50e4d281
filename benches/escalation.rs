//! Knowing when not to know, measured with a stronger model as the cloud: the NPC runs the
//! catalog's escalating model (Qwen2.5-Coder-0.5B; `NPC_BENCH_MODEL=<id>` picks another) and
//! llama.cpp's `llama-server` on loopback serves the catalog's largest (Qwen2.5-Coder-1.5B,
//! greedy) as the cloud:
//!
//! 1. **Routing quality** on `tests/data/escalation.ron` (questions about the shipped
//!    personas, labelled answerable from the persona's file or not). Every question is
//!    answered locally (greedy, fresh conversation); then each signal decides which questions
//!    it would have escalated: escalation precision and recall (an escalation is right when the
//!    question was unanswerable), the local model's accuracy on the questions it kept, and the
//!    signal's AUROC. Logit thresholds are the best-F1 ones *on this same set* (an optimistic
//!    fit, said so in the table); the knowledge-match threshold is the runtime's default.
//!    Then every question again through the runtime with escalation on (default settings,
//!    [`CloudRole::Speak`]): where each line went, and what the routed system answered.
//! 2. **Cost per player-hour** of the seed workload (5 interactions a minute, ~100-token
//!    replies, long lore): an 11-turn session with the blacksmith, escalating to the
//!    stand-in cloud (its real token counts), metered by [`CostMeter`], once per
//!    [`CloudRole`] (the cloud speaks as the NPC; the cloud supplies a fact the local reply
//!    opens with); against cloud-only, where every turn goes to a GPT-4-class model with the
//!    full context (persona, long lore and the whole history, counted by the server's
//!    tokenizer). It also prints, per role, the time to the first token of the escalated
//!    replies and the share of escalated turns up to which ours stays within 1/100 of
//!    cloud-only, from the run's measured cost of a local reply and of an escalation.
//!
//! ```text
//! cargo xtask llama-server && cargo bench -p npc_native --features cloud --bench escalation
//! ```

#[path = "model.rs"]
mod model;
#[path = "../tests/common/servers.rs"]
mod servers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use npc_native::catalog::{self, CatalogModel};
use npc_native::escalation::{self, CloudRole, EscalationConfig};
use npc_native::{
    CloudConfig, CostMeter, Event, NpcId, Persona, ReplySource, ReplyStats, RequestId, Runtime,
    RuntimeConfig,
};
use serde::Deserialize;

const MAX_TOKENS: u32 = 32;

#[derive(Deserialize)]
struct QuestionSet {
    questions: Vec<Question>,
}

#[derive(Deserialize)]
struct Question {
    persona: String,
    question: String,
    answerable: bool,
    answer: Vec<String>,
    /// For a question outside the persona's knowledge with a real-world answer: words a
    /// right answer from the cloud contains.
    #[serde(default)]
    world: Vec<String>,
}

/// The model the NPC runs: `NPC_BENCH_MODEL`, else the catalog's escalating model.
fn npc_model() -> &'static CatalogModel {
    if std::env::var_os("NPC_BENCH_MODEL").is_some() {
        model::catalog_model()
    } else {
        &catalog::ESCALATING_MODEL
    }
}

/// `llama-server` serving the catalog's stand-in cloud on the machine's cores: it computes
/// only while the runtime waits for an escalation, so the two do not compete.
fn stronger_cloud() -> servers::LlamaServer {
    servers::LlamaServer::start_on_all_cores(&model::file_of(&catalog::CLOUD_STANDIN_MODEL))
}

/// Escalation to `server` with caps that never bind: the runs measure routing and what it
/// costs, not what the caps forbid.
fn uncapped_policy(server: &servers::LlamaServer) -> EscalationConfig {
    let mut cloud = CloudConfig::new(server.base_url(), "default");
    cloud.read_timeout = Duration::from_secs(120);
    cloud.total_timeout = Duration::from_secs(300);
    let mut policy = EscalationConfig::enabled(Some(cloud));
    policy.max_spend_per_hour = 100.0;
    policy.max_spend_per_day = 1000.0;
    policy.max_escalations_per_minute = 1000;
    policy
}

/// Whether `text` holds every one of `words` (case-insensitive).
fn holds_all(text: &str, words: &[String]) -> bool {
    let lower = text.to_lowercase();
    words.iter().all(|w| lower.contains(&w.to_lowercase()))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn persona(name: &str) -> Persona {
    let path = root().join(format!("assets/personas/{name}.persona.ron"));
    let source = std::fs::read_to_string(&path).expect("persona file");
    let mut persona = Persona::from_ron(&source, Some(name)).expect("persona parses");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(MAX_TOKENS);
    persona
}

fn start(config: RuntimeConfig) -> Runtime {
    let runtime = Runtime::start(config);
    match runtime.events().recv() {
        Ok(Event::ModelLoaded(_)) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

fn accept(runtime: &Runtime, npc: NpcId, persona: Persona) {
    runtime.set_persona(npc, persona).expect("worker");
    match runtime.events().recv() {
        Ok(Event::PersonaAccepted { .. }) => {}
        other => panic!("persona not accepted: {other:?}"),
    }
}

fn reply(runtime: &Runtime, request: RequestId) -> (String, ReplyStats) {
    for event in runtime.events() {
        match event {
            Event::Replied {
                request: r,
                text,
                stats,
                ..
            } if r == request => return (text, stats),
            Event::Failed {
                request: r, error, ..
            } if r == request => panic!("reply failed: {error}"),
            _ => {}
        }
    }
    panic!("the worker stopped")
}

struct Scored {
    answerable: bool,
    correct: bool,
    knowledge: f32,
    p10: f32,
    mean_logprob: f32,
    refusal: bool,
}

/// Area under the ROC curve of `score` ranking unanswerable questions below answerable ones
/// (1.0: perfect separation, 0.5: chance).
fn auroc(items: &[Scored], score: impl Fn(&Scored) -> f32) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for a in items.iter().filter(|s| s.answerable) {
        for u in items.iter().filter(|s| !s.answerable) {
            pairs += 1.0;
            let (sa, su) = (score(a), score(u));
            if sa > su {
                wins += 1.0;
            } else if (sa - su).abs() < f32::EPSILON {
                wins += 0.5;
            }
        }
    }
    if pairs == 0.0 { 0.5 } else { wins / pairs }
}

struct Outcome {
    escalated: usize,
    precision: f64,
    recall: f64,
    kept_accuracy: f64,
    f1: f64,
}

fn outcome(items: &[Scored], escalate: impl Fn(&Scored) -> bool) -> Outcome {
    let escalated: Vec<&Scored> = items.iter().filter(|s| escalate(s)).collect();
    let kept: Vec<&Scored> = items.iter().filter(|s| !escalate(s)).collect();
    let right = escalated.iter().filter(|s| !s.answerable).count();
    let unanswerable = items.iter().filter(|s| !s.answerable).count();
    let precision = if escalated.is_empty() {
        0.0
    } else {
        right as f64 / escalated.len() as f64
    };
    let recall = right as f64 / unanswerable.max(1) as f64;
    // A kept question is handled well when it was answered correctly, or when it was
    // unanswerable and the model said it did not know.
    let good = kept
        .iter()
        .filter(|s| (s.answerable && s.correct) || (!s.answerable && s.refusal))
        .count();
    Outcome {
        escalated: escalated.len(),
        precision,
        recall,
        kept_accuracy: if kept.is_empty() {
            0.0
        } else {
            good as f64 / kept.len() as f64
        },
        f1: if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        },
    }
}

/// The threshold on `score` (escalate below it) with the best F1 on `items`.
fn best_threshold(items: &[Scored], score: impl Fn(&Scored) -> f32 + Copy) -> f32 {
    let mut candidates: Vec<f32> = items.iter().map(score).collect();
    candidates.sort_by(f32::total_cmp);
    candidates.push(f32::INFINITY);
    candidates
        .into_iter()
        .max_by(|a, b| {
            let fa = outcome(items, |s| score(s) < *a).f1;
            let fb = outcome(items, |s| score(s) < *b).f1;
            fa.total_cmp(&fb)
        })
        .unwrap_or(0.0)
}

fn question_set() -> QuestionSet {
    let source = std::fs::read_to_string(root().join("tests/data/escalation.ron"))
        .expect("tests/data/escalation.ron");
    ron::from_str(&source).expect("question set parses")
}

fn routing_quality(server: &servers::LlamaServer) {
    let set = question_set();
    println!(
        "\n# Escalation: the NPC runs {}, the cloud is {} on llama-server",
        npc_model().display_name,
        catalog::CLOUD_STANDIN_MODEL.display_name
    );
    // One thread: this part measures answers, not speed, and one thread wastes least on a
    // shared machine. Every reply's confidence is scored: this part compares the signals.
    let runtime = start(
        RuntimeConfig::new(model::file_of(npc_model()))
            .with_slots(1)
            .with_threads(1)
            .with_prewarm(false)
            .with_confidence_for_every_reply(true),
    );
    let mut items = Vec::new();
    for (at, q) in set.questions.iter().enumerate() {
        let npc = NpcId(at as u64 + 1);
        let persona = persona(&q.persona);
        let documents = escalation::persona_documents(&persona);
        accept(&runtime, npc, persona);
        let request = runtime.say(npc, &q.question).expect("worker");
        let (text, stats) = reply(&runtime, request);
        runtime.forget(npc).expect("worker");
        let lower = text.to_lowercase();
        let confidence = stats.confidence.expect("local replies carry confidence");
        eprintln!(
            "[{}/{}] {} {:?} -> {:?} (p10 {:.3}, mean log-prob {:.2})",
            at + 1,
            set.questions.len(),
            if q.answerable {
                "answerable"
            } else {
                "unanswerable"
            },
            q.question,
            text,
            confidence.p10_prob,
            confidence.mean_logprob
        );
        let persona_done = set
            .questions
            .get(at + 1)
            .is_some_and(|next| next.persona != q.persona);
        items.push(Scored {
            answerable: q.answerable,
            correct: q.answerable && holds_all(&lower, &q.answer),
            knowledge: escalation::knowledge_match(&documents, &q.question).unwrap_or(1.0),
            p10: confidence.p10_prob,
            mean_logprob: confidence.mean_logprob,
            refusal: escalation::is_refusal(&text),
        });
        if persona_done {
            // A table so far after each persona's questions, so a long run shows progress.
            print_routing_table(
                &items,
                &format!("after {} of {} questions", at + 1, set.questions.len()),
            );
        }
    }
    print_routing_table(&items, "all questions");
    drop(runtime);
    routed(server, &set, &items);
}

/// One question routed by the runtime, scored.
struct Routed {
    answerable: bool,
    /// Sent to the cloud.
    escalated: bool,
    /// Answerable, and the reply holds the answer.
    right: bool,
    /// The player heard "I don't know" (the NPC's line, or the cloud's words).
    dont_know: bool,
    /// For a question with a real-world answer: whether the reply holds it.
    world: Option<bool>,
}

/// Every question again through the runtime with escalation on (default settings, the
/// stand-in cloud speaking as the NPC): where each line went and what the player got.
fn routed(server: &servers::LlamaServer, set: &QuestionSet, local: &[Scored]) {
    let policy = uncapped_policy(server);
    let runtime = start(
        RuntimeConfig::new(model::file_of(npc_model()))
            .with_slots(1)
            .with_threads(1)
            .with_prewarm(false)
            .with_escalation(policy),
    );
    let mut rows: Vec<Routed> = Vec::new();
    for (at, q) in set.questions.iter().enumerate() {
        let npc = NpcId(at as u64 + 1);
        accept(&runtime, npc, persona(&q.persona));
        let request = runtime.say(npc, &q.question).expect("worker");
        let (text, stats) = reply(&runtime, request);
        runtime.forget(npc).expect("worker");
        // Sent to the cloud: answered by it, or (a fallback that paid for a cloud call) the
        // cloud said it did not know and the NPC said so in its own words.
        let escalated = matches!(stats.source, ReplySource::Cloud | ReplySource::Informed)
            || (stats.source == ReplySource::Fallback && stats.cloud_fact.is_some());
        eprintln!(
            "[routed {}/{}] {:?} {:?} -> {:?}",
            at + 1,
            set.questions.len(),
            stats.source,
            q.question,
            text
        );
        rows.push(Routed {
            answerable: q.answerable,
            escalated,
            right: q.answerable && holds_all(&text, &q.answer),
            dont_know: stats.source == ReplySource::Fallback || escalation::is_refusal(&text),
            world: (!q.world.is_empty()).then(|| holds_all(&text, &q.world)),
        });
    }
    let count = |f: &dyn Fn(&Routed) -> bool| rows.iter().filter(|r| f(r)).count();
    let answerable = count(&|r| r.answerable);
    let unanswerable = rows.len() - answerable;
    let escalated = count(&|r| r.escalated);
    let right_escalations = count(&|r| r.escalated && !r.answerable);
    let world = count(&|r| r.world.is_some());
    println!(
        "\n## Routed by the runtime (escalation on, default settings, cloud role Speak): {} questions",
        rows.len()
    );
    println!("\n| measure | value |");
    println!("|---|---:|");
    println!(
        "| escalated | {escalated} of {} ({answerable} answerable, {unanswerable} not) |",
        rows.len()
    );
    println!(
        "| escalation precision (escalated lines that were unanswerable) | {:.2} |",
        right_escalations as f64 / escalated.max(1) as f64
    );
    println!(
        "| escalation recall (unanswerable lines escalated) | {:.2} |",
        right_escalations as f64 / unanswerable.max(1) as f64
    );
    println!(
        "| answerable questions right, end to end (local or cloud) | {} of {answerable} |",
        count(&|r| r.answerable && r.right)
    );
    println!(
        "| answerable questions right, local model alone (same questions, no routing) | {} of {answerable} |",
        local.iter().filter(|s| s.correct).count()
    );
    println!(
        "| answerable questions escalated, and the cloud got them right | {} of {} |",
        count(&|r| r.answerable && r.escalated && r.right),
        count(&|r| r.answerable && r.escalated)
    );
    println!(
        "| unanswerable lines sent to the cloud that it said it did not know | {} of {} |",
        count(&|r| !r.answerable && r.escalated && r.dont_know),
        count(&|r| !r.answerable && r.escalated)
    );
    println!(
        "| unanswerable lines with a real-world answer the player got right | {} of {world} |",
        count(&|r| r.world == Some(true))
    );
    println!(
        "| made-up-world lines the cloud answered anyway (an invented answer) | {} of {} |",
        count(&|r| !r.answerable && r.escalated && !r.dont_know && r.world.is_none()),
        count(&|r| !r.answerable && r.world.is_none())
    );
}

fn print_routing_table(items: &[Scored], label: &str) {
    let answerable = items.iter().filter(|s| s.answerable).count();
    let correct = items.iter().filter(|s| s.correct).count();
    let refusals = items.iter().filter(|s| s.refusal).count();
    let mean = |f: &dyn Fn(&Scored) -> f32, answerable: bool| {
        let v: Vec<f32> = items
            .iter()
            .filter(|s| s.answerable == answerable)
            .map(f)
            .collect();
        v.iter().sum::<f32>() / v.len().max(1) as f32
    };
    println!(
        "\n## Routing quality, {label}: {} questions ({} answerable, {} not), greedy, {MAX_TOKENS} tokens max",
        items.len(),
        answerable,
        items.len() - answerable
    );
    println!(
        "local model alone: {correct}/{answerable} answerable questions right; said \"I don't know\" {refusals} times in {}",
        items.len()
    );
    println!(
        "mean p10 token probability: answerable {:.3}, unanswerable {:.3}; mean log-prob: {:.3} vs {:.3}",
        mean(&|s| s.p10, true),
        mean(&|s| s.p10, false),
        mean(&|s| s.mean_logprob, true),
        mean(&|s| s.mean_logprob, false)
    );
    println!(
        "\n| signal | escalate when | escalated | precision | recall | accuracy on kept | AUROC |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let default_threshold = EscalationConfig::default().min_knowledge_match;
    let row = |name: &str, rule: String, o: Outcome, auc: Option<f64>| {
        println!(
            "| {name} | {rule} | {} | {:.2} | {:.2} | {:.2} | {} |",
            o.escalated,
            o.precision,
            o.recall,
            o.kept_accuracy,
            auc.map_or("-".into(), |a| format!("{a:.2}"))
        );
    };
    row(
        "none (all local)",
        "never".into(),
        outcome(items, |_| false),
        None,
    );
    row(
        "knowledge match",
        format!("score < {default_threshold} (runtime default)"),
        outcome(items, |s| s.knowledge < default_threshold),
        Some(auroc(items, |s| s.knowledge)),
    );
    let t = best_threshold(items, |s| s.p10);
    row(
        "logits: p10 token prob",
        format!("p10 < {t:.3} (best F1, fitted here)"),
        outcome(items, |s| s.p10 < t),
        Some(auroc(items, |s| s.p10)),
    );
    let t = best_threshold(items, |s| s.mean_logprob);
    row(
        "logits: mean log-prob",
        format!("mean < {t:.3} (best F1, fitted here)"),
        outcome(items, |s| s.mean_logprob < t),
        Some(auroc(items, |s| s.mean_logprob)),
    );
    row(
        "refusal in reply",
        "reply says it does not know".into(),
        outcome(items, |s| s.refusal),
        None,
    );
}

/// Deterministic filler lore sized like the seed workload's "long lore": a chronicle of
/// made-up but varied entries. Synthetic: it only stands for the tokens a cloud-only design
/// sends every turn.
fn long_lore(entries: usize) -> String {
    const WHO: [&str; 8] = [
        "Aldric", "Bryn", "Cora", "Dunstan", "Elsa", "Fenn", "Greta", "Hob",
    ];
    const WHAT: [&str; 8] = [
        "sold two sheep",
        "mended the mill wheel",
        "found a silver ring",
        "lost a cart wheel",
        "saw lights over the marsh",
        "bought a plough",
        "married a weaver",
        "fought a boar",
    ];
    const WHERE: [&str; 6] = [
        "by the river at Willow Bend",
        "near the Greyfang Mine",
        "on the Riverford road",
        "behind the chapel",
        "in the market square",
        "at the north gate",
    ];
    (0..entries)
        .map(|i| {
            format!(
                "In the {} year of Lady Orla, {} {} {} and paid {} silver in tithe.\n",
                i + 1,
                WHO[i % WHO.len()],
                WHAT[(i / 3) % WHAT.len()],
                WHERE[(i / 5) % WHERE.len()],
                i % 17 + 1
            )
        })
        .collect()
}

/// Tokens of `text` by the server's tokenizer (`POST /tokenize`).
fn count_tokens(port: u16, text: &str) -> u64 {
    use std::io::{Read, Write};
    let body = serde_json::json!({ "content": text }).to_string();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let json = answer.split("\r\n\r\n").nth(1).expect("a body");
    let value: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    value["tokens"].as_array().expect("tokens").len() as u64
}

/// One design's run of the session: what ours cost, what cloud-only would have cost for
/// the same conversation, and how the turns went.
struct Session {
    role: CloudRole,
    ours: CostMeter,
    cloud_only: CostMeter,
    turns: usize,
    escalated: usize,
    fallback: usize,
    /// Time to first token of each escalated reply.
    escalated_ttft: Vec<Duration>,
}

fn cost_per_player_hour(server: &servers::LlamaServer) {
    let model = model::file_of(npc_model());
    let set = question_set();
    // Small talk, then the blacksmith's first four answerable and first four unanswerable
    // questions, alternating.
    let mut lines: Vec<String> = vec![
        "Good morning!".into(),
        "What do you sell?".into(),
        "Thank you, friend.".into(),
    ];
    let brom = |answerable: bool| {
        set.questions
            .iter()
            .filter(move |q| q.persona == "blacksmith" && q.answerable == answerable)
            .take(4)
            .map(|q| q.question.clone())
    };
    for (known, unknown) in brom(true).zip(brom(false)) {
        lines.push(known);
        lines.push(unknown);
    }
    let lore = long_lore(245);
    let lore_tokens = count_tokens(server.port, &lore);
    let per_hour = 300.0;
    let sessions: Vec<Session> = [CloudRole::Speak, CloudRole::Inform]
        .into_iter()
        .map(|role| session(server, &model, role, &lines, &lore))
        .collect();
    println!(
        "\n## Cost per player-hour: seed workload (5 interactions/min = {per_hour} a player-hour), {} turns, long lore of {lore_tokens} tokens",
        lines.len()
    );
    for s in &sessions {
        println!(
            "\nOurs, cloud role {:?} ({} local, {} escalated to the cloud, {} fallback):",
            s.role,
            s.turns - s.escalated - s.fallback,
            s.escalated,
            s.fallback
        );
        println!("{}", s.ours.report(per_hour));
    }
    println!(
        "\nCloud-only (every turn, full context; the {:?} session's conversation):",
        sessions[0].role
    );
    println!("{}", sessions[0].cloud_only.report(per_hour));
    println!("\n| design | cost per reply | per player-hour | ratio to cloud-only |");
    println!("|---|---:|---:|---:|");
    let cloud_hour = sessions[0].cloud_only.per_player_hour(per_hour);
    println!(
        "| cloud-only, GPT-4-class, full context | ${:.5} | ${:.3} | 1 |",
        sessions[0].cloud_only.cost_per_reply(),
        cloud_hour
    );
    for s in &sessions {
        // Each design against cloud-only on its own conversation (the replies differ).
        let cloud_hour = s.cloud_only.per_player_hour(per_hour);
        let ours_hour = s.ours.per_player_hour(per_hour);
        println!(
            "| ours, cloud role {:?}: local (priced at ${}/GPU-hour) + escalations | ${:.5} | ${:.3} | 1/{:.0} |",
            s.role,
            s.ours.prices.local_per_hour,
            s.ours.cost_per_reply(),
            ours_hour,
            cloud_hour / ours_hour.max(1e-12)
        );
    }
    for s in &sessions {
        let mut ttft: Vec<u128> = s.escalated_ttft.iter().map(Duration::as_millis).collect();
        ttft.sort_unstable();
        println!(
            "\n{:?}: time to the first token of an escalated reply, ms: {ttft:?} (median {})",
            s.role,
            ttft.get(ttft.len() / 2).copied().unwrap_or(0)
        );
    }
    for s in &sessions {
        // Where the target holds: the share of escalated turns at which ours reaches 1/100
        // of cloud-only, at this run's measured cost of a local reply and of an escalation
        // (for `Inform`, the cloud's fact plus one local reply).
        let total = s.ours.total();
        let local_each = total.local_cost(&s.ours.prices)
            / (total.local_replies + total.informed_replies).max(1) as f64;
        let escalations = (total.cloud_replies + total.informed_replies).max(1) as f64;
        let mut escalation_each = total.cloud_cost(&s.ours.prices) / escalations;
        if s.role == CloudRole::Inform {
            escalation_each += local_each;
        }
        let budget = s.cloud_only.cost_per_reply() / 100.0;
        let share = ((budget - local_each) / (escalation_each - local_each)).clamp(0.0, 1.0);
        println!(
            "\n{:?}: at this run's ${local_each:.6} per local reply and ${escalation_each:.5} per \
             escalation, ours stays within 1/100 of cloud-only (${budget:.5} a reply) while at \
             most {:.1} % of turns escalate; this mix escalated {:.1} %.",
            s.role,
            share * 100.0,
            s.escalated as f64 * 100.0 / s.turns as f64
        );
    }
}

/// The session with the blacksmith, escalating with `role`, metered side by side with
/// cloud-only on the same conversation.
fn session(
    server: &servers::LlamaServer,
    model: &Path,
    role: CloudRole,
    lines: &[String],
    lore: &str,
) -> Session {
    let mut policy = uncapped_policy(server);
    policy.cloud_max_tokens = 100;
    policy.cloud_role = role;
    let runtime = start(
        // The machine's cores, as a game would run it: the server computes only while the
        // runtime waits for an escalation, so the two do not compete.
        // No prewarm: the meter counts every local second of every turn.
        RuntimeConfig::new(model)
            .with_slots(1)
            .with_prewarm(false)
            .with_escalation(policy),
    );
    let npc = NpcId(1);
    let mut brom = persona("blacksmith");
    brom.sampling.max_tokens = Some(100);
    let system = brom.system_prompt();
    accept(&runtime, npc, brom);
    let mut ours = CostMeter::default();
    let mut cloud_only = CostMeter::default();
    let mut history = String::new();
    let (mut escalated, mut fallback) = (0, 0);
    let mut escalated_ttft = Vec::new();
    for line in lines {
        let request = runtime.say(npc, line.as_str()).expect("worker");
        let (text, stats) = reply(&runtime, request);
        eprintln!(
            "[cost {role:?}] {:?} {line:?} -> {text:?} ({} prompt, {} cached, {} generated, cloud fact {:?})",
            stats.source,
            stats.prompt_tokens,
            stats.cached_tokens,
            stats.generated_tokens,
            stats.cloud_fact
        );
        ours.record(npc, &stats);
        match stats.source {
            ReplySource::Cloud | ReplySource::Informed => {
                escalated += 1;
                escalated_ttft.push(stats.time_to_first_token);
            }
            ReplySource::Fallback => fallback += 1,
            ReplySource::Local | ReplySource::Remote => {}
        }
        // Cloud-only: the whole persona, the long lore and the whole history, every turn,
        // with a reply as long as ours (at least the seed's ~100 tokens when ours fell back).
        history.push_str(&format!("Player: {line}\n"));
        let input = count_tokens(
            server.port,
            &format!("{system}\n\nLore:\n{lore}\n{history}"),
        );
        history.push_str(&format!("NPC: {text}\n"));
        let output = if stats.generated_tokens == 0 {
            100
        } else {
            stats.generated_tokens
        };
        cloud_only.record(
            npc,
            &ReplyStats {
                prompt_tokens: input as usize,
                generated_tokens: output,
                ..ReplyStats::new(ReplySource::Cloud)
            },
        );
    }
    if role == CloudRole::Inform {
        runtime.inspect(npc).expect("worker");
        for event in runtime.events() {
            if let Event::Mind { memories, .. } = event {
                for memory in memories {
                    eprintln!("[cost {role:?}] remembers: {}", memory.text);
                }
                break;
            }
        }
    }
    Session {
        role,
        ours,
        cloud_only,
        turns: lines.len(),
        escalated,
        fallback,
        escalated_ttft,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let server = stronger_cloud();
    if only.as_deref().is_none_or(|o| o == "routing") {
        routing_quality(&server);
    }
    if only.as_deref().is_none_or(|o| o == "cost") {
        cost_per_player_hour(&server);
    }
}
