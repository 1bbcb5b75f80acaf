//! The traceback of a cancellation or timeout error, taken where it is
//! raised, in one native call.
//!
//! Built in Lua it cost 30–80 µs of every timeout's raise, most of a
//! timeout's overshoot past its deadline: a table per frame from
//! `debug.getinfo`, and from Lua 5.3 on `debug.traceback`'s search of
//! `package.loaded` for each function's name. Here `lua_getinfo` fills one
//! struct per frame and the text is written once.

use std::ffi::{c_char, CStr};
use std::fmt::Write;

use mlua::{ffi, Lua};

/// Frames shown before the rest is cut to `...` (as `luaL_traceback`'s
/// first part).
const MAX_FRAMES: usize = 22;

/// `traceback(library_source)` -> `"stack traceback:\n\t..."`, from the
/// first frame above the library's own (those whose source is
/// `library_source`) that is not the library's: where an interrupt landed,
/// or the user's call of the library's wait.
pub fn traceback(lua: &Lua, library_source: mlua::LuaString) -> mlua::Result<mlua::LuaString> {
    let library = library_source.as_bytes().to_vec();
    let mut text = String::with_capacity(512);
    // SAFETY: the closure runs in mlua's protected call on the calling
    // thread's stack, and calls only `lua_getstack` and `lua_getinfo`,
    // which raise no error for the options given: no Lua error unwinds
    // through the Rust values it holds. The strings `lua_getinfo` points to
    // live at least until the next call on that thread.
    unsafe {
        lua.exec_raw::<()>((), |state| write_traceback(state, &library, &mut text))?;
    }
    lua.create_string(text)
}

/// # Safety
/// `state` is the running thread, on its own OS thread.
unsafe fn write_traceback(state: *mut ffi::lua_State, library: &[u8], text: &mut String) {
    // SAFETY (whole function): a zeroed `lua_Debug` is what `lua_getstack`
    // expects to fill; `lua_getinfo` then sets every field read here, and
    // its string fields are null or NUL-terminated.
    let mut ar: ffi::lua_Debug = std::mem::zeroed();
    let mut level = 0;
    // First the frames of the call that got here (ours and mlua's, in C),
    // then the library's: the first frame after both is the user's.
    let mut in_library = false;
    loop {
        if ffi::lua_getstack(state, level, &mut ar) == 0 {
            break;
        }
        ffi::lua_getinfo(state, c"S".as_ptr(), &mut ar);
        let library_frame = text_of(ar.source) == library || text_of(ar.what) == b"tail";
        if in_library && !library_frame {
            break;
        }
        in_library |= library_frame;
        level += 1;
    }
    text.push_str("stack traceback:");
    let mut frames = 0;
    while ffi::lua_getstack(state, level, &mut ar) != 0 {
        if frames == MAX_FRAMES {
            text.push_str("\n\t...");
            break;
        }
        ffi::lua_getinfo(state, c"Sln".as_ptr(), &mut ar);
        write_frame(&ar, text);
        frames += 1;
        level += 1;
    }
}

/// One line, as `luaL_traceback` writes it (names as `debug.getinfo`
/// gives them).
fn write_frame(ar: &ffi::lua_Debug, text: &mut String) {
    let what = text_of(ar.what);
    if what == b"tail" {
        text.push_str("\n\t(tail call): ?");
        return;
    }
    // SAFETY: `short_src` is a NUL-terminated array that `lua_getinfo` filled.
    let source = unsafe { CStr::from_ptr(ar.short_src.as_ptr()) }.to_string_lossy();
    let _ = if ar.currentline > 0 {
        write!(text, "\n\t{source}:{}: ", ar.currentline)
    } else {
        write!(text, "\n\t{source}: ")
    };
    let name = text_of(ar.name);
    let _ = if !ar.name.is_null() {
        let kind = match text_of(ar.namewhat) {
            b"" => "function".into(),
            kind => String::from_utf8_lossy(kind),
        };
        write!(text, "in {kind} '{}'", String::from_utf8_lossy(name))
    } else if what == b"main" {
        write!(text, "in main chunk")
    } else if what == b"C" {
        write!(text, "in ?")
    } else {
        write!(text, "in function <{source}:{}>", ar.linedefined)
    };
}

/// The bytes of a string field of `lua_Debug` (empty if null).
fn text_of<'a>(field: *const c_char) -> &'a [u8] {
    if field.is_null() {
        return b"";
    }
    // SAFETY: non-null string fields of `lua_Debug` are NUL-terminated and
    // live as long as the frame's function (the caller's use is shorter).
    unsafe { CStr::from_ptr(field) }.to_bytes()
}
