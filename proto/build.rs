//! Generates the tonic/prost code for `gradcast.proto` at build time, with the
//! `protoc` binary shipped by the `protoc-bin-vendored` crate, so no system
//! protobuf compiler is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    println!("cargo:rerun-if-changed=gradcast.proto");
    tonic_prost_build::configure()
        .bytes(".gradcast.v1")
        .compile_protos(&["gradcast.proto"], &["."])?;
    Ok(())
}
