//! The configuration parser over generated files: every key given good, odd and bad values. It never
//! panics; a refusal names a key of the file and says why; an accepted file prints (`check`) as TOML
//! that parses back to the same configuration.

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use streamgate::proxy::Config;

/// Values for each kind of key: good ones, then odd and bad ones.
type Values = (&'static [&'static str], &'static [&'static str]);

const DURATIONS: Values = (
    &["\"250ms\"", "\"15s\"", "\"5m\"", "\"2h\"", "\"1ns\""],
    &[
        "\"0s\"",
        "\"off\"",
        "\"-1s\"",
        "\"5 parsecs\"",
        "\"\"",
        "5",
        "true",
        "\"18446744073709551615s\"",
    ],
);
const KEEPALIVE: Values = (&["\"15s\"", "\"off\"", "\"1s\""], &["\"0s\"", "\"x\"", "1"]);
const COUNTS: Values = (
    &["1", "3", "10000"],
    &[
        "0",
        "-1",
        "4294967296",
        "18446744073709551616",
        "1.5",
        "\"3\"",
        "true",
    ],
);
const WINDOWS: Values = (
    &["64", "256", "16384"],
    &["63", "0", "-1", "16385", "4294967296", "1.5", "\"64\""],
);
const ADDRS: Values = (
    &["\"127.0.0.1:0\"", "\"[::1]:8080\"", "\"0.0.0.0:8080\""],
    &[
        "\"localhost:80\"",
        "\"127.0.0.1\"",
        "\"127.0.0.1:99999\"",
        "\"\"",
        "80",
    ],
);
const ENDPOINTS: Values = (
    &[
        "[\"http://127.0.0.1:9000\"]",
        "[\"https://api.example.com\"]",
        "[\"http://[::1]:80\", \"http://10.0.0.6:8000\"]",
    ],
    &[
        "[]",
        "[\"ftp://x\"]",
        "[\"http://\"]",
        "[\"127.0.0.1:9000\"]",
        "[\"http://a:99999\"]",
        "[\"http://a/b\"]",
        "[\"http://user@a\"]",
        "\"http://127.0.0.1:9000\"",
    ],
);
const BALANCE: Values = (
    &["\"round_robin\"", "\"least_streams\""],
    &["\"bogus\"", "\"\"", "1"],
);
const PROTOCOL: Values = (
    &["\"auto\"", "\"http1\"", "\"http2\""],
    &["\"h3\"", "\"\"", "2"],
);
const OTLP_PROTOCOL: Values = (&["\"http\"", "\"grpc\""], &["\"udp\"", "1"]);
const HOST_HEADER: Values = (
    &["\"upstream\"", "\"preserve\"", "\"example.com\""],
    &["\"\"", "\"a b\"", "\"a\\r\\nb\"", "1"],
);
const HOSTS: Values = (
    &["\"example.com\"", "\"a.internal\""],
    &["\"\"", "\"a b\"", "1"],
);
const PATHS: Values = (
    &["\"/\"", "\"/v1/\"", "\"/v1\""],
    &["\"v1\"", "\"\"", "\"/a b\"", "1"],
);
const URLS: Values = (
    &["\"http://127.0.0.1:4318\"", "\"https://otel.example.com\""],
    &["\"127.0.0.1:4318\"", "\"\"", "\"nope\""],
);
const NDJSON: Values = (&["'{\"type\":\"keepalive\"}'"], &["\"\"", "\"a\\nb\"", "5"]);
const POOLS: Values = (&["\"llm\""], &["\"missing\"", "\"\"", "1"]);

/// The keys of a file, each with the values it may take and whether a file always has it.
fn keys() -> Vec<(&'static str, Values, bool)> {
    vec![
        ("defaults.idle_timeout", DURATIONS, false),
        ("defaults.keepalive_interval", KEEPALIVE, false),
        ("defaults.first_byte_timeout", DURATIONS, false),
        ("defaults.ndjson_keepalive", NDJSON, false),
        ("server.drain_timeout", DURATIONS, false),
        ("server.client_idle_timeout", DURATIONS, false),
        ("server.send_timeout", DURATIONS, false),
        ("server.max_streams", COUNTS, false),
        ("server.workers", COUNTS, false),
        ("server.metrics_listen", ADDRS, false),
        ("telemetry.otlp_endpoint", URLS, false),
        ("telemetry.otlp_protocol", OTLP_PROTOCOL, false),
        ("listener.listen", ADDRS, true),
        ("pool.endpoints", ENDPOINTS, true),
        ("pool.balance", BALANCE, false),
        ("pool.protocol", PROTOCOL, false),
        ("pool.max_fails", COUNTS, false),
        ("pool.ejection_time", DURATIONS, false),
        ("pool.max_attempts", COUNTS, false),
        ("pool.h2_stream_window_kib", WINDOWS, false),
        ("route.path_prefix", PATHS, false),
        ("route.pool", POOLS, true),
        ("route.idle_timeout", DURATIONS, false),
        ("route.host", HOSTS, false),
        ("route.host_header", HOST_HEADER, false),
    ]
}

