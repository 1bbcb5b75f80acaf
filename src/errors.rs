//! Error names shared with the Lua side: each holds its own full name, so
//! that `err:match(mtint.error.X)` works on the messages raised.

pub const INTERRUPTED: &str = "mtint.error.interrupted";
pub const NOT_SUPPORTED: &str = "mtint.error.not_supported";
pub const UNKNOWN_OBJECT: &str = "mtint.error.unknown_object";
