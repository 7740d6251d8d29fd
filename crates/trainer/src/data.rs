//! Training data: JSONL parsing, format detection and validation.
//!
//! One example per line. The format is detected from the first example and every
//! later line must use the same one, so a file never mixes objectives silently.

use serde::{Deserialize, Serialize};
use std::io::BufRead;

/// The JSONL shapes loraforge trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// OpenAI chat: `{"messages": [{"role", "content", "weight"?}, ...]}`.
    Chat,
    /// `{"prompt": "...", "completion": "..."}`.
    PromptCompletion,
    /// `{"text": "..."}`: every token is trained on.
    Text,
    /// `{"input_ids": [...], "labels": [...]?}`; `-100` in labels is ignored.
    Tokenized,
    /// Sequence classification: `{"text": ..., "text_pair"?: ..., "label": ...}`, or
    /// pre-tokenized `{"input_ids": [...], "token_type_ids"?: [...], "label": ...}`.
    /// A label is a class (string or integer), a list of classes (multi-label) or a
    /// number (regression).
    Classification,
    /// A zip of captioned images for text-to-image training (`sd::dataset`).
    ImageZip,
    /// A zip of images in one folder per class, for image classification
    /// (`vision::dataset`).
    ImageClasses,
    /// A zip of audio clips and their transcripts, for speech recognition
    /// (`speech::dataset`).
    AudioTranscripts,
    /// OpenAI's preference pairs (DPO): `{"input": {"messages": [...]},
    /// "preferred_output": [assistant message], "non_preferred_output": [assistant message]}`.
    Preference,
}

impl DataFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            DataFormat::Chat => "chat",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::Text => "text",
            DataFormat::Tokenized => "tokenized",
            DataFormat::Classification => "classification",
            DataFormat::ImageZip => "image_zip",
            DataFormat::ImageClasses => "image_classes",
            DataFormat::AudioTranscripts => "audio_transcripts",
            DataFormat::Preference => "preference",
        }
    }
}

/// A JSON value as written, its objects' keys in the file's order (what a chat template
/// that prints it with `tojson` must see, as transformers' Python dicts keep it).
pub type Json = minijinja::Value;

/// One chat turn. `weight: 0` on an assistant turn excludes it from the loss. An
/// assistant turn may call tools (`tool_calls`, OpenAI's shape, its `content` then
/// possibly empty); a `tool` turn answers one (`tool_call_id`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One parsed training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A conversation, with the tool definitions it was held with (OpenAI's `tools`).
    Chat {
        messages: Vec<Message>,
        tools: Option<Json>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text(String),
    Tokenized {
        input_ids: Vec<u32>,
        labels: Option<Vec<i64>>,
    },
    Classification(ClassExample),
    Preference(Box<PreferencePair>),
}

/// One preference pair: a conversation so far, and the assistant reply preferred to
/// another.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub messages: Vec<Message>,
    pub tools: Option<Json>,
    pub chosen: Message,
    pub rejected: Message,
}

/// A labelled text (or text pair) for sequence classification.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassExample {
    pub input: ClassInput,
    pub label: Label,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClassInput {
    Text {
        text: String,
        text_pair: Option<String>,
    },
    Tokens {
        input_ids: Vec<u32>,
        token_type_ids: Option<Vec<u32>>,
    },
}

/// A label as written: which problem type it belongs to is decided per file.
#[derive(Debug, Clone, PartialEq)]
pub enum Label {
    Str(String),
    Int(i64),
    Float(f64),
    List(Vec<String>),
}

impl Label {
    fn parse(v: &serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        let bad = || {
            "\"label\" must be a string, an integer, a number or a list of strings/integers"
                .to_string()
        };
        match v {
            Value::String(s) if s.is_empty() => Err("\"label\" must not be empty".into()),
            Value::String(s) => Ok(Label::Str(s.clone())),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Ok(Label::Int(i)),
                None => n
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Label::Float)
                    .ok_or_else(bad),
            },
            Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    Value::Number(n) if n.is_i64() => Ok(n.to_string()),
                    _ => Err(bad()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Label::List),
            _ => Err(bad()),
        }
    }
}

