//! What routing keeps per NPC ([`NpcProfile`]): its documents, who it is for the cloud, the
//! prompts the cloud gets, and the facts it learned from the cloud.

use crate::persona::Persona;
use crate::text::{content_words, shared_words};

use super::{PersonaEscalation, persona_documents};

/// What the worker keeps per NPC for routing.
#[derive(Clone, Debug, Default)]
pub(crate) struct NpcProfile {
    pub(crate) settings: PersonaEscalation,
    pub(crate) documents: Vec<String>,
    /// "Name, role": who the cloud supplies a fact for ([`CloudRole::Inform`]).
    pub(crate) identity: String,
    /// Who the NPC is and how it talks, for the cloud ([`CloudRole::Speak`]).
    pub(crate) header: String,
    /// The persona's knowledge entries, of which the cloud gets those the line mentions.
    pub(crate) knowledge: Vec<String>,
    /// How the NPC says it does not know (the persona's `dont_know`, else the defaults).
    pub(crate) dont_know: Vec<String>,
}

impl NpcProfile {
    pub(crate) fn new(persona: &Persona) -> Self {
        let identity = format!("{}, {}", persona.name.trim(), persona.role.trim());
        let mut header = format!(
            "You are {identity}. Stay in character and answer in one or two short sentences."
        );
        for (title, body) in [
            ("Personality", &persona.personality),
            ("Speech style", &persona.speech_style),
        ] {
            if !body.trim().is_empty() {
                header.push_str(&format!("\n\n{title}: {}", body.trim()));
            }
        }
        Self {
            settings: persona.escalation.clone(),
            documents: persona_documents(persona),
            identity,
            header,
            knowledge: persona
                .knowledge
                .iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect(),
            dont_know: persona.dont_know.clone(),
        }
    }

    /// The persona prompt the cloud gets when it speaks as the NPC, compressed: who the NPC
    /// is and how it talks, and the (at most [`CLOUD_KNOWLEDGE`]) knowledge entries that
    /// share the most words with `line`. Secrets, goals, actions and the world preamble are
    /// not sent.
    pub(super) fn cloud_prompt(&self, line: &str) -> String {
        let words = content_words(line);
        let mut scored: Vec<(usize, &String)> = self
            .knowledge
            .iter()
            .map(|entry| (shared_words(&words, entry), entry))
            .filter(|(shared, _)| *shared > 0)
            .collect();
        // Most shared words first; the persona's order among equals.
        scored.sort_by_key(|(shared, _)| std::cmp::Reverse(*shared));
        let mut prompt = self.header.clone();
        if !scored.is_empty() {
            prompt.push_str("\n\nWhat you know:");
            for (_, entry) in scored.into_iter().take(CLOUD_KNOWLEDGE) {
                prompt.push_str("\n- ");
                prompt.push_str(entry);
            }
        }
        prompt.push_str("\n\n");
        prompt.push_str(CLOUD_DONT_KNOW);
        prompt
    }
}

/// Most knowledge entries sent to the cloud with one escalated line.
pub(super) const CLOUD_KNOWLEDGE: usize = 3;

/// The last paragraph of the cloud's persona prompt ([`CloudRole::Speak`]): a line escalates
/// because the NPC was not told the answer, and the cloud was not told the game's world
/// either. Without it the stand-in cloud (Qwen2.5-Coder-1.5B) invented an answer to 26 of the
/// 26 made-up-world questions of `tests/data/escalation.ron` it was sent; with it, it says
/// "I don't know" (which the NPC then says in its own words) and still answers what the real
/// world knows (docs/dialogue.md, "Knowing when not to know").
pub(super) const CLOUD_DONT_KNOW: &str = "You were asked something you were not told about. If the \
    answer is common knowledge in the real world, give it. If it is about people, places or \
    events of your own world, you cannot know it: answer only \"I don't know.\"";

/// The prompt that asks the cloud for the fact behind `line`, for the NPC `identity`.
pub(super) fn fact_prompt(identity: &str, line: &str) -> Vec<(String, String)> {
    vec![
        (
            "system".to_owned(),
            format!(
                "You supply facts to a game character, {identity}, who was asked something \
                 they do not know. Answer the question in one short, plain sentence of fact, \
                 without role-play. If it cannot be known, answer: I don't know."
            ),
        ),
        ("user".to_owned(), line.to_owned()),
    ]
}
