//! The binary's command line: config errors exit 2 naming key, value and reason; `check` prints the
//! effective configuration; the proxy runs from flags alone and exits 0 on SIGTERM.

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_streamgate");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run streamgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("streamgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_values_exit_2_naming_key_value_and_reason() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[
                "check",
                "--listen",
                "127.0.0.1:8080",
                "--upstream",
                "ftp://x",
            ],
            &["--upstream", "ftp://x", "scheme"],
        ),
        (
            &["check", "--listen", "localhost", "--upstream", "http://x"],
            &["--listen", "localhost", "socket address"],
        ),
        (
            &[
                "check",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "http://x",
                "--idle-timeout",
                "forever",
            ],
            &["--idle-timeout", "forever", "not a duration"],
        ),
        (
            &[
                "check",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "http://x",
                "--max-streams",
                "-3",
            ],
            &["--max-streams", "-3"],
        ),
        (
            &[
                "check",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "http://x",
                "--workers",
                "0",
            ],
            &["--workers", "0", "between 1 and 1024"],
        ),
        (
            &["check", "--config", "/nonexistent/streamgate.toml"],
            &["--config", "/nonexistent/streamgate.toml", "cannot read"],
        ),
        (&["check"], &["listen", "no listener"]),
    ];
    for (args, needles) in cases {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
        }
        assert_eq!(err.lines().count(), 1, "one message: {err}");
    }
}

#[test]
fn unknown_keys_in_the_file_are_errors() {
    let p = write(
        "unknown.toml",
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.a]\nendpoints = [\"http://127.0.0.1:1\"]\nbalanse = \"least_streams\"\n[[routes]]\npool = \"a\"\n",
    );
    let (code, _, err) = run(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pools.a.balanse"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[test]
fn check_prints_the_effective_config_with_flags_over_the_file() {
    let p = write(
        "ok.toml",
        "[defaults]\nidle_timeout = \"2m\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.a]\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\npool = \"a\"\n",
    );
    let (code, out, err) = run(&[
        "check",
        "--config",
        p.to_str().unwrap(),
        "--keepalive-interval",
        "5s",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("idle_timeout = \"2m\""), "{out}");
    assert!(out.contains("keepalive_interval = \"5s\""), "{out}");
    assert!(err.contains("valid"));
}

#[test]
fn runs_from_flags_and_exits_0_on_sigterm() {
    // Pick a free port, then hand it to the binary.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{mport}");
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            &listen,
            "--upstream",
            "http://127.0.0.1:9",
            "--metrics-listen",
            &metrics,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it accepts (bounded), then ask for a 502 from the dead upstream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stream = loop {
        match std::net::TcpStream::connect(&listen) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("proxy never listened: {e}"),
        }
    };
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains("{\"error\":{"), "{resp}");
    // The binary serves Prometheus text with the stream metrics and the upstream error it just saw.
    let mut m = std::net::TcpStream::connect(&metrics).unwrap();
    m.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("streamgate_upstream_errors_total{endpoint=\"http://127.0.0.1:9\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE streamgate_time_to_first_byte_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("streamgate_streams_active"), "{text}");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
