//! Rendering of the mock's events: OpenAI chunks and plain test events, as SSE or NDJSON.
//!
//! Events are written by hand into a reused buffer (no `serde_json::Value` per token); the only
//! request-controlled string, the model name, is escaped once per request.

use std::fmt::Write as _;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use super::LineEnding;

/// The text the mock "generates", one word per token, cycled.
pub(crate) const WORDS: &[&str] = &[
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet,",
    "consectetur",
    "adipiscing",
    "elit,",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
    "Ut",
    "enim",
    "ad",
    "minim",
    "veniam,",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "ut",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat.",
    "Duis",
    "aute",
    "irure",
    "dolor",
    "in",
    "reprehenderit",
    "in",
    "voluptate",
    "velit",
    "esse",
    "cillum",
    "dolore",
    "eu",
    "fugiat",
    "nulla",
    "pariatur.",
    "Excepteur",
    "sint",
    "occaecat",
    "cupidatat",
    "non",
    "proident,",
    "sunt",
    "in",
    "culpa",
    "qui",
    "officia",
    "deserunt",
    "mollit",
    "anim",
    "id",
    "est",
    "laborum.",
];

/// Token `i` (0-based): a word, with a leading space after the first.
pub(crate) fn token_text(i: usize) -> (&'static str, &'static str) {
    let sep = if i == 0 { "" } else { " " };
    (sep, WORDS[i % WORDS.len()])
}

/// The whole text of `n` tokens, as the non-streaming answer carries it.
pub(crate) fn full_text(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let (sep, w) = token_text(i);
        s.push_str(sep);
        s.push_str(w);
    }
    s
}

/// Which API's objects to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completions,
    /// `{"index":N,"token":"..."}` test events.
    Plain,
}

/// Everything needed to render one response's events.
#[derive(Debug)]
pub(crate) struct Renderer {
    pub(crate) api: Api,
    pub(crate) ndjson: bool,
    pub(crate) line_ending: LineEnding,
    /// `chatcmpl-...` / `cmpl-...`.
    pub(crate) id: String,
    /// The model name as a JSON string literal, quotes included.
    pub(crate) model_json: String,
    pub(crate) created: u64,
    pub(crate) include_usage: bool,
    pub(crate) emit_time: bool,
    pub(crate) chunk_bytes: usize,
    pub(crate) prompt_tokens: u64,
    pub(crate) finish_reason: &'static str,
    /// Scratch for the part of a token event after its text, so padding can go in between.
    tail: BytesMut,
}

