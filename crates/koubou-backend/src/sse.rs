//! Incremental parsers for the two streaming wire formats the HTTP providers speak:
//! `text/event-stream` (OpenAI-compatible servers) and newline-delimited JSON (Ollama).
//!
//! Why it exists: network chunks split lines (and UTF-8 sequences) anywhere, servers differ on
//! LF vs CRLF, and some send keep-alive comments (`: ping`). Both providers feed raw bytes in as
//! they arrive and get whole lines / whole events out, so neither has to care about framing.

/// The longest line buffered: a peer that sends more without a newline (garbage, or a
/// runaway) gets it cut into lines of this size, which its parser then refuses, instead of
/// growing the buffer without end.
pub(crate) const MAX_LINE: usize = 16 << 20;

/// Splits a byte stream into lines. Accepts LF and CRLF; bytes are buffered until a line is
/// complete, so a chunk may end anywhere, including inside a multi-byte UTF-8 character.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; returns every line it completed (without the line ending).
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.buf.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            out.push(take_line(&mut self.buf));
        }
        while self.buf.len() + rest.len() > MAX_LINE {
            let (head, tail) = rest.split_at(MAX_LINE - self.buf.len());
            self.buf.extend_from_slice(head);
            out.push(take_line(&mut self.buf));
            rest = tail;
        }
        self.buf.extend_from_slice(rest);
        out
    }

    /// At end of stream: the last line if it had no line ending.
    pub(crate) fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() { None } else { Some(take_line(&mut self.buf)) }
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let line = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    line
}

/// One server-sent event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, if any (`None` means the default type, "message").
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental `text/event-stream` parser (the WHATWG rules, minus `id`/`retry`, which no
/// provider here needs).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    lines: LineSplitter,
    event: Option<String>,
    data: Option<String>,
    started: bool,
}

impl SseParser {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; returns every event it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for line in self.lines.push(chunk) {
            if let Some(ev) = self.line(line) {
                out.push(ev);
            }
        }
        out
    }

    /// At end of stream: an event whose closing blank line never came (lenient: a server that
    /// ends with `data: [DONE]\n` and no blank line still gets its last event seen).
    pub(crate) fn finish(&mut self) -> Option<SseEvent> {
        let last = self.lines.finish().and_then(|l| self.line(l));
        last.or_else(|| self.dispatch())
    }

    fn line(&mut self, mut line: String) -> Option<SseEvent> {
        if !self.started {
            self.started = true;
            if let Some(stripped) = line.strip_prefix('\u{feff}') {
                line = stripped.to_owned();
            }
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        self.data.take().map(|data| SseEvent { event, data })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_endless_line_is_cut_not_buffered_without_end() {
        let mut l = super::LineSplitter::new();
        let chunk = vec![b'x'; 1 << 20];
        let mut lines = Vec::new();
        for _ in 0..40 {
            lines.extend(l.push(&chunk));
            assert!(l.buf.len() <= super::MAX_LINE);
        }
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|x| x.len() == super::MAX_LINE));
        assert_eq!(l.finish().map(|x| x.len()), Some((40 << 20) - 2 * super::MAX_LINE));
    }

    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent { event: event.map(str::to_owned), data: data.to_owned() }
    }

    /// Feeds `input` split at every pair of positions (so every 1-, 2- and 3-way split).
    fn all_splits<T: PartialEq + std::fmt::Debug>(input: &[u8], run: impl Fn(&[&[u8]]) -> T) -> T {
        let whole = run(&[input]);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let got = run(&[&input[..i], &input[i..j], &input[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
        whole
    }

    fn sse(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out: Vec<SseEvent> = chunks.iter().flat_map(|c| p.push(c)).collect();
        out.extend(p.finish());
        out
    }

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new();
        let mut out: Vec<String> = chunks.iter().flat_map(|c| s.push(c)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn sse_lf_crlf_comments_multiline_and_utf8_at_every_split() {
        let input = "\u{feff}: ping - 2025\n\
                     data: {\"a\":\"héllo 日本\"}\n\n\
                     event: response.output_text.delta\r\n\
                     data: line1\r\n\
                     data:line2\r\n\
                     data\r\n\
                     \r\n\
                     id: 7\nretry: 10\n: comment\n\n\
                     data: [DONE]\n\n";
        let got = all_splits(input.as_bytes(), sse);
        assert_eq!(
            got,
            vec![
                ev(None, "{\"a\":\"héllo 日本\"}"),
                ev(Some("response.output_text.delta"), "line1\nline2\n"),
                ev(None, "[DONE]"),
            ]
        );
    }

    #[test]
    fn sse_event_without_data_is_not_dispatched_and_does_not_leak() {
        assert_eq!(sse(&[b"event: x\n\ndata: y\n\n"]), vec![ev(None, "y")]);
    }

    #[test]
    fn sse_last_event_without_blank_line_is_kept() {
        assert_eq!(sse(&[b"data: a\n\ndata: [DONE]\n"]), vec![ev(None, "a"), ev(None, "[DONE]")]);
        assert_eq!(sse(&[b"data: a\n\ndata: [DONE]"]), vec![ev(None, "a"), ev(None, "[DONE]")]);
        assert_eq!(sse(&[b""]), vec![]);
    }

    #[test]
    fn lines_lf_crlf_and_utf8_at_every_split() {
        let input = "{\"message\":{\"content\":\"こんにちは\"}}\r\n\n{\"done\":true}\n{\"tail\":\"é\"}";
        let got = all_splits(input.as_bytes(), lines);
        assert_eq!(got, vec!["{\"message\":{\"content\":\"こんにちは\"}}", "", "{\"done\":true}", "{\"tail\":\"é\"}"]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(lines(&[b"a\xffb\n"]), vec!["a\u{fffd}b"]);
    }
}
