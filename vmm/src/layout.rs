//! The guest physical memory map and the fixed device addresses.
//!
//! One place for every address the VMM, the boot code and the ACPI tables
//! agree on. Nothing here talks to KVM.

/// Where the GDT is written for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written for the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`boot_params`) of the 64-bit boot protocol, or PVH's start_info.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPTE, PDE.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, first 1 GiB identity-mapped).
pub const PDE_START: u64 = 0xb000;
/// PVH memory map entries (after start_info).
pub const PVH_MEMMAP_START: u64 = 0x7800;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// End of conventional low memory (start of the EBDA).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables: the RSDP and every table after it live in the BIOS
/// read-only area, which Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte of high memory: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: guest RAM above this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = 0x4000_0000;
/// First byte above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// The ACPI CPU hotplug register block (MMIO, 12 bytes used).
pub const CPU_HOTPLUG_MMIO_BASE: u64 = 0xd000_0000;
/// Size reserved for the CPU hotplug register block.
pub const CPU_HOTPLUG_MMIO_SIZE: u64 = 0x1000;
/// The Generic Event Device's event register (MMIO, 4 bytes used).
pub const GED_MMIO_BASE: u64 = 0xd000_1000;
/// Size reserved for the GED.
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// GSI of the GED interrupt (edge, active high, through the IOAPIC).
pub const GED_GSI: u32 = 5;
/// The agent mailbox (`api::mailbox`): memory shared with the guest agent,
/// in the MMIO hole, absent from e820 and ACPI.
pub const AGENT_MAILBOX_BASE: u64 = api::mailbox::MAILBOX_GPA;
/// Size of the agent mailbox.
pub const AGENT_MAILBOX_SIZE: usize = api::mailbox::MAILBOX_SIZE;
const _: () = assert!(
    AGENT_MAILBOX_BASE >= GED_MMIO_BASE + GED_MMIO_SIZE
        && AGENT_MAILBOX_BASE + AGENT_MAILBOX_SIZE as u64 <= IOAPIC_START
);

/// ACPI power device: sleep control register (FADT SLEEP_CONTROL_REG), I/O port.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI power device: sleep status register (FADT SLEEP_STATUS_REG), I/O port.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT RESET_REG), I/O port.
pub const ACPI_RESET_PORT: u16 = 0x604;
/// Value the guest writes to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// Console UART (COM1, ttyS0).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt.
pub const COM1_GSI: u32 = 4;
/// Agent channel UART (COM2, ttyS1).
pub const COM2_PORT: u16 = 0x2f8;
/// COM2 interrupt.
pub const COM2_GSI: u32 = 3;

/// IOAPIC MMIO base (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base (in-kernel irqchip).
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS, three pages just below the BIOS area at the top of 4 GiB.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// i8042 command/status port: writing 0xFE pulses the CPU reset line
/// (Linux's fallback reboot after the FADT reset register).
pub const I8042_COMMAND_PORT: u16 = 0x64;
