//! The server's end-to-end tests, one module per area, in one test binary: they start
//! the real `loraforge` binary (SQLite, and PostgreSQL when `TEST_DATABASE_URL` is set)
//! and talk to it over HTTP. One binary links once, where thirteen linked thirteen times.

mod common;

mod api;
mod auth;
mod chat;
mod classification;
mod cli_train;
mod dashboard;
mod db_outage;
mod exports;
mod image_classification;
mod jobs;
mod layout;
mod limits;
mod real_model;
mod remote_worker;
mod scale_out;
mod speech;
mod text_to_image;
