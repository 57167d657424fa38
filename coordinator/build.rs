//! Records libtorch's library folder as the binary's run path, so it starts without
//! LD_LIBRARY_PATH on the machine that built it. Containers and Lambda images set the path instead.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{libtorch}/lib");
    }
}
