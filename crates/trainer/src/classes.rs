//! What the classifier families share (text on encoders, images on CNNs): label sets
//! (discovered from a training file, checked against a validation file, saved with the
//! adapter as `labels.json`, transformers' `id2label` / `label2id`), transformers'
//! problem types and their losses, accuracy and macro-F1, and a prediction's shape.

use crate::data::{read_examples, ClassExample, Example, Label};
use crate::ops::cross_entropy_rows;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The file written next to `adapter_config.json`.
pub const LABELS_FILE: &str = "labels.json";

/// A classification example with the line it came from.
pub type Numbered = (u64, ClassExample);

#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    pub problem_type: ProblemType,
    /// `id2label`, in id order. Regression has none.
    pub names: Vec<String>,
}

fn class_name(l: &Label) -> Option<String> {
    match l {
        Label::Str(s) => Some(s.clone()),
        Label::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn show(l: &Label) -> String {
    match l {
        Label::Str(s) => format!("\"{s}\""),
        Label::Int(i) => i.to_string(),
        Label::Float(f) => f.to_string(),
        Label::List(v) => format!("{v:?}"),
    }
}

/// Reads a classification JSONL file, keeping line numbers. A file in another
/// format is an error that says which format it is.
pub fn read_numbered(path: &Path) -> Result<Vec<Numbered>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let out = parse_numbered(&text, &path.display().to_string())?;
    if out.is_empty() {
        // Same message as the other formats for an empty file.
        read_examples(path)?;
    }
    Ok(out)
}

/// Parses classification JSONL text; `what` names the file in errors.
pub fn parse_numbered(text: &str, what: &str) -> Result<Vec<Numbered>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = crate::data::without_bom(line_no, line);
        if line.trim().is_empty() {
            continue;
        }
        match crate::data::parse_line(line) {
            Ok(Example::Classification(c)) => out.push((line_no, c)),
            Ok(Example::Text(_)) => {
                return Err(Error::Data(format!(
                    "{what}: line {line_no}: missing \"label\""
                )))
            }
            Ok(other) => {
                return Err(Error::Data(format!(
                    "{what}: line {line_no}: format \"{}\" is not a classification example ({{\"text\", \"label\"}})",
                    other.format().as_str()
                )))
            }
            Err(m) => return Err(Error::Data(format!("{what}: line {line_no}: {m}"))),
        }
    }
    Ok(out)
}

/// Checks a training file (and a validation file) for a classification job before it
/// runs: the label set it implies and that the validation labels belong to it.
pub fn check_files(
    train: (&str, &str),
    valid: Option<(&str, &str)>,
    problem: Option<ProblemType>,
) -> Result<LabelSet> {
    let rows = parse_numbered(train.1, train.0)?;
    let set = LabelSet::discover(&rows, problem).map_err(|e| match e {
        Error::Data(m) => Error::Data(format!("{}: {m}", train.0)),
        e => e,
    })?;
    if let Some((name, text)) = valid {
        set.check(&parse_numbered(text, name)?, name)?;
    }
    Ok(set)
}

impl LabelSet {
    /// Discovers the label set of a training file. Without an explicit problem type,
    /// lists of labels mean multi-label, non-integer numbers mean regression, and
    /// anything else single-label classes.
    pub fn discover(examples: &[Numbered], problem: Option<ProblemType>) -> Result<Self> {
        let problem = problem.unwrap_or_else(|| {
            if examples
                .iter()
                .any(|(_, e)| matches!(e.label, Label::List(_)))
            {
                ProblemType::MultiLabelClassification
            } else if examples
                .iter()
                .any(|(_, e)| matches!(e.label, Label::Float(_)))
            {
                ProblemType::Regression
            } else {
                ProblemType::SingleLabelClassification
            }
        });
        let mut names = BTreeSet::new();
        for (line, e) in examples {
            match (problem, &e.label) {
                (ProblemType::SingleLabelClassification, l) => {
                    names.insert(class_name(l).ok_or_else(|| {
                        Error::Data(format!(
                            "line {line}: label {} is not a class (a string or an integer); use problem_type \"{}\" for {}",
                            show(l),
                            if matches!(l, Label::List(_)) { "multi_label_classification" } else { "regression" },
                            if matches!(l, Label::List(_)) { "lists" } else { "numbers" },
                        ))
                    })?);
                }
                (ProblemType::MultiLabelClassification, Label::List(v)) => {
                    names.extend(v.iter().cloned());
                }
                (ProblemType::MultiLabelClassification, l) => {
                    return Err(Error::Data(format!(
                        "line {line}: label {} must be a list of classes for multi_label_classification",
                        show(l)
                    )))
                }
                (ProblemType::Regression, Label::Int(_) | Label::Float(_)) => {}
                (ProblemType::Regression, l) => {
                    return Err(Error::Data(format!(
                        "line {line}: label {} is not a number (problem_type regression)",
                        show(l)
                    )))
                }
            }
        }
        let mut names: Vec<String> = names.into_iter().collect();
        // Integer classes sort as numbers, so 0..n keep their ids.
        if names.iter().all(|n| n.parse::<i64>().is_ok()) {
            names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
        }
        if problem != ProblemType::Regression && names.len() < 2 {
            let last = examples.last().map(|(l, _)| *l).unwrap_or(0);
            let found = match names.first() {
                Some(n) => format!("only one class (\"{n}\")"),
                None => "no class".to_string(),
            };
            return Err(Error::Data(format!(
                "lines 1-{last}: the training file has {found}; classification needs at least two"
            )));
        }
        Ok(Self {
            problem_type: problem,
            names,
        })
    }