impl Example {
    pub fn format(&self) -> DataFormat {
        match self {
            Example::Chat { .. } => DataFormat::Chat,
            Example::PromptCompletion { .. } => DataFormat::PromptCompletion,
            Example::Text(_) => DataFormat::Text,
            Example::Tokenized { .. } => DataFormat::Tokenized,
            Example::Classification(_) => DataFormat::Classification,
            Example::Preference(_) => DataFormat::Preference,
        }
    }
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn field_str(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<String, String> {
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("\"{key}\" must be a string")),
        None => Err(format!("missing \"{key}\"")),
    }
}

/// Message content may be a string or OpenAI's list of `{"type": "text", "text": ...}` parts.
fn message_content(v: Option<&serde_json::Value>, key: &str, i: usize) -> Result<String, String> {
    match v {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let ty = p.get("type").and_then(|t| t.as_str());
                match (ty, p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(format!(
                            "\"{key}\"[{i}].content[{j}] must be a {{\"type\": \"text\", \"text\": string}} part"
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(serde_json::Value::Null) | None => Err(format!("\"{key}\"[{i}].content is required")),
        Some(_) => Err(format!(
            "\"{key}\"[{i}].content must be a string or a list of text parts"
        )),
    }
}

fn parse_messages(v: &serde_json::Value, ordered: Option<&Json>) -> Result<Vec<Message>, String> {
    let out = parse_turns(v, "messages", ordered)?;
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("\"messages\" must contain at least one assistant message".into());
    }
    Ok(out)
}

/// The messages of the array `key` (a path such as `input.messages`, named in errors);
/// `ordered` is the same array read with its keys in order, for the tool calls.
fn parse_turns(
    v: &serde_json::Value,
    key: &str,
    ordered: Option<&Json>,
) -> Result<Vec<Message>, String> {
    let arr = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("\"{key}\" must be a non-empty array"))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| format!("\"{key}\"[{i}] must be an object"))?;
        let role = match obj.get("role") {
            Some(serde_json::Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(serde_json::Value::String(r)) => {
                return Err(format!(
                    "\"{key}\"[{i}].role \"{r}\" is not one of system, user, assistant, tool"
                ))
            }
            _ => return Err(format!("\"{key}\"[{i}].role must be a string")),
        };
        let calls = match obj.get("tool_calls") {
            None | Some(serde_json::Value::Null) => None,
            Some(c) => {
                check_tool_calls(c, &format!("\"{key}\"[{i}].tool_calls"))?;
                if role != "assistant" {
                    return Err(format!(
                        "\"{key}\"[{i}].tool_calls is only allowed on assistant messages"
                    ));
                }
                let at = ordered
                    .and_then(|o| o.get_item_by_index(i).ok())
                    .and_then(|m| m.get_attr("tool_calls").ok())
                    .filter(|c| !c.is_undefined() && !c.is_none());
                Some(at.ok_or_else(|| format!("\"{key}\"[{i}].tool_calls could not be read"))?)
            }
        };
        // An assistant turn that only calls tools has no content (null in OpenAI's files).
        let content = match obj.get("content") {
            None | Some(serde_json::Value::Null) if calls.is_some() => String::new(),
            c => message_content(c, key, i)?,
        };
        let text_field = |f: &str| -> Result<Option<String>, String> {
            match obj.get(f) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("\"{key}\"[{i}].{f} must be a string")),
            }
        };
        let tool_call_id = text_field("tool_call_id")?;
        let name = text_field("name")?;
        let weight = match obj.get("weight") {
            None | Some(serde_json::Value::Null) => None,
            Some(w) => match w.as_u64() {
                Some(0) => Some(0),
                Some(1) => Some(1),
                _ => return Err(format!("\"{key}\"[{i}].weight must be 0 or 1")),
            },
        };
        if weight.is_some() && role != "assistant" {
            return Err(format!(
                "\"{key}\"[{i}].weight is only allowed on assistant messages"
            ));
        }
        out.push(Message {
            role,
            content,
            weight,
            tool_calls: calls,
            tool_call_id,
            name,
        });
    }
    Ok(out)
}

/// OpenAI's `tool_calls`: a non-empty list of `{"id", "type": "function", "function":
/// {"name", "arguments"}}` with `arguments` a JSON string.
fn check_tool_calls(v: &serde_json::Value, at: &str) -> Result<(), String> {
    let calls = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("{at} must be a non-empty array"))?;
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(|n| n.as_str());
        let args = f.and_then(|f| f.get("arguments")).and_then(|a| a.as_str());
        if c.get("type").and_then(|t| t.as_str()).unwrap_or("function") != "function"
            || name.is_none_or(str::is_empty)
            || args.is_none()
        {
            return Err(format!(
                "{at}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": string, \"arguments\": JSON string}}}}"
            ));
        }
    }
    Ok(())
}

