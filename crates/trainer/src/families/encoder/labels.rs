//! The label sets of sequence classification: the shared [`crate::classes`] ones, named
//! here as well for the encoder family's users.

pub use crate::classes::{
    check_files, parse_numbered, read_numbered, LabelSet, Numbered, LABELS_FILE,
};
