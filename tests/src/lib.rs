//! Repository-wide tests live in `tests/`.