    pub fn num_labels(&self) -> usize {
        match self.problem_type {
            ProblemType::Regression => 1,
            _ => self.names.len(),
        }
    }

    fn id(&self, name: &str) -> Option<u32> {
        self.names.iter().position(|n| n == name).map(|i| i as u32)
    }

    /// Checks another file (validation) against this set, naming the first bad line.
    pub fn check(&self, examples: &[Numbered], what: &str) -> Result<()> {
        for (line, e) in examples {
            self.targets(&[&e.label])
                .map_err(|m| Error::Data(format!("{what}: line {line}: {m}")))?;
        }
        Ok(())
    }

    /// Targets for a batch of labels; the error names the label, the caller the line.
    pub fn targets(&self, labels: &[&Label]) -> std::result::Result<Targets, String> {
        let unseen = |n: &str| format!("label \"{n}\" does not occur in the training file");
        match self.problem_type {
            ProblemType::SingleLabelClassification => labels
                .iter()
                .map(|l| {
                    let n =
                        class_name(l).ok_or_else(|| format!("label {} is not a class", show(l)))?;
                    self.id(&n).ok_or_else(|| unseen(&n))
                })
                .collect::<std::result::Result<Vec<u32>, String>>()
                .map(Targets::Classes),
            ProblemType::MultiLabelClassification => {
                let k = self.names.len();
                let mut v = vec![0f32; labels.len() * k];
                for (i, l) in labels.iter().enumerate() {
                    let Label::List(items) = l else {
                        return Err(format!("label {} must be a list of classes", show(l)));
                    };
                    for n in items {
                        v[i * k + self.id(n).ok_or_else(|| unseen(n))? as usize] = 1.0;
                    }
                }
                Ok(Targets::Values(v))
            }
            ProblemType::Regression => labels
                .iter()
                .map(|l| match l {
                    Label::Int(i) => Ok(*i as f32),
                    Label::Float(f) => Ok(*f as f32),
                    other => Err(format!("label {} is not a number", show(other))),
                })
                .collect::<std::result::Result<Vec<f32>, String>>()
                .map(Targets::Values),
        }
    }

    /// Writes `labels.json` into an adapter folder.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let id2label: BTreeMap<String, &String> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), n))
            .collect();
        let label2id: BTreeMap<&String, usize> =
            self.names.iter().enumerate().map(|(i, n)| (n, i)).collect();
        let v = json!({
            "problem_type": self.problem_type.as_str(),
            "num_labels": self.num_labels(),
            "id2label": id2label,
            "label2id": label2id,
        });
        let p = dir.join(LABELS_FILE);
        let tmp = dir.join(format!("{LABELS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(&v)?).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
    }

    /// Reads `labels.json` from an adapter folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(LABELS_FILE);
        let v: serde_json::Value = crate::io::read_json(&p)?;
        let bad = |m: &str| Error::Adapter(format!("{}: {m}", p.display()));
        let problem = ProblemType::parse(
            v.get("problem_type")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("no \"problem_type\""))?,
        )?;
        let map = v
            .get("id2label")
            .and_then(|x| x.as_object())
            .ok_or_else(|| bad("no \"id2label\""))?;
        let mut names = vec![String::new(); map.len()];
        for (k, n) in map {
            let i: usize = k.parse().map_err(|_| bad("id2label keys must be ids"))?;
            let slot = names
                .get_mut(i)
                .ok_or_else(|| bad("id2label ids must be 0..n"))?;
            *slot = n
                .as_str()
                .ok_or_else(|| bad("labels must be strings"))?
                .into();
        }
        Ok(Self {
            problem_type: problem,
            names,
        })
    }
}

/// transformers' `problem_type` for sequence classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// One class per example; cross entropy.
    SingleLabelClassification,
    /// Any subset of classes; binary cross entropy on each logit.
    MultiLabelClassification,
    /// Real-valued targets; mean squared error.
    Regression,
}

impl ProblemType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "single_label_classification" => Ok(Self::SingleLabelClassification),
            "multi_label_classification" => Ok(Self::MultiLabelClassification),
            "regression" => Ok(Self::Regression),
            _ => Err(Error::Config(format!(
                "problem_type \"{s}\": expected single_label_classification, multi_label_classification or regression"
            ))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::SingleLabelClassification => "single_label_classification",
            Self::MultiLabelClassification => "multi_label_classification",
            Self::Regression => "regression",
        }
    }
}

