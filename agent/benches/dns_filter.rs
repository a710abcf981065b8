//! DNS filter benchmark: what an upload of a large block list costs the agent. A
//! program that prints figures (`cargo bench -p netpilot-agent --bench dns_filter`);
//! it never asserts on timing.
//!
//! The list is 100,000 generated names that look like real ones (two or three
//! syllable-built labels under common TLDs), plus a few thousand subdomains of them
//! (which the compiler must fold into their parents), some as hosts-file lines and
//! some with comments. Each round parses it as an upload would (`parse_text`) and
//! compiles it with the built-in categories, the DoH names and an allow list whose
//! entries partly lie inside blocked names (`compile`). Figures are medians over the
//! rounds, with min and max. Built with the release profile, i.e. `opt-level = "z"`
//! as on the router.

use std::fmt::Write;
use std::time::{Duration, Instant};

use netpilot_agent::dns::categories::{builtin_doh, BUILTIN, USE_APPLICATION_DNS};
use netpilot_agent::dns::domain::{normalize, Domain};
use netpilot_agent::dns::list::parse_text;
use netpilot_agent::dns::servers_file::compile;
use netpilot_testkit::XorShift;

const DOMAINS: usize = 100_000;
const SUBDOMAINS: usize = 5_000;
const ALLOWED: usize = 2_000;
const ROUNDS: usize = 15;

const SYLLABLES: &[&str] = &[
    "ad", "an", "ar", "ba", "be", "bo", "ca", "cdn", "co", "da", "de", "di", "do", "el", "en",
    "fa", "fi", "ga", "go", "ha", "in", "io", "ka", "ki", "la", "le", "li", "lo", "ma", "me", "mi",
    "mo", "na", "ne", "no", "on", "pa", "pi", "pro", "ra", "re", "ri", "ro", "sa", "se", "si",
    "so", "ta", "te", "ti", "to", "tra", "tu", "un", "va", "ve", "vi", "web", "xo", "za",
];
const TLDS: &[&str] = &[
    "com", "com", "com", "com", "net", "net", "org", "io", "de", "ru", "co.uk", "fr", "info",
    "xyz", "top", "online", "site", "com.br", "jp", "nl",
];
const SUB: &[&str] = &[
    "ads", "cdn", "track", "pixel", "stats", "m", "api", "img", "static",
];

fn label(rng: &mut XorShift) -> String {
    let n = 2 + rng.next_u64() % 3;
    let mut s: String = (0..n).map(|_| *rng.pick(SYLLABLES)).collect();
    if rng.next_u64() % 8 == 0 {
        let _ = write!(s, "-{}", rng.pick(SYLLABLES));
    }
    if rng.next_u64() % 10 == 0 {
        let _ = write!(s, "{}", rng.next_u64() % 100);
    }
    s
}

/// The upload body, and the names generated (for picking allowed entries).
fn generate() -> (String, Vec<String>) {
    let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
    let mut names = Vec::with_capacity(DOMAINS);
    for _ in 0..DOMAINS {
        let name = if rng.next_u64() % 4 == 0 {
            format!("{}.{}.{}", label(&mut rng), label(&mut rng), rng.pick(TLDS))
        } else {
            format!("{}.{}", label(&mut rng), rng.pick(TLDS))
        };
        names.push(name);
    }
    let mut body = String::from("# generated block list\n\n");
    for (i, name) in names.iter().enumerate() {
        match i % 10 {
            0 => {
                let _ = writeln!(body, "0.0.0.0 {name}");
            }
            1 => {
                let _ = writeln!(body, "{name} # tracker");
            }
            2 => {
                let _ = writeln!(body, "||{name}^");
            }
            _ => {
                let _ = writeln!(body, "{name}");
            }
        }
    }
    for _ in 0..SUBDOMAINS {
        let parent = &names[(rng.next_u64() % DOMAINS as u64) as usize];
        let _ = writeln!(body, "{}.{parent}", rng.pick(SUB));
    }
    (body, names)
}

fn stats(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:7.1} ms  (min {:.1}, max {:.1})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    )
}

fn main() {
    let (body, names) = generate();
    let mut rng = XorShift::new(7);
    // Half inside a blocked name (each needs a `#` line), half equal to one.
    let allowed: Vec<Domain> = (0..ALLOWED)
        .map(|i| {
            let parent = &names[(rng.next_u64() % DOMAINS as u64) as usize];
            let name = if i % 2 == 0 {
                format!("ok.{parent}")
            } else {
                parent.clone()
            };
            normalize(&name).expect("generated names are valid")
        })
        .collect();
    let categories: Vec<Vec<Domain>> = BUILTIN.iter().map(|b| b.domains()).collect();
    let mut doh = builtin_doh().names;
    doh.push(normalize(USE_APPLICATION_DNS).expect("a valid name"));

    let (mut parse, mut build, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let list = parse_text(&body);
        let parsed = Instant::now();
        let mut blocked: Vec<&[Domain]> = categories.iter().map(Vec::as_slice).collect();
        blocked.push(&list.domains);
        blocked.push(&doh);
        let file = compile(&blocked, &allowed);
        let done = Instant::now();
        parse.push(parsed - start);
        build.push(done - parsed);
        total.push(done - start);
        last = Some((list, file));
    }
    let (list, file) = last.expect("at least one round");
    assert_eq!(list.error_count, 0, "{:?}", list.errors);
    println!(
        "input: {} lines, {} bytes: {} names ({} duplicates), {} allowed, {} category and DoH names",
        body.lines().count(),
        body.len(),
        list.domains.len(),
        list.duplicates,
        allowed.len(),
        categories.iter().map(Vec::len).sum::<usize>() + doh.len()
    );
    println!(
        "output: {} bytes, {} blocked lines, {} allowed lines",
        file.text.len(),
        file.blocked,
        file.allowed
    );
    println!("{ROUNDS} rounds:");
    println!("  parse_text          {}", stats(parse));
    println!("  compile             {}", stats(build));
    println!("  parse_text+compile  {}", stats(total));
}
