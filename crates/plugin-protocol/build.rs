//! Generates the gRPC code from `proto/` with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [
        root.join("io/cloudevents/v1/cloudevents.proto"),
        root.join("mycelium/function/v1/function.proto"),
        root.join("plugin/grpc_controller.proto"),
        root.join("plugin/grpc_stdio.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    // The build script runs single-threaded before any other code of ours.
    unsafe_env_protoc(&protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &[root, well_known])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env_protoc(protoc: &std::path::Path) {
    // SAFETY: no other thread exists in this build script.
    unsafe { std::env::set_var("PROTOC", protoc) };
}
