//! Code generated from `proto/` by tonic-prost-build: the only protobuf types in Mycelium.
//! Modules mirror the protobuf packages, which the generated cross-references rely on.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod io {
    pub mod cloudevents {
        pub mod v1 {
            tonic::include_proto!("io.cloudevents.v1");
        }
    }
}

pub mod mycelium {
    pub mod function {
        pub mod v1 {
            tonic::include_proto!("mycelium.function.v1");
        }
    }
}

pub mod plugin {
    tonic::include_proto!("plugin");
}

pub use io::cloudevents::v1 as cloudevents;
pub use mycelium::function::v1 as function;
pub use plugin as go_plugin;
