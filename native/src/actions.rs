//! Game actions: what a persona declares its NPC may do, the grammar that confines the model's
//! reply to "spoken text + at most one declared action", and the parser that reads it back.
//!
//! A persona lists its actions in RON:
//!
//! ```ron
//! actions: [
//!     (name: "give_item", description: "Hand the player an item they paid for.",
//!      params: [(name: "item", kind: OneOf(["horseshoe", "iron sword"]))]),
//!     (name: "open_gate", description: "Open the north gate."),
//!     (name: "set_price", params: [(name: "gold", kind: Integer(min: 1, max: 500))]),
//!     (name: "note", params: [(name: "text", kind: Text(max_chars: 40))]),
//! ]
//! ```
//!
//! The model then writes its spoken text and, optionally, one line
//! `[ACTION] give_item(item="horseshoe")`. A GBNF grammar built from the declarations (see
//! [`action_grammar`]) makes any other action, parameter or value impossible to sample; the
//! parser ([`parse_action`]) checks the same rules again before the game sees an
//! [`ActionCall`]. The spoken text never contains a newline or `[`, so the action line never
//! streams into the dialogue.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::sampling::StopFilter;

/// One action an NPC may take, as its persona declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The action's name: lowercase ASCII letters, digits and `_`, starting with a letter
    /// (`give_item`).
    pub name: String,
    /// What the action does and when to take it; shown to the model.
    #[serde(default)]
    pub description: String,
    /// Its parameters, all required, in the order the model writes them.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
}

/// One parameter of an [`ActionSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The parameter's name (same rules as an action name).
    pub name: String,
    /// The values it may take.
    pub kind: ParamKind,
}

/// The values a parameter may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// One of these strings exactly (`OneOf(["horseshoe", "iron sword"])`).
    OneOf(Vec<String>),
    /// A whole number in `min..=max` (`Integer(min: 1, max: 500)`).
    Integer {
        /// Smallest value allowed.
        min: i64,
        /// Largest value allowed.
        max: i64,
    },
    /// Short free text without quotes, backslashes or line breaks (`Text(max_chars: 40)`).
    Text {
        /// Longest text allowed, in characters (1 to [`MAX_TEXT_CHARS`]).
        max_chars: u32,
    },
}

/// An action the model asked for; every name and value is one its persona declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionCall {
    /// The action's name.
    pub name: String,
    /// Its arguments, in declaration order.
    pub args: Vec<(String, ActionValue)>,
}

/// The value of one argument of an [`ActionCall`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionValue {
    /// A [`ParamKind::OneOf`] choice or [`ParamKind::Text`].
    Text(String),
    /// A [`ParamKind::Integer`].
    Integer(i64),
}

impl ActionCall {
    /// The argument named `name`, if the action has one.
    #[must_use]
    pub fn arg(&self, name: &str) -> Option<&ActionValue> {
        self.args
            .iter()
            .find(|(arg, _)| arg == name)
            .map(|(_, value)| value)
    }

    /// The text of the argument named `name`, if it is text.
    #[must_use]
    pub fn text_arg(&self, name: &str) -> Option<&str> {
        match self.arg(name)? {
            ActionValue::Text(text) => Some(text),
            ActionValue::Integer(_) => None,
        }
    }

    /// The number of the argument named `name`, if it is a number.
    #[must_use]
    pub fn integer_arg(&self, name: &str) -> Option<i64> {
        match self.arg(name)? {
            ActionValue::Integer(value) => Some(*value),
            ActionValue::Text(_) => None,
        }
    }
}

/// The call as the model writes it: `give_item(item="horseshoe")`.
impl fmt::Display for ActionCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (index, (name, value)) in self.args.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            match value {
                ActionValue::Text(text) => write!(f, "{name}=\"{text}\"")?,
                ActionValue::Integer(number) => write!(f, "{name}={number}")?,
            }
        }
        f.write_str(")")
    }
}

/// What precedes the action in a reply. The spoken text can contain neither `\n` nor `[`.
pub const ACTION_MARKER: &str = "\n[ACTION] ";

/// Most actions one persona may declare.
pub const MAX_ACTIONS: usize = 16;
/// Most parameters one action may have.
pub const MAX_PARAMS: usize = 6;
/// Most choices of one [`ParamKind::OneOf`].
pub const MAX_CHOICES: usize = 32;
/// Longest name, choice or description, in characters.
pub const MAX_NAME_CHARS: usize = 32;
/// Longest [`ParamKind::OneOf`] choice, in characters.
pub const MAX_CHOICE_CHARS: usize = 48;
/// Longest [`ParamKind::Text`] allowed, in characters.
pub const MAX_TEXT_CHARS: u32 = 120;
/// Largest magnitude of an [`ParamKind::Integer`] bound.
pub const MAX_INTEGER: i64 = 1_000_000_000;
/// Longest action description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 300;

