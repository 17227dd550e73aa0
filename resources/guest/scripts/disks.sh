# Lists the block devices the guest found, one line each: name, size in 512-byte sectors, read-only.
for d in /sys/block/vd*; do
  [ -e "$d" ] || continue
  echo "GUEST-DISK $(basename "$d") sectors=$(cat "$d/size") ro=$(cat "$d/ro")"
done
echo "GUEST-DISKS-DONE"