/// OpenAI's `tools`: a list of `{"type": "function", "function": {"name", ...}}`,
/// returned as written (keys in order) from `ordered`.
fn parse_tools(
    v: Option<&serde_json::Value>,
    at: &str,
    ordered: Option<Json>,
) -> Result<Option<Json>, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let tools = v
        .as_array()
        .ok_or_else(|| format!("\"{at}\" must be an array of tool definitions"))?;
    for (j, t) in tools.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(|n| n.as_str());
        if t.get("type").and_then(|x| x.as_str()) != Some("function")
            || name.is_none_or(str::is_empty)
        {
            return Err(format!(
                "\"{at}\"[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": string, ...}}}}"
            ));
        }
    }
    if tools.is_empty() {
        return Ok(None);
    }
    ordered
        .filter(|o| !o.is_undefined())
        .map(Some)
        .ok_or_else(|| format!("\"{at}\" could not be read"))
}

/// The line again with its keys in order, when it holds tools or tool calls (the only
/// parts a template prints as JSON).
fn ordered_line(line: &str) -> Option<Json> {
    (line.contains("\"tools\"") || line.contains("\"tool_calls\""))
        .then(|| serde_json::from_str::<Json>(line).ok())
        .flatten()
}

/// OpenAI's preference line; `ordered` is the line with its keys in order (when it
/// holds tools or tool calls).
fn parse_preference(
    obj: &serde_json::Map<String, serde_json::Value>,
    ordered: Option<Json>,
) -> Result<PreferencePair, String> {
    let input = obj
        .get("input")
        .and_then(|v| v.as_object())
        .ok_or_else(|| "\"input\" must be an object with \"messages\"".to_string())?;
    let ordered_input = ordered.as_ref().and_then(|o| o.get_attr("input").ok());
    let attr = |v: &Option<Json>, k: &str| v.as_ref().and_then(|o| o.get_attr(k).ok());
    let tools = parse_tools(
        input.get("tools"),
        "input.tools",
        attr(&ordered_input, "tools"),
    )?;
    let messages = parse_turns(
        input.get("messages").unwrap_or(&serde_json::Value::Null),
        "input.messages",
        attr(&ordered_input, "messages").as_ref(),
    )?;
    if messages.iter().any(|m| m.weight.is_some()) {
        return Err("\"input.messages\": weight has no meaning in a preference pair".into());
    }
    let output = |key: &str| -> Result<Message, String> {
        let turns = parse_turns(
            obj.get(key).unwrap_or(&serde_json::Value::Null),
            key,
            attr(&ordered, key).as_ref(),
        )?;
        match turns.as_slice() {
            [m] if m.role == "assistant" && m.weight.is_none() => Ok(m.clone()),
            _ => Err(format!("\"{key}\" must be a list of one assistant message")),
        }
    };
    Ok(PreferencePair {
        messages,
        tools,
        chosen: output("preferred_output")?,
        rejected: output("non_preferred_output")?,
    })
}

fn parse_ids(v: &serde_json::Value, key: &str) -> Result<Vec<i64>, String> {
    let arr = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("\"{key}\" must be a non-empty array of integers"))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64()
                .ok_or_else(|| format!("\"{key}\"[{i}] must be an integer"))
        })
        .collect()
}

fn token_ids(v: &serde_json::Value, key: &str) -> Result<Vec<u32>, String> {
    parse_ids(v, key)?
        .iter()
        .enumerate()
        .map(|(i, &x)| u32::try_from(x).map_err(|_| format!("\"{key}\"[{i}] must be >= 0")))
        .collect()
}

