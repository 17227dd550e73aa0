# Powers the guest off at once (ACPI S5 where the VMM describes it).
echo "GUEST-POWEROFF"
poweroff -f
