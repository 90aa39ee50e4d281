use super::*;
use crate::mind::memory::learned_question;
use crate::protocol::NpcId;
use crate::text::{numbers, unfamiliar_names};

use super::profile::CLOUD_DONT_KNOW;

#[test]
fn logprob_and_entropy_match_a_hand_computed_softmax() {
    // Two equal logits and one far below: p ≈ 0.5 each, entropy ≈ ln 2.
    let logits = [3.0, 3.0, -50.0];
    let (logprob, entropy) = token_logprob_entropy(&logits, 0).unwrap();
    assert!((logprob - 0.5f32.ln()).abs() < 1e-5, "{logprob}");
    assert!((entropy - 2f32.ln()).abs() < 1e-5, "{entropy}");
    let (sure, flat) = token_logprob_entropy(&[10.0, -10.0], 0).unwrap();
    assert!(sure > -1e-6 && flat < 1e-6);
    assert_eq!(token_logprob_entropy(&logits, 3), None);
    assert_eq!(token_logprob_entropy(&[f32::NAN, 1.0], 0), None);
}

#[test]
fn leaving_out_negligible_logits_changes_nothing_measurable() {
    // A vocabulary-sized spread of logits (deterministic), most far below the top.
    let logits: Vec<f32> = (0..49_152u32)
        .map(|i| {
            let x = (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32;
            12.0 - 40.0 * x
        })
        .collect();
    let exact = |token: usize| {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (mut sum, mut weighted) = (0.0f64, 0.0f64);
        for &l in &logits {
            let shifted = f64::from(l - max);
            sum += shifted.exp();
            weighted += shifted.exp() * shifted;
        }
        let log_z = sum.ln();
        (
            f64::from(logits[token] - max) - log_z,
            log_z - weighted / sum,
        )
    };
    for token in [0, 7, 40_000] {
        let (logprob, entropy) = token_logprob_entropy(&logits, token).unwrap();
        let (want_logprob, want_entropy) = exact(token);
        assert!(
            (f64::from(logprob) - want_logprob).abs() < 1e-5,
            "{logprob} vs {want_logprob}"
        );
        assert!(
            (f64::from(entropy) - want_entropy).abs() < 1e-5,
            "{entropy} vs {want_entropy}"
        );
    }
}

#[test]
fn confidence_summary_takes_the_low_quantile() {
    let mut conf = TokenConfidence::default();
    assert_eq!(conf.summary(), None);
    for p in [0.9f32, 0.8, 0.1, 0.95, 0.99, 0.7, 0.6, 0.85, 0.9, 0.92, 0.3] {
        // logits whose softmax gives p to token 0 and 1-p to token 1.
        conf.observe(&[p.ln(), (1.0 - p).ln()], 0);
    }
    let s = conf.summary().unwrap();
    assert_eq!(s.tokens, 11);
    assert!((s.min_prob - 0.1).abs() < 1e-4, "{s:?}");
    assert!((s.p10_prob - 0.3).abs() < 1e-4, "{s:?}");
    assert!(s.mean_logprob < 0.0 && s.mean_entropy > 0.0);
    conf.observe(&[1.0], -1); // ignored
    assert_eq!(conf.summary().unwrap().tokens, 11);
}

#[test]
fn refusals_are_detected() {
    assert!(is_refusal("Hmm. I don't know, friend."));
    assert!(is_refusal("I’m not sure about that."));
    assert!(is_refusal("I couldn't say, traveller."));
    assert!(!is_refusal("An iron sword costs 40 gold."));
}

#[test]
fn knowledge_match_separates_known_from_unknown() {
    let docs = [
        "An iron sword costs 40 gold.",
        "Your apprentice is a boy named Pip.",
    ];
    assert_eq!(
        knowledge_match(&docs, "How much is an iron sword?"),
        Some(1.0)
    );
    assert!(knowledge_match(&docs, "Who is your apprentice?").unwrap() >= 0.5);
    assert_eq!(
        knowledge_match(&docs, "What is the capital of France?"),
        Some(0.0)
    );
    assert_eq!(knowledge_match(&docs, "Hello!"), None);
    assert_eq!(knowledge_match(&docs, "Good morning!"), None);
    assert_eq!(knowledge_match(&docs, "Thank you, friend."), None);
    assert_eq!(knowledge_match::<&str>(&[], "Swords?"), Some(0.0));
}

#[test]
fn policy_respects_topics_thresholds_and_opt_out() {
    let mut config = EscalationConfig::enabled(None);
    config.always_topics = vec!["dragon".into()];
    config.never_topics = vec!["weather".into()];
    let persona = PersonaEscalation::default();
    assert_eq!(should_escalate(&config, &persona, "hi", None), None);
    assert!(matches!(
        should_escalate(&config, &persona, "Tell me of the Dragon", Some(1.0)),
        Some(EscalationReason::AlwaysTopic(_))
    ));
    assert_eq!(
        should_escalate(&config, &persona, "dragon weather?", Some(0.0)),
        None
    );
    assert!(matches!(
        should_escalate(&config, &persona, "x", Some(0.1)),
        Some(EscalationReason::LowKnowledgeMatch(_))
    ));
    assert_eq!(should_escalate(&config, &persona, "x", Some(0.5)), None);
    let opt_out = PersonaEscalation {
        enabled: Some(false),
        ..PersonaEscalation::default()
    };
    assert_eq!(
        should_escalate(&config, &opt_out, "dragon", Some(0.0)),
        None
    );
    config.enabled = false;
    assert_eq!(
        should_escalate(&config, &persona, "dragon", Some(0.0)),
        None
    );
}

#[test]
fn a_truncated_fact_keeps_its_complete_sentences() {
    let cut = "The forest is far. It lies beyond the river and the";
    assert_eq!(complete_sentences(cut, true), "The forest is far.");
    assert_eq!(complete_sentences(cut, false), cut);
    assert_eq!(
        complete_sentences("It costs 3.5 gold and", true),
        "It costs 3.5 gold and"
    );
    assert_eq!(complete_sentences("Why? Because", true), "Why?");
    assert_eq!(complete_sentences("", true), "");
}

#[test]
fn learned_facts_route_by_their_question_only() {
    let memory = learned_memory("Who rules the north?", "Queen Maud, since the war.");
    assert_eq!(learned_question(&memory), Some("Who rules the north?"));
    assert_eq!(learned_question("The player is called Aria."), None);
    let memories = [memory.as_str(), "The player is called Aria."];
    let fact = Some("Queen Maud, since the war.");
    assert_eq!(learned_answer(&memories, "Who rules the North?"), fact);
    assert_eq!(learned_answer(&memories, "So who rules the north?"), fact);
    assert_eq!(
        learned_answer(&memories, "Who rules the north and the south?"),
        None
    );
    assert_eq!(learned_answer(&memories, "Hello!"), None);
}

#[test]
fn the_cloud_gets_a_compressed_persona() {
    let persona = Persona::from_ron(
        r#"(name: "Brom", role: "the blacksmith", personality: "Gruff.",
                speech_style: "Short sentences.",
                knowledge: ["A horseshoe costs 3 gold.", "An iron sword costs 40 gold.",
                            "Pip is the apprentice."],
                secrets: ["You owe Marta 12 gold."], goals: ["Sell swords."])"#,
        None,
    )
    .unwrap();
    let prompt = NpcProfile::new(&persona).cloud_prompt("Tell me about your swords.");
    assert!(
        prompt.starts_with("You are Brom, the blacksmith."),
        "{prompt}"
    );
    assert!(prompt.contains("Short sentences."), "{prompt}");
    assert!(prompt.contains("An iron sword costs 40 gold."), "{prompt}");
    for left_out in ["horseshoe", "Pip", "Marta", "Sell swords"] {
        assert!(!prompt.contains(left_out), "{left_out} in {prompt}");
    }
    // It ends by telling the cloud to say it does not know what the NPC was not told.
    assert!(prompt.ends_with(CLOUD_DONT_KNOW), "{prompt}");
}

