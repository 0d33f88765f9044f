//! Training (stages 5-6): the TTT objective, the optimizer, checkpoints and the loop.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod setup;
pub mod trainer;
pub mod ttt;
