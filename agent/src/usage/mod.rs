//! Device usage from nlbwmon: parsing its outputs, the service behind the
//! `/api/device-usage/*` endpoints, and the daily history kept in SQLite.

pub mod parse;
