//! The embedded default corpus: synthetic English-like stories generated from a seed, so
//! `routelm demo` needs no download and every run sees the same text.
//!
//! The text is built so that tokens differ sharply in how hard they are to predict:
//! - **template words** ("Once upon a time there was", "went to the market") repeat in
//!   every story and are trivially predictable;
//! - **names and facts** (a made-up name, a city, a pet's name) are drawn fresh for each
//!   story from syllables, so they cannot be memorised: after their first mention they
//!   must be *recalled* from earlier in the sequence;
//! - **arithmetic answers** ("17 plus 25 is 42") must be *computed* from the operands.
//!
//! Later routing experiments (MoE, MoD) use this to show whether routers spend compute on
//! the hard tokens.

use crate::rng::Rng;

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ren", "dar", "vel", "su", "tor", "ba", "ni", "zel", "or", "fa", "quin",
    "ma", "ris", "te", "gon", "li", "ve", "sha", "ko", "den", "ut",
];
const ANIMALS: &[&str] = &[
    "cat", "dog", "goat", "parrot", "horse", "owl", "rabbit", "fox",
];
const ITEMS: &[&str] = &[
    "apples", "coins", "books", "stones", "shells", "cakes", "ribbons",
];
const PLACES: &[&str] = &["market", "river", "mill", "garden", "harbour", "library"];

fn word(rng: &mut Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(SYLLABLES[rng.below(SYLLABLES.len())]);
    }
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => w,
    }
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len())]
}

/// One story: introduces facts, uses templates, asks for sums and recalls the facts.
fn story(rng: &mut Rng, out: &mut String) {
    let name = word(rng, 2);
    let city = word(rng, 3);
    let pet = word(rng, 2);
    let animal = pick(rng, ANIMALS);
    let item = pick(rng, ITEMS);
    let place = pick(rng, PLACES);
    out.push_str(&format!(
        "Once upon a time there was a person named {name} who lived in the town of {city}. "
    ));
    out.push_str(&format!("{name} had a pet {animal} called {pet}. "));
    for _ in 0..1 + rng.below(3) {
        let (a, b) = (rng.below(50), rng.below(50));
        out.push_str(&format!(
            "Every morning {name} went to the {place} and came back with {a} {item}. "
        ));
        out.push_str(&format!(
            "One day {name} had {a} {item} and found {b} more, so {a} plus {b} is {}. ",
            a + b
        ));
    }
    match rng.below(3) {
        0 => out.push_str(&format!("Where did {name} live? {name} lived in {city}. ")),
        1 => out.push_str(&format!(
            "What was the name of the {animal}? It was called {pet}. "
        )),
        _ => out.push_str(&format!(
            "Who owned {pet}? {pet} belonged to {name} of {city}. "
        )),
    }
    out.push_str("The end.\n");
}

/// Generate about `n_bytes` of text deterministically from `seed`.
pub fn generate(seed: u64, n_bytes: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(n_bytes + 512);
    while out.len() < n_bytes {
        story(&mut rng, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_arithmetic_is_right() {
        let a = generate(7, 20_000);
        assert_eq!(a, generate(7, 20_000));
        assert_ne!(a, generate(8, 20_000));
        // every "x plus y is z" is correct
        let mut checked = 0;
        for s in a.split(", so ").skip(1) {
            let w: Vec<&str> = s.split_whitespace().collect();
            let (x, y, z): (usize, usize, usize) = (
                w[0].parse().unwrap(),
                w[2].parse().unwrap(),
                w[4].trim_end_matches('.').parse().unwrap(),
            );
            assert_eq!(x + y, z);
            checked += 1;
        }
        assert!(checked > 50);
    }
}