fn miller_documents() -> (Vec<String>, std::collections::HashSet<String>) {
    let docs = vec![
        "A sack of wheat flour costs 4 silver.".to_owned(),
        "My library holds three hundred and forty books.".to_owned(),
        "The far bank leads to the road to Marrowby.".to_owned(),
    ];
    let vocabulary = vocabulary(docs.iter().map(String::as_str));
    (docs, vocabulary)
}

#[test]
fn paraphrases_that_share_words_are_familiar_and_unknown_names_are_not() {
    let (docs, vocabulary) = miller_documents();
    // In the words of the fact, or half of them: the model answers as usual.
    assert!(!unfamiliar(
        &docs,
        &vocabulary,
        "How much is a sack of wheat flour?"
    ));
    assert!(!unfamiliar(
        &docs,
        &vocabulary,
        "What does wheat cost by the sack?"
    ));
    // Nothing it knows, or a place it never heard of: the reminder and the check.
    assert!(unfamiliar(
        &docs,
        &vocabulary,
        "Who was the first king of this realm?"
    ));
    assert!(unfamiliar(
        &docs,
        &vocabulary,
        "What does flour cost in Saltmere?"
    ));
    assert!(!unfamiliar(
        &docs,
        &vocabulary,
        "What does flour cost in Marrowby?"
    ));
    // Greetings and statements are never about what it does not know.
    assert!(!unfamiliar(&docs, &vocabulary, "Good morning!"));
    assert!(!unfamiliar(&docs, &vocabulary, "I like your mill."));
}

