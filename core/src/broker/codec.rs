//! Commands as bytes inside Raft entries (postcard).

use std::fmt;

use bytes::Bytes;

use super::types::Command;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode a broker command: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

pub fn encode_command(command: &Command) -> Bytes {
    // Serialising an in-memory value to a Vec cannot fail for these plain types; if serde
    // ever reports an error, an empty entry decodes as malformed and is refused on apply.
    Bytes::from(postcard::to_allocvec(command).unwrap_or_default())
}

pub fn decode_command(bytes: &[u8]) -> Result<Command, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
}
