//! mxscope demo (being written)
fn main() {}