fn parse_classification(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<ClassExample, String> {
    let label = match obj.get("label") {
        None | Some(serde_json::Value::Null) => return Err("missing \"label\"".into()),
        Some(l) => Label::parse(l)?,
    };
    let input = if let Some(ids) = obj.get("input_ids") {
        let input_ids = token_ids(ids, "input_ids")?;
        let token_type_ids = match obj.get("token_type_ids") {
            None | Some(serde_json::Value::Null) => None,
            Some(t) => {
                let t = token_ids(t, "token_type_ids")?;
                if t.len() != input_ids.len() {
                    return Err(format!(
                        "\"token_type_ids\" has {} entries but \"input_ids\" has {}",
                        t.len(),
                        input_ids.len()
                    ));
                }
                Some(t)
            }
        };
        ClassInput::Tokens {
            input_ids,
            token_type_ids,
        }
    } else {
        let text = field_str(obj, "text")?;
        if text.trim().is_empty() {
            return Err("\"text\" must not be empty".into());
        }
        let text_pair = match obj.get("text_pair") {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(field_str(obj, "text_pair")?),
        };
        ClassInput::Text { text, text_pair }
    };
    Ok(ClassExample { input, label })
}

/// Parses one JSONL line. The error names the offending field, not the line
/// number: callers know the line.
pub fn parse_line(line: &str) -> Result<Example, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "each line must be a JSON object".to_string())?;
    if obj.contains_key("preferred_output")
        || obj.contains_key("non_preferred_output")
        || obj.contains_key("input")
    {
        return parse_preference(obj, ordered_line(line)).map(|p| Example::Preference(Box::new(p)));
    }
    if obj.contains_key("label") || obj.contains_key("text_pair") {
        return parse_classification(obj).map(Example::Classification);
    }
    if let Some(m) = obj.get("messages") {
        let ordered = ordered_line(line);
        let at = |k: &str| ordered.as_ref().and_then(|o| o.get_attr(k).ok());
        return Ok(Example::Chat {
            messages: parse_messages(m, at("messages").as_ref())?,
            tools: parse_tools(obj.get("tools"), "tools", at("tools"))?,
        });
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = field_str(obj, "prompt")?;
        let completion = field_str(obj, "completion")?;
        if completion.is_empty() {
            return Err("\"completion\" must not be empty".into());
        }
        return Ok(Example::PromptCompletion { prompt, completion });
    }
    if obj.contains_key("text") {
        let text = field_str(obj, "text")?;
        if text.is_empty() {
            return Err("\"text\" must not be empty".into());
        }
        return Ok(Example::Text(text));
    }
    if let Some(ids) = obj.get("input_ids") {
        let ids = parse_ids(ids, "input_ids")?;
        let input_ids = ids
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                u32::try_from(x).map_err(|_| format!("\"input_ids\"[{i}] must be a token id >= 0"))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        let labels = match obj.get("labels") {
            None | Some(serde_json::Value::Null) => None,
            Some(l) => {
                let l = parse_ids(l, "labels")?;
                if l.len() != input_ids.len() {
                    return Err(format!(
                        "\"labels\" has {} entries but \"input_ids\" has {}",
                        l.len(),
                        input_ids.len()
                    ));
                }
                if let Some(i) = l.iter().position(|&x| x < 0 && x != -100) {
                    return Err(format!("\"labels\"[{i}] must be a token id or -100"));
                }
                Some(l)
            }
        };
        return Ok(Example::Tokenized { input_ids, labels });
    }
    Err("unknown format: expected \"messages\", \"prompt\"/\"completion\", \"text\", \"input_ids\", \"label\" or \"input\"/\"preferred_output\"/\"non_preferred_output\"".into())
}

/// What a validation pass found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ValidationReport {
    pub format: Option<DataFormat>,
    pub examples: u64,
    /// Lines of the form `line 7: ...`, at most [`MAX_REPORTED_ERRORS`].
    pub errors: Vec<String>,
    /// Total number of bad lines (may exceed `errors.len()`).
    pub error_count: u64,
    /// Largest token id seen in pre-tokenized data (checked against a model's vocabulary later).
    pub max_token_id: Option<u32>,
}

pub const MAX_REPORTED_ERRORS: usize = 20;

impl ValidationReport {
    pub fn is_ok(&self) -> bool {
        self.error_count == 0
    }
    fn push_error(&mut self, line: u64, msg: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(format!("line {line}: {msg}"));
        }
    }
}

/// Checks a JSONL stream line by line; never holds more than one line in memory.
/// Empty lines are errors (they are almost always a broken export), except a
/// single trailing newline. Fewer than `min_examples` valid examples is an error.
/// A line of a JSONL file without the UTF-8 byte-order mark that some editors put at the
/// start of a file (line 1 only; elsewhere it is content, and JSON refuses it).
pub fn without_bom(line_no: u64, line: &str) -> &str {
    if line_no == 1 {
        line.strip_prefix('\u{feff}').unwrap_or(line)
    } else {
        line
    }
}

