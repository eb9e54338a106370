//! Per-CPU hotplug thread registry (placeholder; see ../shared/design/smpboot-spec.md).