#[test]
fn a_reply_is_grounded_when_its_specifics_are_known() {
    let (_, vocabulary) = miller_documents();
    let line = "How many books are on your shelves?";
    assert!(grounded(
        "I keep 340 books here.",
        &vocabulary,
        &[line],
        &[]
    ));
    assert!(grounded(
        "Three hundred and forty, reader.",
        &vocabulary,
        &[line],
        &[]
    ));
    assert!(grounded(
        "I don't know, I'm afraid.",
        &vocabulary,
        &[line],
        &[]
    ));
    // A number, a name or several words from nowhere: invented.
    assert!(!grounded(
        "I keep 500 books here.",
        &vocabulary,
        &[line],
        &[]
    ));
    let king = ["Who was king?"];
    assert!(!grounded(
        "The first king was King Arthur.",
        &vocabulary,
        &king,
        &[]
    ));
    let fireball = ["How do you cast a fireball?"];
    assert!(!grounded(
        "You need a magic staff to summon it.",
        &vocabulary,
        &fireball,
        &[]
    ));
    // What the player said counts as heard, but not a name the NPC never heard of.
    assert!(grounded(
        "Arthur, you say?",
        &vocabulary,
        &["Do you know Arthur?"],
        &[]
    ));
    let saltmere = ["What does flour cost in Saltmere?"];
    let unknown = unfamiliar_names(&miller_documents().0, &vocabulary, saltmere[0]).unwrap();
    assert_eq!(unknown, ["saltmere"]);
    assert!(!grounded(
        "Flour costs 4 silver in Saltmere.",
        &vocabulary,
        &saltmere,
        &unknown
    ));
    let spelled: Vec<String> = numbers("nineteen years and forty-two days").collect();
    assert_eq!(spelled, ["19", "42"]);
}

#[test]
fn a_cloud_reply_streams_after_its_opening_and_a_refusal_never_does() {
    let mut hold = OpeningHold::default();
    assert_eq!(hold.push("The capital"), "");
    assert_eq!(hold.push(" is Paris."), "");
    // The first sentence is in once something follows it.
    assert_eq!(hold.push(" It has"), "The capital is Paris. It has");
    assert_eq!(hold.push(" a river."), " a river.");
    assert_eq!(hold.finish(), "");
    assert!(!hold.refused());

    let mut hold = OpeningHold::default();
    for piece in ["I don't", " know", ".", " Ask", " the mayor."] {
        assert_eq!(hold.push(piece), "", "{piece:?}");
    }
    assert_eq!(hold.finish(), "");
    assert!(hold.refused());

    // A reply shorter than one sentence is decided at the end.
    let mut hold = OpeningHold::default();
    assert_eq!(hold.push("Paris"), "");
    assert_eq!(hold.finish(), "Paris");
    let mut hold = OpeningHold::default();
    assert_eq!(hold.push("No idea"), "");
    assert_eq!(hold.finish(), "");
    assert!(hold.refused());

    // A long opening without a sentence end is not held past OPENING_CHARS.
    let mut hold = OpeningHold::default();
    let long = "word ".repeat(OPENING_CHARS / 5 + 1);
    assert_eq!(hold.push(&long), long);
    // "3.5" is no sentence end.
    let mut hold = OpeningHold::default();
    assert_eq!(hold.push("It weighs 3.5"), "");
}

#[test]
fn fallback_lines_take_turns() {
    let escalator = Escalator::new(&EscalationConfig::default());
    let profile = NpcProfile::default();
    let said: Vec<String> = (0..3)
        .map(|_| escalator.fallback_line(NpcId(1), &profile))
        .collect();
    assert_eq!(said[0], DEFAULT_FALLBACK_LINE);
    assert!(said.windows(2).all(|w| w[0] != w[1]), "{said:?}");
    let own = NpcProfile {
        dont_know: vec!["Ask Bessa.".into(), "Not my trade.".into()],
        ..NpcProfile::default()
    };
    let said: Vec<String> = (0..3)
        .map(|_| escalator.fallback_line(NpcId(2), &own))
        .collect();
    assert_eq!(said, ["Ask Bessa.", "Not my trade.", "Ask Bessa."]);
}

#[test]
fn the_api_key_is_redacted_in_debug_output() {
    let config = CloudConfig::new("http://127.0.0.1:1/v1", "m").with_api_key("sk-secret-123");
    let shown = format!(
        "{config:?} {:?}",
        EscalationConfig::enabled(Some(config.clone()))
    );
    assert!(!shown.contains("sk-secret-123"), "{shown}");
    assert!(shown.contains("redacted"));
}
