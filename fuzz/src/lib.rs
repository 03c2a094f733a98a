//! Fuzz entry points shared by the cargo-fuzz targets and the stable corpus replay.
