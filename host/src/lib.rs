pub mod bindings;
pub mod capabilities;
pub mod config;
pub mod model;
pub mod runtime;
