//! Compiles `proto/counters.proto` with protox (no `protoc` needed): the messages always, the
//! gRPC server and client with the `service` feature.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/counters.proto");
    let fds = protox::compile(["counters.proto"], ["proto"])?;
    let service = std::env::var_os("CARGO_FEATURE_SERVICE").is_some();
    tonic_prost_build::configure()
        .build_server(service)
        .build_client(service)
        .build_transport(service)
        .compile_fds(fds)?;
    Ok(())
}
