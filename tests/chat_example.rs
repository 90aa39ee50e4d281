//! The demo (`cargo xtask demo`: the chat example with the blacksmith) on the default model,
//! as a player uses it: lines typed on stdin, the replies and their statistics on stdout.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn the_demo_answers_from_the_persona_and_reuses_its_cache() {
    let _serial = common::serial();
    // The default model must be there (the binary finds it in the project's assets).
    common::default_model_path();
    let mut child = Command::new(common::example_binary("chat"))
        .args([
            "--persona",
            "assets/personas/blacksmith.persona.ron",
            "--seed",
            "7",
        ])
        .current_dir(common::root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the chat example");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "How much is an iron sword?").unwrap();
    writeln!(stdin, "And who is your apprentice?").unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "{stderr}");
    let replies: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("> Brom Ironhand: "))
        .collect();
    assert_eq!(replies.len(), 2, "{stdout}");
    assert!(
        replies[0].contains("40"),
        "the sword costs 40 gold: {replies:?}"
    );
    assert!(
        replies[1].contains("Pip"),
        "the apprentice is Pip: {replies:?}"
    );
    // Each reply ends with its statistics; the second turn reuses the first one's tokens.
    let stats: Vec<&str> = stdout
        .lines()
        .filter(|line| line.contains("prompt tokens cached]"))
        .collect();
    assert_eq!(stats.len(), 2, "{stdout}");
    let cached = |line: &str| -> (usize, usize) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "of").unwrap();
        (
            words[at - 1].parse().unwrap(),
            words[at + 1].parse().unwrap(),
        )
    };
    let (reused, prompt) = cached(stats[1]);
    assert!(
        reused * 10 >= prompt * 8,
        "the second turn reuses most of its prompt: {}",
        stats[1]
    );
    assert!(
        stderr.contains(npc_native::catalog::DEFAULT_MODEL.file_name),
        "it ran the default model: {stderr}"
    );
}