impl Renderer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        api: Api,
        ndjson: bool,
        line_ending: LineEnding,
        id: String,
        model: &str,
        created: u64,
        include_usage: bool,
        emit_time: bool,
        chunk_bytes: usize,
        prompt_tokens: u64,
        finish_reason: &'static str,
    ) -> Self {
        Self {
            api,
            ndjson,
            line_ending,
            id,
            model_json: serde_json::to_string(model).expect("a string serialises"),
            created,
            include_usage,
            emit_time,
            chunk_bytes,
            prompt_tokens,
            finish_reason,
            tail: BytesMut::new(),
        }
    }

    /// Render token event `i` into `buf` and split it off.
    pub(crate) fn token(&mut self, buf: &mut BytesMut, i: usize, now: Instant) -> Bytes {
        let (sep, word) = token_text(i);
        let start = buf.len();
        // Plain test events carry an SSE `id:` (useful for Last-Event-ID tests); OpenAI chunks do not.
        self.open_record(buf, (self.api == Api::Plain).then_some(i));
        match self.api {
            Api::Chat => {
                self.chunk_head(buf, "chat.completion.chunk");
                buf.put_slice(br#","choices":[{"index":0,"delta":{"#);
                if i == 0 {
                    buf.put_slice(br#""role":"assistant","#);
                }
                buf.put_slice(br#""content":""#);
            }
            Api::Completions => {
                self.chunk_head(buf, "text_completion");
                buf.put_slice(br#","choices":[{"text":""#);
            }
            Api::Plain => {
                let _ = write!(buf, r#"{{"index":{i},"token":""#);
            }
        }
        buf.put_slice(sep.as_bytes());
        buf.put_slice(word.as_bytes());

        let mut tail = std::mem::take(&mut self.tail);
        tail.clear();
        match self.api {
            Api::Chat => {
                tail.put_slice(br#""},"logprobs":null,"finish_reason":null}]"#);
                if self.include_usage {
                    tail.put_slice(br#","usage":null"#);
                }
            }
            Api::Completions => {
                tail.put_slice(br#"","index":0,"logprobs":null,"finish_reason":null}]"#);
            }
            Api::Plain => tail.put_slice(b"\""),
        }
        self.emit_fields(&mut tail, now);
        tail.put_u8(b'}');
        self.close_record(&mut tail);

        let have = buf.len() - start + tail.len();
        if have < self.chunk_bytes {
            buf.put_bytes(b'.', self.chunk_bytes - have);
        }
        buf.put_slice(&tail);
        self.tail = tail;
        buf.split().freeze()
    }

    /// Render the end of the stream after `emitted` tokens: the finish event, the usage event if asked
    /// for, and `[DONE]` (SSE only), as one frame.
    pub(crate) fn trailer(&mut self, buf: &mut BytesMut, emitted: usize, now: Instant) -> Bytes {
        match self.api {
            Api::Chat | Api::Completions => {
                self.open_record(buf, None);
                if self.api == Api::Chat {
                    self.chunk_head(buf, "chat.completion.chunk");
                    let _ = write!(
                        buf,
                        r#","choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{}"}}]"#,
                        self.finish_reason
                    );
                } else {
                    self.chunk_head(buf, "text_completion");
                    let _ = write!(
                        buf,
                        r#","choices":[{{"text":"","index":0,"logprobs":null,"finish_reason":"{}"}}]"#,
                        self.finish_reason
                    );
                }
                if self.include_usage {
                    buf.put_slice(br#","usage":null"#);
                }
                self.emit_fields(buf, now);
                buf.put_u8(b'}');
                self.close_record(buf);
                if self.include_usage {
                    self.open_record(buf, None);
                    let object = if self.api == Api::Chat {
                        "chat.completion.chunk"
                    } else {
                        "text_completion"
                    };
                    self.chunk_head(buf, object);
                    let completion = emitted as u64;
                    let _ = write!(
                        buf,
                        r#","choices":[],"usage":{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
                        self.prompt_tokens,
                        completion,
                        self.prompt_tokens + completion
                    );
                    self.emit_fields(buf, now);
                    buf.put_u8(b'}');
                    self.close_record(buf);
                }
                if !self.ndjson {
                    buf.put_slice(b"data: [DONE]");
                    self.close_record(buf);
                }
            }
            Api::Plain => {
                if self.ndjson {
                    let _ = write!(buf, r#"{{"done":true,"tokens":{emitted}"#);
                    self.emit_fields(buf, now);
                    buf.put_u8(b'}');
                } else {
                    buf.put_slice(b"event: done");
                    buf.put_slice(self.line_ending.as_bytes());
                    buf.put_slice(b"data: [DONE]");
                }
                self.close_record(buf);
            }
        }
        buf.split().freeze()
    }

    /// Start a record: `data: ` for SSE (after an `id:` line when `sse_id` is given), nothing for NDJSON.
    fn open_record(&self, buf: &mut BytesMut, sse_id: Option<usize>) {
        if !self.ndjson {
            if let Some(id) = sse_id {
                let _ = write!(buf, "id: {id}");
                buf.put_slice(self.line_ending.as_bytes());
            }
            buf.put_slice(b"data: ");
        }
    }

    fn close_record(&self, buf: &mut BytesMut) {
        let le = self.line_ending.as_bytes();
        buf.put_slice(le);
        if !self.ndjson {
            buf.put_slice(le);
        }
    }

    fn chunk_head(&self, buf: &mut BytesMut, object: &str) {
        let _ = write!(
            buf,
            r#"{{"id":"{}","object":"{}","created":{},"model":{},"system_fingerprint":"fp_streamgate_mock""#,
            self.id, object, self.created, self.model_json
        );
    }

    fn emit_fields(&self, buf: &mut BytesMut, now: Instant) {
        if self.emit_time {
            let _ = write!(
                buf,
                r#","emit_mono_ns":{},"emit_unix_ns":{}"#,
                super::nanos_since_epoch(now),
                super::unix_nanos()
            );
        }
    }
}
