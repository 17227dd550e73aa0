# Starts busybox acpid so an ACPI power button press (QMP system_powerdown) shuts the guest down: the
# button driver reports the press on an evdev device, and acpid runs /etc/acpi/PWRF/00000080. acpid
# exits at once when it cannot open its log and pid files, so their folders must exist.
mkdir -p /var/log /var/run
acpid
echo "GUEST-ACPID"