/// The loss of a batch, summed over its scored units, and the number of units
/// (examples for single-label, examples × labels for multi-label and regression),
/// so that dividing by the step's units gives transformers' mean.
pub fn classification_loss(
    logits: &Tensor,
    problem: ProblemType,
    targets: &Targets,
) -> Result<(Tensor, usize)> {
    let (b, k) = logits.dims2()?;
    match (problem, targets) {
        (ProblemType::SingleLabelClassification, Targets::Classes(c)) => {
            Ok((cross_entropy_rows(logits, c)?.sum_all()?, b))
        }
        (ProblemType::MultiLabelClassification, Targets::Values(y))
        | (ProblemType::Regression, Targets::Values(y)) => {
            let y = Tensor::from_slice(y, (b, k), logits.device())?;
            let sum = if problem == ProblemType::Regression {
                (logits - y)?.sqr()?.sum_all()?
            } else {
                // max(x, 0) - x·y + log(1 + exp(-|x|)): BCE with logits, stable for any x.
                let x = logits;
                let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
                ((x.relu()? - (x * y)?)? + softplus)?.sum_all()?
            };
            Ok((sum, b * k))
        }
        _ => Err(Error::Data(format!(
            "targets do not fit problem_type {}",
            problem.as_str()
        ))),
    }
}

/// Per-batch targets.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Class index per example.
    Classes(Vec<u32>),
    /// `(b, num_labels)` row-major: multi-hot (multi-label) or values (regression).
    Values(Vec<f32>),
}

/// Accuracy and macro-F1 over predictions and gold labels of `k` classes.
pub fn accuracy_macro_f1(pred: &[u32], gold: &[u32], k: usize) -> (f64, f64) {
    if pred.is_empty() {
        return (0.0, 0.0);
    }
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    let mut f1 = 0.0;
    let mut classes = 0;
    for c in 0..k as u32 {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g == c)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g != c)
            .count() as f64;
        let fn_ = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p != c && **g == c)
            .count() as f64;
        if tp + fp + fn_ == 0.0 {
            // A class absent from both gold and predictions says nothing (sklearn warns too).
            continue;
        }
        classes += 1;
        f1 += 2.0 * tp / (2.0 * tp + fp + fn_);
    }
    (
        correct as f64 / pred.len() as f64,
        if classes > 0 {
            f1 / classes as f64
        } else {
            0.0
        },
    )
}

/// One prediction: a score per label, in id order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    /// The arg-max label (single-label), the labels above 0.5 (multi-label), or none.
    pub labels: Vec<String>,
    /// Probabilities (softmax or sigmoid) per label, or the regression value.
    pub scores: Vec<(String, f32)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ClassInput;

    fn ex(line: u64, label: Label) -> Numbered {
        (
            line,
            ClassExample {
                input: ClassInput::Text {
                    text: "x".into(),
                    text_pair: None,
                },
                label,
            },
        )
    }

    #[test]
    fn discovers_sorts_and_rejects() {
        let s = LabelSet::discover(
            &[
                ex(1, Label::Int(2)),
                ex(2, Label::Int(10)),
                ex(3, Label::Int(0)),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.names, ["0", "2", "10"]);
        let one = LabelSet::discover(
            &[ex(1, Label::Str("a".into())), ex(2, Label::Str("a".into()))],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(one.contains("lines 1-2") && one.contains("\"a\""), "{one}");
        let s = LabelSet::discover(
            &[ex(1, Label::Str("a".into())), ex(2, Label::Str("b".into()))],
            None,
        )
        .unwrap();
        let e = s
            .check(&[ex(7, Label::Str("c".into()))], "valid.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 7") && e.contains("\"c\""), "{e}");
        let r =
            LabelSet::discover(&[ex(1, Label::Float(0.5)), ex(2, Label::Int(1))], None).unwrap();
        assert_eq!(r.problem_type, ProblemType::Regression);
        assert_eq!(r.num_labels(), 1);
        let m = LabelSet::discover(
            &[
                ex(1, Label::List(vec!["x".into(), "y".into()])),
                ex(2, Label::List(vec![])),
            ],
            None,
        )
        .unwrap();
        match m.targets(&[&Label::List(vec!["y".into()])]).unwrap() {
            Targets::Values(v) => assert_eq!(v, [0.0, 1.0]),
            _ => panic!(),
        }
    }

    #[test]
    fn macro_f1_matches_hand_computation() {
        // class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 1 fp 1 fn 0 -> 2/3
        let (acc, f1) = accuracy_macro_f1(&[0, 0, 1, 2, 2], &[0, 1, 1, 2, 0], 3);
        assert!((acc - 0.6).abs() < 1e-12);
        assert!(
            (f1 - (0.5 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12,
            "{f1}"
        );
    }
}
