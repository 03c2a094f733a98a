//! The shell: the I/O driver of holdfast-core (the mio server and CLI arrive with their own issue).
