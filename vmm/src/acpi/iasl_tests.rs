//! Checks the tables with ACPICA's `iasl` (Debian package acpica-tools).