pub fn validate<R: BufRead>(mut reader: R, min_examples: u64) -> std::io::Result<ValidationReport> {
    let mut report = ValidationReport::default();
    let mut buf = String::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = match reader.read_line(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                line_no += 1;
                report.push_error(line_no, "not valid UTF-8".into());
                // Skip the rest of that line byte-wise.
                let mut raw = Vec::new();
                reader.read_until(b'\n', &mut raw)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        line_no += 1;
        let line = without_bom(line_no, buf.trim_end_matches(['\n', '\r']));
        if line.trim().is_empty() {
            report.push_error(line_no, "empty line".into());
            continue;
        }
        match parse_line(line) {
            Ok(ex) => {
                let f = ex.format();
                match report.format {
                    None => report.format = Some(f),
                    Some(DataFormat::Classification) if f == DataFormat::Text => {
                        report.push_error(line_no, "missing \"label\"".into());
                        continue;
                    }
                    Some(first) if first != f => {
                        report.push_error(
                            line_no,
                            format!(
                                "format \"{}\" differs from the file's format \"{}\" (one format per file)",
                                f.as_str(),
                                first.as_str()
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                }
                if let Example::Tokenized { input_ids, .. } = &ex {
                    let m = input_ids.iter().copied().max();
                    report.max_token_id = report.max_token_id.max(m);
                }
                report.examples += 1;
            }
            Err(msg) => report.push_error(line_no, msg),
        }
    }
    if report.examples < min_examples && report.error_count == 0 {
        report.error_count += 1;
        report.errors.push(format!(
            "the file has {} example(s); at least {min_examples} are required",
            report.examples
        ));
    }
    Ok(report)
}

/// Reads every example of a JSONL file, failing on the first bad line.
pub fn read_examples(path: &std::path::Path) -> Result<Vec<Example>, crate::Error> {
    let f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut out = Vec::new();
    let mut first: Option<DataFormat> = None;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| crate::Error::io(path, e))?;
        let line = without_bom(i as u64 + 1, &line);
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_line(line)
            .map_err(|m| crate::Error::Data(format!("{}: line {}: {m}", path.display(), i + 1)))?;
        match first {
            None => first = Some(ex.format()),
            Some(f) if f != ex.format() => {
                return Err(crate::Error::Data(format!(
                    "{}: line {}: format differs from the file's first line",
                    path.display(),
                    i + 1
                )))
            }
            _ => {}
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(crate::Error::Data(format!(
            "{}: no examples",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile-client finding 18: a file saved with a UTF-8 byte-order mark validates
    /// and reads; a mark anywhere but at the start stays an error.
    #[test]
    fn a_byte_order_mark_on_line_one_is_dropped() {
        let text = "\u{feff}{\"text\": \"a\"}\n{\"text\": \"b\"}\n";
        let r = validate(text.as_bytes(), 1).unwrap();
        assert!(r.is_ok(), "{:?}", r.errors);
        assert_eq!(r.examples, 2);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bom.jsonl");
        std::fs::write(&p, text).unwrap();
        assert_eq!(read_examples(&p).unwrap().len(), 2);
        let late = "{\"text\": \"a\"}\n\u{feff}{\"text\": \"b\"}\n";
        let r = validate(late.as_bytes(), 1).unwrap();
        assert_eq!(r.error_count, 1, "{:?}", r.errors);
    }

    #[test]
    fn detects_formats_and_names_fields() {
        assert!(matches!(
            parse_line(r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo","weight":0}]}"#),
            Ok(Example::Chat { messages: m, .. }) if m[1].weight == Some(0)
        ));
        assert_eq!(
            parse_line(r#"{"messages":[]}"#).unwrap_err(),
            "\"messages\" must be a non-empty array"
        );
        assert!(parse_line(r#"{"messages":[{"role":"bot","content":"x"}]}"#)
            .unwrap_err()
            .contains("role \"bot\""));
        assert!(matches!(
            parse_line(r#"{"prompt":"a","completion":"b"}"#),
            Ok(Example::PromptCompletion { .. })
        ));
        assert!(matches!(
            parse_line(r#"{"text":"abc"}"#),
            Ok(Example::Text(_))
        ));
        assert!(matches!(
            parse_line(r#"{"input_ids":[1,2,3],"labels":[-100,2,3]}"#),
            Ok(Example::Tokenized {
                labels: Some(_),
                ..
            })
        ));
        assert!(parse_line(r#"{"input_ids":[1,2],"labels":[1]}"#).is_err());
        assert!(parse_line("not json")
            .unwrap_err()
            .starts_with("invalid JSON"));
    }

    #[test]
    fn preference_pairs_parse_and_name_the_field() {
        let ok = r#"{"input":{"messages":[{"role":"user","content":"hi"}]},"preferred_output":[{"role":"assistant","content":"hello"}],"non_preferred_output":[{"role":"assistant","content":"go away"}]}"#;
        match parse_line(ok) {
            Ok(Example::Preference(p)) => {
                assert_eq!(p.messages.len(), 1);
                assert_eq!(p.chosen.content, "hello");
                assert_eq!(p.rejected.content, "go away");
            }
            other => panic!("{other:?}"),
        }
        let bad = |line: &str, want: &str| {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        };
        bad(
            r#"{"input":{"messages":[]},"preferred_output":[],"non_preferred_output":[]}"#,
            "\"input.messages\" must be a non-empty array",
        );
        bad(
            r#"{"input":{"messages":[{"role":"user","content":"a"}]},"preferred_output":[{"role":"user","content":"b"}],"non_preferred_output":[{"role":"assistant","content":"c"}]}"#,
            "\"preferred_output\" must be a list of one assistant message",
        );
        bad(
            r#"{"input":{"messages":[{"role":"user","content":"a"}]},"preferred_output":[{"role":"assistant","content":"b"}]}"#,
            "\"non_preferred_output\" must be a non-empty array",
        );
        bad(
            r#"{"input":{"messages":[{"role":"user"}]},"preferred_output":[{"role":"assistant","content":"b"}],"non_preferred_output":[{"role":"assistant","content":"c"}]}"#,
            "\"input.messages\"[0].content is required",
        );
        bad(
            r#"{"input":{"messages":[{"role":"user","content":"a"}],"tools":[{"type":"function"}]},"preferred_output":[{"role":"assistant","content":"b"}],"non_preferred_output":[{"role":"assistant","content":"c"}]}"#,
            "\"input.tools\"[0] must be",
        );
        let mixed = format!("{ok}\n{{\"text\":\"x\"}}\n");
        let r = validate(mixed.as_bytes(), 1).unwrap();
        assert_eq!(r.format, Some(DataFormat::Preference));
        assert_eq!(r.error_count, 1, "{:?}", r.errors);
    }

    /// Tool definitions and calls are read with their keys in the file's order (what a
    /// template printing them with `tojson` must see); malformed ones name the field.
    #[test]
    fn tools_and_tool_calls_keep_their_order_and_name_the_field() {
        let line = r#"{"tools":[{"type":"function","function":{"name":"f","parameters":{"z":1,"a":2}}}],"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"ok"},{"role":"assistant","content":"done"}]}"#;
        let Ok(Example::Chat { messages, tools }) = parse_line(line) else {
            panic!("not a chat example")
        };
        let params = tools.unwrap().get_item_by_index(0).unwrap();
        let keys: Vec<String> = params
            .get_attr("function")
            .and_then(|f| f.get_attr("parameters"))
            .unwrap()
            .try_iter()
            .unwrap()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["z", "a"]);
        assert_eq!(messages[1].content, "");
        assert!(messages[1].tool_calls.is_some());
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        let bad = |line: &str, want: &str| {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        };
        bad(
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"f"}}]}]}"#,
            "\"messages\"[0].tool_calls[0] must be",
        );
        bad(
            r#"{"messages":[{"role":"user","content":"x","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"assistant","content":"y"}]}"#,
            "tool_calls is only allowed on assistant messages",
        );
        bad(
            r#"{"tools":{"type":"function"},"messages":[{"role":"assistant","content":"y"}]}"#,
            "\"tools\" must be an array",
        );
    }

    #[test]
    fn validate_reports_line_numbers_and_mixed_formats() {
        let data = "{\"text\":\"a\"}\n{\"text\":\"b\"}\n\n{\"prompt\":\"p\",\"completion\":\"c\"}\n{\"text\":\"d\"}\n";
        let r = validate(data.as_bytes(), 1).unwrap();
        assert_eq!(r.examples, 3);
        assert_eq!(r.errors.len(), 2);
        assert!(r.errors[0].starts_with("line 3: empty line"));
        assert!(r.errors[1].starts_with("line 4: format"));
        let r = validate("{\"text\":\"a\"}\n".as_bytes(), 2).unwrap();
        assert!(!r.is_ok());
    }
}
