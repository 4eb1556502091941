//! The library part of mxscopectl: the bounce explainer, usable without the command line (the
//! `mxscopectl bounce` command in the binary prints what it reads).

pub mod bounce;