/// One key's draw: whether it is in the file, whether its value is a bad one, and which.
type Draw = (bool, bool, prop::sample::Index);

/// The full name of a key of [`keys`], as errors name it.
fn full_name(key: &str) -> String {
    let (section, name) = key.split_once('.').unwrap();
    match section {
        "listener" => format!("listeners[0].{name}"),
        "pool" => format!("pools.llm.{name}"),
        "route" => format!("routes[0].{name}"),
        _ => key.to_string(),
    }
}

/// The full names of the keys a file of these draws has.
fn written(draws: &[Draw]) -> Vec<String> {
    keys()
        .into_iter()
        .zip(draws)
        .filter(|((_, _, always), (present, _, _))| *always || *present)
        .map(|((key, _, _), _)| full_name(key))
        .collect()
}

/// A file of the keys as drawn.
fn file(draws: &[Draw]) -> String {
    let mut sections: Vec<(&str, Vec<String>)> = vec![
        ("[defaults]", vec![]),
        ("[server]", vec![]),
        ("[telemetry]", vec![]),
        ("[[listeners]]", vec![]),
        ("[pools.llm]", vec![]),
        ("[[routes]]", vec![]),
    ];
    for ((key, (good, bad), always), (present, is_bad, pick)) in keys().into_iter().zip(draws) {
        if !(always || *present) {
            continue;
        }
        let values = if *is_bad { bad } else { good };
        let (section, name) = key.split_once('.').unwrap();
        let at = match section {
            "defaults" => 0,
            "server" => 1,
            "telemetry" => 2,
            "listener" => 3,
            "pool" => 4,
            _ => 5,
        };
        sections[at]
            .1
            .push(format!("{name} = {}", values[pick.index(values.len())]));
    }
    let mut text = String::new();
    for (header, lines) in sections {
        text.push_str(header);
        text.push('\n');
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
    }
    text
}

#[test]
fn generated_files_are_refused_by_key_or_accepted_and_round_trip() {
    let n = keys().len();
    // Each key in the file half the time, with a bad value one time in twenty-five: about two files
    // in five have none, so acceptance and refusal both get exercised.
    let draw = (
        any::<bool>(),
        prop::bool::weighted(0.04),
        any::<prop::sample::Index>(),
    );
    let strategy = prop::collection::vec(draw, n);
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let mut runner = TestRunner::new(RunnerConfig::with_cases(3000));
    runner
        .run(&strategy, |draws| {
            let text = file(&draws);
            match Config::from_toml(&text) {
                Ok(cfg) => {
                    accepted.set(accepted.get() + 1);
                    let printed = cfg.to_toml();
                    let again = Config::from_toml(&printed).map_err(|e| {
                        TestCaseError::fail(format!("{e}\nprinted:\n{printed}\nfrom:\n{text}"))
                    })?;
                    prop_assert_eq!(&again, &cfg, "printed:\n{}\nfrom:\n{}", printed, text);
                }
                Err(e) => {
                    refused.set(refused.get() + 1);
                    let shown = e.to_string();
                    // The key is one the file has (an endpoint's error names its index too).
                    let key = e.key();
                    prop_assert!(
                        written(&draws).iter().any(|w| key == w
                            || key
                                .strip_prefix(w.as_str())
                                .is_some_and(|rest| rest.starts_with('['))),
                        "{} names a key not in the file:\n{}",
                        shown,
                        text
                    );
                    prop_assert!(!e.reason().is_empty(), "{} from:\n{}", shown, text);
                    prop_assert!(shown.contains(e.key()), "{}", shown);
                }
            }
            Ok(())
        })
        .unwrap();
    // Both outcomes are exercised, not only one.
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted >= 30 && refused >= 30,
        "{accepted} accepted, {refused} refused"
    );
}
