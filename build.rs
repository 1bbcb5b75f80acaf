// A Lua module gets the Lua C API from the interpreter that loads it.
// Linux and the BSDs allow undefined symbols in a shared object by default;
// macOS needs to be told.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo:rustc-cdylib-link-arg=-undefined");
        println!("cargo:rustc-cdylib-link-arg=dynamic_lookup");
    }
}
