# Reboots the guest at once; the VMM under test ends on a reboot, as QEMU does with -no-reboot.
echo "GUEST-REBOOT"
reboot -f