/// Checks the declarations: identifier names, no duplicates, non-empty choices without
/// quotes, backslashes or control characters, non-empty ranges, sane sizes.
///
/// # Errors
/// A message naming the action (and parameter) at fault.
pub fn validate_actions(actions: &[ActionSpec]) -> Result<(), String> {
    if actions.len() > MAX_ACTIONS {
        return Err(format!(
            "{} actions declared; at most {MAX_ACTIONS} are allowed",
            actions.len()
        ));
    }
    for (index, action) in actions.iter().enumerate() {
        check_identifier(&action.name)
            .map_err(|why| format!("action #{} name {:?}: {why}", index + 1, action.name))?;
        if actions[..index].iter().any(|a| a.name == action.name) {
            return Err(format!("action `{}` is declared twice", action.name));
        }
        let at = |what: String| format!("action `{}`: {what}", action.name);
        if action.description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(at(format!(
                "description is longer than {MAX_DESCRIPTION_CHARS} characters"
            )));
        }
        if action.params.len() > MAX_PARAMS {
            return Err(at(format!("at most {MAX_PARAMS} parameters are allowed")));
        }
        for (p, param) in action.params.iter().enumerate() {
            check_identifier(&param.name)
                .map_err(|why| at(format!("parameter #{} name {:?}: {why}", p + 1, param.name)))?;
            if action.params[..p].iter().any(|q| q.name == param.name) {
                return Err(at(format!("parameter `{}` is declared twice", param.name)));
            }
            let at = |what: String| at(format!("parameter `{}`: {what}", param.name));
            match &param.kind {
                ParamKind::OneOf(choices) => {
                    if choices.is_empty() {
                        return Err(at("OneOf needs at least one choice".into()));
                    }
                    if choices.len() > MAX_CHOICES {
                        return Err(at(format!("OneOf allows at most {MAX_CHOICES} choices")));
                    }
                    for (c, choice) in choices.iter().enumerate() {
                        check_choice(choice)
                            .map_err(|why| at(format!("choice {choice:?}: {why}")))?;
                        if choices[..c].contains(choice) {
                            return Err(at(format!("choice {choice:?} is listed twice")));
                        }
                    }
                }
                ParamKind::Integer { min, max } => {
                    if min > max {
                        return Err(at(format!("the range {min}..={max} is empty")));
                    }
                    if min.abs() > MAX_INTEGER || max.abs() > MAX_INTEGER {
                        return Err(at(format!(
                            "bounds must lie within -{MAX_INTEGER}..={MAX_INTEGER}"
                        )));
                    }
                }
                ParamKind::Text { max_chars } => {
                    if !(1..=MAX_TEXT_CHARS).contains(max_chars) {
                        return Err(at(format!("max_chars must be 1..={MAX_TEXT_CHARS}")));
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(first) if !first.is_ascii_lowercase() => {
            return Err("must start with a lowercase ASCII letter".into());
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("may only hold lowercase ASCII letters, digits and `_`".into());
    }
    if name.len() > MAX_NAME_CHARS {
        return Err(format!("is longer than {MAX_NAME_CHARS} characters"));
    }
    Ok(())
}

fn check_choice(choice: &str) -> Result<(), String> {
    if choice.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if choice.trim() != choice {
        return Err("must not start or end with spaces".into());
    }
    if choice.chars().count() > MAX_CHOICE_CHARS {
        return Err(format!("is longer than {MAX_CHOICE_CHARS} characters"));
    }
    if let Some(bad) = choice.chars().find(|&c| !allowed_in_text(c)) {
        return Err(format!(
            "must not contain {bad:?} (quotes, backslashes and control characters are not allowed)"
        ));
    }
    Ok(())
}

/// Characters a quoted value may hold (the grammar's `[^"\\\x00-\x1f\x7f]`).
fn allowed_in_text(c: char) -> bool {
    c != '"' && c != '\\' && !c.is_control()
}

/// How an action is written in the prompt's list: `give_item(item="horseshoe"|"iron sword")`.
fn signature(action: &ActionSpec) -> String {
    let params: Vec<String> = action
        .params
        .iter()
        .map(|param| {
            let values = match &param.kind {
                ParamKind::OneOf(choices) => choices
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join("|"),
                ParamKind::Integer { min, max } => format!("a number from {min} to {max}"),
                ParamKind::Text { max_chars } => format!("\"up to {max_chars} characters\""),
            };
            format!("{}={values}", param.name)
        })
        .collect();
    format!("{}({})", action.name, params.join(", "))
}

/// An example call of `action` with the first allowed value of each parameter.
fn example_call(action: &ActionSpec) -> ActionCall {
    ActionCall {
        name: action.name.clone(),
        args: action
            .params
            .iter()
            .map(|param| {
                let value = match &param.kind {
                    ParamKind::OneOf(choices) => ActionValue::Text(choices[0].clone()),
                    ParamKind::Integer { min, max } => {
                        ActionValue::Integer(if (*min..=*max).contains(&10) {
                            10
                        } else {
                            *min
                        })
                    }
                    ParamKind::Text { .. } => ActionValue::Text("thanks".into()),
                };
                (param.name.clone(), value)
            })
            .collect(),
    }
}

/// The system-prompt section that tells the model which actions exist and how to write one.
/// Empty when the persona declares none.
#[must_use]
pub fn actions_prompt(actions: &[ActionSpec]) -> String {
    let Some(first) = actions.first() else {
        return String::new();
    };
    // A worked example: Qwen2.5-1.5B wrote the marked line for 9 of 12 requests it agreed to
    // with this wording, against none with a bare description of the format (and never on
    // a question or a greeting, with either).
    let mut text = format!(
        "Actions: you can act in the world. When the player asks for something and you agree \
         to do it, answer in one short sentence, then write the action on its own line. For \
         example, if the player pays for what they ask, you reply:\nHere you go.\n[ACTION] {}\n\
         The only actions you have:",
        example_call(first)
    );
    for action in actions {
        text.push_str("\n- ");
        text.push_str(&signature(action));
        let description = action.description.trim();
        if !description.is_empty() {
            text.push_str(": ");
            text.push_str(description);
        }
    }
    text.push_str("\nNo other action exists. Take no action when none is needed.");
    text
}

/// A GBNF literal: `"…"` with quotes, backslashes and non-printable characters escaped.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                // Validated choices hold none; escape anyway rather than trust the caller.
                let code = c as u32;
                if code <= 0xff {
                    out.push_str(&format!("\\x{code:02X}"));
                } else {
                    out.push_str(&format!("\\u{code:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The GBNF grammar (root rule `root`) that allows exactly: spoken text without newlines or
/// `[`, then optionally [`ACTION_MARKER`] and one call of a declared action with values of
/// its declared types. `None` when the persona declares no actions (replies are then free).
/// Rule names are generated (`a0`, `a0p1` …), never taken from the persona, and every
/// persona string appears only as an escaped literal; the declarations must have passed
/// [`validate_actions`].
#[must_use]
pub fn action_grammar(actions: &[ActionSpec]) -> Option<String> {
    if actions.is_empty() {
        return None;
    }
    let mut rules = vec![
        "root ::= speech action?".to_owned(),
        "speech ::= [^\\n\\[]*".to_owned(),
        format!("action ::= {} call", gbnf_literal(ACTION_MARKER)),
        format!(
            "call ::= {}",
            (0..actions.len())
                .map(|a| format!("a{a}"))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    ];
    for (a, action) in actions.iter().enumerate() {
        let mut body = vec![gbnf_literal(&format!("{}(", action.name))];
        for (p, param) in action.params.iter().enumerate() {
            let separator = if p == 0 { "" } else { ", " };
            body.push(gbnf_literal(&format!("{separator}{}=", param.name)));
            body.push(format!("a{a}p{p}"));
            let values = match &param.kind {
                ParamKind::OneOf(choices) => choices
                    .iter()
                    .map(|c| gbnf_literal(&format!("\"{c}\"")))
                    .collect::<Vec<_>>()
                    .join(" | "),
                ParamKind::Integer { min, max } => integer_gbnf(*min, *max),
                ParamKind::Text { max_chars } => {
                    format!("\"\\\"\" [^\"\\\\\\x00-\\x1F\\x7F]{{0,{max_chars}}} \"\\\"\"")
                }
            };
            rules.push(format!("a{a}p{p} ::= {values}"));
        }
        body.push(gbnf_literal(")"));
        rules.push(format!("a{a} ::= {}", body.join(" ")));
    }
    let mut grammar = rules.join("\n");
    grammar.push('\n');
    Some(grammar)
}

/// One digit position of an integer pattern: the digits `low..=high`.
type DigitClass = (u8, u8);

/// Patterns (sequences of digit classes) that together match exactly the decimal numbers
/// `low..=high`, without leading zeros. `low <= high`.
fn digit_patterns(low: u64, high: u64) -> Vec<Vec<DigitClass>> {
    let digits = |n: u64| n.to_string().len();
    if digits(low) < digits(high) {
        let split = 10u64.pow(u32::try_from(digits(low)).unwrap_or(0));
        let mut out = digit_patterns(low, split - 1);
        out.extend(digit_patterns(split, high));
        return out;
    }
    let to_digits = |n: u64| n.to_string().bytes().map(|b| b - b'0').collect::<Vec<u8>>();
    same_length_patterns(&to_digits(low), &to_digits(high))
}

fn same_length_patterns(low: &[u8], high: &[u8]) -> Vec<Vec<DigitClass>> {
    let (a, b) = (low[0], high[0]);
    if low.len() == 1 {
        return vec![vec![(a, b)]];
    }
    let rest = low.len() - 1;
    let prefixed = |first: DigitClass, tails: Vec<Vec<DigitClass>>| {
        tails
            .into_iter()
            .map(|tail| {
                let mut pattern = vec![first];
                pattern.extend(tail);
                pattern
            })
            .collect::<Vec<_>>()
    };
    if a == b {
        return prefixed((a, a), same_length_patterns(&low[1..], &high[1..]));
    }
    let low_rest_zero = low[1..].iter().all(|&d| d == 0);
    let high_rest_nine = high[1..].iter().all(|&d| d == 9);
    let mut out = Vec::new();
    let mut middle = (a, b);
    if !low_rest_zero {
        out.extend(prefixed(
            (a, a),
            same_length_patterns(&low[1..], &vec![9; rest]),
        ));
        middle.0 = a + 1;
    }
    if !high_rest_nine {
        middle.1 = b - 1;
    }
    if middle.0 <= middle.1 {
        let mut pattern = vec![middle];
        pattern.extend(std::iter::repeat_n((0, 9), rest));
        out.push(pattern);
    }
    if !high_rest_nine {
        out.extend(prefixed(
            (b, b),
            same_length_patterns(&vec![0; rest], &high[1..]),
        ));
    }
    out
}

/// Patterns with an optional sign for `min..=max` (as `(negative, digits)`).
fn integer_patterns(min: i64, max: i64) -> Vec<(bool, Vec<DigitClass>)> {
    let mut out = Vec::new();
    if min < 0 {
        // Negative part: -(|upper|..=|min|), zero excluded.
        let low = if max < 0 { max.unsigned_abs() } else { 1 };
        out.extend(
            digit_patterns(low, min.unsigned_abs())
                .into_iter()
                .map(|p| (true, p)),
        );
    }
    if max >= 0 {
        let low = min.max(0).unsigned_abs();
        out.extend(
            digit_patterns(low, max.unsigned_abs())
                .into_iter()
                .map(|p| (false, p)),
        );
    }
    out
}

fn integer_gbnf(min: i64, max: i64) -> String {
    integer_patterns(min, max)
        .into_iter()
        .map(|(negative, pattern)| {
            let mut parts: Vec<String> = Vec::with_capacity(pattern.len() + 1);
            if negative {
                parts.push("\"-\"".into());
            }
            for (low, high) in pattern {
                parts.push(if low == high {
                    format!("\"{low}\"")
                } else {
                    format!("[{low}-{high}]")
                });
            }
            format!("( {} )", parts.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Reads the action out of the part of a reply from [`ACTION_MARKER`] on, or from a call
/// written inline without the marker (`give_item(item="horseshoe")`, the name perhaps
/// capitalised, perhaps followed by a full stop). `None` unless it is exactly one call of a
/// declared action with every parameter in order and in type (a reply cut short by its
/// token limit, say, carries no action).
#[must_use]
pub fn parse_action(actions: &[ActionSpec], tail: &str) -> Option<ActionCall> {
    let call = match tail.strip_prefix(ACTION_MARKER) {
        Some(marked) => marked.trim_end(),
        None => tail.trim_end().trim_end_matches('.'),
    };
    let open = call.find('(')?;
    let name = &call[..open];
    // Declared names are lowercase; an inline call may capitalise the first letter.
    let action = actions.iter().find(|a| a.name.eq_ignore_ascii_case(name))?;
    let mut rest = call[open + 1..].strip_suffix(')')?;
    let mut args = Vec::with_capacity(action.params.len());
    for (p, param) in action.params.iter().enumerate() {
        if p > 0 {
            rest = rest.strip_prefix(", ")?;
        }
        rest = rest.strip_prefix(param.name.as_str())?.strip_prefix('=')?;
        let value = match &param.kind {
            ParamKind::OneOf(_) | ParamKind::Text { .. } => {
                let quoted = rest.strip_prefix('"')?;
                let end = quoted.find('"')?;
                let text = &quoted[..end];
                rest = &quoted[end + 1..];
                ActionValue::Text(text.to_owned())
            }
            ParamKind::Integer { .. } => {
                let end = rest
                    .char_indices()
                    .find(|&(at, c)| !(c.is_ascii_digit() || (at == 0 && c == '-')))
                    .map_or(rest.len(), |(at, _)| at);
                let number = rest[..end].parse::<i64>().ok()?;
                if rest[..end].len() > 1 && rest[..end].trim_start_matches('-').starts_with('0') {
                    return None;
                }
                rest = &rest[end..];
                ActionValue::Integer(number)
            }
        };
        if !value_fits(&param.kind, &value) {
            return None;
        }
        args.push((param.name.clone(), value));
    }
    rest.is_empty().then(|| ActionCall {
        name: action.name.clone(),
        args,
    })
}

/// Whether `value` is one `kind` allows.
#[must_use]
pub fn value_fits(kind: &ParamKind, value: &ActionValue) -> bool {
    match (kind, value) {
        (ParamKind::OneOf(choices), ActionValue::Text(text)) => choices.contains(text),
        (ParamKind::Integer { min, max }, ActionValue::Integer(n)) => (*min..=*max).contains(n),
        (ParamKind::Text { max_chars }, ActionValue::Text(text)) => {
            text.chars().count() <= *max_chars as usize && text.chars().all(allowed_in_text)
        }
        _ => false,
    }
}

/// Whether `call` names a declared action with every parameter in order and in type.
#[must_use]
pub fn call_is_declared(actions: &[ActionSpec], call: &ActionCall) -> bool {
    actions.iter().any(|action| {
        action.name == call.name
            && action.params.len() == call.args.len()
            && action
                .params
                .iter()
                .zip(&call.args)
                .all(|(param, (name, value))| param.name == *name && value_fits(&param.kind, value))
    })
}

/// The note the NPC reads before the player's next line, telling it what became of its
/// action.
#[must_use]
pub fn outcome_note(action: &ActionCall, approved: bool, reason: &str) -> String {
    let reason = reason.trim();
    match (approved, reason.is_empty()) {
        (true, true) => format!("(Your action {action} was done.)"),
        (true, false) => format!("(Your action {action} was done: {reason}.)"),
        (false, true) => format!("(Your action {action} was refused.)"),
        (false, false) => format!("(Your action {action} was refused: {reason}.)"),
    }
}

/// The actions part of an NPC's state in the worker.
#[derive(Debug, Default)]
pub(crate) struct NpcActions {
    /// The persona's declarations.
    pub(crate) specs: Vec<ActionSpec>,
    /// Their grammar, `None` without actions.
    pub(crate) grammar: Option<String>,
    /// Outcomes not yet told to the NPC; prefixed to its next line.
    pub(crate) notes: Vec<String>,
}

impl NpcActions {
    /// The player's line with any pending outcome notes before it (the notes are consumed).
    pub(crate) fn take_notes_into(&mut self, line: String) -> String {
        if self.notes.is_empty() {
            return line;
        }
        let mut text = self.notes.join(" ");
        self.notes.clear();
        text.push('\n');
        text.push_str(&line);
        text
    }
}

/// A reply's sampler: the persona's chain, held to the NPC's action grammar if it has one.
///
/// The grammar is checked against the token the chain picks, and applied to every candidate
/// only when it refuses that token, as llama.cpp's own common sampler does. Applied to all
/// 49,152 candidates of SmolLM2 before the chain, it had nearly halved the blacksmith's
/// generation speed (0.55× the same persona without actions on 2 CPU cores, 0.72× after: the
/// speed bench's `grammar` table). Greedy picks the same token either way (the best token the grammar
/// allows); seeded sampling keeps the chain's pick whenever the grammar allows it, so its
/// draws differ from filtering first. A token the grammar refuses is never accepted into it
/// (llama.cpp aborts on that).
///
/// When the chain can only pick among the best few tokens (it starts with top-k, or it is
/// greedy, either after a repeat penalty or not), it runs over just those: the `k` best, plus
/// one per token the penalty may push down (at most `repeat_last_n`), which holds every token
/// it would keep from the whole vocabulary. That saves passes of llama.cpp's samplers over
/// every vocabulary entry per token (151,936 for Qwen2.5).
pub(crate) struct ReplySampler {
    chain: llama_cpp_2::sampling::LlamaSampler,
    grammar: Option<llama_cpp_2::sampling::LlamaSampler>,
    /// How many of the best tokens the chain needs to see; `None`: all of them.
    candidates: Option<usize>,
    /// The candidate array, kept between tokens so that none is allocated per token.
    buffer: Vec<llama_cpp_2::token::data::LlamaTokenData>,
}

impl ReplySampler {
    /// `chain` held to `grammar` (GBNF with a `root` rule); without a grammar, `chain` as is.
    /// `candidates` is [`SamplingParams::candidates_needed`](crate::SamplingParams) for the
    /// settings `chain` was built from.
    pub(crate) fn new(
        model: &llama_cpp_2::model::LlamaModel,
        grammar: Option<&str>,
        chain: llama_cpp_2::sampling::LlamaSampler,
        candidates: Option<usize>,
    ) -> Self {
        use llama_cpp_2::sampling::LlamaSampler;
        let grammar = grammar.and_then(|grammar| {
            LlamaSampler::grammar(model, grammar, "root")
                .map_err(|err| {
                    // Checked when the persona was set; the parser still refuses anything
                    // undeclared.
                    tracing::error!("action grammar refused at reply time: {err}");
                })
                .ok()
        });
        Self {
            chain,
            grammar,
            candidates,
            buffer: Vec::with_capacity(candidates.unwrap_or(0)),
        }
    }

    /// Whether a pick passes the chain over every vocabulary entry (no bound on the
    /// candidates it needs), not over the best few.
    pub(crate) fn reads_every_logit(&self) -> bool {
        self.candidates.is_none()
    }

    /// Picks the next token from one batch entry's `logits` (one per vocabulary entry) and
    /// accepts it into the chain (and the grammar). `None` only if the grammar allows no
    /// token at all. It needs no context, so the NPCs of a step can sample on several
    /// threads.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> Option<llama_cpp_2::token::LlamaToken> {
        use llama_cpp_2::token::LlamaToken;
        use llama_cpp_2::token::data::LlamaTokenData;
        use llama_cpp_2::token::data_array::LlamaTokenDataArray;
        // Every token, into the kept buffer (as llama.cpp's own candidate array holds them).
        let every_token = |buffer: &mut Vec<LlamaTokenData>| {
            let mut data = std::mem::take(buffer);
            data.clear();
            data.extend(logits.iter().enumerate().map(|(id, &logit)| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
                LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)
            }));
            LlamaTokenDataArray::new(data, false)
        };
        let selected = |array: &LlamaTokenDataArray| {
            array
                .selected
                .and_then(|at| array.data.get(at))
                .filter(|data| data.logit().is_finite())
                .map(LlamaTokenData::id)
        };
        // The chain over the best candidates (or, without a bound, every token).
        let pick = |chain: &mut llama_cpp_2::sampling::LlamaSampler, buffer: &mut Vec<_>| {
            let mut array = match self.candidates {
                Some(k) => {
                    crate::logits::top_candidates(logits, k, buffer);
                    LlamaTokenDataArray::new(std::mem::take(buffer), false)
                }
                None => every_token(buffer),
            };
            array.apply_sampler(chain);
            let token = selected(&array);
            *buffer = array.data;
            token
        };
        let token = match self.grammar.as_mut() {
            None => pick(&mut self.chain, &mut self.buffer)?,
            Some(grammar) => {
                let allowed = |grammar: &mut _, token| {
                    let mut one =
                        LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
                    one.apply_sampler(grammar);
                    one.data[0].logit().is_finite()
                };
                match pick(&mut self.chain, &mut self.buffer) {
                    Some(token) if allowed(grammar, token) => token,
                    _ => {
                        // The grammar refused the chain's pick: filter every token, then pick.
                        let mut all = every_token(&mut self.buffer);
                        all.apply_sampler(grammar);
                        all.apply_sampler(&mut self.chain);
                        let token = selected(&all).filter(|&token| allowed(grammar, token));
                        self.buffer = all.data;
                        token?
                    }
                }
            }
        };
        self.chain.accept(token);
        if let Some(grammar) = self.grammar.as_mut() {
            grammar.accept(token);
        }
        Some(token)
    }
}

/// The stream filter for an NPC: the action part of a reply never streams. It starts at
/// [`ACTION_MARKER`], or where the model writes a declared call inline, without the marker
/// (`Very well. give_item(item="horseshoe")`, which small models often do): at the action's
/// name and its `(`, written as declared or with a capital first letter.
pub(crate) fn filter(actions: &NpcActions, filter: StopFilter) -> StopFilter {
    if actions.grammar.is_none() {
        return filter;
    }
    let mut markers = vec![ACTION_MARKER.to_owned()];
    for action in &actions.specs {
        let call = format!("{}(", action.name);
        let mut capital = call.clone();
        capital[..1].make_ascii_uppercase();
        markers.push(call);
        markers.push(capital);
    }
    filter.with_hidden_tail(markers)
}

/// What the conversation keeps of a reply: the text exactly as generated (`released`, then
/// the `hidden` action line, untrimmed), so the next prompt renders the tokens the NPC's KV
/// cache already holds and the NPC sees its own past actions. The game gets the trimmed
/// spoken text; trimming the stored turn would change the tokens and recompute the reply.
pub(crate) fn turn_text(released: &str, hidden: &str) -> String {
    format!("{released}{hidden}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ActionSpec> {
        vec![
            ActionSpec {
                name: "give_item".into(),
                description: "Hand over an item.".into(),
                params: vec![ParamSpec {
                    name: "item".into(),
                    kind: ParamKind::OneOf(vec!["horseshoe".into(), "iron sword".into()]),
                }],
            },
            ActionSpec {
                name: "open_gate".into(),
                description: String::new(),
                params: vec![],
            },
            ActionSpec {
                name: "set_price".into(),
                description: String::new(),
                params: vec![
                    ParamSpec {
                        name: "gold".into(),
                        kind: ParamKind::Integer { min: 1, max: 500 },
                    },
                    ParamSpec {
                        name: "note".into(),
                        kind: ParamKind::Text { max_chars: 10 },
                    },
                ],
            },
        ]
    }

    fn matches(patterns: &[(bool, Vec<DigitClass>)], n: i64) -> bool {
        let text = n.unsigned_abs().to_string();
        patterns.iter().any(|(negative, pattern)| {
            *negative == (n < 0)
                && pattern.len() == text.len()
                && pattern
                    .iter()
                    .zip(text.bytes())
                    .all(|(&(low, high), d)| (low..=high).contains(&(d - b'0')))
        })
    }

    #[test]
    fn integer_patterns_match_exactly_the_range() {
        let ranges = [
            (0, 0),
            (0, 9),
            (1, 500),
            (7, 7),
            (10, 99),
            (13, 1234),
            (99, 101),
            (-40, 25),
            (-300, -12),
            (-9, 0),
            (250, 10_000),
        ];
        for (min, max) in ranges {
            let patterns = integer_patterns(min, max);
            for n in -12_000..=12_000 {
                assert_eq!(
                    matches(&patterns, n),
                    (min..=max).contains(&n),
                    "{n} in {min}..={max}: {patterns:?}"
                );
            }
        }
    }

    #[test]
    fn an_inline_call_is_hidden_from_the_stream_like_a_marked_one() {
        let actions = NpcActions {
            specs: specs(),
            grammar: action_grammar(&specs()),
            notes: Vec::new(),
        };
        for reply in [
            "Very well. give_item(item=\"horseshoe\")",
            "Very well. Give_item(item=\"horseshoe\")",
            "Very well. \n[ACTION] give_item(item=\"horseshoe\")",
        ] {
            let mut stream = filter(&actions, StopFilter::new(Vec::new()));
            let mut shown = String::new();
            // Token-sized pieces, so markers arrive split.
            for piece in reply.as_bytes().chunks(3) {
                shown.push_str(&stream.push(piece).0);
            }
            shown.push_str(&stream.finish());
            assert_eq!(shown.trim(), "Very well.", "{reply:?}");
            let call = parse_action(&actions.specs, stream.hidden()).unwrap();
            assert_eq!(call.text_arg("item"), Some("horseshoe"));
        }
    }

    #[test]
    fn parse_accepts_declared_calls_and_nothing_else() {
        let specs = specs();
        let call = parse_action(&specs, "\n[ACTION] give_item(item=\"iron sword\")").unwrap();
        assert_eq!(call.text_arg("item"), Some("iron sword"));
        assert_eq!(call.to_string(), "give_item(item=\"iron sword\")");
        let call = parse_action(&specs, "\n[ACTION] set_price(gold=500, note=\"deal\")").unwrap();
        assert_eq!(call.integer_arg("gold"), Some(500));
        assert!(parse_action(&specs, "\n[ACTION] open_gate()").is_some());
        // Written inline, without the marker, as small models do.
        let inline = parse_action(&specs, "Give_item(item=\"horseshoe\").").unwrap();
        assert_eq!(inline.text_arg("item"), Some("horseshoe"));
        assert!(parse_action(&specs, "give_item(item=\"anvil\")").is_none());
        for bad in [
            "\n[ACTION] give_item(item=\"gold\")",
            "\n[ACTION] open_vault()",
            "\n[ACTION] set_price(gold=1000, note=\"x\")",
            "\n[ACTION] set_price(gold=0, note=\"x\")",
            "\n[ACTION] set_price(gold=050, note=\"x\")",
            "\n[ACTION] set_price(gold=5, note=\"far too long\")",
            "\n[ACTION] set_price(note=\"x\", gold=5)",
            "\n[ACTION] give_item(item=\"horseshoe\")give_item(item=\"horseshoe\")",
            "\n[ACTION] give_item(item=\"horseshoe\"",
            "\n[ACTION] open_gate(",
            "[ACTION] open_gate()",
            "",
        ] {
            assert_eq!(parse_action(&specs, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn validation_rejects_bad_declarations_with_clear_messages() {
        type Edit = Box<dyn Fn(&mut Vec<ActionSpec>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s[0].name = "Give Item".into()), "lowercase"),
            (Box::new(|s| s[0].name = String::new()), "empty"),
            (Box::new(|s| s[0].name = "a\"b".into()), "may only hold"),
            (
                Box::new(|s| s[1].name = "give_item".into()),
                "declared twice",
            ),
            (
                Box::new(|s| s[0].params[0].kind = ParamKind::OneOf(vec![])),
                "at least one choice",
            ),
            (
                Box::new(|s| s[0].params[0].kind = ParamKind::OneOf(vec!["a\"b".into()])),
                "quotes",
            ),
            (
                Box::new(|s| s[0].params[0].kind = ParamKind::OneOf(vec!["a\nb".into()])),
                "control",
            ),
            (
                Box::new(|s| s[2].params[0].kind = ParamKind::Integer { min: 5, max: 1 }),
                "is empty",
            ),
            (
                Box::new(|s| s[2].params[1].kind = ParamKind::Text { max_chars: 0 }),
                "max_chars",
            ),
            (
                Box::new(|s| s[2].params[1].name = "gold".into()),
                "declared twice",
            ),
        ];
        for (edit, expected) in cases {
            let mut bad = specs();
            edit(&mut bad);
            let err = validate_actions(&bad).unwrap_err();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
        assert_eq!(validate_actions(&specs()), Ok(()));
    }

    #[test]
    fn grammar_names_rules_itself_and_escapes_every_literal() {
        let grammar = action_grammar(&specs()).unwrap();
        assert!(
            grammar.starts_with("root ::= speech action?\n"),
            "{grammar}"
        );
        assert!(grammar.contains("a0p0 ::= \"\\\"horseshoe\\\"\" | \"\\\"iron sword\\\"\""));
        assert!(grammar.contains("a1 ::= \"open_gate(\" \")\""), "{grammar}");
        assert_eq!(action_grammar(&[]), None);
        assert_eq!(gbnf_literal("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\x01\"");
    }

    #[test]
    fn prompt_lists_every_action_with_an_example() {
        let prompt = actions_prompt(&specs());
        assert!(
            prompt.contains("[ACTION] give_item(item=\"horseshoe\")"),
            "{prompt}"
        );
        assert!(prompt.contains("- open_gate()"), "{prompt}");
        assert!(prompt.contains("gold=a number from 1 to 500"), "{prompt}");
        assert!(actions_prompt(&[]).is_empty());
    }

    #[test]
    fn notes_go_before_the_next_line_once() {
        let mut state = NpcActions::default();
        let call = parse_action(&specs(), "\n[ACTION] open_gate()").unwrap();
        state
            .notes
            .push(outcome_note(&call, false, "it is already open"));
        let line = state.take_notes_into("Thanks.".into());
        assert_eq!(
            line,
            "(Your action open_gate() was refused: it is already open.)\nThanks."
        );
        assert_eq!(state.take_notes_into("Bye.".into()), "Bye.");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A call of one of [`specs`]'s actions with values that fit, and its line.
        fn declared_call() -> impl Strategy<Value = (ActionCall, String)> {
            prop_oneof![
                prop_oneof![Just("horseshoe"), Just("iron sword")].prop_map(|item| {
                    (
                        ActionCall {
                            name: "give_item".into(),
                            args: vec![("item".into(), ActionValue::Text(item.into()))],
                        },
                        format!("give_item(item=\"{item}\")"),
                    )
                }),
                Just((
                    ActionCall {
                        name: "open_gate".into(),
                        args: Vec::new(),
                    },
                    "open_gate()".to_owned(),
                )),
                (1i64..=500, "[a-z ]{0,10}").prop_map(|(gold, note)| {
                    (
                        ActionCall {
                            name: "set_price".into(),
                            args: vec![
                                ("gold".into(), ActionValue::Integer(gold)),
                                ("note".into(), ActionValue::Text(note.clone())),
                            ],
                        },
                        format!("set_price(gold={gold}, note=\"{note}\")"),
                    )
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn whatever_the_model_writes_only_a_declared_call_comes_out(
                tail in "(\n\\[ACTION\\] )?[a-zA-Z_]{0,12}\\(?[a-z_=\", 0-9-]{0,30}\\)?\\.?",
                noise in ".{0,40}",
            ) {
                for text in [tail.clone(), format!("{ACTION_MARKER}{noise}"), noise.clone()] {
                    if let Some(call) = parse_action(&specs(), &text) {
                        prop_assert!(call_is_declared(&specs(), &call), "{:?} from {:?}", call, text);
                    }
                }
            }

            #[test]
            fn a_declared_call_reads_back_marked_or_inline(
                (call, line) in declared_call(),
                cut in any::<proptest::sample::Index>(),
            ) {
                let marked = format!("{ACTION_MARKER}{line}");
                prop_assert_eq!(parse_action(&specs(), &marked), Some(call.clone()));
                prop_assert_eq!(parse_action(&specs(), &format!("{line}.")), Some(call));
                // Cut short (the token limit): no action, never a different one.
                let cut = cut.index(marked.len());
                if marked.is_char_boundary(cut) && cut < marked.len() {
                    prop_assert_eq!(parse_action(&specs(), &marked[..cut]), None);
                }
            }
        }
    }
}
